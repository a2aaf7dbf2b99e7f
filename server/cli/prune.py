"""``dipc prune``: keep the tables that grow with traffic to a chosen age."""

from __future__ import annotations

import argparse
import asyncio
from datetime import timedelta

from server.cli.common import EXIT_USAGE, CommandFailed, open_database, print_json
from server.config import load_settings
from server.store import retention

DEFAULT_DAYS = {
    "inquiries": 90,
    "notifications": 400,
    "webhook_deliveries": 30,
    "events": 90,
    "reconciliation": 90,
}


def register(commands: argparse._SubParsersAction) -> None:
    prune = commands.add_parser(
        "prune",
        help="delete old inquiries, notifications, delivered webhooks, events and ended reconciliation",
        description="Delete rows older than the given number of days, in batches of "
        f"{retention.BATCH:,}. Payments and payment codes are never deleted. Events still needed by an "
        "undelivered webhook stay, and so do invoices still reconciled or given up (reconciliation goes "
        "once paid or expired). Run it daily (cron, a systemd timer, a Kubernetes CronJob).",
        epilog="example: dipc prune --dry-run",
    )
    for table, days in DEFAULT_DAYS.items():
        flag = "--" + table.replace("_", "-")
        prune.add_argument(flag, type=int, default=days, metavar="DAYS", help=f"keep {days} days (default)")
    prune.add_argument("--dry-run", action="store_true", help="only count what would go")
    prune.add_argument("--json", action="store_true")
    prune.add_argument(
        "--demo", action="store_true", help="without DATABASE_URL: the embedded database of `serve --demo`"
    )
    prune.set_defaults(run=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    ages = {table: getattr(args, table) for table in DEFAULT_DAYS}
    if any(days < 1 for days in ages.values()):
        raise CommandFailed("retention must be at least 1 day", EXIT_USAGE)
    settings = load_settings(demo=args.demo)

    async def run() -> dict[str, int]:
        done: dict[str, int] = {}
        periods = {table: timedelta(days=days) for table, days in ages.items()}
        async with open_database(settings) as database:
            if args.dry_run:
                return await retention.count_all(database.pool, periods)
            for table, older_than in periods.items():  # deliveries before the events they hold
                done[table] = await retention.prune(database.pool, table, older_than)
        return done

    done = asyncio.run(run())
    if args.json:
        print_json({"dry_run": args.dry_run, "rows": done})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        for table, rows in done.items():
            print(f"{table}: {verb} {rows:,} rows older than {ages[table]} days")
    return 0
