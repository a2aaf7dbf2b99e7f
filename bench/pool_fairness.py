"""Does asyncpg's own pool serve waiters first come, first served? (issue 10 asks before FairPool stays)

    .venv/bin/python bench/pool_fairness.py            # about 20 seconds

Starts an embedded PostgreSQL, then runs the same contention against asyncpg's ``Pool`` and dipc's
``FairPool``: 32 tasks on 10 connections, each acquiring, running one short statement and releasing,
in a loop. Prints the acquire wait's p50/p99/max per pool, and the installed asyncpg version. A fair
queue keeps p99 near a few times p50; a queue where newcomers take a just-released connection ahead
of a woken waiter (which then queues again at the back) shows a tail of starved waiters.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import run  # bench/run.py: this runs as a script, with bench/ on sys.path
import uvloop

from server.store.pool import FairPool

TASKS, CONNECTIONS, SECONDS = 32, 10, 8


async def contend(pool: asyncpg.Pool) -> list[float]:
    waits: list[float] = []
    stop = time.perf_counter() + SECONDS

    async def worker() -> None:
        while time.perf_counter() < stop:
            asked = time.perf_counter()
            async with pool.acquire() as conn:
                waits.append(time.perf_counter() - asked)
                await conn.fetchval("SELECT 1")

    await asyncio.gather(*(worker() for _ in range(TASKS)))
    return sorted(waits)


async def measure(dsn: str) -> None:
    print(f"asyncpg {asyncpg.__version__}; {TASKS} tasks on {CONNECTIONS} connections, {SECONDS} s each")
    print("| pool | acquires | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|")
    for name, pool_class in (("asyncpg.Pool", asyncpg.Pool), ("FairPool", FairPool)):
        pool = await pool_class(
            dsn, min_size=CONNECTIONS, max_size=CONNECTIONS, max_queries=50_000, loop=None,
            max_inactive_connection_lifetime=60.0, connection_class=asyncpg.Connection,
            record_class=asyncpg.Record,
        )  # fmt: skip
        try:
            waits = await contend(pool)
        finally:
            await pool.close()

        def ms(fraction: float, waits: list[float] = waits) -> str:
            return f"{waits[min(len(waits) - 1, int(fraction * len(waits)))] * 1000:.2f}"

        print(f"| {name} | {len(waits):,} | {ms(0.5)} | {ms(0.99)} | {waits[-1] * 1000:.2f} |")


def main() -> None:
    with run.scratch_database("dipc-bench-pool-") as (_workdir, _pg, dsn):
        uvloop.run(measure(dsn))


if __name__ == "__main__":
    main()
