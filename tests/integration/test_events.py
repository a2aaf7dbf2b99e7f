"""The event feed: in order, never missed or read twice, and woken by LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from server.app import make_app
from server.doku.client import notification_body
from server.http import admin
from server.http.keys import LISTENER
from server.store import outbox
from server.store.listener import EventListener
from tests.conftest import CODE, code_fields, make_settings, waiting_for_a_lock
from tests.dbproxy import SilencingProxy

INVOICE = "INV-2026-000123"


async def feed(client, admin_headers, **params) -> dict:
    response = await client.get(
        "/v1/events", params={k: str(v) for k, v in params.items()}, headers=admin_headers
    )
    assert response.status == 200, await response.text()
    return await response.json()


async def test_events_are_read_after_a_cursor(client, doku, register, admin_headers):
    await register()
    await doku.notify(CODE, invoice_number=INVOICE, amount=150000, original_request_id="t1")
    page = await feed(client, admin_headers)
    assert [(e["id"], e["type"], e["payment_code"]) for e in page["items"]] == [
        (1, "code.created", CODE),
        (2, "payment.received", CODE),
    ]
    assert page["next"] == 2
    assert page["items"][1]["payload"]["code"]["status"] == "paid"
    assert (await feed(client, admin_headers, after=1))["items"][0]["id"] == 2
    empty = await feed(client, admin_headers, after=2)
    assert (empty["items"], empty["next"]) == ([], 2)


async def test_a_long_poll_returns_when_an_event_commits(client, register, admin_headers):
    waiting = asyncio.create_task(feed(client, admin_headers, after=0, wait=30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await register()
    committed = time.perf_counter()
    page = await waiting
    woke_after_ms = (time.perf_counter() - committed) * 1000
    assert [event["type"] for event in page["items"]] == ["code.created"]
    print(f"long-poll woke {woke_after_ms:.1f} ms after the commit")  # reported, not asserted


async def test_a_long_poll_without_events_returns_empty_after_the_wait(client, admin_headers):
    page = await feed(client, admin_headers, after=0, wait=0.3)
    assert (page["items"], page["next"]) == ([], 0)


@pytest.mark.parametrize("params", [{"wait": "61"}, {"wait": "-1"}, {"after": "-1"}, {"wait": "soon"}])
async def test_bad_feed_parameters_are_422(client, admin_headers, params):
    response = await client.get("/v1/events", params=params, headers=admin_headers)
    assert response.status == 422


async def consume(
    client, admin_headers, until: asyncio.Event, expected: list[int] | None = None
) -> list[int]:
    """A consumer that keeps its cursor and long-polls in small pages, as a merchant's would."""
    seen: list[int] = []
    cursor = 0
    while True:
        page = await feed(client, admin_headers, after=cursor, limit=7, wait=0.5)
        seen += [event["id"] for event in page["items"]]
        cursor = page["next"]
        if until.is_set() and not page["items"] and (expected is None or len(seen) >= len(expected)):
            return seen


async def test_consumers_before_and_after_a_burst_see_every_event_once_in_order(
    client, doku, register, admin_headers, pool
):
    codes = [f"88965000000{n:05d}" for n in range(40)]
    for code in codes[:20]:
        await register(payment_code=code, invoice_number=f"I-{code}")
    burst_done = asyncio.Event()
    early = asyncio.create_task(consume(client, admin_headers, burst_done))

    async def pay(code: str, ref: str):
        return await doku.notify(code, invoice_number=f"I-{code}", amount=150000, original_request_id=ref)

    async def create(code: str):
        return await client.post(
            "/v1/payment-codes",
            json={"payment_code": code, "amount": 1, "invoice_number": f"I-{code}", "customer_name": "N",
                  "client_id": "MCH-0001-10791114622547"},
            headers=admin_headers,
        )  # fmt: skip

    # Payments, conflicts and registrations, all at once, so event ids are taken by racing transactions.
    work = [pay(code, "A") for code in codes[:20]] + [pay(code, "B") for code in codes[:20]]
    work += [create(code) for code in codes[20:]]
    await asyncio.gather(*work)
    burst_done.set()
    expected = [row["id"] for row in await pool.fetch("SELECT id FROM events ORDER BY id")]
    assert len(expected) == 20 + 40 + 20  # created, payments (normal + conflict), created
    # Causal order per code: the second payment waited for the first's row lock and saw it (a conflict),
    # so its event comes after the first's, though both were sequenced after their commits.
    by_code: dict[str, list[str]] = {}
    for row in await pool.fetch("SELECT payment_code, type FROM events ORDER BY id"):
        by_code.setdefault(row["payment_code"], []).append(row["type"])
    assert {tuple(types) for code, types in by_code.items() if code in codes[:20]} == {
        ("code.created", "payment.received", "payment.conflict")
    }

    late = await consume(client, admin_headers, burst_done, expected)
    assert await early == expected
    assert late == expected


