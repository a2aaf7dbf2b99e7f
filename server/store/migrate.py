"""Numbered SQL migrations from ``schemas/migrations``: applied in order, each in a transaction, once.

An advisory lock makes workers that start together migrate once; the others wait, then find nothing to do.

A migration runs beside servers that serve: it waits at most LOCK_TIMEOUT_MS for any lock it needs, then
rolls back and tries again later. While a lock request waits, every query of that table queues behind it,
so a migration that waited for as long as a long transaction (a nightly pg_dump, a report) holds its
table would stop the servers' queries of it for as long. The work itself is not bounded: an index over a
large table takes what it takes, whatever the session's statement_timeout.
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
LOCK_WAIT_S = 300.0  # how long migrate() tries again before it gives up (dipc migrate --lock-wait)
_PAUSES_S = (0.5, 1.0, 2.0, 5.0)  # between tries; the last one repeats

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

    def __init__(self, version: str, waited_s: float, holders: list[str]) -> None:
        named = "; ".join(holders) if holders else "no session holds a table lock now"
        super().__init__(
            f"migration {version} waited {waited_s:.0f} s for its locks and was not applied (nothing "
            f"of it was). The sessions in the oldest transactions that hold table locks: {named}. Run "
            "`dipc migrate` again once they end."
        )
        self.version = version


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


async def migrate(conn: asyncpg.Connection, *, lock_wait_s: float = LOCK_WAIT_S) -> list[str]:
    """Apply every pending migration; return the versions applied by this call. Raise MigrationBlocked
    when one could not take its locks within ``lock_wait_s``; those before it stay applied."""
    applied_now: list[str] = []
    async with _unbounded(conn):  # the lock is the session's, and waits for another migrating
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        async with _unbounded(conn):
            await conn.execute(_LEDGER)
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available():
            if migration.version in done:
                continue
            await _apply(conn, migration, lock_wait_s)
            log.info("migration.applied", version=migration.version)
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


async def _apply(conn: asyncpg.Connection, migration: Migration, lock_wait_s: float) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    tries = 0
    while True:
        try:
            async with _unbounded(conn):
                await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
            return
        except asyncpg.LockNotAvailableError:
            holders = await _lock_holders(conn)
            pause = _PAUSES_S[min(tries, len(_PAUSES_S) - 1)]
            tries += 1
            waited = loop.time() - started
            if waited + pause > lock_wait_s:
                raise MigrationBlocked(migration.version, waited, holders) from None
            log.warning(
                "migration.locks_busy",
                version=migration.version,
                tries=tries,
                again_in_s=pause,
                holders=holders,
            )
            await asyncio.sleep(pause)


@contextlib.asynccontextmanager
async def _unbounded(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction whose statements the session's statement_timeout does not bound (a pool's is 30 s)."""
    async with conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0")
        yield


# Who most likely holds what a migration waited for: the oldest transactions holding table locks. Only
# pg_locks is visible to every role; a session of another role shows its query only to a superuser or a
# member of pg_read_all_stats.
_LOCK_HOLDERS = """
SELECT l.pid, a.usename, a.application_name, now() - a.xact_start AS open_for, a.query
  FROM (SELECT DISTINCT pid FROM pg_locks
         WHERE locktype = 'relation' AND granted AND pid <> pg_backend_pid()
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) l
  LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 ORDER BY a.xact_start NULLS LAST, l.pid
 LIMIT 3
"""


async def _lock_holders(conn: asyncpg.Connection) -> list[str]:
    holders = []
    for row in await conn.fetch(_LOCK_HOLDERS):
        what = [f"pid {row['pid']}"]
        if row["usename"]:
            what.append(f"role {row['usename']}")
        if row["application_name"]:
            what.append(f"application {row['application_name']!r}")
        if row["open_for"] is not None:
            what.append(f"in a transaction for {row['open_for'].total_seconds():.0f} s")
        if row["query"]:
            what.append(f"last query {' '.join(row['query'].split())[:200]!r}")
        holders.append(", ".join(what))
    return holders


async def migrate_dsn(dsn: str) -> list[str]:
    """Apply pending migrations to the database at ``dsn`` on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
