"""``dipc reconcile``: ask DOKU's Check Status now about quoted invoices that have no payment (spec §8)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import aiohttp
import asyncpg

from server.cli.common import A_TIME, EXIT_USAGE, CommandFailed, open_database, print_json, print_table
from server.config import Settings, load_settings
from server.core.errors import BeingChecked
from server.core.reconciliation import invoice_document
from server.core.times import parse_timestamp
from server.doku.checkstatus import CheckStatusClient
from server.reconcile import worker
from server.store import reconciliation as store

# amount: the invoice's, as quoted; paid: what DOKU's answer says was paid; recorded: what that became.
COLUMNS = [
    "payment_code",
    "invoice_number",
    "amount",
    "result",
    "paid",
    "recorded",
    "state",
    "attempts",
    "detail",
]
# A run asks about at most this many invoices: a year's unsettled ones would be hours of checks, all in
# memory before the first line is printed.
DEFAULT_LIMIT = 1000

HELP = """\
Ask DOKU's Check Status about quoted invoices that have no payment yet, now, and print what DOKU said.
A paid answer is recorded as a payment through the same rules as a notification (source check_status).
Without options: every invoice whose scheduled check is due. The running servers' reconcilers do this on
their own schedule (DIPC_RECONCILE_SCHEDULE); this command is for asking by hand.
"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "reconcile",
        help="ask DOKU's Check Status about unpaid quoted invoices now",
        description=HELP,
        epilog="examples:\n"
        "  dipc reconcile --invoice INV-2026-000123\n"
        "  dipc reconcile --since 2026-11-20T00:00:00Z",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--invoice", help="this invoice number, whatever its schedule")
    which.add_argument("--since", help=f"every unsettled invoice first quoted at or after {A_TIME}")
    parser.add_argument(
        "--demo", action="store_true", help="the demo client of `serve --demo` (needs a stand-in)"
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"ask about at most this many invoices (default {DEFAULT_LIMIT:,}; at DOKU's rate budget a"
        " check takes about 0.2 s): with --since, those checked least recently, never checked first, so"
        " that a run again goes on to the others; to have the servers' reconcilers ask about every one,"
        ' POST /v1/reconciliation/check {"since": ...}',
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run_reconcile)


def _row(document: dict[str, Any]) -> dict[str, Any]:
    check = document.get("check") or {}
    recorded = " ".join(str(part) for part in (check.get("recorded"), check.get("reason")) if part)
    if check.get("payment_id") is not None:
        recorded += f" #{check['payment_id']}"
    return document | {
        "result": check.get("result", "(paid: not asked)"),
        "paid": check.get("amount"),
        "recorded": recorded or None,
        "detail": check.get("detail") or document.get("last_detail"),
    }


def run_reconcile(args: argparse.Namespace) -> int:
    settings = load_settings(demo=args.demo)
    if settings.doku_api_url is None:
        raise CommandFailed(
            "no DOKU API: set DIPC_DOKU_API_URL (under --demo, a stand-in: `dipc simulate doku-api --demo`)",
            EXIT_USAGE,
        )
    try:
        since = parse_timestamp(args.since) if args.since else None
    except ValueError as problem:
        raise CommandFailed(f"--since: {problem}", EXIT_USAGE) from None
    if args.limit < 1:
        raise CommandFailed("--limit: at least 1", EXIT_USAGE)

    async def run() -> list[dict[str, Any]]:
        async with open_database(settings) as database, aiohttp.ClientSession() as session:
            api = CheckStatusClient(session, settings.doku_api_url, timeout_s=settings.doku_api_timeout_s)
            return await _check(
                database.pool, api, settings, invoice=args.invoice, since=since, limit=args.limit
            )

    documents, more = asyncio.run(run())
    if args.json:
        print_json({"items": documents, "more": more})
    elif documents:
        print_table([_row(document) for document in documents], COLUMNS)
    else:
        print("nothing to check")
    if more and not args.json:
        print(
            f"more unsettled invoices than --limit {args.limit:,}: run again, or have the servers'"
            ' reconcilers ask about all of them (POST /v1/reconciliation/check {"since": ...})',
            file=sys.stderr,
        )
    return 0


async def _check(
    pool: asyncpg.Pool,
    api: CheckStatusClient,
    settings: Settings,
    *,
    invoice: str | None,
    since: Any,
    limit: int,
) -> tuple[list[dict[str, Any]], bool]:
    """What DOKU said of each invoice asked about, and whether more than ``limit`` were to ask about."""
    if invoice is not None:
        return await worker.check_invoice_number(pool, api, settings, invoice), False
    if since is not None:
        invoices = await store.due_within(pool, since, limit=limit + 1)
    else:
        invoices = await store.due_now(pool, limit=limit + 1)
    more = len(invoices) > limit
    documents = []
    for item in invoices[:limit]:
        try:
            documents.append(await worker.check_invoice(pool, api, settings, item))
        except BeingChecked as busy:  # a running server's reconciler has it right now
            documents.append(invoice_document(item) | {"check": {"result": "busy", "detail": busy.message}})
    return documents, more
