"""Numbered SQL migrations from ``schemas/migrations``: applied in order, each in a transaction, once.

An advisory lock makes workers that start together migrate once; the others wait, then find nothing to do.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import asyncpg
import structlog

from server.schemas import schemas_dir

log = structlog.get_logger(component="dipc.migrate")

# pg_advisory_lock key: the ASCII of "dipcmigr" as a bigint, so it cannot collide with our other locks.
MIGRATION_LOCK_KEY = int.from_bytes(b"dipcmigr", "big") & 0x7FFF_FFFF_FFFF_FFFF

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


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply every pending migration; return the versions applied by this call."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_LEDGER)
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in available():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
                    migration.version,
                    migration.checksum,
                )
            log.info("migration.applied", version=migration.version)
            applied_now.append(migration.version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


async def migrate_dsn(dsn: str) -> list[str]:
    """Apply pending migrations to the database at ``dsn`` on a connection of its own."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
