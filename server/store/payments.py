"""The ``payments`` table: one row per store transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from server.core.payments import Payment, PaymentDecision, PaymentHistory, PaymentNotice
from server.store import inbox

COLUMNS = (
    "id, payment_code, invoice_number, transaction_ref, kind, reason, amount, expected_amount, client_id, "
    "channel, agent_id, agent_store_id, agent_trx_id, paid_at, notification_id, source, recorded_at"
)


def payment_from_row(row: asyncpg.Record) -> Payment:
    return Payment(**dict(row))


async def list_page(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    payment_code: str | None,
    kind: str | None,
    since: datetime | None,
    after: int | None,
    limit: int,
) -> list[Payment]:
    """Up to ``limit`` payments in id order after the cursor ``after`` (keyset pagination)."""
    rows = await conn.fetch(
        f"""
        SELECT {COLUMNS} FROM payments
         WHERE ($1::text IS NULL OR payment_code = $1)
           AND ($2::text IS NULL OR kind = $2)
           AND ($3::timestamptz IS NULL OR recorded_at >= $3)
           AND ($4::bigint IS NULL OR id > $4)
         ORDER BY id
         LIMIT $5
        """,  # noqa: S608 - column list is a constant
        payment_code,
        kind,
        since,
        after,
        limit,
    )
    return [payment_from_row(row) for row in rows]


async def history(
    conn: asyncpg.Connection,
    payment_code: str,
    invoice_number: str,
    transaction_ref: str,
    amount: int,
    *,
    unnamed_ref: str,
) -> PaymentHistory:
    """What is recorded for this code and invoice. Run it after taking the code's row lock, in a
    statement of its own, so its snapshot includes whatever the lock holder before us committed.

    A repeat is the same transaction reference; and, where one side is a Check Status answer that named
    no transaction (``unnamed_ref``, ``check-status:<invoice>``), the same amount for the same invoice:
    such an answer and DOKU's notification of that payment cannot be told apart by reference, and one
    payment must not become a conflict that tells finance to refund it (spec §8 rule 3).
    """
    row = await conn.fetchrow(
        """
        SELECT EXISTS (SELECT 1 FROM payments
                        WHERE payment_code = $1 AND invoice_number = $2
                          AND (transaction_ref = $3
                               OR (amount = $4 AND ($3 = $5 OR transaction_ref = $5)))) AS repeat,
               EXISTS (SELECT 1 FROM payments
                        WHERE payment_code = $1 AND invoice_number = $2 AND kind = 'normal') AS invoice_paid,
               ARRAY(SELECT DISTINCT amount FROM inquiries
                      WHERE payment_code = $1 AND invoice_number = $2 AND amount IS NOT NULL) AS quoted
        """,
        payment_code,
        invoice_number,
        transaction_ref,
        amount,
        unnamed_ref,
    )
    return PaymentHistory(
        repeat=row["repeat"], invoice_paid=row["invoice_paid"], quoted_amounts=frozenset(row["quoted"])
    )


async def insert_with_notification(
    conn: asyncpg.Connection,
    notification: tuple[Any, ...],
    notice: PaymentNotice,
    decision: PaymentDecision,
) -> tuple[int, Payment | None]:
    """Store the notification (``inbox.values``) and record the payment it tells of, in one statement.

    Returns the notification's id, and the payment: None when this transaction is recorded already (a
    racing retry; the inbox row stays, as every notification does). Only the payment's own identity is a
    tolerated conflict: a second normal payment for one invoice violates ``payments_one_normal_idx`` and
    raises, so it can never pass silently.
    """
    row = await conn.fetchrow(
        f"""
        WITH inbox AS ({inbox.INSERT}),
        payment AS (
            INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, reason, amount,
                                  expected_amount, client_id, channel, agent_id, agent_store_id, agent_trx_id,
                                  paid_at, notification_id, source)
            SELECT $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, inbox.id, $8 FROM inbox
            ON CONFLICT (payment_code, invoice_number, transaction_ref) DO NOTHING
            RETURNING {COLUMNS}
        )
        SELECT inbox.id AS inbox_id, payment.* FROM inbox LEFT JOIN payment ON true
        """,  # noqa: S608 - constants
        *notification,  # $1 to $8, the last the source (a notification, or a Check Status answer)
        notice.payment_code,
        notice.invoice_number,
        notice.transaction_ref,
        decision.kind.value,
        decision.reason.value if decision.reason else None,
        notice.amount,
        decision.expected_amount,
        notice.client_id,
        notice.channel,
        notice.agent_id,
        notice.agent_store_id,
        notice.agent_trx_id,
        notice.paid_at,
    )
    record = dict(row)
    notification_id = record.pop("inbox_id")
    return notification_id, (Payment(**record) if record["id"] is not None else None)
