"""The ``payment_codes`` table: register, read, change, cancel, list and bulk-import codes."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from server.core.codes import NEW_CODE_COLUMNS, CodeValues, NewCode, PaymentCode
from server.core.outcomes import CodeStatus
from server.core.registration import PATCHABLE_FIELDS

_COLUMN_NAMES = (
    *NEW_CODE_COLUMNS,
    *("status", "paid_count", "invoice_seq", "created_at", "updated_at", "version"),
)
COLUMNS = ", ".join(_COLUMN_NAMES)


def qualified_columns(alias: str) -> str:
    """The code columns as ``alias.column`` for queries that join payment_codes."""
    return ", ".join(f"{alias}.{column}" for column in _COLUMN_NAMES)


def code_from_row(row: asyncpg.Record, prefix: str = "") -> PaymentCode:
    """The code in ``row``, whose columns may carry a ``prefix`` (see :func:`prefixed_columns`)."""
    values = {name: row[f"{prefix}{name}"] for name in _COLUMN_NAMES}
    return PaymentCode(**(values | {"status": CodeStatus(values["status"])}))


def prefixed_columns(alias: str, prefix: str) -> str:
    """The code columns as ``alias.column AS prefixcolumn``, for a row that holds another table's too."""
    return ", ".join(f"{alias}.{column} AS {prefix}{column}" for column in _COLUMN_NAMES)


async def get(conn: asyncpg.Connection, payment_code: str, *, for_update: bool = False) -> PaymentCode | None:
    lock = " FOR UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT {COLUMNS} FROM payment_codes WHERE payment_code = $1{lock}",  # noqa: S608 - constants
        payment_code,
    )
    return code_from_row(row) if row else None


_INSERT = f"""
INSERT INTO payment_codes ({", ".join(NEW_CODE_COLUMNS)})
VALUES ({", ".join(f"${i}" for i in range(1, len(NEW_CODE_COLUMNS) + 1))})
ON CONFLICT (payment_code) DO NOTHING
RETURNING {COLUMNS}
"""  # noqa: S608 - column names are constants


_values: Callable[[NewCode], tuple[Any, ...]] = operator.attrgetter(*NEW_CODE_COLUMNS)


async def insert(conn: asyncpg.Connection, new: NewCode) -> PaymentCode | None:
    """The registered code, or None when the payment code already exists."""
    row = await conn.fetchrow(_INSERT, *_values(new))
    return code_from_row(row) if row else None


async def update(
    conn: asyncpg.Connection, payment_code: str, values: dict[str, Any], expected_version: int | None
) -> PaymentCode | None:
    """Apply a validated change to an active code; None when it is not active or not at that version."""
    assignments = []
    params: list[Any] = [payment_code, expected_version]
    for name, value in values.items():
        if name not in PATCHABLE_FIELDS:  # the names become SQL; only known columns may pass
            raise ValueError(f"{name} is not a patchable column")
        params.append(value)
        assignments.append(f"{name} = ${len(params)}")
    row = await conn.fetchrow(
        f"""
        UPDATE payment_codes
           SET {", ".join(assignments)}, updated_at = now(), version = version + 1
         WHERE payment_code = $1 AND status = 'active' AND ($2::int IS NULL OR version = $2)
        RETURNING {COLUMNS}
        """,  # noqa: S608 - assignments are built from PATCHABLE_FIELDS only
        *params,
    )
    return code_from_row(row) if row else None


async def cancel(conn: asyncpg.Connection, payment_code: str) -> PaymentCode | None:
    """Cancel an active code; None when it is not active."""
    row = await conn.fetchrow(
        f"""
        UPDATE payment_codes SET status = 'cancelled', updated_at = now(), version = version + 1
         WHERE payment_code = $1 AND status = 'active'
        RETURNING {COLUMNS}
        """,  # noqa: S608
        payment_code,
    )
    return code_from_row(row) if row else None


async def mint_invoice(conn: asyncpg.Connection, payment_code: str) -> int | None:
    """Take the next invoice sequence number of an active reusable code; None if it is no longer active."""
    return await conn.fetchval(
        """
        UPDATE payment_codes SET invoice_seq = invoice_seq + 1
         WHERE payment_code = $1 AND reusable AND status = 'active'
        RETURNING invoice_seq
        """,
        payment_code,
    )