async def test_an_event_that_commits_late_comes_after_every_cursor_given_before(client, admin_headers, pool):

    appended, release = asyncio.Event(), asyncio.Event()

    async def slow_writer() -> None:
        async with outbox.transaction(pool) as conn:
            await outbox.append(conn, "code.created", "1", {})
            appended.set()
            await release.wait()  # appended, not committed

    slow = asyncio.create_task(slow_writer())
    await appended.wait()
    async with asyncio.timeout(5):  # a writer never waits for another writer's commit
        async with outbox.transaction(pool) as conn:
            await outbox.append(conn, "code.created", "2", {})
    page = await feed(client, admin_headers, after=0)
    assert [event["payment_code"] for event in page["items"]] == ["2"]

    release.set()
    await slow
    later = await feed(client, admin_headers, after=page["next"])
    assert [event["payment_code"] for event in later["items"]] == ["1"]
    assert later["items"][0]["id"] > page["next"]
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0


async def test_events_a_dead_writer_left_unsequenced_reach_the_feed(client, admin_headers, pool):
    # What a process killed between its commit and the sequencing leaves: committed, pending events.
    await pool.executemany(
        "INSERT INTO events_pending (type, payment_code, payload) VALUES ('code.created', $1, '{}')",
        [("1",), ("2",)],
    )
    page = await feed(client, admin_headers, after=0, wait=15)  # the server's sweep moves them
    items = page["items"]
    if len(items) == 1:  # the feed answered between the sweep's two moves: the other comes next
        items += (await feed(client, admin_headers, after=page["next"], wait=15))["items"]
    assert [event["payment_code"] for event in items] == ["1", "2"]


async def test_append_outside_an_outbox_transaction_is_refused(pool):

    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(RuntimeError, match=r"outside outbox\.transaction"):
            await outbox.append(conn, "code.created", "1", {})
    # On an outbox connection, but with no transaction: the event would commit without its change.
    async with outbox.connection(pool) as conn:
        with pytest.raises(RuntimeError, match=r"outside a transaction"):
            await outbox.append(conn, "code.created", "1", {})
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0


# --- sequencing after the commit (ADR 3): repeats, trouble, other databases, the previous version ----

SEQUENCING_LOCK = 7235437848553746036  # dipc_sequence_events' advisory lock


@contextlib.asynccontextmanager
async def advisory_lock_held(pool, key: int):
    """The advisory lock ``key``, held by a connection of the test's own until the block ends."""
    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", key)
        try:
            yield
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", key)


def sequencing_held(pool):
    """Another process's sequencing pass, slow to finish: no pass anywhere moves an event meanwhile."""
    return advisory_lock_held(pool, SEQUENCING_LOCK)


async def append_one(pool, event_type: str, payment_code: str) -> None:
    """A writer of this version: one event, in a transaction of its own."""

    async with outbox.transaction(pool) as conn:
        await outbox.append(conn, event_type, payment_code, {})


async def until(pool, query: str, *args) -> None:
    """Wait (up to 5 s) until ``query`` returns something true."""
    async with asyncio.timeout(5):
        while True:
            if await pool.fetchval(query, *args):
                return
            await asyncio.sleep(0.01)


