"""The ``notifications`` inbox: every verified notification, raw, in the transaction of its effect."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from server.core.payments import NotificationOutcome


async def insert(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    payment_code: str,
    client_id: str,
    request_id: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    transaction_status: str | None,
    outcome: NotificationOutcome,
    source: str = "notification",
) -> int:
    """Store one notification exactly as received; return its id."""
    notification_id: int = await conn.fetchval(
        """
        INSERT INTO notifications (payment_code, client_id, request_id, headers, body,
                                   transaction_status, outcome, source)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        RETURNING id
        """,
        payment_code,
        client_id,
        request_id,
        [list(pair) for pair in headers],
        body,
        transaction_status,
        outcome.value,
        source,
    )
    return notification_id


async def set_outcome(
    conn: asyncpg.Connection, payment_code: str, notification_id: int, outcome: NotificationOutcome
) -> None:
    await conn.execute(
        "UPDATE notifications SET outcome = $3 WHERE payment_code = $1 AND id = $2",
        payment_code,
        notification_id,
        outcome.value,
    )
