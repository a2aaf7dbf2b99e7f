"""events_pending's floor (migration 0020): moves read from it, and it never passes an event that may
still commit.

A move of pending events into the feed reads events_pending's primary key from the floor up. While a
snapshot is held anywhere in the database, the rows moves deleted stay in that index; reading from the
first id, every move walked all of them. The floor may rise only past ids whose writers have all ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.store import outbox
from tests.integration.test_events import until

APPEND = "INSERT INTO events_pending (type, payment_code, payload) VALUES ('code.created', $1, '{}')"
FLOOR = "SELECT last_value FROM events_pending_floor"


async def advance(pool: asyncpg.Pool, runs: int = 3) -> int:
    """The floor after ``runs`` runs of its keeper, each in a transaction of its own, as a server runs it."""
    for _ in range(runs):
        await pool.fetchval("SELECT dipc_advance_events_floor()")
    return await pool.fetchval(FLOOR)


def reaped(pid: int) -> bool:
    """The process is gone, not even a zombie."""
    return not os.path.exists(f"/proc/{pid}")


@contextlib.asynccontextmanager
async def snapshot_held(database_url: str) -> AsyncIterator[None]:
    """A read-only REPEATABLE READ transaction with its snapshot taken (a pg_dump, say) until exit."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            await conn.fetchval("SELECT count(*) FROM events")
            yield
    finally:
        await conn.close()


async def index_entries_read(conn: asyncpg.Connection, statement: str) -> tuple[object, int]:
    """``statement``'s result, and how many entries of events_pending's primary key it read."""
    count = "SELECT pg_stat_get_xact_tuples_returned('events_pending_pkey'::regclass)"
    async with conn.transaction():  # the backend's counts not yet reported are read within it
        before = await conn.fetchval(count)
        result = await conn.fetchval(statement)
        return result, await conn.fetchval(count) - before


async def test_under_a_held_snapshot_a_move_reads_from_the_floor_not_every_event_moved_since(
    pool, database_url
):
    async with snapshot_held(database_url):
        await pool.executemany(APPEND, [(str(n),) for n in range(3000)])
        await pool.execute("ANALYZE events_pending")  # as under load: the planner reads it by its index
        assert await pool.fetchval("SELECT dipc_sequence_events(5000)") == 3000
        await pool.execute(APPEND, "late-1")
        async with pool.acquire() as conn:
            # The floor is still at 0: the move walks the 3,000 rows moved before, dead but kept.
            moved, read = await index_entries_read(conn, "SELECT dipc_sequence_events(1000)")
            assert (moved, read >= 3000) == (1, True), read
            assert await advance(pool) == 3001
            await pool.execute(APPEND, "late-2")
            moved, read = await index_entries_read(conn, "SELECT dipc_sequence_events(1000)")
            assert (moved, read <= 3) == (1, True), read  # its own id, from the floor and by the delete
    assert await pool.fetchval("SELECT count(*) FROM events") == 3002


async def test_the_floor_stays_below_the_id_of_a_writer_still_running_which_then_reaches_the_feed(pool):
    # Ids given before: a sequence writes its WAL (and so gives the transaction an xid) only every 32 ids.
    await pool.executemany(APPEND, [("before-1",), ("before-2",)])
    assert await pool.fetchval("SELECT dipc_sequence_events(1000)") == 2
    assert await advance(pool) == 2
    async with pool.acquire() as writer:
        transaction = writer.transaction()
        await transaction.start()
        # The writer has taken its event's id, as an insert's default does first, and not yet inserted.
        mine = await writer.fetchval("SELECT dipc_next_pending_event_id()")
        await pool.executemany(APPEND, [("after-1",), ("after-2",)])
        assert await pool.fetchval("SELECT dipc_sequence_events(1000)") == 2
        assert await advance(pool, runs=5) == mine - 1
        await writer.execute(
            "INSERT INTO events_pending (id, type, payment_code, payload)"
            " VALUES ($1, 'code.created', 'mine', '{}')",
            mine,
        )
        await transaction.commit()
    assert await pool.fetchval("SELECT dipc_sequence_events(1000)") == 1
    assert await pool.fetchval("SELECT payment_code FROM events ORDER BY id DESC LIMIT 1") == "mine"
    assert await advance(pool) == mine + 2


