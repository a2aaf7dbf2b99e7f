"""Migrations: recorded, idempotent, and applied once when several processes start together."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.embedded import EmbeddedPostgres
from server.store import migrate, payments
from tests.conftest import applied_before


async def test_concurrent_migrations_apply_each_version_once(fresh_database):
    connections = [await asyncpg.connect(fresh_database) for _ in range(5)]
    try:
        results = await asyncio.gather(*(migrate.migrate(conn) for conn in connections))
        versions = [version for result in results for version in result]
        assert versions == [m.version for m in migrate.available()]
        state = await migrate.state(connections[0])
        assert state.current
        assert set(state.applied) == set(versions)
        assert await migrate.migrate(connections[0]) == []
    finally:
        for conn in connections:
            await conn.close()


async def test_state_reports_pending_and_changed_migrations(fresh_database):
    conn = await asyncpg.connect(fresh_database)
    try:
        before = await migrate.state(conn)
        assert before.pending == [m.version for m in migrate.available()]
        assert not before.current
        await migrate.migrate(conn)
        await conn.execute("UPDATE schema_migrations SET checksum = 'edited-after-release'")
        after = await migrate.state(conn)
        assert after.changed == [m.version for m in migrate.available()]
        assert not after.current
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_behind(fresh_database, monkeypatch):
    broken = migrate.Migration(version="9999_broken", sql="CREATE TABLE half_done (id int); SELECT 1/0;")
    shipped = migrate.available()
    monkeypatch.setattr(migrate, "available", lambda: (*shipped, broken))
    conn = await asyncpg.connect(fresh_database)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrate.migrate(conn)
        assert await conn.fetchval("SELECT to_regclass('half_done')") is None
        assert "9999_broken" not in (await migrate.state(conn)).applied
        other = await asyncpg.connect(fresh_database)  # the lock is per session: ask from another one
        try:
            assert await other.fetchval("SELECT pg_try_advisory_lock($1)", migrate.MIGRATION_LOCK_KEY)
        finally:
            await other.close()
    finally:
        await conn.close()


async def test_upgrading_to_reconciliation_watches_the_recent_unpaid_quotes(fresh_database):
    conn = await asyncpg.connect(fresh_database)
    try:
        await applied_before(conn, "0003")
        quote = """
            INSERT INTO inquiries (payment_code, request_id, client_id, channel, body_sha256, outcome,
                                   invoice_number, amount, http_status, response_body, received_at)
            VALUES ($1, $2, 'MCH', 'ALFA', '\\x00', 'SUCCESS', $3, 150000, 200, '{}',
                    now() - make_interval(hours => $4))
        """
        await conn.execute(quote, "8896500000000001", "r1", "INV-RECENT", 1)
        await conn.execute(quote, "8896500000000001", "r2", "INV-RECENT", 2)  # quoted twice: one row
        await conn.execute(quote, "8896500000000002", "r3", "INV-OLD", 120)
        await conn.execute(quote, "8896500000000003", "r4", "INV-PAID", 1)
        await conn.execute("""
            INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, amount, client_id,
                                  channel, notification_id)
            VALUES ('8896500000000003', 'INV-PAID', 'ref', 'normal', 150000, 'MCH', 'ALFA', 1)
        """)
        await migrate.migrate(conn)
        rows = await conn.fetch("SELECT * FROM reconciliation")
        assert [(row["invoice_number"], row["state"]) for row in rows] == [("INV-RECENT", "pending")]
        assert await conn.fetchval(
            "SELECT first_quoted_at BETWEEN now() - interval '121 minutes' AND now() - interval '119 minutes'"
            " FROM reconciliation"
        )
        assert await conn.fetchval("SELECT next_check_at <= now() FROM reconciliation")
        assert await conn.fetchval("SELECT source FROM payments") == "notification"
    finally:
        await conn.close()


async def test_upgrading_to_the_events_floor_continues_the_pending_ids_and_moves_what_was_pending(
    fresh_database,
):
    conn = await asyncpg.connect(fresh_database)
    append = "INSERT INTO events_pending (type, payment_code, payload) VALUES ('code.created', $1, '{}')"
    try:
        await applied_before(conn, "0020")
        await conn.executemany(append, [("a",), ("b",), ("c",)])
        assert await conn.fetchval("SELECT dipc_sequence_events(1)") == 1
        await migrate.migrate(conn)
        await conn.execute(append, "d")
        assert [row["id"] for row in await conn.fetch("SELECT id FROM events_pending ORDER BY id")] == [
            2,
            3,
            4,
        ]
        assert await conn.fetchval("SELECT dipc_sequence_events(1000)") == 3
        feed = await conn.fetch("SELECT payment_code FROM events ORDER BY id")
        assert [row["payment_code"] for row in feed] == ["a", "b", "c", "d"]
    finally:
        await conn.close()


async def test_autovacuum_leaves_the_tables_read_by_key_alone_for_their_first_thousand_changes(tmp_path):
    # Statistics taken while such a table holds a page or less plan its lookups by key as sequential
    # scans, which every server keeps until the next analyze (migration 0021). Here autovacuum visits
    # every second: a table of ours with as many rows is analyzed, and payments is not.
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)  # its autovacuum is changed
    dsn = await asyncio.to_thread(server.start)
    await migrate.migrate_dsn(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.executemany(
            """
            INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, amount, client_id,
                                  channel, notification_id, paid_at)
            VALUES ($1, 'INV-' || $1, 'ref', 'normal', 1000, 'MCH', 'ALFA', $2, now())
            """,
            [(f"88965{n:011d}", n) for n in range(300)],
        )
        await conn.execute("CREATE TABLE control_rows AS SELECT generate_series(1, 300) AS n")
        counts = """
            SELECT relname, autoanalyze_count + autovacuum_count AS visits FROM pg_stat_user_tables
             WHERE relname IN ('payments', 'control_rows')
        """
        for _ in range(150):  # 30 s
            visits = dict(await conn.fetch(counts))
            if visits["control_rows"]:
                break
            await asyncio.sleep(0.2)
        assert visits == {"control_rows": visits["control_rows"] or "a visit", "payments": 0}
    finally:
        await conn.close()
        await asyncio.to_thread(server.stop)


async def test_the_history_read_planned_on_200_unanalyzed_payments_reads_by_code_as_payments_grow(
    fresh_database,
):
    # Never analyzed, at about 200 payments an index on (kind, id) was one page while the invoice's
    # index had two levels, and the lookup of an invoice's normal payment was planned as a scan of it,
    # kept by every server until an analyze: each notification read every normal payment (0022).
    await migrate.migrate_dsn(fresh_database)
    conn = await asyncpg.connect(fresh_database)
    add = """
        INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, amount, client_id,
                              channel, notification_id, paid_at, agent_trx_id)
        VALUES ($1, $2, $3, 'normal', 10000 + $4, 'MCH-BENCH-0001', 'ALFA', $4, now(), $3)
    """
    # Rows of payments read: by sequential scans, and fetched through any of its indexes.
    read = """
        SELECT pg_stat_get_xact_tuples_returned('payments'::regclass)
               + (SELECT sum(pg_stat_get_xact_tuples_fetched(indexrelid))::bigint
                    FROM pg_index WHERE indrelid = 'payments'::regclass)
    """

    def rows(start: int, end: int) -> list[tuple]:
        return [(f"88965400000{k:05d}", f"INV-889654-{k}", str(uuid.uuid4()), k) for k in range(start, end)]

    try:
        await conn.executemany(add, rows(0, 200))
        await conn.execute("SET plan_cache_mode = force_generic_plan")  # planned now, kept after
        for code, more in (("8896549999999998", (200, 2200)), ("8896549999999999", None)):
            async with conn.transaction():
                before = await conn.fetchval(read)
                await payments.read_context(
                    conn, code, "INV-X", "ref", 1000, unnamed_ref="check-status:INV-X"
                )
                assert await conn.fetchval(read) - before == 0
            if more:
                await conn.executemany(add, rows(*more))
    finally:
        await conn.close()


async def test_upgrading_to_payments_by_invoice_keeps_every_resolution_bound_to_its_payment(fresh_database):
    # 0023 moves the key payment_resolutions refers to from (payment_code, id) to (id, payment_code).
    conn = await asyncpg.connect(fresh_database)
    resolve = """
        INSERT INTO payment_resolutions (payment_code, payment_id, resolution, resolved_by, note)
        VALUES ($1, $2, 'refunded', 'finance', 'by transfer')
    """
    try:
        await applied_before(conn, "0023")
        paid = await conn.fetch("""
            INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, amount, client_id,
                                  channel, notification_id)
            VALUES ('8896500000000001', 'INV-1', 'a', 'conflict', 1, 'MCH', 'ALFA', 1),
                   ('8896500000000002', 'INV-2', 'b', 'conflict', 1, 'MCH', 'ALFA', 2)
            RETURNING payment_code, id
        """)
        await conn.execute(resolve, *paid[0])
        await migrate.migrate(conn)
        await conn.execute(resolve, *paid[1])
        with pytest.raises(asyncpg.ForeignKeyViolationError):  # the other code's payment id
            await conn.execute(resolve, paid[0]["payment_code"], paid[1]["id"])
        rows = await conn.fetch(
            "SELECT payment_code, payment_id FROM payment_resolutions ORDER BY payment_id"
        )
        assert [tuple(row) for row in rows] == [tuple(row) for row in paid]
        indexes = await conn.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = 'payments'")
        leading_with_the_code = sorted(
            row["indexdef"].split(" USING btree ")[1] for row in indexes if "(payment_code" in row["indexdef"]
        )
        assert leading_with_the_code == [
            "(payment_code, invoice_number) WHERE (kind = 'normal'::text)",
            "(payment_code, invoice_number, transaction_ref)",
        ]
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def sessions(dsn: str, count: int) -> AsyncIterator[list[asyncpg.Connection]]:
    """``count`` connections to ``dsn``, each closed afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        connections = []
        for _ in range(count):
            connections.append(await asyncpg.connect(dsn))
            stack.push_async_callback(connections[-1].close)
        yield connections


