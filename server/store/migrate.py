"""Numbered SQL migrations from ``schemas/migrations``: applied in order, each in a transaction, once.

An advisory lock makes workers that start together migrate once; the others wait, then find nothing to do.

A migration runs beside servers that serve. While a lock request waits, every query of that table
queues behind it, so a migration that waited for as long as a long transaction (a nightly pg_dump, a
report) holds its table would stop the servers' queries of it for as long. So a try waits at most
LOCK_TIMEOUT_MS for each lock, then rolls back. The sessions that held table locks then and still do a
moment later are long transactions: the next try waits until they have ended (or RETRY_AFTER_S has
passed), because until then it would only fail again, after holding what its earlier statements had
locked (an index build holds off the table's writes while it runs). The work itself is not bounded: an
index over a large table takes what it takes, whatever the session's statement_timeout; a migrator that
dies meanwhile ends its work within a second (client_connection_check_interval, server/store/pool.py).
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
RETRY_AFTER_S = 30.0  # the longest wait for a try's long transactions before the next try
_POLL_S = 1.0  # how often the wait looks at them

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
            f"long transactions holding table locks: {'; '.join(holders)} (see pg_stat_activity)"
            if holders
            else "no long transaction held a table lock at its last try"
        )
        super().__init__(
            f"migration {version} could not take its locks in {tried_s:.0f} s of tries and was not "
            f"applied (nothing of it was); {named}. Run `dipc migrate` again once they have ended."
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
    when they could not take their locks within ``lock_wait_s`` in all; those before stay applied."""
    applied_now: list[str] = []
    async with _unbounded(conn):  # the lock is the session's, and waits for another migrating
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    give_up_at = asyncio.get_running_loop().time() + lock_wait_s
    try:
        async with _unbounded(conn):
            await conn.execute(_LEDGER)
            done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available():
            if migration.version in done:
                continue
            await _apply(conn, migration, give_up_at)
            log.info("migration.applied", version=migration.version)
            applied_now.append(migration.version)
    finally:
        async with _unbounded(conn):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


async def _apply(conn: asyncpg.Connection, migration: Migration, give_up_at: float) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
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
            long_held = await _outlast(conn, give_up_at)
            if loop.time() >= give_up_at:
                raise MigrationBlocked(migration.version, loop.time() - started, long_held) from None
            log.warning("migration.locks_busy", version=migration.version, waited_for=long_held)


@contextlib.asynccontextmanager
async def _unbounded(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction whose statements neither the session's statement_timeout (a pool's is 30 s) nor a
    lock_timeout set on the role or database bounds."""
    async with conn.transaction():
        await conn.execute("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0")
        yield


# The transactions holding table locks in this database: pg_locks is visible to every role, and so are
# pg_stat_activity's role and application of each session (its query, which may hold secrets, is not
# read). A transaction's start time shows only for the migrator's own role, so how long one has held its
# locks is what this migration saw.
_LOCK_HOLDERS = """
SELECT l.virtualtransaction, l.pid, a.usename, a.application_name, a.state
  FROM (SELECT DISTINCT virtualtransaction, pid FROM pg_locks
         WHERE locktype = 'relation' AND granted AND pid <> pg_backend_pid()
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) l
  LEFT JOIN pg_stat_activity a ON a.pid = l.pid
"""


async def _outlast(conn: asyncpg.Connection, give_up_at: float) -> list[str]:
    """After a try's lock timeout: wait while a transaction that held table locks then still holds them,
    for at most RETRY_AFTER_S and not past ``give_up_at``; describe those still held at the end."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    then = {row["virtualtransaction"]: row for row in await conn.fetch(_LOCK_HOLDERS)}
    retry_at = min(started + RETRY_AFTER_S, give_up_at)
    while True:
        await asyncio.sleep(max(0.0, min(_POLL_S, retry_at - loop.time())))
        now = {row["virtualtransaction"] for row in await conn.fetch(_LOCK_HOLDERS)}
        then = {vxid: row for vxid, row in then.items() if vxid in now}
        if not then or loop.time() >= retry_at:
            held_s = loop.time() - started
            return [_described(row, held_s) for row in then.values()]


def _described(row: asyncpg.Record, held_s: float) -> str:
    about = (
        f"role {row['usename']}" if row["usename"] else None,
        f"application {row['application_name']!r}" if row["application_name"] else None,
        row["state"],  # "idle in transaction", say: only for the migrator's own role
    )
    known = ", ".join(part for part in about if part)
    return f"pid {row['pid']}{f' ({known})' if known else ''} for {held_s:.0f} s or more"


async def migrate_dsn(dsn: str) -> list[str]:
    """Apply pending migrations to the database at ``dsn`` on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
