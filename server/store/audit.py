"""The audit trail read back: the ``inquiries`` log and the ``notifications`` inbox, page by page."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg


@dataclass(frozen=True, slots=True)
class InquiryRecord:
    payment_code: str
    request_id: str
    client_id: str
    channel: str
    outcome: str
    invoice_number: str | None
    amount: int | None
    http_status: int
    response_body: bytes
    received_at: datetime


@dataclass(frozen=True, slots=True)
class NotificationRecord:
    id: int
    payment_code: str
    client_id: str
    request_id: str
    headers: Any  # the jsonb as stored, whatever its shape
    body: bytes
    transaction_status: str | None
    outcome: str
    received_at: datetime
    payment_id: int | None
    kind: str | None
    reason: str | None


InquiryCursor = tuple[datetime, str, str]  # (received_at, payment_code, request_id) of the last row shown


async def inquiries(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    payment_code: str | None,
    since: datetime | None,
    after: InquiryCursor | None,
    limit: int,
) -> list[InquiryRecord]:
    """Inquiries in (received_at, payment_code, request_id) order, after the cursor (keyset)."""
    rows = await conn.fetch(
        """
        SELECT payment_code, request_id, client_id, channel, outcome, invoice_number, amount, http_status,
               response_body, received_at
          FROM inquiries
         WHERE ($1::text IS NULL OR payment_code = $1)
           AND ($2::timestamptz IS NULL OR received_at >= $2)
           AND ($3::timestamptz IS NULL OR (received_at, payment_code, request_id) > ($3, $4::text, $5::text))
         ORDER BY received_at, payment_code, request_id
         LIMIT $6
        """,
        payment_code,
        since,
        *(after or (None, None, None)),
        limit,
    )
    return [InquiryRecord(**dict(row)) for row in rows]


async def notifications(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    payment_code: str | None,
    outcome: str | None,
    after: int | None,
    limit: int,
) -> list[NotificationRecord]:
    """Inbox rows in id order after ``after``, each with the payment it made (if any)."""
    rows = await conn.fetch(
        """
        SELECT n.id, n.payment_code, n.client_id, n.request_id, n.headers, n.body, n.transaction_status,
               n.outcome, n.received_at, p.id AS payment_id, p.kind, p.reason
          FROM notifications n
          -- The payment it made, looked up for each row of the page (payments_notification_id_idx):
          -- a join planned over both tables read payments in notification order from the first one.
          LEFT JOIN LATERAL (SELECT id, kind, reason FROM payments
                              WHERE notification_id = n.id AND payment_code = n.payment_code
                              LIMIT 1) p ON true
         WHERE ($1::text IS NULL OR n.payment_code = $1)
           AND ($2::text IS NULL OR n.outcome = $2)
           AND ($3::bigint IS NULL OR n.id > $3)
         ORDER BY n.id
         LIMIT $4
        """,
        payment_code,
        outcome,
        after,
        limit,
    )
    return [NotificationRecord(**dict(row)) for row in rows]