async def _paid(conn: asyncpg.Connection, payments: int) -> None:
    """``payments`` normal payments, each of a code of its own."""
    await conn.execute(
        """
        INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, amount, client_id,
                              channel, notification_id)
        SELECT '88965' || lpad(g::text, 11, '0'), 'INV-' || g, 'ref', 'normal', 1, 'MCH', 'ALFA', g
          FROM generate_series(1, $1::int) g
        """,
        payments,
    )


async def _waiting_for_a_lock(conn: asyncpg.Connection, pid: int) -> None:
    """Until session ``pid`` waits for a lock (a pg_locks row of it not granted)."""
    for _ in range(1000):
        if await conn.fetchval("SELECT EXISTS (SELECT FROM pg_locks WHERE pid = $1 AND NOT granted)", pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"session {pid} never waited for a lock")


@pytest.mark.parametrize("watched", [True, False], ids=["watched", "unwatched"])
async def test_a_migration_waiting_for_a_lock_does_not_stop_the_tables_readers_behind_it(
    fresh_database, captured_log, watched
):
    # (Found by review.) 0023 drops indexes of payments, which takes the table's exclusive lock. Behind
    # a transaction that reads payments for long (a nightly pg_dump, a report), `dipc migrate` waited for
    # that lock with no bound, and every query of payments queued behind its request: the servers'
    # notifications, history reads and listings stopped until the dump ended. Now a try waits at most
    # migrate.LOCK_TIMEOUT_MS, rolls back, and tries again once the dump has ended: a try before then
    # would build 0023's indexes again, holding off payments' writes, only to fail again (a review).
    # Without a watcher, every session that held a table lock at the timeout is waited for.
    async with sessions(fresh_database, 4) as (conn, holder, reader, watcher):
        await applied_before(conn, "0023")
        dump = holder.transaction(isolation="repeatable_read")
        await dump.start()
        await holder.fetchval("SELECT count(*) FROM payments")  # its lock is held to the transaction's end
        migrating = asyncio.create_task(migrate.migrate(conn, watcher=watcher if watched else None))
        await _waiting_for_a_lock(reader, conn.get_server_pid())
        # A server's read of payments, while the dump still holds its lock and the migration still waits.
        assert await asyncio.wait_for(reader.fetchval("SELECT count(*) FROM payments"), 10) == 0
        await asyncio.sleep(4.0)  # a fixed back-off (0.5, 1, 2 s) would have tried three times more
        assert not migrating.done()
        await dump.commit()
        applied = await asyncio.wait_for(migrating, 10)  # not RETRY_AFTER_S after its try
        assert applied[0] == "0023_payments_by_invoice"
        assert (await migrate.state(conn)).current
        [busy] = captured_log.events("migration.locks_busy")  # one failed try, then the one that worked
        assert busy["waited_for"] == []  # it tried again because the dump had ended


