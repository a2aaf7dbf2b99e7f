"""The ``reconciliation`` table: quoted invoices without a payment, and when DOKU is asked about them.

A row is written by the statement that records the quoting inquiry (``store/inquiries.py``), closed by
the transaction that records a payment for its invoice (:func:`settle`), and checked by reconcilers,
which claim due rows with ``FOR UPDATE SKIP LOCKED`` and a lease (``lease_until``, ``lease_token``): no
row is checked by two processes at once, and a crashed process's lease simply runs out.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from server.store import counts

COLUMNS = (
    "payment_code, invoice_number, client_id, channel, amount, state, first_quoted_at, attempts, "
    "timeouts_in_a_row, next_check_at, last_checked_at, last_result, last_detail, payment_id, settled_by, "
    "updated_at"
)


@dataclass(frozen=True, slots=True)
class QuotedInvoice:
    """An invoice an inquiry quoted, and where its reconciliation stands."""

    payment_code: str
    invoice_number: str
    client_id: str
    channel: str
    amount: int
    state: str  # pending, paid, expired, gave_up
    first_quoted_at: datetime
    attempts: int
    timeouts_in_a_row: int  # calls about it in a row that got no answer in time (migration 0017)
    next_check_at: datetime | None
    last_checked_at: datetime | None
    last_result: str | None
    last_detail: str | None
    payment_id: int | None
    settled_by: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Claimed:
    """A row this process holds the lease on: only the holder of ``token`` records its result."""

    invoice: QuotedInvoice
    token: uuid.UUID


def _invoice(row: asyncpg.Record) -> QuotedInvoice:
    return QuotedInvoice(**{name: row[name] for name in COLUMNS.split(", ")})


def _claimed(rows: list[asyncpg.Record]) -> list[Claimed]:
    return [Claimed(_invoice(row), row["lease_token"]) for row in rows]


async def take_rate_budget(conn: asyncpg.Connection, *, rps: float, want: int) -> int:
    """Take up to ``want`` calls from the budget all reconcilers share; return how many were granted.

    A token bucket in one row, refilled at ``rps`` and holding at most one second's worth. The row lock
    serialises claimers for the few milliseconds of their claim. Call inside the claim's transaction.
    """
    burst = max(rps, 1.0)
    available = await conn.fetchval(
        """
        SELECT least($2::float8, tokens + $1::float8 * extract(epoch FROM clock_timestamp() - refilled_at))
          FROM reconciliation_rate FOR UPDATE
        """,
        rps,
        burst,
    )
    if available is None:  # the row is gone (a restore without it): start with a full bucket
        await conn.execute(
            "INSERT INTO reconciliation_rate (tokens) VALUES ($1) ON CONFLICT DO NOTHING", burst
        )
        available = burst
    granted = max(0, min(want, int(available)))
    await conn.execute(
        "UPDATE reconciliation_rate SET tokens = $1, refilled_at = clock_timestamp()", available - granted
    )
    return granted


async def slow_down(conn: asyncpg.Connection | asyncpg.Pool, *, rps: float, seconds: float) -> None:
    """DOKU said 429 or 5xx: empty the shared bucket so that no reconciler calls for ``seconds``."""
    await conn.execute(
        "UPDATE reconciliation_rate SET tokens = least(tokens, $1::float8), refilled_at = clock_timestamp()",
        -rps * seconds,
    )


async def claim_due(pool: asyncpg.Pool, *, limit: int, lease_s: float, rps: float) -> list[Claimed]:
    """Lease up to ``limit`` due invoices, as many as the shared rate budget allows right now."""
    async with pool.acquire() as conn, conn.transaction():
        granted = await take_rate_budget(conn, rps=rps, want=limit)
        if not granted:
            return []
        rows = await conn.fetch(
            f"""
            WITH due AS (
                SELECT payment_code, invoice_number FROM reconciliation
                 WHERE state = 'pending' AND next_check_at <= now()
                   AND (lease_until IS NULL OR lease_until <= now())
                 ORDER BY next_check_at
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED
            )
            UPDATE reconciliation r
               SET lease_until = now() + make_interval(secs => $2), lease_token = gen_random_uuid()
              FROM due
             WHERE r.payment_code = due.payment_code AND r.invoice_number = due.invoice_number
            RETURNING {", ".join(f"r.{column}" for column in COLUMNS.split(", "))}, r.lease_token
            """,  # noqa: S608 - column list is a constant
            granted,
            lease_s,
        )
        if len(rows) < granted:  # hand back what nobody used
            await conn.execute(
                "UPDATE reconciliation_rate SET tokens = tokens + $1::float8", float(granted - len(rows))
            )
        return _claimed(rows)


async def claim(
    conn: asyncpg.Connection | asyncpg.Pool, payment_code: str, invoice_number: str, *, lease_s: float
) -> Claimed | None:
    """Lease one invoice to check it now, whatever its schedule; None when it is paid or leased."""
    rows = await conn.fetch(
        f"""
        UPDATE reconciliation
           SET lease_until = now() + make_interval(secs => $3), lease_token = gen_random_uuid()
         WHERE payment_code = $1 AND invoice_number = $2 AND state <> 'paid'
           AND (lease_until IS NULL OR lease_until <= now())
        RETURNING {COLUMNS}, lease_token
        """,  # noqa: S608 - column list is a constant
        payment_code,
        invoice_number,
        lease_s,
    )
    claimed = _claimed(rows)
    return claimed[0] if claimed else None


async def record_check(
    conn: asyncpg.Connection | asyncpg.Pool,
    claimed: Claimed,
    *,
    result: str,
    detail: str,
    state: str,
    next_check_at: datetime | None,
    counted: bool,
    timeouts_in_a_row: int,
) -> QuotedInvoice | None:
    """Write what a check found and end the lease; None when the lease was lost meanwhile.

    A row that became paid meanwhile (a notification, or this very check's payment) stays paid. One
    quoted again meanwhile (an inquiry reopened its reconciliation, from a new first quote) keeps the
    state, schedule and counts it has since: ``state``, ``next_check_at`` and ``timeouts_in_a_row``
    were computed from the row as claimed.
    """
    row = await conn.fetchrow(
        f"""
        UPDATE reconciliation
           SET attempts = attempts + CASE WHEN first_quoted_at = $9 THEN $4::int ELSE 0 END,
               timeouts_in_a_row = CASE WHEN state = 'paid' THEN 0
                                        WHEN first_quoted_at = $9 THEN $10::int
                                        ELSE timeouts_in_a_row END,
               last_checked_at = now(), last_result = $5, last_detail = $6,
               state = CASE WHEN state = 'paid' OR first_quoted_at <> $9 THEN state ELSE $7 END,
               next_check_at = CASE WHEN state = 'paid' THEN NULL
                                    WHEN first_quoted_at <> $9 THEN next_check_at
                                    ELSE $8::timestamptz END,
               lease_until = NULL, lease_token = NULL, updated_at = now()
         WHERE payment_code = $1 AND invoice_number = $2 AND lease_token = $3
        RETURNING {COLUMNS}
        """,  # noqa: S608 - column list is a constant
        claimed.invoice.payment_code,
        claimed.invoice.invoice_number,
        claimed.token,
        1 if counted else 0,
        result,
        detail[:500],
        state,
        next_check_at,
        claimed.invoice.first_quoted_at,
        timeouts_in_a_row,
    )
    return _invoice(row) if row else None


def settle_statement(
    payment_code: str, invoice_number: str, recorded: str = "payments", *, source: str | None = None
) -> str:
    """The UPDATE that closes an invoice's row as paid by the payment recorded for it (a normal one
    first). ``payment_code`` and ``invoice_number`` are the statement's placeholders for them, or columns
    of ``source``, a FROM item with the invoices to settle; ``recorded`` is where the payments are read
    from (payments.record adds the ones it is inserting).
    """
    return f"""
        UPDATE reconciliation r
           SET state = 'paid', next_check_at = NULL, payment_id = p.id, settled_by = p.source,
               timeouts_in_a_row = 0, updated_at = now()
          FROM {f"{source} CROSS JOIN LATERAL" if source else ""}
               (SELECT id, source FROM {recorded} recorded
                 WHERE recorded.payment_code = {payment_code} AND recorded.invoice_number = {invoice_number}
                 ORDER BY recorded.kind = 'normal' DESC, recorded.id
                 LIMIT 1) p
         WHERE r.payment_code = {payment_code} AND r.invoice_number = {invoice_number} AND r.state <> 'paid'
        """  # noqa: S608 - built from placeholders and table names


async def settle(conn: asyncpg.Connection, payment_code: str, invoice_number: str) -> None:
    """Close the invoice's row as paid by the payment recorded for it (a normal one first).

    Run after a check that found one (a notification's payment settles in payments.record).
    """
    await conn.execute(settle_statement("$1", "$2"), payment_code, invoice_number)


async def get(
    conn: asyncpg.Connection | asyncpg.Pool, payment_code: str, invoice_number: str
) -> QuotedInvoice | None:
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM reconciliation WHERE payment_code = $1 AND invoice_number = $2",  # noqa: S608
        payment_code,
        invoice_number,
    )
    return _invoice(row) if row else None


async def find_invoice(conn: asyncpg.Connection | asyncpg.Pool, invoice_number: str) -> list[QuotedInvoice]:
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM reconciliation WHERE invoice_number = $1 ORDER BY payment_code",  # noqa: S608
        invoice_number,
    )
    return [_invoice(row) for row in rows]


async def codes_quoting(conn: asyncpg.Connection | asyncpg.Pool, client_id: str, invoice_number: str) -> int:
    """How many of this merchant's codes quoted ``invoice_number`` (rows that retention removed aside)."""
    return await conn.fetchval(
        "SELECT count(*) FROM reconciliation WHERE invoice_number = $1 AND client_id = $2",
        invoice_number,
        client_id,
    )


# How many invoices check_soon makes due in one transaction: the longest an inquiry quoting one of them
# again, or a payment of one, waits for it is one such chunk.
CHECK_SOON_CHUNK = 1000


async def check_soon(pool: asyncpg.Pool, since: datetime) -> int:
    """Make every unsettled invoice (pending or gave_up) first quoted at or after ``since`` due now; say
    how many were not due yet.

    In chunks of CHECK_SOON_CHUNK, each its own transaction, taken in the order of
    reconciliation_state_idx: no invoice is held for longer than a chunk, and two of these at once take
    the invoices they share in one order (one statement over all of them held every row until its
    commit, and two took them in their plans' orders: a lock cycle). Invoices due already are left as
    they are, so that a request that ran out of its budget, asked again, goes on where it stopped.
    """
    scheduled = 0
    for state in ("pending", "gave_up"):
        after: tuple[datetime, str, str] = (since, "", "")  # first_quoted_at >= since: every code is > ''
        while True:
            rows = await pool.fetch(
                """
                WITH chunk AS (
                    SELECT payment_code, invoice_number FROM reconciliation
                     WHERE state = $1 AND (first_quoted_at, payment_code, invoice_number) > ($2, $3, $4)
                       AND (next_check_at IS NULL OR next_check_at > now())
                     ORDER BY first_quoted_at, payment_code, invoice_number
                     LIMIT $5
                       FOR UPDATE
                )
                UPDATE reconciliation r SET state = 'pending', next_check_at = now(), updated_at = now()
                  FROM chunk
                 WHERE r.payment_code = chunk.payment_code AND r.invoice_number = chunk.invoice_number
                RETURNING r.first_quoted_at, r.payment_code, r.invoice_number
                """,
                state,
                *after,
                CHECK_SOON_CHUNK,
            )
            scheduled += len(rows)
            if len(rows) < CHECK_SOON_CHUNK:
                break
            after = max(tuple(row) for row in rows)
    return scheduled


async def due_within(
    conn: asyncpg.Connection | asyncpg.Pool, since: datetime, *, limit: int
) -> list[QuotedInvoice]:
    """``limit`` unsettled invoices first quoted at or after ``since`` (a check by hand): those checked
    least recently, never checked first, then the oldest quotes. A run after one that stopped at its
    limit goes on to the others."""
    rows = await conn.fetch(
        f"""
        SELECT {COLUMNS} FROM reconciliation
         WHERE state IN ('pending', 'gave_up') AND first_quoted_at >= $1
         ORDER BY last_checked_at NULLS FIRST, first_quoted_at, payment_code, invoice_number
         LIMIT $2
        """,  # noqa: S608 - column list is a constant
        since,
        limit,
    )
    return [_invoice(row) for row in rows]


async def due_now(conn: asyncpg.Connection | asyncpg.Pool, *, limit: int) -> list[QuotedInvoice]:
    """The first ``limit`` pending invoices whose scheduled check is due, in the order they fell due."""
    rows = await conn.fetch(
        f"""
        SELECT {COLUMNS} FROM reconciliation
         WHERE state = 'pending' AND next_check_at <= now()
         ORDER BY next_check_at
         LIMIT $1
        """,  # noqa: S608 - column list is a constant
        limit,
    )
    return [_invoice(row) for row in rows]


async def next_due(conn: asyncpg.Connection | asyncpg.Pool) -> datetime | None:
    """When the earliest unleased pending invoice is due (an index scan of one row)."""
    return await conn.fetchval(
        """
        SELECT next_check_at FROM reconciliation
         WHERE state = 'pending' AND (lease_until IS NULL OR lease_until <= now())
         ORDER BY next_check_at
         LIMIT 1
        """
    )


async def release(conn: asyncpg.Connection | asyncpg.Pool, claimed: Claimed) -> None:
    """Give a claimed invoice back at once (this process stops before its check finished)."""
    await conn.execute(
        "UPDATE reconciliation SET lease_until = NULL, lease_token = NULL "
        "WHERE payment_code = $1 AND invoice_number = $2 AND lease_token = $3",
        claimed.invoice.payment_code,
        claimed.invoice.invoice_number,
        claimed.token,
    )


async def list_page(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    state: str | None,
    after: tuple[datetime, str, str] | None,
    limit: int,
) -> list[QuotedInvoice]:
    """Up to ``limit`` invoices in order of their first quote, after the keyset cursor ``after``."""
    quoted_at, code, invoice = after if after else (None, None, None)
    rows = await conn.fetch(
        f"""
        SELECT {COLUMNS} FROM reconciliation
         WHERE ($1::text IS NULL OR state = $1)
           AND ($2::timestamptz IS NULL
                OR (first_quoted_at, payment_code, invoice_number) > ($2, $3::text, $4::text))
         ORDER BY first_quoted_at, payment_code, invoice_number
         LIMIT $5
        """,  # noqa: S608 - column list is a constant
        state,
        quoted_at,
        code,
        invoice,
        limit,
    )
    return [_invoice(row) for row in rows]


# What the sampler runs (counts.py says why the counts are bounded); by name, for EXPLAIN ANALYZE
# (bench/backlog_cost.py, tests).
BACKLOG = f"""
    SELECT {counts.bounded("reconciliation", "state = 'pending'")} AS pending,
           {counts.bounded("reconciliation", "state = 'gave_up'")} AS gave_up,
           (SELECT coalesce(extract(epoch FROM now() - min(next_check_at)), 0)
              FROM reconciliation WHERE state = 'pending') AS lag_s
"""  # noqa: S608 - constants
BACKLOG_QUERIES = {"backlog": BACKLOG}


async def backlog(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[dict[str, int], float]:
    """Invoices still pending and given up (paid and expired rows are not counted: they only grow), and
    how many seconds the most overdue pending check is late (0 when none is).

    A count is exact up to counts.EXACT_UP_TO, and PostgreSQL's estimate past it: what costs the same
    at any size (the lag is one index entry).
    """
    row = await conn.fetchrow(BACKLOG)
    states = {
        state: await counts.past_exact(conn, "reconciliation", f"state = '{state}'", row[state])
        for state in ("pending", "gave_up")
    }
    return states, max(float(row["lag_s"]), 0.0)
