"""The ``payments`` table: one row per store transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from server.core.codes import PaymentCode
from server.core.payments import Payment, PaymentDecision, PaymentHistory, PaymentNotice
from server.store import codes as code_store
from server.store import inbox, reconciliation

COLUMNS = (
    "id, payment_code, invoice_number, transaction_ref, kind, reason, amount, expected_amount, client_id, "
    "channel, agent_id, agent_store_id, agent_trx_id, paid_at, notification_id, source, recorded_at"
)


_COLUMN_NAMES = COLUMNS.split(", ")


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


_LOCK_AND_READ = f"""
SELECT {code_store.prefixed_columns("(context.code)", "code_")}, repeat, invoice_paid, quoted_amounts
  FROM dipc_payment_context($1, $2, $3, $4, $5) AS context
"""  # noqa: S608 - constants


async def lock_and_read(
    conn: asyncpg.Connection,
    payment_code: str,
    invoice_number: str,
    transaction_ref: str,
    amount: int,
    *,
    unnamed_ref: str,
) -> tuple[PaymentCode | None, PaymentHistory]:
    """Lock the code's row, then read what is recorded for its invoice: in one round trip, inside the
    caller's transaction, which holds the lock until it ends.

    The function ``dipc_payment_context`` (schemas/migrations/0006_payment_context.sql) reads the history
    in a statement of its own after the lock is held, so it sees whatever the lock holder before us
    committed. The code is None when it is not registered (no row to lock). A repeat is the same
    transaction reference, or the same amount where one side is a Check Status answer that named no
    transaction (``unnamed_ref``, ``check-status:<invoice>``; spec §8 rule 3).
    """
    row = await conn.fetchrow(
        _LOCK_AND_READ, payment_code, invoice_number, transaction_ref, amount, unnamed_ref
    )
    code = code_store.code_from_row(row, "code_") if row["code_payment_code"] is not None else None
    history = PaymentHistory(
        repeat=row["repeat"],
        invoice_paid=row["invoice_paid"],
        quoted_amounts=frozenset(row["quoted_amounts"]),
    )
    return code, history


@dataclass(frozen=True, slots=True)
class Recorded:
    notification_id: int
    payment: Payment | None  # None: this transaction was recorded already (a racing retry)
    counted: PaymentCode | None  # the code after counting a normal payment; None for other kinds


async def record(
    conn: asyncpg.Connection,
    notification: tuple[Any, ...],
    notice: PaymentNotice,
    decision: PaymentDecision,
) -> Recorded:
    """Store the notification (``inbox.values``) and record the payment it tells of, in one statement.

    The same statement counts a normal payment on its code (codes.COUNT_PAYMENT) and settles the
    invoice's reconciliation row (any payment stops reconciliation asking DOKU about it). Run it holding
    the code's row lock. When this transaction is recorded already (a racing retry) only the inbox row is
    written, as for every notification. Only the payment's own identity is a tolerated conflict: a second
    normal payment for one invoice violates ``payments_one_normal_idx`` and raises, so it can never pass
    silently.
    """
    recorded = (
        "(SELECT id, source, kind, payment_code, invoice_number FROM payments"
        " UNION ALL SELECT id, source, kind, payment_code, invoice_number FROM payment)"
    )
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
        ),
        counted AS (
            {code_store.COUNT_PAYMENT}
             WHERE payment_code = $9 AND EXISTS (SELECT 1 FROM payment WHERE kind = 'normal')
            RETURNING *
        ),
        settled AS (
            {reconciliation.settle_statement("$9", "$10", recorded)}
               AND EXISTS (SELECT 1 FROM payment)
        )
        SELECT inbox.id AS inbox_id, payment.*, {code_store.prefixed_columns("counted", "code_")}
          FROM inbox LEFT JOIN payment ON true LEFT JOIN counted ON true
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
    payment = Payment(**{name: row[name] for name in _COLUMN_NAMES}) if row["id"] is not None else None
    counted = code_store.code_from_row(row, "code_") if row["code_payment_code"] is not None else None
    return Recorded(row["inbox_id"], payment, counted)
