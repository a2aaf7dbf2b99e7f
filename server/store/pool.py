"""The connection pool, and the one place that decides which failures mean "the database is down"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

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


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    connect_timeout: float = 5.0,
    statement_timeout_ms: int = 30_000,
) -> asyncpg.Pool:
    """A pool whose connections speak orjson for jsonb and give up on statements that hang."""
    return await asyncpg.create_pool(
        dsn,
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
