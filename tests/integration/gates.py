"""A gate at the database: holds a batch (of inquiries, of payment recordings) busy without a lock.

A trigger keeps the statement that inserts a matching row working (pg_sleep, waiting for no lock) until
the test opens the gate; what arrives meanwhile queues for the lane's next batch (:func:`queued`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from server.store.batches import Batches


class Gate:
    def __init__(self, pool: asyncpg.Pool, name: str, query_part: str) -> None:
        self.pool = pool
        self.name = name
        self.query_part = query_part

    async def reached(self) -> None:
        """Until a statement running ``query_part`` waits at the gate."""
        if not await self._at_gate("count(*)", pause_s=0.01):
            raise AssertionError("no batch reached the gate")

    async def end(self, how: str) -> int:
        """End the statement waiting at the gate with ``how`` (``pg_cancel_backend`` or
        ``pg_terminate_backend``); how many backends that ended. Between two of its sleeps the gate's
        loop runs with no wait event, so a backend seen there is looked at again, not taken for gone."""
        return await self._at_gate(f"count({how}(pid))", pause_s=0.001)

    async def _at_gate(self, select: str, *, pause_s: float) -> int:
        """``select`` over the backends sleeping at the gate, asked again (up to 500 times, ``pause_s``
        apart) until it is not 0; its last value."""
        found = 0
        for _ in range(500):
            found = await self.pool.fetchval(
                f"SELECT {select} FROM pg_stat_activity"  # noqa: S608 - a test's constant
                " WHERE wait_event = 'PgSleep' AND query LIKE '%' || $1 || '%'",
                self.query_part,
            )
            if found:
                break
            await asyncio.sleep(pause_s)
        return found

    async def open(self, conn: asyncpg.Connection | None = None) -> None:
        """Open the gate, through ``conn`` when the test holds the pool's connections."""
        await (conn or self.pool).execute(f"INSERT INTO {self.name} VALUES (true)")  # noqa: S608 - a test's constant


async def queued(batches: Batches, count: int, *, then_timeout_s: float | None = None) -> None:
    """Until ``count`` writes wait for their lane's next batch; that batch and those after it then have
    ``then_timeout_s`` at the database, if given. (The batch held at the gate is not what a test measures:
    with a short budget from its start, a slow machine's queueing outlasted it, and the writes went out
    one batch early.)"""
    for _ in range(500):
        if batches.waiting == count:
            if then_timeout_s is not None:
                batches._timeout_s = then_timeout_s  # read as each batch starts
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{batches.waiting} writes wait, not {count}")


@asynccontextmanager
async def gate_on(
    pool: asyncpg.Pool, *, table: str, where: str, query_part: str, name: str = "test_gate", then: str = ""
) -> AsyncIterator[Gate]:
    """A gate for the rows inserted into ``table`` that match ``where`` (on NEW), recognised by
    ``query_part`` in their statement; ``then`` is more PL/pgSQL for the trigger to run after the gate."""
    await pool.execute(
        f"""
        CREATE TABLE {name} (open boolean NOT NULL);
        CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            WHILE ({where}) AND NOT EXISTS (SELECT FROM {name} WHERE open) LOOP
                PERFORM pg_sleep(0.01);
            END LOOP;
            {then}
            RETURN NEW;
        END $$;
        CREATE TRIGGER {name} BEFORE INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION {name}();
        """
    )
    gate = Gate(pool, name, query_part)
    try:
        yield gate
    finally:
        await gate.open()
        await pool.execute(f"DROP TRIGGER {name} ON {table}; DROP FUNCTION {name}(); DROP TABLE {name}")
