"""The connection pool, and the one place that decides which failures mean "the database is down"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
import structlog

from server.core.errors import Unavailable
from server.ops import metrics

log = structlog.get_logger(component="dipc.store")

# Failures that say nothing about the request and everything about the database or the way to it.
# The caller gets 503 UNAVAILABLE and retries; DOKU retries notifications on its own schedule.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, crash recovery, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.InterfaceError,  # connection closed under us, pool closing
)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: orjson.dumps(value).decode(),
        decoder=orjson.loads,
        format="text",
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection to the pool without asyncpg's default reset round trip.

    asyncpg still rolls back an open transaction before calling this. The default reset (RESET ALL,
    UNLISTEN *, advisory unlock, CLOSE ALL) costs a round trip per release, on the inquiry hot path too,
    and there is nothing for it to undo: pooled connections never SET session state (only SET LOCAL),
    never LISTEN (the event feed listens on a connection of its own), and release session advisory
    locks in ``finally`` (migrations).
    """


# How long taking a connection back may wait for its cancelled statement (normally well under 1 ms).
RELEASE_TIMEOUT_S = 1.0


class FairPool(asyncpg.Pool):
    """asyncpg's pool, served first come, first served.

    asyncpg hands a released connection to whoever asks next; a waiter it had woken for that connection
    finds it gone and queues again at the back. Under load some requests starve: bench/ measured p99
    400 ms at p50 10 ms with 32 concurrent inquiries on 10 connections. A FIFO semaphore with as many
    permits as connections, taken before asyncpg's queue, makes waiting fair (p99 fell to 27 ms).
    """

    __slots__ = ("_gate", "_held")

    def __init__(self, *args: Any, max_size: int, **kwargs: Any) -> None:
        super().__init__(*args, max_size=max_size, **kwargs)
        self._gate = asyncio.Semaphore(max_size)
        self._held: set[int] = set()  # ids of the proxies handed out through the gate

    async def _acquire(self, timeout: float | None) -> Any:  # noqa: ASYNC109 - asyncpg's signature
        started = time.monotonic()
        async with asyncio.timeout(timeout):
            await self._gate.acquire()
        try:
            remaining = None if timeout is None else max(timeout - (time.monotonic() - started), 0.001)
            proxy = await super()._acquire(remaining)
        except BaseException:
            self._gate.release()
            raise
        self._held.add(id(proxy))
        return proxy

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        # asyncpg waits for a cancelled statement to end before it takes the connection back, without a
        # limit unless given one. A statement cancelled by a request's deadline on a frozen server (a
        # hung host, a stalled disk: SIGSTOP) would hold the request, whatever its budget, until the
        # server came back. With a limit, asyncpg terminates that connection and the pool opens another.
        if timeout is None:
            timeout = RELEASE_TIMEOUT_S
        try:
            await super().release(connection, timeout=timeout)
        finally:
            if id(connection) in self._held:  # a second release of one proxy frees nothing twice
                self._held.discard(id(connection))
                self._gate.release()


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    connect_timeout: float = 5.0,
    statement_timeout_ms: int = 30_000,
) -> asyncpg.Pool:
    """A pool whose connections speak orjson for jsonb and give up on statements that hang."""
    return await FairPool(
        dsn,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        loop=None,
        max_queries=50_000,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout,
        init=_init_connection,
        reset=_keep_session,
        # Connections to a dead server are dropped quickly, so the pool recovers when it returns.
        max_inactive_connection_lifetime=60.0,
        server_settings={
            "application_name": "dipc",
            "jit": "off",
            "statement_timeout": str(statement_timeout_ms),
            "idle_in_transaction_session_timeout": "60000",
        },
    )


@asynccontextmanager
async def deadline(seconds: float, what: str) -> AsyncIterator[None]:
    """Run database work under a deadline; turn every "database is down" failure into Unavailable.

    Also the one place the duration of a request's database work is measured (``what`` names it).
    """
    started = time.perf_counter()
    result = "error"
    try:
        async with asyncio.timeout(seconds):
            yield
        result = "ok"
    except TimeoutError:
        result = "timeout"
        log.warning("db.deadline_exceeded", what=what, seconds=seconds)
        raise Unavailable(f"the database did not answer within {seconds:g} s") from None
    except UNAVAILABLE_ERRORS as error:
        result = "unavailable"
        log.warning("db.unavailable", what=what, error=f"{type(error).__name__}: {error}")
        raise Unavailable("the database is unavailable") from error
    finally:
        metrics.DB_DURATION.labels(what, result).observe(time.perf_counter() - started)