async def test_a_migration_waits_for_the_session_it_waited_for_not_for_every_long_one(
    fresh_database, captured_log
):
    # (Found by review.) An import of codes (one transaction for its whole file) or a report on another
    # table held a table lock as long as the dump did, and the migration waited for both: 30 s after the
    # dump had ended, naming the bystander. The watcher sees whom a try waits for.
    async with sessions(fresh_database, 4) as (conn, dump, bystander, watcher):
        await applied_before(conn, "0023")
        importing = bystander.transaction()
        await importing.start()
        await bystander.execute("SELECT count(*) FROM payment_codes")
        dumping = dump.transaction(isolation="repeatable_read")
        await dumping.start()
        await dump.fetchval("SELECT count(*) FROM payments")
        migrating = asyncio.create_task(migrate.migrate(conn, watcher=watcher))
        await _waiting_for_a_lock(bystander, conn.get_server_pid())  # the watcher is the migration's
        await asyncio.sleep(1.0)  # its first try has timed out
        await dumping.commit()
        applied = await asyncio.wait_for(migrating, 10)
        assert applied[0] == "0023_payments_by_invoice"
        assert [busy["waited_for"] for busy in captured_log.events("migration.locks_busy")] == [[]]
        await importing.commit()


async def test_a_migration_whose_blocker_ends_as_its_budget_does_is_applied(fresh_database):
    # (Found by review.) The lock was free at the end of the budget, and the migration gave up without
    # trying again, saying that nobody held a lock.
    async with sessions(fresh_database, 3) as (conn, holder, watcher):
        await applied_before(conn, "0023")
        report = holder.transaction()
        await report.start()
        await holder.fetchval("SELECT count(*) FROM payments")
        # Its try times out at 0.5 s, its wait looks at 0.5, 1.5 and 2.5 s, and its budget ends at 3.45 s:
        # the report ends between the last two looks.
        migrating = asyncio.create_task(migrate.migrate(conn, watcher=watcher, lock_wait_s=3.45))
        await _waiting_for_a_lock(holder, conn.get_server_pid())
        await asyncio.sleep(3.0)
        await report.commit()
        assert (await asyncio.wait_for(migrating, 10))[0] == "0023_payments_by_invoice"


