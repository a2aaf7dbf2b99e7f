"""Numbered SQL migrations from ``schemas/migrations``: applied in order, each in a transaction, once.

An advisory lock makes workers that start together migrate once; the others wait, then find nothing to do.

A migration runs beside servers that serve. While a lock request waits, every query of that table
queues behind it, so a migration that waited for as long as a long transaction (a nightly pg_dump, a
report) holds its table would stop the servers' queries of it for as long. So a try waits at most
LOCK_TIMEOUT_MS for each lock, then rolls back, and the next try waits until the sessions it waited for
have ended (or RETRY_AFTER_S has passed): until then it would only fail again, after holding what its
earlier statements had locked (an index build holds off the table's writes while it runs). A second
connection, the watcher, sees which sessions a waiting try waits for (pg_blocking_pids). An autovacuum is
waited for past deadlock_timeout once instead: PostgreSQL then cancels it for the lock request. The work
itself is not bounded: an index over a large table takes what it takes, whatever the session's
statement_timeout; a migrator that dies meanwhile ends its work within a second
(client_connection_check_interval, server/store/pool.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import structlog

from server.schemas import schemas_dir

log = structlog.get_logger(component="dipc.migrate")

# pg_advisory_lock key: the ASCII of "dipcmigr" as a bigint, so it cannot collide with our other locks.
MIGRATION_LOCK_KEY = int.from_bytes(b"dipcmigr", "big") & 0x7FFF_FFFF_FFFF_FFFF

# A try's wait for each lock: below an inquiry's database budget (DIPC_DOKU_DB_TIMEOUT_S, 0.8 s by
# default), which the queries queued behind it spend.
LOCK_TIMEOUT_MS = 500
LOCK_WAIT_S = 300.0  # how long a run of migrate() tries again before it gives up (dipc migrate --lock-wait)
RETRY_AFTER_S = 30.0  # the longest wait for the sessions a try waited for, before the next try
_POLL_S = 1.0  # how often that wait looks at them
_WATCH_S = 0.2  # how often the watcher asks whom a try waits for (pg_blocking_pids takes the lock manager)

LEDGER_TABLE = "schema_migrations"
_LEDGER = f"""
CREATE TABLE IF NOT EXISTS {LEDGER_TABLE} (
    version     text        PRIMARY KEY,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: str  # the file name without ".sql", e.g. "0001_initial"
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


@functools.cache
def available() -> tuple[Migration, ...]:
    """Every migration shipped with this version of dipc, in the order it applies."""
    folder = schemas_dir().joinpath("migrations")
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")), key=lambda entry: entry.name
    )
    return tuple(
        Migration(version=entry.name.removesuffix(".sql"), sql=entry.read_text("utf-8")) for entry in files
    )


class MigrationBlocked(Exception):
    """A migration could not take its locks within the budget: other sessions held them throughout."""

    def __init__(self, version: str, tried_s: float, holders: list[str]) -> None:
        named = (
            f"it waited for {'; '.join(holders)} (see pg_stat_activity)"
            if holders
            else "other sessions held what it needed at every try, none of them for long"
        )
        super().__init__(
            f"migration {version} could not take its locks in {tried_s:.0f} s of tries and was not "
            f"applied (nothing of it was); {named}. Run `dipc migrate` again once they have ended."
        )


@dataclass(frozen=True, slots=True)
class MigrationState:
    applied: dict[str, str]  # version -> checksum recorded when it was applied
    pending: list[str]
    changed: list[str]  # applied, but the shipped file differs from what was applied
    unknown: list[str]  # applied by a newer dipc than this one

    @property
    def current(self) -> bool:
        return not self.pending and not self.changed


async def state(conn: asyncpg.Connection) -> MigrationState:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations") if exists else []
    applied = {row["version"]: row["checksum"] for row in rows}
    shipped = available()
    shipped_versions = {migration.version for migration in shipped}
    return MigrationState(
        applied=applied,
        pending=[m.version for m in shipped if m.version not in applied],
        changed=[m.version for m in shipped if m.version in applied and applied[m.version] != m.checksum],
        unknown=sorted(version for version in applied if version not in shipped_versions),
    )


async def migrate(
    conn: asyncpg.Connection, *, watcher: asyncpg.Connection | None = None, lock_wait_s: float = LOCK_WAIT_S
) -> list[str]:
    """Apply every pending migration; return the versions applied by this call. Raise MigrationBlocked
    when they spent ``lock_wait_s`` in all on tries that timed out and on waits after them; those
    applied before stay applied. ``watcher``, another connection, sees whom a try waits for; without
    it, every session holding a table lock when a try timed out is waited for."""
    applied_now: list[str] = []
    async with _unbounded(conn):  # the lock is the session's, and waits for another migrating
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    budget = _Budget(lock_wait_s)
    try:
        async with _unbounded(conn):
            await conn.execute(_LEDGER)
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available():
            if migration.version in done:
                continue
            await _apply(conn, watcher, migration, budget)
            log.info("migration.applied", version=migration.version)
            applied_now.append(migration.version)
    finally:
        async with _unbounded(conn):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


@dataclass(slots=True)
class _Budget:
    left_s: float
    last_try: bool = False  # taken once the budget is spent, when the sessions waited for had ended