async def payment_events(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM events WHERE type = 'payment.received'")


async def test_a_repeat_is_answered_only_once_the_first_payments_event_is_in_the_feed(
    client, doku, register, pool
):
    await register()
    body = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="t1")
    async with sequencing_held(pool):
        first = asyncio.create_task(doku.post("/doku/notification", body))
        await until(pool, "SELECT count(*) FROM payments")  # committed; its event waits for the sequencing

        async def twin_then_look() -> tuple[int, int]:
            reply = await doku.post("/doku/notification", body)  # DOKU's retry: a repeat
            return reply.status, await payment_events(pool)

        twin = asyncio.create_task(twin_then_look())
        await asyncio.sleep(0.4)
        assert not twin.done()
    status, in_feed_when_answered = await twin
    assert (await first).status == 200
    assert status == 200
    assert in_feed_when_answered == 1


async def test_a_committed_change_is_answered_so_when_its_sequencing_cannot_finish(
    client, doku, register, pool, admin_headers
):
    await register(payment_code="8896500000000001", invoice_number="INV-1")
    body = notification_body(
        "8896500000000001", invoice_number="INV-1", amount=150000, original_request_id="t"
    )
    async with sequencing_held(pool):
        paid = await doku.post("/doku/notification", body)
        created = await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)
        # Both committed, and said so (a 503 would make DOKU, or the merchant, try again for nothing).
        assert paid.status == 200
        assert created.status == 201, await created.text()
        assert await pool.fetchval("SELECT count(*) FROM payments") == 1
        assert await pool.fetchval("SELECT count(*) FROM events_pending") == 2
    # The next pass (here the server's sweep, at the latest) gives them their ids.
    page = await feed(client, admin_headers, after=1, wait=15)
    rest = await feed(client, admin_headers, after=page["next"], wait=1)
    assert [event["type"] for event in page["items"] + rest["items"]] == ["payment.received", "code.created"]


async def test_a_rollback_sequences_nothing_and_an_error_after_the_commit_loses_nothing(pool, monkeypatch):

    passes: list[int] = []
    real = outbox._move_all

    async def counted(p):
        passes.append(1)
        return await real(p)

    monkeypatch.setattr(outbox, "_move_all", counted)

    async def rolled_back() -> None:
        async with outbox.transaction(pool) as conn:
            await outbox.append(conn, "code.created", "rolled back", {})
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await rolled_back()
    assert passes == []
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0

    async def lost(_pool):
        raise ConnectionResetError("the connection went after the commit")

    monkeypatch.setattr(outbox, "_move_all", lost)
    async with outbox.transaction(pool) as conn:  # committed: no error reaches the caller
        await outbox.append(conn, "code.created", "kept", {})
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 1
    monkeypatch.undo()
    await outbox.sequence(pool)
    assert await pool.fetchval("SELECT count(*) FROM events WHERE payment_code = 'kept'") == 1


async def test_a_pass_on_another_database_does_not_cover_a_writer_of_this_one(
    database_url, pool, monkeypatch
):
    from server.store import migrate, outbox
    from server.store.pool import create_pool

    other = "dipc_events_other"
    await pool.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")
    await pool.execute(f"CREATE DATABASE {other}")
    other_url = urlunsplit(urlsplit(database_url)._replace(path=f"/{other}"))
    await migrate.migrate_dsn(other_url)
    other_pool = await create_pool(other_url, min_size=1, max_size=2)
    monkeypatch.setattr(outbox, "SEQUENCE_GAP_S", 0.3)  # passes far apart: a writer asks during one

    try:
        await append_one(pool, "code.created", "warm")  # this database's last pass was just now
        # Waits out the gap, holding its pass:
        first = asyncio.create_task(append_one(pool, "code.created", "here"))
        await asyncio.sleep(0.05)
        await append_one(other_pool, "code.created", "there")
        await first
        assert await other_pool.fetchval("SELECT count(*) FROM events") == 1
    finally:
        await other_pool.close()
        await pool.execute(f"DROP DATABASE IF EXISTS {other} WITH (FORCE)")


