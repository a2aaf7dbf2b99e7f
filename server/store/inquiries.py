"""The ``inquiries`` table: every authenticated inquiry and the exact bytes we answered it with."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from server.core.codes import PaymentCode
from server.store.codes import code_from_row, qualified_columns

_PRIOR_COLUMNS = "payment_code, body_sha256, http_status, response_body, outcome, invoice_number"


@dataclass(frozen=True, slots=True)
class PriorInquiry:
    """An inquiry recorded earlier under the same Request-Id."""

    payment_code: str
    body_sha256: bytes
    http_status: int
    response_body: bytes
    outcome: str
    invoice_number: str | None


def _prior(row: asyncpg.Record, prefix: str = "") -> PriorInquiry:
    return PriorInquiry(
        payment_code=row[f"{prefix}payment_code"],
        body_sha256=row[f"{prefix}body_sha256"],
        http_status=row[f"{prefix}http_status"],
        response_body=row[f"{prefix}response_body"],
        outcome=row[f"{prefix}outcome"],
        invoice_number=row[f"{prefix}invoice_number"],
    )


# One round trip: the code (if any) and any earlier inquiry with this Request-Id, preferring one for
# the same code. Both probes are index lookups.
_LOOKUP = f"""
SELECT {qualified_columns("c")},
       {", ".join(f"p.{column} AS prior_{column}" for column in _PRIOR_COLUMNS.split(", "))}
  FROM (SELECT 1) AS one
  LEFT JOIN payment_codes c ON c.payment_code = $1
  LEFT JOIN LATERAL (
        SELECT {_PRIOR_COLUMNS} FROM inquiries
         WHERE request_id = $2
         ORDER BY payment_code = $1 DESC
         LIMIT 1
  ) p ON true
"""  # noqa: S608 - built from constants


async def lookup(
    conn: asyncpg.Connection | asyncpg.Pool, payment_code: str, request_id: str
) -> tuple[PaymentCode | None, PriorInquiry | None]:
    row = await conn.fetchrow(_LOOKUP, payment_code, request_id)
    code = code_from_row(row) if row["payment_code"] is not None else None
    prior = _prior(row, "prior_") if row["prior_payment_code"] is not None else None
    return code, prior


_RECORD = """
WITH inquiry AS (
    INSERT INTO inquiries (payment_code, request_id, client_id, channel, body_sha256, outcome,
                           invoice_number, amount, http_status, response_body)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
    ON CONFLICT (payment_code, request_id) DO NOTHING
    RETURNING payment_code, invoice_number, client_id, channel, amount
), quote AS (
    -- A quoted invoice is reconciled until it is paid (spec §8). A quote of an invoice whose
    -- reconciliation had ended (given up, expired, settled by an anomaly only) means the customer may
    -- pay it now: it starts again. Not one paid by a normal payment: only an inquiry that decided
    -- before that payment committed can quote it, and reopening would drop its settlement.
    INSERT INTO reconciliation (payment_code, invoice_number, client_id, channel, amount, next_check_at)
    SELECT payment_code, invoice_number, client_id, channel, amount, now() + make_interval(secs => $11)
      FROM inquiry
     WHERE invoice_number IS NOT NULL
    ON CONFLICT (payment_code, invoice_number) DO UPDATE
       SET state = 'pending', attempts = 0, first_quoted_at = now(), amount = EXCLUDED.amount,
           next_check_at = EXCLUDED.next_check_at, payment_id = NULL, settled_by = NULL, updated_at = now()
     WHERE reconciliation.state <> 'pending'
       AND NOT (reconciliation.state = 'paid'
                AND EXISTS (SELECT 1 FROM payments p
                             WHERE p.payment_code = reconciliation.payment_code
                               AND p.invoice_number = reconciliation.invoice_number
                               AND p.kind = 'normal'))
)
SELECT true FROM inquiry
"""


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    payment_code: str,
    request_id: str,
    client_id: str,
    channel: str,
    body_sha256: bytes,
    outcome: str,
    invoice_number: str | None,
    amount: int | None,
    http_status: int,
    response_body: bytes,
    first_check_s: float,
) -> bool:
    """Record an answered inquiry, and the invoice it quoted for reconciliation, in one statement.

    False when a concurrent twin with the same Request-Id got there first (and recorded both).
    """
    inserted = await conn.fetchval(
        _RECORD,
        payment_code,
        request_id,
        client_id,
        channel,
        body_sha256,
        outcome,
        invoice_number,
        amount,
        http_status,
        response_body,
        first_check_s,
    )
    return bool(inserted)


async def get(conn: asyncpg.Connection | asyncpg.Pool, payment_code: str, request_id: str) -> PriorInquiry:
    row = await conn.fetchrow(
        f"SELECT {_PRIOR_COLUMNS} FROM inquiries WHERE payment_code = $1 AND request_id = $2",  # noqa: S608
        payment_code,
        request_id,
    )
    return _prior(row)
