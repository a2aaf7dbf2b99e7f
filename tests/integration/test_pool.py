"""The connection pool serves waiters in arrival order, so no request starves under load; deadlines
bound the database work of a request."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

from server.core.errors import Unavailable
from server.store.pool import create_pool, deadline
from tests.integration.test_events import until


async def test_under_contention_connections_go_out_in_the_order_they_were_asked_for(database_url):
    pool = await create_pool(database_url, min_size=3, max_size=3)
    order = itertools.count()
    served: list[tuple[int, int]] = []  # (asked, got)
    rng = random.Random(7)

    async def worker() -> None:
        for _ in range(30):
            asked = next(order)
            async with pool.acquire() as conn:
                served.append((asked, next(order)))
                if rng.random() < 0.3:
                    await conn.fetchval("SELECT 1")
                await asyncio.sleep(rng.random() / 1000)

    try:
        await asyncio.gather(*(worker() for _ in range(20)))
    finally:
        await pool.close()
    assert len(served) == 600
    by_ask = sorted(served)
    overtaken = sum(1 for earlier, later in itertools.pairwise(by_ask) if later[1] < earlier[1])
    assert overtaken == 0  # nobody who asked later was served earlier


async def test_releasing_twice_frees_one_place(database_url):
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        first = await pool.acquire()
        await pool.release(first)
        await pool.release(first)
        held = [await pool.acquire(), await pool.acquire()]

        async def one_more():
            return await pool.acquire()

        third = asyncio.create_task(one_more())
        await asyncio.sleep(0.1)
        assert not third.done()  # two places, both taken: a double release did not make a third
        await pool.release(held[0])
        await pool.release(await third)
        await pool.release(held[1])
    finally:
        await pool.close()


async def test_a_deadline_cancels_a_hanging_statement_and_frees_its_connection(database_url):
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"did not answer within 0\.2 s"):
            async with deadline(0.2, "test"):
                await pool.fetchval("SELECT pg_sleep(30)")
        assert time.monotonic() - started < 10  # the deadline spoke, not the statement
        # The pool's one connection was terminated, not left to the hanging statement: a new one serves.
        async with deadline(5, "test"):
            assert await pool.fetchval("SELECT 1") == 1
    finally:
        await pool.close()


async def test_a_timeout_of_something_else_is_not_reported_as_the_deadline(captured_log):
    """(Found by review.) A 503 said "did not answer within 30 s" after 5 s: the pool's connect timeout,
    or any TimeoutError raised inside, was reported as the deadline's own expiry."""
    with pytest.raises(Unavailable) as refused:
        async with deadline(30, "test"):
            raise TimeoutError  # as asyncpg's connect raises it, after DIPC_DB_CONNECT_TIMEOUT_S
    assert "30 s" not in str(refused.value)
    assert [line["event"] for line in captured_log.lines()] == ["db.unavailable"]


async def test_a_deadline_also_bounds_the_wait_for_a_connection(database_url):
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        held = await pool.acquire()
        with pytest.raises(Unavailable, match="did not answer"):
            async with deadline(0.2, "test"):
                await pool.fetchval("SELECT 1")  # waits for the one connection, held above
        await pool.release(held)
    finally:
        await pool.close()


async def test_a_cancellation_from_elsewhere_is_not_taken_for_the_deadline(database_url):
    """The client went away or the server stops: the work's cancellation goes on as a cancellation."""
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:

        async def work() -> None:
            async with deadline(30, "test"):
                await pool.fetchval("SELECT pg_sleep(30)")

        task = asyncio.create_task(work())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
    finally:
        pool.terminate()


async def test_an_inner_deadline_expiring_leaves_the_outer_one_running(database_url):
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        async with deadline(30, "outer"):
            with pytest.raises(Unavailable):
                async with deadline(0.2, "inner"):
                    await pool.fetchval("SELECT pg_sleep(30)")
            # The inner expiry was consumed where it belongs: the outer scope's work goes on.
            assert await pool.fetchval("SELECT 2") == 2
        assert asyncio.current_task().cancelling() == 0
    finally:
        await pool.close()


async def test_a_backend_whose_connection_a_deadline_terminated_stops_waiting_for_a_lock(database_url):
    """PostgreSQL does not notice a closed client while it waits for a lock: without checking the client
    (client_connection_check_interval), each request that gave up on a held lock left a backend waiting
    until the statement timeout, and under load they filled max_connections."""
    pool = await create_pool(database_url, min_size=1, max_size=2)
    holder = await pool.acquire()
    try:
        await holder.execute("BEGIN")
        await holder.execute("SELECT pg_advisory_xact_lock(42)")
        with pytest.raises(Unavailable):
            async with deadline(0.2, "test"):
                await pool.fetchval("SELECT pg_advisory_xact_lock(42)")
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        assert await holder.fetchval(waiting) == 1  # the terminated connection's backend, still waiting
        await until(holder, f"SELECT ({waiting}) = 0")  # within 5 s, or the test fails
    finally:
        await pool.release(holder)
        await pool.close()