async def test_a_server_of_the_previous_version_keeps_the_feed_in_causal_order(pool):
    """Its append (ADR 3 before 0007): the insert into events under the lock, held to its commit."""

    previous_append = """
        WITH locked AS (SELECT pg_advisory_xact_lock($1))
        INSERT INTO events (type, payment_code, payload)
        SELECT $2, $3, '{}' FROM locked
        RETURNING id, pg_notify('dipc_events', id::text)
    """
    async with sequencing_held(pool):  # this version's writer is between its commit and its pass
        committed_first = asyncio.create_task(append_one(pool, "payment.received", "X"))
        await until(pool, "SELECT count(*) FROM events_pending")
    await committed_first
    # Rolled back to the previous version: its writers insert directly. What this version left pending
    # goes first, though nobody of this version is left to sequence it.
    await pool.execute(
        "INSERT INTO events_pending (type, payment_code, payload) VALUES ('code.updated', 'X', '{}')"
    )
    async with pool.acquire() as conn, conn.transaction():
        await conn.fetchrow(previous_append, SEQUENCING_LOCK, "payment.conflict", "X")
    assert [row["type"] for row in await pool.fetch("SELECT type FROM events ORDER BY id")] == [
        "payment.received",
        "code.updated",
        "payment.conflict",
    ]
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0
    await outbox.sequence(pool)  # and a pass of this version after it finds nothing twice


async def test_a_payment_committed_late_in_its_budget_is_answered_200_not_503(
    aiohttp_client, database_url, pool
):
    from server.app import make_app
    from server.doku.client import DokuSimulator
    from tests.conftest import CLIENT, make_settings

    # A budget shorter than the sequencing's own wait: the wait ends before the request's deadline.
    client = await aiohttp_client(make_app(make_settings(notification_db_timeout_s=0.6), database_url))
    await pool.execute(
        "INSERT INTO payment_codes (payment_code, client_id, channel, invoice_number, amount, customer_name) "
        "VALUES ($1, $2, 'ALFA', $3, 150000, 'Budi')",
        CODE,
        CLIENT.client_id,
        INVOICE,
    )
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    body = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="late")
    async with sequencing_held(pool):
        reply = await doku.post("/doku/notification", body)
        assert reply.status == 200
        assert await pool.fetchval("SELECT count(*) FROM payments") == 1


async def test_a_pass_finds_pending_events_by_their_index_not_by_reading_what_passes_before_deleted(pool):
    # Under load, passes delete events faster than autovacuum (a minute apart) reclaims them: a pass that
    # scanned the table would read every event moved since the last vacuum. The table's statistics say it
    # was full, as the last ANALYZE under load saw it.
    await pool.executemany(
        "INSERT INTO events_pending (type, payment_code, payload) VALUES ('code.created', $1, '{}')",
        [(str(n),) for n in range(5000)],
    )
    await pool.execute("ANALYZE events_pending")
    assert await pool.fetchval("SELECT dipc_sequence_events(5000)") == 5000
    await pool.executemany(
        "INSERT INTO events_pending (type, payment_code, payload) VALUES ('code.created', $1, '{}')",
        [("late-1",), ("late-2",)],
    )
    scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'events_pending'"
    async with pool.acquire() as conn, conn.transaction():
        # The backend's counts not yet reported are in the view too: compare around the pass.
        before = await conn.fetchrow(scans)
        assert await conn.fetchval("SELECT dipc_sequence_events(1000)") == 2
        after = await conn.fetchrow(scans)
    assert (after["seq_scan"] - before["seq_scan"], after["idx_scan"] > before["idx_scan"]) == (0, True)
    assert await pool.fetchval("SELECT count(*) FROM events") == 5002


