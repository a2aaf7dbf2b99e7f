"""The ``payment_resolutions`` table, and the exception queue read from ``payments`` beside it."""

from __future__ import annotations

import asyncpg

from server.core.payments import Payment
from server.core.resolutions import PaymentResolution, ResolutionRequest
from server.store.payments import COLUMNS as PAYMENT_COLUMNS
from server.store.payments import payment_from_row

RESOLUTION_COLUMNS = (
    "payment_code, payment_id, resolution, resolved_by, note, reference, code_paid, resolved_at"
)
_PAYMENT_NAMES = PAYMENT_COLUMNS.split(", ")
_RESOLUTION_NAMES = RESOLUTION_COLUMNS.split(", ")


def _resolution(row: asyncpg.Record, prefix: str = "") -> PaymentResolution | None:
    if row[f"{prefix}payment_id"] is None:
        return None
    return PaymentResolution(**{name: row[f"{prefix}{name}"] for name in _RESOLUTION_NAMES})


async def get_payment(conn: asyncpg.Connection | asyncpg.Pool, payment_id: int) -> Payment | None:
    row = await conn.fetchrow(
        f"SELECT {PAYMENT_COLUMNS} FROM payments WHERE id = $1",  # noqa: S608 - constant columns
        payment_id,
    )
    return payment_from_row(row) if row else None


async def get(
    conn: asyncpg.Connection | asyncpg.Pool, payment_code: str, payment_id: int
) -> PaymentResolution | None:
    row = await conn.fetchrow(
        f"SELECT {RESOLUTION_COLUMNS} FROM payment_resolutions "  # noqa: S608 - constant columns
        "WHERE payment_code = $1 AND payment_id = $2",
        payment_code,
        payment_id,
    )
    return _resolution(row) if row else None


async def insert(
    conn: asyncpg.Connection, payment: Payment, request: ResolutionRequest, *, code_paid: bool
) -> PaymentResolution | None:
    """Record the resolution; None when the payment has one already (which stays as it is)."""
    row = await conn.fetchrow(
        f"""
        INSERT INTO payment_resolutions (payment_code, payment_id, resolution, resolved_by, note,
                                         reference, code_paid)
        VALUES ($1, $2, $3, $4, $5, $6, $7)
        ON CONFLICT (payment_code, payment_id) DO NOTHING
        RETURNING {RESOLUTION_COLUMNS}
        """,  # noqa: S608 - constant columns
        payment.payment_code,
        payment.id,
        request.resolution.value,
        request.resolved_by,
        request.note,
        request.reference,
        code_paid,
    )
    return _resolution(row) if row else None


async def list_page(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    state: str | None,
    kind: str | None,
    reason: str | None,
    after: int | None,
    limit: int,
) -> list[tuple[Payment, PaymentResolution | None]]:
    """Exceptions in payment-id order after ``after``; open ones have no resolution."""
    payment_columns = ", ".join(f"p.{name}" for name in _PAYMENT_NAMES)
    resolution_columns = ", ".join(f"r.{name} AS r_{name}" for name in _RESOLUTION_NAMES)
    rows = await conn.fetch(
        f"""
        SELECT {payment_columns}, {resolution_columns}
          FROM payments p
          LEFT JOIN payment_resolutions r ON r.payment_code = p.payment_code AND r.payment_id = p.id
         WHERE p.kind <> 'normal'
           AND ($1::text IS NULL OR ($1 = 'open') = (r.payment_id IS NULL))
           AND ($2::text IS NULL OR p.kind = $2)
           AND ($3::text IS NULL OR p.reason = $3)
           AND ($4::bigint IS NULL OR p.id > $4)
         ORDER BY p.id
         LIMIT $5
        """,  # noqa: S608 - constant columns
        state,
        kind,
        reason,
        after,
        limit,
    )
    return [(Payment(**{name: row[name] for name in _PAYMENT_NAMES}), _resolution(row, "r_")) for row in rows]


async def open_stats(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[dict[tuple[str, str], int], float]:
    """Open exceptions per (kind, reason), and the age in seconds of the oldest (0 when none)."""
    rows = await conn.fetch(
        """
        SELECT p.kind, coalesce(p.reason, '') AS reason, count(*) AS n,
               extract(epoch FROM now() - min(p.recorded_at)) AS oldest
          FROM payments p
         WHERE p.kind <> 'normal'
           AND NOT EXISTS (SELECT 1 FROM payment_resolutions r
                            WHERE r.payment_code = p.payment_code AND r.payment_id = p.id)
         GROUP BY 1, 2
        """
    )
    counts = {(row["kind"], row["reason"]): row["n"] for row in rows}
    oldest = max((float(row["oldest"]) for row in rows), default=0.0)
    return counts, max(oldest, 0.0)
