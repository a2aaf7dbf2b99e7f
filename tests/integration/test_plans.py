"""Plans that must hold whatever the statistics say (issue 10).

The servers run their statements as prepared statements and PL/pgSQL, which PostgreSQL plans once for
every value of the parameters (a generic plan) after a few runs. Such a plan is priced with each
column's average, and in a merchant's tables the averages lie for a reusable code: most codes are paid
once, so ``payment_code = $1`` looks like one row, while a reusable code that sells every day has
thousands of payments and quotes. A plan that then finds a reusable code's invoice by its code alone,
filtering on the invoice afterwards, reads all of them for every payment.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from server.app import make_app
from server.doku.client import DokuSimulator
from server.store import audit, migrate
from tests.conftest import CLIENT, CLIENT_ID, make_settings

ONE_SHOT_PAID = 20_000  # codes paid once, as most are: they set the statistics' averages
HISTORY = 3_000  # the quotes and payments the busy reusable code had before
BUSY = "8896500000000001"  # reusable, with that history
NEW = "8896500000000002"  # reusable, paid for the first time in the test
PAYMENTS = 6  # paid in each phase
# Reusable codes made with the same invoice base as BUSY and NEW, whose invoices' numbers are theirs too:
# an invoice is found by its code and its number, never by its number alone.
NAMESAKES = 200
NAMESAKE_INVOICES = [
    f"TOPUP-{n}" for n in (*range(1, PAYMENTS + 1), *range(HISTORY + 1, HISTORY + PAYMENTS + 1))
]
# The tables a payment reads by code and something else, with other keys that lead with the code; with a
# plan by the code alone, one payment reads HISTORY rows of one of them.
TABLES = ("payments", "inquiries", "notifications")
OTHER_SESSIONS = """
    SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


@pytest.fixture
async def skewed_database(fresh_database: str) -> str:
    """A database of its own (generic plans are set for the whole database), with the statistics of a
    merchant's tables: ONE_SHOT_PAID one-shot codes quoted and paid once, and BUSY with its history."""
    await migrate.migrate_dsn(fresh_database)
    conn = await asyncpg.connect(fresh_database)
    try:
        await fill(conn)
        name = await conn.fetchval("SELECT current_database()")
        await conn.execute(f'ALTER DATABASE "{name}" SET plan_cache_mode = force_generic_plan')
    finally:
        await conn.close()
    return fresh_database


async def fill(conn: asyncpg.Connection) -> None:
    one_shot = [f"88965{n:011d}" for n in range(100, 100 + ONE_SHOT_PAID)]
    quoted = [(code, f"INV-{code}") for code in one_shot] + [
        (BUSY, f"TOPUP-{n}") for n in range(1, HISTORY + 1)
    ]
    await conn.copy_records_to_table(
        "payment_codes",
        records=[(code, CLIENT_ID, "ALFA", invoice, 10_000, "Pelanggan", False, "paid", 1, 0)
                 for code, invoice in quoted[:ONE_SHOT_PAID]]
        + [(code, CLIENT_ID, "ANY", "TOPUP", 50_000, "Pelanggan", True, "active", count, count)
           for code, count in ((BUSY, HISTORY), (NEW, 0))],
        columns=["payment_code", "client_id", "channel", "invoice_number", "amount", "customer_name",
                 "reusable", "status", "paid_count", "invoice_seq"],
    )  # fmt: skip
    await conn.copy_records_to_table(
        "inquiries",
        records=[(code, f"quote-{n}", CLIENT_ID, "ALFA", b"", "quoted", invoice, 10_000, 200, b"{}")
                 for n, (code, invoice) in enumerate(quoted)],
        columns=["payment_code", "request_id", "client_id", "channel", "body_sha256", "outcome",
                 "invoice_number", "amount", "http_status", "response_body"],
    )  # fmt: skip
    await conn.copy_records_to_table(
        "notifications",
        records=[(code, CLIENT_ID, f"pay-{n}", "{}", b"{}", "SUCCESS", "recorded")
                 for n, (code, _) in enumerate(quoted, start=1)],  # ids 1, 2, ... in this order
        columns=["payment_code", "client_id", "request_id", "headers", "body", "transaction_status",
                 "outcome"],
    )  # fmt: skip
    await conn.copy_records_to_table(
        "payments",
        records=[(code, invoice, f"ref-{n}", "normal", 10_000, CLIENT_ID, "ALFA", n)
                 for n, (code, invoice) in enumerate(quoted, start=1)],
        columns=["payment_code", "invoice_number", "transaction_ref", "kind", "amount", "client_id",
                 "channel", "notification_id"],
    )  # fmt: skip
    namesakes = [f"88965{n:011d}" for n in range(100_000, 100_000 + NAMESAKES)]
    await conn.copy_records_to_table(
        "reconciliation",
        records=[(code, invoice, CLIENT_ID, "ALFA", 10_000, "paid", None, n, "notification")
                 for n, (code, invoice) in enumerate(quoted[:ONE_SHOT_PAID], start=1)]
        + [(code, invoice, CLIENT_ID, "ANY", 50_000, "expired", None, None, None)
           for code in namesakes for invoice in NAMESAKE_INVOICES],
        columns=["payment_code", "invoice_number", "client_id", "channel", "amount", "state",
                 "next_check_at", "payment_id", "settled_by"],
    )  # fmt: skip
    await conn.execute("ANALYZE")


