"""``dipc doctor``: check a deployment before DOKU finds out — configuration, database, schema, clock."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp

from server.cli.common import EXIT_FAILURE, CommandFailed, open_database, print_json
from server.config import ConfigError, Settings, load_settings
from server.core.outcomes import CheckResult
from server.doku.checkstatus import CheckAnswer, CheckStatusClient
from server.embedded import EmbeddedPostgres
from server.store import migrate, privileges

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
    if settings.db_statement_cache_size == 0 and not settings.listen_database_url:
        # A cache of 0 says "behind a transaction pooler", where LISTEN would lose the feed's wake-ups.
        checks.append(
            Check(
                "event feed",
                WARN,
                "DIPC_DB_STATEMENT_CACHE_SIZE=0 suggests pgbouncer in transaction mode: set "
                "DIPC_LISTEN_DATABASE_URL to PostgreSQL directly, LISTEN needs a session of its own",
            )
        )
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
    where = "embedded" if settings.embedded else "DATABASE_URL"
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
            role = await privileges.check(conn)
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
    checks.append(role_check(settings, role))
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


async def doku_api_checks(settings: Settings) -> list[Check]:
    """Reconciliation's configuration, and whether DOKU's Check Status API answers us and accepts our
    signature: an authenticated call about an invoice that does not exist is enough."""
    schedule = ",".join(f"{offset:g}" for offset in settings.reconcile_schedule)
    if settings.doku_api_url is None:
        return [
            Check(
                "DOKU API",
                WARN,
                "not configured (--demo): reconciliation is off; see `dipc simulate doku-api`",
            )
        ]
    state = f"on, schedule {schedule} s, {settings.reconcile_rps:g} req/s" if settings.reconcile else "off"
    checks = [Check("reconciliation", OK if settings.reconcile else WARN, f"{state} (DIPC_RECONCILE)")]
    invoice = f"DIPC-DOCTOR-{uuid.uuid4().hex[:12]}"
    async with aiohttp.ClientSession() as session:
        api = CheckStatusClient(
            session, settings.doku_api_url, timeout_s=min(settings.doku_api_timeout_s, 10.0)
        )
        for client_id, client in sorted(settings.clients.items()):
            if not client.secret_keys:
                continue
            answer = await api.check(client, payment_code="", invoice_number=invoice, now=datetime.now(UTC))
            checks.append(_doku_api_check(settings.doku_api_url, client_id, answer, settings.reconcile))
    return checks


def _doku_api_check(url: str, client_id: str, answer: CheckAnswer, reconciling: bool) -> Check:
    # Without a reconciler here only checks by hand need DOKU's API: a problem is a warning.
    problem = FAIL if reconciling else WARN
    name = f"DOKU API ({client_id})"
    if answer.http_status in (401, 403):
        refused = f"{url} refused our signature (HTTP {answer.http_status})"
        return Check(name, problem, f"{refused}: check the Client-Id and the secret key")
    if answer.result in (CheckResult.TIMEOUT, CheckResult.UNREACHABLE):
        return Check(name, problem, f"{url} unreachable: {answer.detail}")
    if answer.result in (CheckResult.SERVER_ERROR, CheckResult.RATE_LIMITED, CheckResult.HTTP_ERROR):
        return Check(
            name, WARN, f"{url} answered HTTP {answer.http_status}; our signature could not be judged"
        )
    if answer.result is CheckResult.BAD_SIGNATURE:
        return Check(name, WARN, f"{url} accepted our signature, but its answer's signature does not verify")
    return Check(name, OK, f"{url} answers (HTTP {answer.http_status}) and accepts our signature")


def role_check(settings: Settings, role: privileges.RoleReport) -> Check:
    if not role.sufficient:
        more = len(role.missing) - 8
        shown = ", ".join(role.missing[:8]) + (f" and {more} more" if more > 0 else "")
        return Check(
            "database role", FAIL, f"{role.role} lacks {shown} (grant as in deploy/postgres/roles.sql)"
        )
    if settings.embedded or not (role.superuser or role.can_change_schema):
        return Check("database role", OK, f"{role.role} may read and write every table dipc uses")
    what = "a superuser" if role.superuser else "allowed to change the schema"
    return Check(
        "database role",
        WARN,
        f"{role.role} is {what}: serve with a least-privilege role, migrate with the owner "
        "(deploy/postgres/roles.sql)",
    )


def run_doctor(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(demo=args.demo)
    except ConfigError as error:
        checks = [Check("configuration", FAIL, str(error))]
    else:
        checks = [Check("configuration", OK, "loaded"), *configuration_checks(settings)]
        checks += asyncio.run(database_checks(settings))
        checks += asyncio.run(doku_api_checks(settings))
    failed = any(check.status == FAIL for check in checks)
    if args.json:
        print_json({"ok": not failed, "checks": [check.__dict__ for check in checks]})
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            print(f"{MARKS[check.status]} {check.name.ljust(width)}  {check.detail}")
        print("\nproblems found" if failed else "\nall good")
    return EXIT_FAILURE if failed else 0