async def test_a_transaction_moves_its_own_events_in_its_commit_unless_another_sequencing_holds_on(pool):

    await pool.execute(  # committed by a writer that died before its pass
        "INSERT INTO events_pending (type, payment_code, payload) VALUES ('code.created', 'before', '{}')"
    )
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '100ms'")  # a batch's bound on its lock waits
            await conn.execute(f"{outbox.INSERT_PENDING} VALUES ('payment.received', 'mine', '{{}}')")
            async with sequencing_held(pool):
                assert await outbox.sequence_in_commit(conn) is False  # gave up after a few ms
            assert await conn.fetchval("SELECT current_setting('lock_timeout')") == "100ms"
            assert await conn.fetchval("SELECT count(*) FROM events_pending") == 2  # its own still there
            assert await outbox.sequence_in_commit(conn) is True
            assert await conn.fetchval("SELECT current_setting('lock_timeout')") == "100ms"
            # Nobody else sees them before the commit, and no other move runs meanwhile.
            assert await pool.fetchval("SELECT count(*) FROM events") == 0
            other = asyncio.create_task(outbox.sequence(pool))
            await asyncio.sleep(0.2)
            assert not other.done()
        await other
    assert [
        row["payment_code"] for row in await pool.fetch("SELECT payment_code FROM events ORDER BY id")
    ] == [
        "before",
        "mine",
    ]
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0
    async with pool.acquire() as conn:
        with pytest.raises(RuntimeError, match="outside a transaction"):
            await outbox.sequence_in_commit(conn)


async def test_a_transaction_frozen_after_moving_its_events_loses_its_session_not_the_feed(
    pool, database_url
):
    # It holds the sequencing lock until its COMMIT, which its client sends: a client that froze there
    # (a stopped process, a lost network) would stop every sequencing of the database.

    frozen = await asyncpg.connect(database_url)
    try:
        await frozen.execute("BEGIN")
        await frozen.execute(f"{outbox.INSERT_PENDING} VALUES ('payment.received', 'frozen', '{{}}')")
        assert await outbox.sequence_in_commit(frozen) is True
        await pool.execute(f"{outbox.INSERT_PENDING} VALUES ('code.created', 'other', '{{}}')")
        await outbox.sequence(pool)  # a pass elsewhere gets through (Unavailable after 1 s if not)
        # The session was ended: the batch is not committed. How asyncpg says so depends on when the
        # server's farewell arrives (as dipc's pool, which counts all three as the connection's loss).
        with pytest.raises(
            (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)
        ):
            await frozen.execute("COMMIT")
    finally:
        await frozen.close()
    assert [row["payment_code"] for row in await pool.fetch("SELECT payment_code FROM events")] == ["other"]
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0


async def test_writers_that_give_up_on_a_held_sequencing_lock_share_one_pass(pool, database_url):
    """A pass ran under the deadline of the writer that started it: when that writer gave up, its pass's
    connection was terminated and the next writer started another, so a held lock took a new backend
    (and connection) for each writer, as many as writers arrived. Now a process runs one pass at a time
    under its own deadline, and writers wait for it under theirs."""
    from server.core.errors import Unavailable

    watcher = await asyncpg.connect(database_url)
    try:
        async with sequencing_held(pool):
            waiters: set[int] = set()
            writers = [
                asyncio.create_task(outbox.sequence(pool, 0.1 + 0.04 * n)) for n in range(20)
            ]  # they give up one after the other, over 0.9 s
            while not all(writer.done() for writer in writers):
                waiters |= {
                    row["pid"]
                    for row in await watcher.fetch(
                        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    )
                }
                await asyncio.sleep(0.01)
            for writer in writers:
                with pytest.raises(Unavailable):
                    writer.result()
        assert len(waiters) == 1
    finally:
        await watcher.close()


async def test_a_writer_that_asked_after_a_pass_began_waits_for_the_next_not_that_ones_failure(
    pool, database_url
):
    """A pass that began before a writer committed cannot cover it, so its failure is not the writer's:
    the writer starts or joins the next pass, within its own wait (ADR 3: the answer comes once the feed
    has its event, if that takes less than the wait)."""
    from server.core.errors import Unavailable

    async with sequencing_held(pool):
        # Its pass waits for the lock SEQUENCE_WAIT_S (1 s) and fails; the writer would wait 3 s.
        first = asyncio.create_task(outbox.sequence(pool, 3))
        await waiting_for_a_lock(pool, "dipc_sequence_events")
        await pool.execute(f"{outbox.INSERT_PENDING} VALUES ('code.created', 'late', '{{}}')")
        late = asyncio.create_task(outbox.sequence(pool, 5))  # a writer that committed after the pass began
        with pytest.raises(Unavailable):
            await first  # its pass's failure
        assert not late.done()  # the failed pass was not its own: it waits for the next
    await late  # which finds the lock free
    assert await pool.fetchval("SELECT count(*) FROM events WHERE payment_code = 'late'") == 1


