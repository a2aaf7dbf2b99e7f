"""The ``payments`` table: one row per store transaction."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from server.core.payments import Payment

COLUMNS = (
    "id, payment_code, invoice_number, transaction_ref, kind, reason, amount, expected_amount, client_id, "
    "channel, agent_id, agent_store_id, agent_trx_id, paid_at, notification_id, recorded_at"
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