async def test_a_migration_behind_an_autovacuum_has_postgresql_cancel_it(own_database, captured_log):
    # (Found by review.) PostgreSQL cancels an autovacuum that blocks a lock request once the request has
    # waited deadlock_timeout (1 s); a try that gives up at 500 ms never got there, and a slow autovacuum
    # of payments took the whole budget. The next try waits past deadlock_timeout once.
    _, dsn = own_database  # a cluster of its own, whose autovacuum may be set
    admin = await asyncpg.connect(dsn)
    await admin.execute("ALTER SYSTEM SET autovacuum_naptime = 1")
    await admin.execute("SELECT pg_reload_conf()")
    await admin.execute("CREATE DATABASE before_0023")
    await admin.close()
    older = dsn.replace("/dipc?", "/before_0023?")
    async with sessions(older, 2) as (conn, watcher):
        await applied_before(conn, "0023")
        await _paid(conn, 100_000)
        await conn.execute("""
            ALTER TABLE payments SET (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,
                                      autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1);
            DELETE FROM payments WHERE notification_id % 2 = 0;
        """)
        vacuum = (
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' AND query ~ 'payments'"
        )
        for _ in range(300):
            if await watcher.fetchval(vacuum):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("autovacuum never started on payments")
        applied = await asyncio.wait_for(migrate.migrate(conn, watcher=watcher, lock_wait_s=20), 30)
        assert applied[0] == "0023_payments_by_invoice"
        [busy] = captured_log.events("migration.locks_busy")
        assert busy["next_lock_timeout_ms"] > 1000
        assert "autovacuum worker" in busy["waited_for"][0]


