"""``dipc migrate``: apply the schema migrations this dipc ships that the database has not seen yet."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import asyncpg

from server.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    CommandFailed,
    MigrationsBlocked,
    apply_migrations,
    open_database,
)
from server.config import load_settings
from server.store import migrate

RETRY_S = 2.0  # with --wait: how often to try again a database that does not answer


def wait_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= seconds <= 86_400:
        raise argparse.ArgumentTypeError("from 0 to 86400 seconds")
    return seconds


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
        "--wait",
        type=wait_seconds,
        default=0.0,
        metavar="SECONDS",
        help="while the database does not answer (a host that booted with it, a database still "
        f"starting), try again every {RETRY_S:g} s for up to SECONDS before failing with exit 1 "
        "(default 0: fail at once). A database that answers and refuses (credentials, database "
        "name, privileges) fails at once with exit 2.",
    )
    parser.add_argument(
        "--lock-wait",
        type=wait_seconds,
        default=migrate.LOCK_WAIT_S,
        metavar="SECONDS",
        help=f"wait at most {migrate.LOCK_TIMEOUT_MS} ms at a time for a lock a migration needs (the "
        "servers' queries of that table queue behind the request); behind a long transaction (a "
        "pg_dump, a report) try again once it has ended, for up to SECONDS in all (default "
        f"{migrate.LOCK_WAIT_S:g}); then fail with exit 1, naming the sessions that held table locks",
    )
    parser.add_argument(
        "--demo", action="store_true", help="without DATABASE_URL: the embedded database of `serve --demo`"
    )
    parser.set_defaults(run=run_migrate)


def run_migrate(args: argparse.Namespace) -> int:
    settings = load_settings(demo=args.demo)

    async def apply() -> list[str]:
        async with open_database(settings, require_current=False) as db:
            try:
                return await apply_migrations(db.pool, lock_wait_s=args.lock_wait)
            except asyncpg.InsufficientPrivilegeError as error:
                raise CommandFailed(
                    f"this role may not change the schema ({error}): run `dipc migrate` with the owner's "
                    "DATABASE_URL (deploy/postgres/roles.sql)",
                    EXIT_USAGE,
                ) from None

    give_up_at, waited = time.monotonic() + args.wait, False
    while True:
        try:
            applied = asyncio.run(apply())
            break
        except CommandFailed as failure:
            # Exit 1 is a database that did not answer; anything else will not mend by waiting. A blocked
            # migration has been tried again for --lock-wait already.
            if (
                failure.exit_code != EXIT_FAILURE
                or isinstance(failure, MigrationsBlocked)
                or time.monotonic() + RETRY_S > give_up_at
            ):
                raise
            if not waited:  # one line for the wait, not one per try
                print(f"dipc: {failure}; trying again every {RETRY_S:g} s for up to {args.wait:g} s",
                      file=sys.stderr, flush=True)  # fmt: skip
                waited = True
            time.sleep(RETRY_S)
    print(f"applied {', '.join(applied)}" if applied else "the database is up to date")
    return 0
