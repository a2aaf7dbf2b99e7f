"""Readiness: can this process serve? The database answers within a second and its schema is current.

The check runs on a connection of its own, never the request pool, so a probe does not queue behind
requests stuck on a slow database. Concurrent probes share one check, and a result is reused for half a
second, so a storm of probes costs the database one query.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg

from server.ops import metrics
from server.store import migrate
from server.store.pool import UNAVAILABLE_ERRORS

CHECK_TIMEOUT_S = 1.0
REUSE_S = 0.5
# The server's own bound on every statement of the checker's connection (its checks, the sampler's reads):
# a statement the client gave up on (after CHECK_TIMEOUT_S, or the sampler's second) would otherwise keep
# its backend waiting on whatever it waits for (a table an operator holds locked), one per round, until
# the database has no connections left. Ignored behind a pgbouncer that ignores the startup parameter:
# the role's own statement_timeout then bounds it (README, pgbouncer).
STATEMENT_TIMEOUT_MS = 2000
_SESSION = {"application_name": "dipc", "statement_timeout": str(STATEMENT_TIMEOUT_MS)}
# A database that reads but takes no writes answers every other check: a standby (after a failover that
# left dipc's address pointing at it), or one set default_transaction_read_only. Every write would fail.
READ_ONLY = "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only')::boolean"


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str | None = None
    pending: tuple[str, ...] = ()

    def document(self) -> dict[str, object]:
        if self.ready:
            return {"status": "ready"}
        document: dict[str, object] = {"status": "unavailable", "reason": self.reason}
        if self.pending:
            document["pending"] = list(self.pending)
        return document


class HealthChecker:
    def __init__(self, dsn: str, *, statement_cache_size: int = 100) -> None:
        self.dsn = dsn
        self.statement_cache_size = statement_cache_size
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._last: tuple[float, Readiness] | None = None

    async def readiness(self) -> Readiness:
        async with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < REUSE_S:
                return self._last[1]
            result = await self._check()
            self._last = (time.monotonic(), result)
            metrics.DATABASE_UP.set(1 if result.ready else 0)
            return result

    async def _check(self) -> Readiness:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self.dsn,
                        timeout=CHECK_TIMEOUT_S,
                        statement_cache_size=self.statement_cache_size,
                        server_settings=_SESSION,
                    )
                state = await migrate.state(self._conn)
                read_only = await self._conn.fetchval(READ_ONLY)
        except UNAVAILABLE_ERRORS as error:
            await self.close()
            detail = "did not answer within 1 s" if isinstance(error, TimeoutError) else type(error).__name__
            return Readiness(False, f"database unreachable ({detail})")
        if not state.current:
            return Readiness(False, "migrations not current", tuple(state.pending + state.changed))
        if read_only:
            return Readiness(False, "database is read-only (a standby, or default_transaction_read_only)")
        return Readiness(True)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection | None]:
        """The checker's own connection, if open, for the block (other checks wait): the background
        sampler reads its gauges here, away from the request pool."""
        async with self._lock:
            yield self._conn if self._conn is not None and not self._conn.is_closed() else None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