async def test_writers_racing_the_floor_keeper_and_moves_reach_the_feed_each_once(pool, database_url):
    committed: list[str] = []
    stop = asyncio.Event()

    async def write(n: int) -> None:
        rng = random.Random(n)
        conn = await asyncpg.connect(database_url)
        try:
            for k in range(25):
                label = f"{n}-{k}"
                transaction = conn.transaction()
                await transaction.start()
                await conn.execute(APPEND, label)
                await asyncio.sleep(rng.random() * 0.01)  # commits land out of id order
                if rng.random() < 0.1:
                    await transaction.rollback()  # its id is never seen
                    continue
                await transaction.commit()
                committed.append(label)
                await conn.fetchval("SELECT dipc_sequence_events(1000)")
        finally:
            await conn.close()

    async def keep_the_floor() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            while not stop.is_set():
                await conn.fetchval("SELECT dipc_advance_events_floor()")
        finally:
            await conn.close()

    keeper = asyncio.create_task(keep_the_floor())
    await asyncio.gather(*(write(n) for n in range(12)))
    stop.set()
    await keeper
    await pool.fetchval("SELECT dipc_sequence_events(1000)")
    labels = [row["payment_code"] for row in await pool.fetch("SELECT payment_code FROM events ORDER BY id")]
    assert (sorted(labels), len(set(labels))) == (sorted(committed), len(committed))
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0
    assert await pool.fetchval(FLOOR) > 0  # the keeper did advance meanwhile


async def test_a_server_starting_lowers_a_floor_restored_above_pending_events(pool):
    # A dump reads sequences after its snapshot: restored, the floor may stand above events it saw pending.
    await pool.executemany(APPEND, [("restored-1",), ("restored-2",)])
    await pool.execute("SELECT setval('events_pending_floor', 10)")
    assert await pool.fetchval("SELECT dipc_sequence_events(1000)") == 0  # moves read from the floor
    keeper = asyncio.create_task(outbox.floor_forever(pool, every_s=0.01))
    try:
        await until(pool, f"SELECT ({FLOOR}) = 0")
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    assert await pool.fetchval("SELECT dipc_sequence_events(1000)") == 2


async def test_ids_started_over_under_the_floor_start_it_over(pool):
    await pool.executemany(APPEND, [("old-1",), ("old-2",)])
    await pool.fetchval("SELECT dipc_sequence_events(1000)")
    assert await advance(pool) == 2
    await pool.execute("SELECT setval('events_pending_id_seq', 1, false)")  # as RESTART IDENTITY does
    await pool.execute(APPEND, "new-1")
    assert await advance(pool, runs=1) == 0
    assert await pool.fetchval("SELECT dipc_sequence_events(1000)") == 1


async def test_the_keeper_refuses_to_run_inside_a_transaction_that_has_written(pool):
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(APPEND, "x")
        with pytest.raises(asyncpg.RaiseError, match="its own transaction"):
            await conn.fetchval("SELECT dipc_advance_events_floor()")


async def test_postgresql_killed_while_the_floor_advances_keeps_every_committed_event(tmp_path):
    # The floor and its next step are sequences, written in place and WAL-logged without a flush of their
    # own (migration 0020): a crash keeps a prefix of their writes, and each value written is true on its
    # own. Writers, moves and the keeper run until PostgreSQL is SIGKILLed (every process of the cluster
    # at once, as the OOM killer or a power cut would); once it has recovered, every event whose commit
    # was answered is above the floor or in the feed, and reaches the feed exactly once.
    from server.embedded import EmbeddedPostgres
    from server.store import migrate
    from tests.integration.test_outage import cluster_pids

    server = EmbeddedPostgres(tmp_path / "pg", durable=True)
    dsn = await asyncio.to_thread(server.start)
    await migrate.migrate_dsn(dsn)
    committed: list[str] = []

    async def write(n: int) -> None:
        conn = await asyncpg.connect(dsn)
        for k in range(100_000):
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute(APPEND, f"{n}-{k}")
            await transaction.commit()
            committed.append(f"{n}-{k}")
            if k % 3 == 0:
                await conn.fetchval("SELECT dipc_sequence_events(1000)")

    async def keep_the_floor() -> None:
        conn = await asyncpg.connect(dsn)
        while True:
            await conn.fetchval("SELECT dipc_advance_events_floor()")

    tasks = [asyncio.create_task(write(n)) for n in range(6)] + [asyncio.create_task(keep_the_floor())]
    try:
        await asyncio.sleep(1.5)
        floor_before = await asyncpg.connect(dsn)
        assert await floor_before.fetchval(FLOOR) > 0  # the keeper was advancing when the kill came
        await floor_before.close()
        killed = cluster_pids(server)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        await asyncio.gather(*tasks, return_exceptions=True)  # each fails on its lost connection
    finally:
        for task in tasks:
            task.cancel()
    for _ in range(300):  # until the killed postmaster is reaped: its pid keeps the lock file in use
        if reaped(killed[0]):
            break
        await asyncio.sleep(0.1)
    await asyncio.to_thread(server.start)
    try:
        conn = await asyncpg.connect(dsn)
        try:
            below = await conn.fetchval(f"SELECT count(*) FROM events_pending WHERE id <= ({FLOOR})")  # noqa: S608
            assert below == 0
            while await conn.fetchval("SELECT dipc_sequence_events(1000)") == 1000:
                pass
            labels = [row[0] for row in await conn.fetch("SELECT payment_code FROM events ORDER BY id")]
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(server.stop)
    assert len(labels) == len(set(labels))
    assert set(committed) <= set(labels)  # and perhaps a commit that was not answered before the kill
    assert len(committed) > 100