async def test_a_writers_wait_for_a_pass_is_measured_once(pool):
    """dipc_db_operation_duration_seconds{operation="outbox.sequence"} is a writer's wait (README); the
    pass it waits for is "outbox.pass"."""
    from server.ops import metrics

    def observed(operation: str) -> float:
        [family] = metrics.DB_DURATION.collect()
        return sum(
            sample.value
            for sample in family.samples
            if sample.name.endswith("_count") and sample.labels["operation"] == operation
        )

    await pool.execute(f"{outbox.INSERT_PENDING} VALUES ('code.created', 'measured', '{{}}')")
    before = observed("outbox.sequence"), observed("outbox.pass")
    await outbox.sequence(pool)
    assert (observed("outbox.sequence") - before[0], observed("outbox.pass") - before[1]) == (1, 1)


async def test_long_polls_at_one_cursor_share_the_read_an_event_wakes_them_for(
    client, register, admin_headers, monkeypatch
):
    """Every event wakes every long-poll: each one's own query made a herd that held DOKU's inquiries
    back (1,000 waiters: an inquiry's median 2.7 → 256 ms, bench/README "Long-polls")."""
    reads: list[int] = []
    read_after = outbox.read_after

    async def counted(conn, after, limit):
        reads.append(after)
        return await read_after(conn, after, limit)

    monkeypatch.setattr(outbox, "read_after", counted)
    waiters = [asyncio.create_task(feed(client, admin_headers, after=0, wait=30)) for _ in range(30)]
    waits = client.app[admin.FEED_WAITS]
    async with asyncio.timeout(10):
        while waits.active < len(waiters):  # noqa: ASYNC110 - a count in the app, no event to wait on
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.5)  # each has read once (those reads share, too) and waits
    reads.clear()
    await register()
    pages = await asyncio.gather(*waiters)
    assert {tuple(event["type"] for event in page["items"]) for page in pages} == {("code.created",)}
    assert 1 <= len(reads) <= 3, reads  # one per wake-up, not one per waiter


async def test_long_polls_past_the_cap_are_refused_at_once_and_a_read_without_wait_is_not(
    aiohttp_client, pool, database_url, admin_headers
):
    client = await aiohttp_client(make_app(make_settings(feed_max_waiters=3), database_url))
    waiters = [asyncio.create_task(feed(client, admin_headers, after=0, wait=30)) for _ in range(3)]
    await asyncio.sleep(0.3)
    refused = await client.get("/v1/events", params={"after": "0", "wait": "30"}, headers=admin_headers)
    assert refused.status == 503
    assert (await refused.json())["error"]["code"] == "OVERLOADED"
    assert (await feed(client, admin_headers, after=0))["items"] == []
    created = await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)
    assert created.status == 201
    assert all(len(page["items"]) == 1 for page in await asyncio.gather(*waiters))
    page = await feed(client, admin_headers, after=1, wait=0.2)  # the slots were given back
    assert page["items"] == []


async def test_a_read_without_wait_sees_every_event_answered_before_it_while_a_like_read_runs(
    aiohttp_client, database_url, pool, admin_headers, monkeypatch
):
    """(Found by review.) A read that joined one already running, begun before a write was answered,
    missed that write's event: the feed's promise is that an answered change is in it. Here the
    listener hears nothing, as when its NOTIFY is late, and the first read returns late."""
    monkeypatch.setattr(EventListener, "_on_notify", lambda self, *args: None)
    client = await aiohttp_client(make_app(make_settings(), database_url))
    await client.app[LISTENER].connected.wait()  # its own bump is behind us
    gate = asyncio.Event()
    started = asyncio.Event()
    read_after = outbox.read_after

    async def slow_first(conn, after, limit):
        events = await read_after(conn, after, limit)
        if not started.is_set():
            started.set()
            await gate.wait()
        return events

    monkeypatch.setattr(outbox, "read_after", slow_first)
    first = asyncio.create_task(feed(client, admin_headers, after=0))
    await started.wait()
    created = await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)
    assert created.status == 201
    second = asyncio.create_task(feed(client, admin_headers, after=0))
    await asyncio.sleep(0.2)
    gate.set()
    assert (await first)["items"] == []
    assert [event["type"] for event in (await second)["items"]] == ["code.created"]