async def rows_read(dsn: str, tables: tuple[str, ...]) -> dict[str, int]:
    """Rows each table has returned to statements so far: by sequential scans, and as entries of its
    indexes (an index-only scan returns entries and fetches no row). A backend reports all its counts
    as it ends, before it leaves pg_stat_activity, so this waits for every other session to end first."""
    conn = await asyncpg.connect(dsn)
    try:
        for _ in range(500):
            if await conn.fetchval(OTHER_SESSIONS) == 0:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the server's sessions did not end")
        rows = await conn.fetch(
            "SELECT t.relname, t.seq_tup_read + coalesce(sum(i.idx_tup_read), 0)::bigint AS n"
            "  FROM pg_stat_user_tables t JOIN pg_stat_user_indexes i USING (relid)"
            " WHERE t.relname = any($1::text[]) GROUP BY t.relname, t.seq_tup_read",
            list(tables),
        )
        return {row["relname"]: row["n"] for row in rows}
    finally:
        await conn.close()


async def pay(aiohttp_client, dsn: str, code: str, tables=TABLES) -> dict[str, int]:
    """PAYMENTS invoices of ``code``, each quoted and then paid, on a server of its own: the rows read."""
    before = await rows_read(dsn, tables)
    client = await aiohttp_client(make_app(make_settings(metrics_sample_s=3600), dsn))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    try:
        for n in range(PAYMENTS):
            quote = await doku.inquiry(code)
            assert quote.status == 200, quote.body
            invoice = quote.json()["order"]["invoice_number"]
            paid = await doku.notify(code, invoice_number=invoice, amount=50_000, original_request_id=f"t{n}")
            assert paid.status == 200, paid.body
    finally:
        await client.close()
    after = await rows_read(dsn, tables)
    return {table: after[table] - before[table] for table in tables}


async def test_a_busy_reusable_codes_payment_reads_no_more_rows_than_a_new_ones(
    aiohttp_client, skewed_database
):
    new = await pay(aiohttp_client, skewed_database, NEW)
    busy = await pay(aiohttp_client, skewed_database, BUSY)
    # The same statements with the same plans read as many rows for either code; a plan that finds the
    # busy code's invoice by the code alone reads HISTORY more each time. The margin, a row per payment,
    # is for what the servers read besides (their starts, the events' sequencing).
    for table in TABLES:
        assert busy[table] <= new[table] + PAYMENTS, (table, busy, new)
    paid = await asyncpg.connect(skewed_database)
    try:
        counts = await paid.fetch(
            "SELECT payment_code, paid_count FROM payment_codes WHERE payment_code = any($1::text[])"
            " ORDER BY payment_code",
            [BUSY, NEW],
        )
    finally:
        await paid.close()
    assert [tuple(row) for row in counts] == [(BUSY, HISTORY + PAYMENTS), (NEW, PAYMENTS)]


async def test_a_payment_reads_its_own_invoices_reconciliation_row_and_not_its_namesakes(
    aiohttp_client, skewed_database
):
    """An invoice's reconciliation row is found by (payment_code, invoice_number), which is unique. An
    index on the invoice number alone priced the same to a generic plan, and then each payment's lock
    and settling of its row read every row of that number: a reusable code's invoices are numbered
    from its base, and codes made alike share their numbers."""
    paid = await pay(aiohttp_client, skewed_database, NEW, (*TABLES, "reconciliation"))
    # Each payment reads its own row a few times (the quote's upsert, the lock, the settling); a plan
    # by the number alone reads NAMESAKES more each time.
    assert paid["reconciliation"] <= PAYMENTS * 10, paid


async def test_a_busy_codes_inbox_is_listed_with_its_own_payments_only(skewed_database):
    """GET /v1/notifications?payment_code=... pages through one code's inbox in id order, each row with
    the payment it made. The busy code's rows come after every other code's: a join that reads payments
    in notification order from the first passes ONE_SHOT_PAID others' payments before its own."""
    conn = await asyncpg.connect(skewed_database)
    read = """
        SELECT sum(pg_stat_get_xact_blocks_fetched(indexrelid))::bigint
               + pg_stat_get_xact_blocks_fetched('payments'::regclass)
          FROM pg_index WHERE indrelid = 'payments'::regclass
    """
    try:
        await conn.execute("SET plan_cache_mode = auto")  # as a server's session plans a new statement
        async with conn.transaction():
            before = await conn.fetchval(read)
            page = await audit.notifications(conn, payment_code=BUSY, outcome=None, after=None, limit=51)
            pages_read = await conn.fetchval(read) - before
        assert len(page) == 51
        assert all(row.payment_id is not None for row in page)
        # A lookup per row: an index's root, inner and leaf pages and a heap page at most (every access
        # counts, from shared buffers or not). A walk from the first payment reads ONE_SHOT_PAID others.
        assert pages_read <= 4 * 51, pages_read
    finally:
        await conn.close()