async def test_a_migration_blocked_past_its_budget_fails_naming_what_blocks_it(fresh_database):
    async with sessions(fresh_database, 3) as (conn, holder, watcher):
        await applied_before(conn, "0023")
        async with holder.transaction():
            await holder.execute("SELECT count(*), 'SK-LIVE-secret' /* the nightly report */ FROM payments")
            with pytest.raises(migrate.MigrationBlocked) as blocked:
                await asyncio.wait_for(migrate.migrate(conn, watcher=watcher, lock_wait_s=2.5), 10)
        message = str(blocked.value)
        assert "migration 0023_payments_by_invoice could not take its locks" in message
        assert f"pid {holder.get_server_pid()} (role " in message
        assert re.search(r"idle in transaction\) for \d+ s or more", message), message
        assert "SK-LIVE" not in message  # another session's query is not copied into logs
        state = await migrate.state(conn)
        assert state.pending[0] == "0023_payments_by_invoice"
        free = "SELECT pg_try_advisory_lock($1) AND pg_advisory_unlock($1)"  # the migration's lock is let go
        assert await holder.fetchval(free, migrate.MIGRATION_LOCK_KEY)
        assert await migrate.migrate(conn) == state.pending  # and once the report is done, it applies


async def test_a_migration_is_not_bound_by_the_servers_statement_timeout(fresh_database):
    # The pools dipc opens (`dipc migrate`'s too) give every statement 30 s. Building 0023's indexes over
    # a large merchant's payments takes longer than that, and the migration was cancelled. Scaled down
    # here: 200,000 payments and a timeout of 50 ms.
    conn = await asyncpg.connect(fresh_database)
    try:
        await applied_before(conn, "0023")
        await _paid(conn, 200_000)
        await conn.execute("SET statement_timeout = 50")
        assert (await migrate.migrate(conn))[0] == "0023_payments_by_invoice"
        assert await conn.fetchval("SHOW statement_timeout") == "50ms"  # the session's own, left as it was
    finally:
        await conn.close()


async def test_a_migration_waits_for_another_one_past_the_sessions_timeouts(fresh_database):
    # `dipc migrate` from two places at once: the second waits for the first's advisory lock, for as
    # long as the first's migrations take, which neither statement_timeout nor a lock_timeout set on the
    # role or the database (a review) bounds.
    async with sessions(fresh_database, 2) as (first, second):
        await first.execute("SELECT pg_advisory_lock($1)", migrate.MIGRATION_LOCK_KEY)  # migrating
        await second.execute("SET statement_timeout = 50; SET lock_timeout = 50")
        migrating = asyncio.create_task(migrate.migrate(second))
        await _waiting_for_a_lock(first, second.get_server_pid())
        await asyncio.sleep(0.5)  # ten times those timeouts
        await first.execute("SELECT pg_advisory_unlock($1)", migrate.MIGRATION_LOCK_KEY)
        assert await asyncio.wait_for(migrating, 30) == [m.version for m in migrate.available()]
