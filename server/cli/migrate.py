"""``dipc migrate``: apply the schema migrations this dipc ships that the database has not seen yet."""

from __future__ import annotations

import argparse
import asyncio

import asyncpg

from server.cli.common import EXIT_USAGE, CommandFailed, open_database
from server.config import load_settings
from server.store import migrate


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "migrate",
        help="apply pending database migrations",
        description="Apply the SQL migrations in schemas/migrations that the database has not seen yet, "
        "in order, each in its own transaction. Run it as the role that owns the schema, before "
        "`dipc serve` starts on a new version. Safe to run while servers run, and from several places "
        "at once (an advisory lock makes it happen once). Connect directly to PostgreSQL, not through "
        "a transaction-pooling pgbouncer (the lock is held for the session).",
    )
    parser.add_argument(
        "--demo", action="store_true", help="without DATABASE_URL: the embedded database of `serve --demo`"
    )
    parser.set_defaults(run=run_migrate)


def run_migrate(args: argparse.Namespace) -> int:
    settings = load_settings(demo=args.demo)

    async def apply() -> list[str]:
        async with open_database(settings, require_current=False) as db, db.pool.acquire() as conn:
            try:
                return await migrate.migrate(conn)
            except asyncpg.InsufficientPrivilegeError as error:
                raise CommandFailed(
                    f"this role may not change the schema ({error}): run `dipc migrate` with the owner's "
                    "DATABASE_URL (deploy/postgres/roles.sql)",
                    EXIT_USAGE,
                ) from None

    applied = asyncio.run(apply())
    print(f"applied {', '.join(applied)}" if applied else "the database is up to date")
    return 0
