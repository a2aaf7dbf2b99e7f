"""What every command shares: settings, the database (embedded or external), output, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TextIO

import asyncpg
import orjson
import structlog

from server.config import ConfigError, Settings
from server.core.errors import DipcError, error_text
from server.embedded import EmbeddedError, EmbeddedPostgres
from server.store import migrate
from server.store.pool import UNAVAILABLE_ERRORS, close_pool, create_pool

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
# What a --since takes (a time without its offset is refused: WIB or UTC?).
A_TIME = "this ISO 8601 time, with its UTC offset (2026-11-20T00:00:00+07:00, or Z)"

log = structlog.get_logger(component="dipc.cli")

# The database answered, and said no: restarting will not change that, so these are configuration
# errors (exit 2, which systemd's RestartPreventExitStatus=2 and the supervisor treat as final).
REFUSED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidAuthorizationSpecificationError,  # wrong password, no pg_hba.conf entry, no such role
    asyncpg.InvalidCatalogNameError,  # no such database
    asyncpg.InsufficientPrivilegeError,  # no CONNECT on the database, or a missing GRANT
)


@dataclass(frozen=True)
class Database:
    pool: asyncpg.Pool
    dsn: str
    listen_dsn: str  # for LISTEN: a session of its own (see DIPC_LISTEN_DATABASE_URL)


class CommandFailed(Exception):
    """A command could not do its job; the message is for the person at the terminal."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MigrationsBlocked(CommandFailed):
    """A migration's locks stayed held by other sessions for its whole budget (exit 1)."""


async def apply_migrations(pool: asyncpg.Pool, *, lock_wait_s: float = migrate.LOCK_WAIT_S) -> list[str]:
    """migrate.migrate on two of the pool's connections (one watches the other's lock waits), with a
    blocked migration told as a command's failure."""
    try:
        async with pool.acquire() as conn, pool.acquire() as watcher:
            return await migrate.migrate(conn, watcher=watcher, lock_wait_s=lock_wait_s)
    except migrate.MigrationBlocked as blocked:
        raise MigrationsBlocked(str(blocked)) from None


def fail_on_config(error: ConfigError) -> CommandFailed:
    return CommandFailed(f"configuration: {error}", EXIT_USAGE)


def database_failure(error: BaseException, settings: Settings) -> CommandFailed:
    """One line for a database that cannot be used at start, saying what to do about it: exit 2 when it
    refused us (credentials, database name, privileges: restarting will not help), 1 when it did not
    answer (it may be starting: a service manager restarts on 1)."""
    where = settings.database_description()
    if isinstance(error, asyncpg.InvalidPasswordError):
        detail = "the password was refused: check the password in DATABASE_URL"
    elif isinstance(error, asyncpg.InvalidCatalogNameError):
        detail = f"{error}: create it, or fix the database name in DATABASE_URL"
    elif isinstance(error, asyncpg.InvalidAuthorizationSpecificationError):
        detail = f"the connection was refused ({error}): check the user in DATABASE_URL and pg_hba.conf"
    elif isinstance(error, asyncpg.InsufficientPrivilegeError):
        detail = f"{error}: grant the serving role its privileges (see deploy/postgres/roles.sql)"
    elif isinstance(error, TimeoutError):
        waited = f"no answer within {settings.db_connect_timeout_s:g} s"
        return CommandFailed(f"database unreachable: {where}: {waited}", EXIT_FAILURE)
    else:
        return CommandFailed(f"database unreachable: {where}: {error_text(error)}", EXIT_FAILURE)
    return CommandFailed(f"database {where}: {detail}", EXIT_USAGE)


def log_database_choice(settings: Settings) -> None:
    log.info(
        "database.chosen",
        database="embedded" if settings.embedded else "external",
        where=settings.database_description(),
        how="--demo" if settings.demo and settings.embedded else "DATABASE_URL",
    )


@asynccontextmanager
async def open_database(
    settings: Settings, *, require_current: bool = True, migrate_embedded: bool = True, pool_max: int = 4
) -> AsyncIterator[Database]:
    """A pool on DATABASE_URL, or on the embedded server (started if nobody runs it, stopped after).

    An embedded database is brought to the current schema; an external one must be migrated with
    ``dipc migrate`` (a CLI should not change a production schema as a side effect).
    """
    try:
        settings.require_database()
    except ConfigError as error:
        raise fail_on_config(error) from None
    embedded = None
    dsn = settings.database_url
    try:
        if dsn is None:
            embedded = EmbeddedPostgres(settings.data_dir)
            dsn = await asyncio.to_thread(embedded.start)
        try:
            pool = await create_pool(
                dsn,
                min_size=1,
                max_size=pool_max,
                connect_timeout=settings.db_connect_timeout_s,
                statement_cache_size=settings.db_statement_cache_size,
            )
        except (*UNAVAILABLE_ERRORS, *REFUSED_ERRORS) as error:
            raise database_failure(error, settings) from None
        try:
            if embedded is not None and migrate_embedded:
                await apply_migrations(pool)
            async with pool.acquire() as conn:
                try:
                    state = await migrate.state(conn)
                except REFUSED_ERRORS as error:
                    raise database_failure(error, settings) from None
            if state.pending and require_current:
                raise CommandFailed(
                    f"the database needs migrations {', '.join(state.pending)}: run `dipc migrate`"
                )
            yield Database(pool, dsn, settings.listen_database_url or dsn)
        finally:
            await close_pool(pool)
    except EmbeddedError as error:
        raise CommandFailed(f"embedded PostgreSQL: {error}", EXIT_USAGE) from None
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def read_off_loop(read: Callable[[int], bytes], size: int) -> bytes:
    """``read(size)`` in a daemon thread of its own, awaited on the event loop (which goes on meanwhile).

    Not ``asyncio.to_thread``: its threads are joined when ``asyncio.run`` ends, so a command that fails
    while the pipe it reads from stays open (a producer that pauses) could not exit until that pipe sent
    more or closed. A daemon thread blocked in its read is left behind instead.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bytes] = loop.create_future()

    def settle(data: bytes, error: BaseException | None) -> None:  # on the loop
        if future.done():  # the command stopped waiting
            return
        if error is None:
            future.set_result(data)
        else:
            future.set_exception(error)

    def run() -> None:
        data, error = b"", None
        try:
            data = read(size)
        except BaseException as failure:  # handed to the task that awaits it
            error = failure
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, data, error)

    threading.Thread(target=run, name="dipc-read", daemon=True).start()
    return await future


def print_json(document: Any, stream: TextIO | None = None) -> None:
    (stream or sys.stdout).write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")


def print_error(error: DipcError) -> None:
    """The error once: its message, or (when it names fields) one line per field."""
    if not error.fields:
        print(f"error: {error.code}: {error.message}", file=sys.stderr)
        return
    print(f"error: {error.code}", file=sys.stderr)
    for name, problem in error.fields.items():
        print(f"  {name}: {problem}", file=sys.stderr)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (or when forced)."""

    def __init__(self, label: str, *, stream: TextIO | None = None, force: bool = False) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self._last = 0.0

    def update(self, fraction: float, detail: str, *, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self._last < 0.1):
            return
        self._last = now
        fraction = min(max(fraction, 0.0), 1.0)
        filled = int(fraction * 30)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'-' * (30 - filled)}] {fraction:6.1%} {detail}")
        if final:
            self.stream.write("\n")
        self.stream.flush()
