"""``dipc doctor``: check a deployment before DOKU finds out — configuration, database, schema, clock."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from server.cli.common import EXIT_FAILURE, CommandFailed, open_database, print_json
from server.config import ConfigError, Settings, load_settings
from server.embedded import EmbeddedPostgres
from server.store import migrate

OK, WARN, FAIL = "ok", "warn", "fail"
MARKS = {OK: "✓", WARN: "!", FAIL: "✗"}
MIN_POSTGRES = 140000


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


def register(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser(
        "doctor",
        help="check configuration, database, migrations and clock",
        description="Check this deployment: configuration, DOKU credentials and BIN rules, database "
        "reachability and version, migrations, and the clock against the database's. Exits 1 when a check "
        "fails.",
    )
    doctor.add_argument("--demo", action="store_true", help="check the configuration `serve --demo` uses")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(run=run_doctor)


def configuration_checks(settings: Settings) -> list[Check]:
    checks: list[Check] = []
    try:
        settings.require_serving()
        clients = ", ".join(f"{cid} ({len(c.secret_keys)} key{'s' if len(c.secret_keys) != 1 else ''})"
                            for cid, c in sorted(settings.clients.items()))  # fmt: skip
        checks.append(Check("DOKU clients", OK, clients))
    except ConfigError as error:
        checks.append(Check("DOKU clients", FAIL, str(error)))
    if settings.bins:
        checks.append(Check("BIN rules", OK, str(settings.bins)))
    else:
        checks.append(Check("BIN rules", WARN, "DIPC_BINS is unset: codes are not checked against BIN rules"))
    checks.append(
        Check("DOKU paths", OK, f"inquiry {settings.inquiry_path}, notification {settings.notification_path}")
    )
    if settings.admin_tokens:
        checks.append(Check("admin API", OK, f"enabled ({len(settings.admin_tokens)} token(s))"))
    else:
        checks.append(Check("admin API", WARN, "disabled: DIPC_ADMIN_TOKEN is unset"))
    if settings.webhook_url:
        host = urlsplit(settings.webhook_url).hostname or ""
        if not settings.webhook_secrets:
            checks.append(Check("webhook", FAIL, "DIPC_WEBHOOK_URL is set without DIPC_WEBHOOK_SECRET"))
        elif settings.webhook_url.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
            checks.append(Check("webhook", WARN, f"{settings.webhook_url} is not https"))
        else:
            checks.append(Check("webhook", OK, settings.webhook_url))
    else:
        checks.append(Check("webhook", OK, "not configured (the event feed is available)"))
    return checks


async def database_checks(settings: Settings) -> list[Check]:
    where = "embedded" if settings.database_url is None else "DATABASE_URL"
    try:
        async with (
            open_database(settings, require_current=False, migrate_embedded=False) as database,
            database.pool.acquire() as conn,
        ):
            version_num = int(await conn.fetchval("SHOW server_version_num"))
            version = await conn.fetchval("SHOW server_version")
            before = datetime.now(UTC)
            database_now = await conn.fetchval("SELECT now()")
            after = datetime.now(UTC)
            state = await migrate.state(conn)
    except CommandFailed as failure:
        return [Check("database", FAIL, f"{where}: {failure}")]
    checks = []
    if settings.database_url is None:
        checks.append(Check("embedded", OK, EmbeddedPostgres(settings.data_dir).describe()))
    checks += [
        Check(
            "database",
            OK if version_num >= MIN_POSTGRES else FAIL,
            f"{where}: PostgreSQL {version}"
            + ("" if version_num >= MIN_POSTGRES else " (14 or newer needed)"),
        )
    ]
    if state.current and not state.unknown:
        checks.append(Check("migrations", OK, f"current ({len(state.applied)} applied)"))
    elif state.current:
        checks.append(Check("migrations", WARN, f"applied by a newer dipc: {', '.join(state.unknown)}"))
    else:
        problems = [f"pending {', '.join(state.pending)}"] if state.pending else []
        problems += [f"changed since applied {', '.join(state.changed)}"] if state.changed else []
        checks.append(Check("migrations", FAIL, "; ".join(problems) + " (run `dipc migrate`)"))
    local = before + (after - before) / 2
    skew = abs((local - database_now).total_seconds())
    detail = f"{skew:.3f} s from the database's clock"
    if skew <= 2:
        checks.append(Check("clock", OK, detail))
    elif skew <= settings.max_skew_s / 2:
        checks.append(Check("clock", WARN, detail + "; run NTP"))
    else:
        checks.append(
            Check("clock", FAIL, detail + f"; DOKU's timestamps are checked to ±{settings.max_skew_s} s")
        )
    return checks


def run_doctor(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(demo=args.demo)
    except ConfigError as error:
        checks = [Check("configuration", FAIL, str(error))]
    else:
        checks = [Check("configuration", OK, "loaded"), *configuration_checks(settings)]
        checks += asyncio.run(database_checks(settings))
    failed = any(check.status == FAIL for check in checks)
    if args.json:
        print_json({"ok": not failed, "checks": [check.__dict__ for check in checks]})
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            print(f"{MARKS[check.status]} {check.name.ljust(width)}  {check.detail}")
        print("\nproblems found" if failed else "\nall good")
    return EXIT_FAILURE if failed else 0