async def test_a_read_every_caller_gave_up_on_gives_its_connection_back(
    aiohttp_client, database_url, pool, admin_headers
):
    """(Found by review.) A read whose callers all passed their deadline ran on, queued for a connection
    or blocked, with no deadline of its own: reads held the pool, and DOKU's inquiry got a 503."""
    client = await aiohttp_client(make_app(make_settings(admin_db_timeout_s=0.5), database_url))
    reading = (
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%FROM events WHERE id >%'"
        " AND pid <> pg_backend_pid()"
    )
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        answers = await asyncio.gather(
            *(client.get("/v1/events", params={"after": str(n)}, headers=admin_headers) for n in range(20))
        )
        assert [answer.status for answer in answers] == [503] * 20  # 8 read, 12 queued for a connection
        async with asyncio.timeout(5):
            while await pool.fetchval(reading + " AND state = 'active'"):  # noqa: ASYNC110 - a server's state
                await asyncio.sleep(0.05)


async def _ask(client, admin_headers, after_s: float, wait: float):
    await asyncio.sleep(after_s)
    return await client.get("/v1/events", params={"after": "0", "wait": str(wait)}, headers=admin_headers)


async def test_a_shared_read_is_not_ended_by_the_deadline_of_a_caller_while_another_waits(
    aiohttp_client, database_url, pool, admin_headers
):
    """(Found by review.) A shared read ran under the deadline of the caller that asked for it first: its
    expiry ended the read under a long-poll that still had seconds to wait, which got a 503."""
    client = await aiohttp_client(make_app(make_settings(admin_db_timeout_s=1.0), database_url))
    async with pool.acquire() as holder:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        first = asyncio.create_task(_ask(client, admin_headers, 0.0, 0))  # its read runs, blocked
        second = asyncio.create_task(_ask(client, admin_headers, 0.3, 0))  # asks for the next read first
        patient = asyncio.create_task(_ask(client, admin_headers, 0.6, 10))  # shares that next read
        assert (await first).status == 503
        assert (await second).status == 503
        await asyncio.sleep(0.5)
        await transaction.rollback()
    answer = await patient
    assert answer.status == 200, await answer.text()


async def test_a_shared_read_nobody_waits_for_ends_at_once_on_a_connection_that_hangs(
    aiohttp_client, database_url, pool, admin_headers
):
    """(Found by review.) A read begun after the caller who asked for it first had gone ran with no
    deadline; when its last caller left on a connection that had gone silent, its cancellation waited on
    it, and every later read of that page queued behind it and got a 503 until the network came back."""
    proxy = SilencingProxy(database_url)
    await proxy.start()
    try:
        client = await aiohttp_client(make_app(make_settings(admin_db_timeout_s=1.0), proxy.url))
        async with pool.acquire() as holder:
            transaction = holder.transaction()
            await transaction.start()
            await holder.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            first = asyncio.create_task(_ask(client, admin_headers, 0.0, 2))  # gone at 3.0 s
            second = asyncio.create_task(_ask(client, admin_headers, 0.3, 0))  # the next: gone at 1.3 s
            third = asyncio.create_task(_ask(client, admin_headers, 0.6, 3))  # shares it; gone at 4.6 s
            await asyncio.sleep(3.5)  # the next read has begun, blocked
            proxy.lose_every_open_connection()
            assert [(await caller).status for caller in (first, second, third)] == [503, 503, 503]
            await transaction.rollback()
        answer = await _ask(client, admin_headers, 0.2, 0)
        assert answer.status == 200, await answer.text()
    finally:
        await proxy.close()