def count_statement(payment_code: str, at: str, *, source: str | None = None) -> str:
    """The UPDATE that counts a normal payment on its code: a one-shot code becomes paid, a reusable one
    stays active. ``payment_code`` and ``at`` (the time of the count) are SQL: placeholders, ``now()``, or
    columns of ``source``, a FROM item that gives each code to count once (the payments a statement
    records). Run it holding the code's row lock; it counts relative to the row as it is, so it is also a
    part of the statement that records notifications' payments (payments.record)."""
    return f"""
        UPDATE payment_codes
           SET paid_count = paid_count + 1, status = CASE WHEN reusable THEN status ELSE 'paid' END,
               updated_at = {at}, version = version + 1
          {f"FROM {source}" if source else ""}
         WHERE payment_codes.payment_code = {payment_code}
        """  # noqa: S608 - SQL expressions of the caller's


async def count_payment(conn: asyncpg.Connection, payment_code: str) -> PaymentCode:
    """Count a normal payment (:func:`count_statement`) and return the code as it is now."""
    row = await conn.fetchrow(f"{count_statement('$1', 'now()')} RETURNING {COLUMNS}", payment_code)
    return code_from_row(row)


async def list_page(
    conn: asyncpg.Connection,
    *,
    status: str | None,
    client_id: str | None,
    after: str | None,
    limit: int,
    expired_at: datetime | None = None,
    expired: bool | None = None,
) -> list[PaymentCode]:
    """Up to ``limit`` codes in payment-code order after the cursor ``after`` (keyset pagination).

    With ``expired`` set, only codes whose expiry is (True) or is not (False) past at ``expired_at``.
    """
    rows = await conn.fetch(
        f"""
        SELECT {COLUMNS} FROM payment_codes
         WHERE ($1::text IS NULL OR status = $1)
           AND ($2::text IS NULL OR client_id = $2)
           AND ($3::text IS NULL OR payment_code > $3)
           AND ($6::bool IS NULL OR (expires_at IS NOT NULL AND expires_at <= $5::timestamptz) = $6)
         ORDER BY payment_code
         LIMIT $4
        """,  # noqa: S608
        status,
        client_id,
        after,
        limit,
        expired_at,
        expired,
    )
    return [code_from_row(row) for row in rows]


async def upsert_fresh(conn: asyncpg.Connection, codes: Iterable[NewCode]) -> list[tuple[PaymentCode, bool]]:
    """Register codes or put them back to their registered, unpaid state (the demo's seed).

    Returns each code as it is now, and whether it was inserted (False: it existed and was reset).
    """
    assignments = ", ".join(f"{column} = EXCLUDED.{column}" for column in NEW_CODE_COLUMNS[1:])
    sql = _INSERT.replace(
        "ON CONFLICT (payment_code) DO NOTHING",
        f"ON CONFLICT (payment_code) DO UPDATE SET {assignments}, status = 'active', paid_count = 0, "
        "updated_at = now(), version = payment_codes.version + 1",
    ).replace(f"RETURNING {COLUMNS}", f"RETURNING {COLUMNS}, (xmax = 0) AS inserted")
    result = []
    for code in codes:
        row = await conn.fetchrow(sql, *_values(code))
        result.append((code_from_row(row), row["inserted"]))
    return result


# --- bulk import through COPY -------------------------------------------------------------------
#
# Each batch of validated rows is COPYed straight into payment_codes, PostgreSQL's fastest way in,
# under a savepoint. A batch that meets a code already there (registered before, or earlier in this
# file) rolls back to the savepoint and goes in through ON CONFLICT DO NOTHING instead, its refused
# rows noted. Every row's line is kept, so that at the end a refused row can name the line it repeats.

_LINES = "dipc_import_lines"  # (payment_code, line) of every row offered
_REFUSED = "dipc_import_refused"  # (line, payment_code) of the rows payment_codes did not take
_BATCH = "dipc_import_batch"  # the batch that is going in row by row


