"""The connection pool serves waiters in arrival order, so no request starves under load."""

from __future__ import annotations

import asyncio
import itertools
import random

from server.store.pool import create_pool


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