async def _apply(
    conn: asyncpg.Connection, watcher: asyncpg.Connection | None, migration: Migration, budget: _Budget
) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    timeout_ms = LOCK_TIMEOUT_MS
    while True:
        blockers: dict[str, asyncpg.Record] = {}
        started = loop.time()
        try:
            async with _watching(watcher, conn.get_server_pid(), blockers), _unbounded(conn):
                await conn.execute(f"SET LOCAL lock_timeout = {timeout_ms}")
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
            return
        except asyncpg.LockNotAvailableError:
            pass
        if not blockers:  # no watcher, or it saw nobody: whoever holds a table lock now
            blockers = {row["virtualtransaction"]: row for row in await conn.fetch(_HOLDERS)}
        vacuum = any(row["backend_type"] == "autovacuum worker" for row in blockers.values())
        if vacuum and timeout_ms == LOCK_TIMEOUT_MS:
            # PostgreSQL cancels an autovacuum that a lock request has waited for past deadlock_timeout.
            timeout_ms = await conn.fetchval(_PAST_DEADLOCK_TIMEOUT_MS)
            still = [_described(row, loop.time() - started) for row in blockers.values()]
        else:
            timeout_ms = LOCK_TIMEOUT_MS
            still = await _outlast(conn, blockers, max(0.0, budget.left_s - (loop.time() - started)))
        budget.left_s -= loop.time() - started
        if budget.left_s <= 0:
            if still or budget.last_try:
                raise MigrationBlocked(migration.version, loop.time() - began, still)
            budget.last_try = True
        log.warning(
            "migration.locks_busy",
            version=migration.version,
            waited_for=still,
            next_lock_timeout_ms=timeout_ms,
        )


@contextlib.asynccontextmanager
async def _unbounded(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction whose statements neither the session's statement_timeout (a pool's is 30 s) nor a
    lock_timeout set on the role or database bounds."""
    async with conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0")
        yield


_PAST_DEADLOCK_TIMEOUT_MS = (
    "SELECT ceil(1000 * extract(epoch FROM current_setting('deadlock_timeout')::interval))::int + 500"
)

# The transactions holding table locks in this database, and with $1 only those that session pid $1
# waits for. pg_locks is visible to every role, and so are pg_stat_activity's role, application and
# backend type of each session (its query, which may hold secrets, is not read). A transaction's start
# shows only for the migrator's own role, so how long one held its locks is what this migration saw. A
# prepared transaction holds locks with no pid (pg_blocking_pids gives it as 0).
_HOLDERS = """
SELECT DISTINCT ON (l.virtualtransaction) l.virtualtransaction, l.pid, a.usename, a.application_name,
       a.state, a.backend_type
  FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'relation' AND l.granted AND l.pid IS DISTINCT FROM pg_backend_pid()
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
_BLOCKERS = _HOLDERS + "   AND coalesce(l.pid, 0) = ANY (pg_blocking_pids($1))\n"


@contextlib.asynccontextmanager
async def _watching(
    watcher: asyncpg.Connection | None, pid: int, blockers: dict[str, asyncpg.Record]
) -> AsyncIterator[None]:
    """While the block runs, note in ``blockers`` every session that session ``pid`` waits for."""
    if watcher is None:
        yield
        return
    stop = asyncio.Event()

    async def watch() -> None:
        # Unseen, every holder of a table lock is waited for.
        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
            while not stop.is_set():
                for row in await watcher.fetch(_BLOCKERS, pid):
                    blockers[row["virtualtransaction"]] = row
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), _WATCH_S)

    watching = asyncio.create_task(watch())
    try:
        yield
    finally:
        stop.set()
        await watching


async def _outlast(conn: asyncpg.Connection, blockers: dict[str, asyncpg.Record], left_s: float) -> list[str]:
    """Wait while any of ``blockers`` still holds a table lock, for at most RETRY_AFTER_S and ``left_s``;
    describe those that still did at the end."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    retry_at = started + min(RETRY_AFTER_S, left_s)
    while blockers:
        holding = {row["virtualtransaction"] for row in await conn.fetch(_HOLDERS)}
        blockers = {vxid: row for vxid, row in blockers.items() if vxid in holding}
        if not blockers or loop.time() >= retry_at:
            break
        await asyncio.sleep(min(_POLL_S, retry_at - loop.time()))
    return [_described(row, loop.time() - started) for row in blockers.values()]


def _described(row: asyncpg.Record, held_s: float) -> str:
    if row["pid"] is None:
        return f"a prepared transaction (pg_prepared_xacts) for {held_s:.0f} s or more"
    about = (
        f"role {row['usename']}" if row["usename"] else None,
        f"application {row['application_name']!r}" if row["application_name"] else None,
        row["backend_type"] if row["backend_type"] not in (None, "client backend") else None,
        row["state"],  # "idle in transaction", say: only for the migrator's own role
    )
    known = ", ".join(part for part in about if part)
    return f"pid {row['pid']}{f' ({known})' if known else ''} for {held_s:.0f} s or more"


async def migrate_dsn(dsn: str) -> list[str]:
    """Apply pending migrations to the database at ``dsn`` on a connection of its own (and a watcher)."""
    conn = await asyncpg.connect(dsn)
    try:
        watcher = await asyncpg.connect(dsn)
        try:
            return await migrate(conn, watcher=watcher)
        finally:
            await watcher.close()
    finally:
        await conn.close()