async def begin_import(conn: asyncpg.Connection, *, timeout_s: int) -> None:
    """Temporary tables for one import, inside the caller's transaction, with its own statement timeout."""
    await conn.execute(
        f"""
        SET LOCAL statement_timeout = '{int(timeout_s)}s';
        CREATE TEMP TABLE {_LINES} (payment_code text NOT NULL, line integer NOT NULL) ON COMMIT DROP;
        CREATE TEMP TABLE {_REFUSED} (line integer NOT NULL, payment_code text NOT NULL) ON COMMIT DROP;
        CREATE TEMP TABLE {_BATCH} (line integer NOT NULL, LIKE payment_codes INCLUDING DEFAULTS)
            ON COMMIT DROP;
        """
    )


async def import_batch(
    conn: asyncpg.Connection, batch: Sequence[tuple[int, CodeValues]], *, refusals_expected: bool = False
) -> int:
    """Register a batch of ``(line, the code's values)``; return how many rows were refused (see
    :func:`refused_rows`).

    ``refusals_expected`` (the batch before had refused rows: a re-upload of registered codes, most
    likely) sends the batch row by row at once, rather than a COPY that would be refused first.
    """
    if refusals_expected or not await _copied(conn, batch):
        refused = await _import_batch_one_by_one(conn, batch)
    else:
        refused = 0
    await conn.copy_records_to_table(_LINES, records=[(values[0], line) for line, values in batch])
    return refused


async def _copied(conn: asyncpg.Connection, batch: Sequence[tuple[int, CodeValues]]) -> bool:
    """COPY the batch straight into payment_codes under a savepoint; False if a code was there already."""
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "payment_codes", records=[values for _, values in batch], columns=NEW_CODE_COLUMNS
            )
    except asyncpg.UniqueViolationError:
        return False
    return True


async def _import_batch_one_by_one(conn: asyncpg.Connection, batch: Sequence[tuple[int, CodeValues]]) -> int:
    await conn.execute(f"TRUNCATE {_BATCH}")
    await conn.copy_records_to_table(
        _BATCH, records=[(line, *values) for line, values in batch], columns=["line", *NEW_CODE_COLUMNS]
    )
    columns = ", ".join(NEW_CODE_COLUMNS)
    status = await conn.execute(
        f"""
        WITH first AS (
            SELECT DISTINCT ON (payment_code) line, {columns} FROM {_BATCH} ORDER BY payment_code, line
        ), inserted AS (
            INSERT INTO payment_codes ({columns})
            SELECT {columns} FROM first
            ON CONFLICT (payment_code) DO NOTHING
            RETURNING payment_code
        )
        INSERT INTO {_REFUSED} (line, payment_code)
        SELECT line, payment_code FROM {_BATCH}
         WHERE line NOT IN (SELECT f.line FROM first f JOIN inserted i USING (payment_code))
        """  # noqa: S608 - identifiers are constants
    )
    return int(status.rsplit(" ", 1)[1])


async def refused_rows(conn: asyncpg.Connection, limit: int) -> list[tuple[int, str, int | None]]:
    """The first ``limit`` rows of this import that payment_codes refused, by line, as ``(line,
    payment_code, first_line)`` (a re-upload of a million registered codes is a million of them, and
    an import reports a thousand).

    ``first_line`` is the earlier line of the same file with the same code, or None when the code was
    registered before the import.
    """
    # The rows to report first, then their codes' lines: joined whole, a re-upload of a million
    # registered codes matched a million refused rows with a million lines to report a thousand.
    rows = await conn.fetch(
        f"""
        WITH reported AS (SELECT line, payment_code FROM {_REFUSED} ORDER BY line LIMIT $1)
        SELECT r.line, r.payment_code, NULLIF(min(l.line), r.line) AS first_line
          FROM reported r JOIN {_LINES} l USING (payment_code)
         GROUP BY r.line, r.payment_code
         ORDER BY r.line
        """,  # noqa: S608 - identifiers are constants
        limit,
    )
    return [(row["line"], row["payment_code"], row["first_line"]) for row in rows]
