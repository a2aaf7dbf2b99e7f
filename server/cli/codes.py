"""``dipc codes …`` and ``dipc payments …``: the merchant's codes and what was paid, from the terminal."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from server.cli.common import (
    A_TIME,
    EXIT_FAILURE,
    EXIT_USAGE,
    CommandFailed,
    Progress,
    open_database,
    print_json,
    print_table,
    read_off_loop,
)
from server.config import Settings, load_settings
from server.core import manage
from server.core.codes import PaymentCode
from server.core.documents import code_document, payment_document
from server.core.imports import FORMATS, format_for_path, lines_of, read_rows
from server.core.times import parse_timestamp, utcnow

CODE_COLUMNS = [
    "payment_code",
    "status",
    "amount",
    "invoice_number",
    "customer_name",
    "reusable",
    "paid_count",
    "expires_at",
]
# paid_at: when DOKU says the customer paid; recorded_at: when dipc recorded it (what --since filters on).
PAYMENT_COLUMNS = [
    "id", "payment_code", "invoice_number", "amount", "kind", "reason", "channel", "source", "paid_at",
    "recorded_at",
]  # fmt: skip


def _with_db(args: argparse.Namespace, work: Callable[[asyncpg.Pool, Settings], Awaitable[int]]) -> int:
    settings = load_settings(demo=args.demo)

    async def run() -> int:
        async with open_database(settings) as database:
            return await work(database.pool, settings)

    return asyncio.run(run())


def _shown(code: PaymentCode, now: datetime) -> dict[str, Any]:
    """The code's document with the status a person reads (``expired`` is derived, not stored)."""
    return code_document(code) | {"status": manage.shown_status(code, now)}


def _show(args: argparse.Namespace, document: dict[str, Any]) -> None:
    if args.json:
        print_json(document)
        return
    width = max(len(name) for name in document)
    for name, value in document.items():
        print(f"{name.ljust(width)}  {'' if value is None else value}")


def _print_page(
    args: argparse.Namespace, documents: list[dict[str, Any]], cursor: str | None, columns: list[str]
) -> None:
    if args.json:
        print_json({"items": documents, "next": cursor})
        return
    print_table(documents, columns)
    if cursor:
        print(f"more: {next_page_command(args.argv, cursor)}")


def next_page_command(argv: list[str], cursor: str) -> str:
    """The command line of the next page: this one (its filters, --demo, --limit) at ``cursor``."""
    kept: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--after":
            next(arguments, None)  # and its value
        elif not argument.startswith("--after="):
            kept.append(argument)
    return shlex.join(["dipc", *kept, "--after", cursor])


def register(commands: argparse._SubParsersAction) -> None:
    json_flag = argparse.ArgumentParser(add_help=False)
    json_flag.add_argument("--json", action="store_true", help="print JSON instead of text")
    json_flag.add_argument(
        "--demo",
        action="store_true",
        help="use the demo client and BINs of `serve --demo` for defaults and checks",
    )

    codes = commands.add_parser(
        "codes",
        help="register, import, show, list and cancel payment codes",
        description="Manage payment codes in the database (the same rules as the admin API).",
    )
    actions = codes.add_subparsers(title="actions", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add",
        parents=[json_flag],
        help="register one payment code",
        description="Register one payment code. The code must start with a configured BIN (DIPC_BINS).",
        epilog="examples:\n"
        "  dipc codes add --demo 8896512345678124 --amount 150000 --invoice INV-1 --name 'Budi Santoso'\n"
        "      (next to `dipc serve --demo`: the demo's database, client and BINs)\n"
        "  DATABASE_URL=postgresql://… DIPC_CLIENT_ID=… DIPC_BINS=ALFA:88965 \\\n"
        "      dipc codes add 8896512345678124 --amount 150000 --invoice INV-1 --name 'Budi Santoso'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("payment_code", help="digits only; leading zeros are kept")
    add.add_argument("--amount", required=True, type=int, help="whole rupiah, greater than 0")
    add.add_argument(
        "--invoice", required=True, dest="invoice_number", help="invoice number, [A-Za-z0-9_-/], ≤ 64"
    )
    add.add_argument("--name", required=True, dest="customer_name", help="customer name shown at the counter")
    add.add_argument("--email", dest="customer_email", help="customer email")
    add.add_argument(
        "--reusable", action="store_true", help="may be paid many times (a fresh invoice each time)"
    )
    add.add_argument("--channel", help="ALFA, INDOMARET or ANY (default: the channel of the code's BIN)")
    add.add_argument(
        "--expires-at", dest="expires_at", help="ISO 8601 with offset, e.g. 2026-12-31T23:59:59+07:00"
    )
    add.add_argument(
        "--client-id", dest="client_id", help="DOKU Client-Id (default: the only configured one)"
    )
    for index in (1, 2, 3):
        add.add_argument(f"--info{index}", help="text the store may print on the receipt, ≤ 40 characters")
    add.set_defaults(run=run_add)

    imp = actions.add_parser(
        "import",
        parents=[json_flag],
        help="register many codes from CSV or NDJSON",
        description="Register many codes at once. CSV needs a header row naming the columns (payment_code, "
        "amount, invoice_number, customer_name, and optionally customer_email, reusable, channel, "
        "expires_at, info1, info2, info3, client_id); NDJSON has one JSON object per line with the same "
        "names. Valid rows are imported, invalid ones are reported by line number.",
        epilog="exit codes:\n"
        "  0  every line was imported (with --check: every line is valid)\n"
        "  1  nothing was imported: every line was rejected, or --all-or-nothing / --check found one\n"
        "  2  usage: no such file, unknown format, bad configuration\n"
        "  3  partly imported: the valid lines were saved, the rejected ones were not\n"
        "     (fix them and import those lines again)\n"
        "example: dipc codes import --check codes.csv && dipc codes import --all-or-nothing codes.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("file", help="a .csv, .ndjson or .jsonl file, or - for standard input")
    imp.add_argument("--format", choices=FORMATS, help="the file's format (default: from its extension)")
    mode = imp.add_mutually_exclusive_group()
    mode.add_argument(
        "--all-or-nothing",
        action="store_true",
        help="import nothing if any line is rejected (default: import the valid lines)",
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="check every line (against the database too) and report, saving nothing",
    )
    imp.set_defaults(run=run_import)

    show = actions.add_parser("show", parents=[json_flag], help="show one code")
    show.add_argument("payment_code")
    show.set_defaults(run=run_show)

    listing = actions.add_parser("list", parents=[json_flag], help="list codes in payment-code order")
    listing.add_argument(
        "--status",
        choices=["active", "expired", "paid", "cancelled"],
        help="expired: active codes past their expiry (shown as expired; inquiries refuse them)",
    )
    listing.add_argument("--limit", type=int, default=50, help="at most this many (default 50, max 1000)")
    listing.add_argument("--after", help="start after this payment code (the previous page's last)")
    listing.set_defaults(run=run_list)

    cancel = actions.add_parser("cancel", parents=[json_flag], help="cancel an unpaid code")
    cancel.add_argument("payment_code")
    cancel.set_defaults(run=run_cancel)

    payments = commands.add_parser("payments", help="list recorded payments")
    payment_actions = payments.add_subparsers(title="actions", metavar="ACTION", required=True)
    plist = payment_actions.add_parser(
        "list",
        parents=[json_flag],
        help="list payments in the order they were recorded",
        epilog="example: dipc payments list --kind conflict --since 2026-11-01T00:00:00Z",
    )
    plist.add_argument("--code", dest="payment_code", help="only this payment code")
    plist.add_argument("--kind", choices=list(manage.PAYMENT_KINDS), help="only this kind")
    plist.add_argument("--since", help=f"only payments recorded at or after {A_TIME}")
    plist.add_argument("--limit", type=int, default=50)
    plist.add_argument("--after", type=int, help="start after this payment id")
    plist.set_defaults(run=run_payments)


def run_add(args: argparse.Namespace) -> int:
    raw = {
        name: getattr(args, name)
        for name in (
            "payment_code",
            "amount",
            "invoice_number",
            "customer_name",
            "customer_email",
            "channel",
            "expires_at",
            "client_id",
            "info1",
            "info2",
            "info3",
        )
        if getattr(args, name) is not None
    }
    raw["reusable"] = args.reusable

    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        code = await manage.create_code(
            pool, raw, rules=settings.bins, client_ids=settings.client_ids, now=utcnow()
        )
        _show(args, code_document(code))
        return 0

    return _with_db(args, work)


def run_show(args: argparse.Namespace) -> int:
    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        _show(args, _shown(await manage.get_code(pool, args.payment_code), utcnow()))
        return 0

    return _with_db(args, work)


def run_cancel(args: argparse.Namespace) -> int:
    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        _show(args, code_document(await manage.cancel_code(pool, args.payment_code)))
        return 0

    return _with_db(args, work)


def run_list(args: argparse.Namespace) -> int:
    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        now = utcnow()
        page = await manage.list_codes(
            pool, status=args.status, after=args.after, limit=args.limit, derived_at=now
        )
        documents = [_shown(code, now) for code in page.items]
        _print_page(args, documents, page.next, CODE_COLUMNS)
        return 0

    return _with_db(args, work)


def run_payments(args: argparse.Namespace) -> int:
    try:
        since = parse_timestamp(args.since) if args.since else None
    except ValueError as problem:
        raise CommandFailed(f"--since: {problem}", EXIT_USAGE) from None

    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        page = await manage.list_payments(
            pool,
            payment_code=args.payment_code,
            kind=args.kind,
            since=since,
            after=args.after,
            limit=args.limit,
        )
        documents = [payment_document(payment) for payment in page.items]
        _print_page(args, documents, page.next, PAYMENT_COLUMNS)
        return 0

    return _with_db(args, work)


def run_import(args: argparse.Namespace) -> int:
    stdin = args.file == "-"
    fmt = args.format or (None if stdin else format_for_path(args.file))
    if fmt is None:
        raise CommandFailed(
            "cannot tell the format from the file name: pass --format csv or --format ndjson", EXIT_USAGE
        )
    path = None if stdin else Path(args.file)
    if path is not None and not path.is_file():
        raise CommandFailed(f"no such file: {args.file}", EXIT_USAGE)
    total = path.stat().st_size if path is not None else 0
    progress = Progress(f"importing {args.file}")

    async def chunks() -> AsyncIterator[bytes]:
        # The descriptor itself, read off the event loop (read_off_loop) for what has come so far: a pipe
        # that pauses leaves the batch at the database answered meanwhile, and its lines are checked as
        # they come. Not sys.stdin.buffer: a read left waiting in it at exit holds the lock that closing
        # it at interpreter shutdown needs, and Python aborts.
        fd = sys.stdin.fileno() if path is None else os.open(path, os.O_RDONLY)
        done = 0
        reading = False
        try:
            while True:
                reading = True
                chunk = await read_off_loop(functools.partial(os.read, fd), 256 * 1024)
                reading = False
                if not chunk:
                    break
                done += len(chunk)
                progress.update(done / total if total else 0.0, f"{done / 1e6:,.1f} MB")
                yield chunk
        finally:
            # A read given up on may still come: its descriptor stays open (to the exit) rather than
            # be reused by another file or socket under it.
            if path is not None and not reading:
                os.close(fd)

    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        # The modules and the pool live as long as the command: out of the way of the collector's full
        # walks, which a million rows in flight set off again and again.
        gc.freeze()
        keep = None
        if args.check:
            keep = lambda result: False  # noqa: E731 - a dry run keeps nothing
        elif args.all_or_nothing:
            keep = lambda result: result.rejected_count == 0  # noqa: E731
        result = await manage.import_codes(
            pool,
            read_rows(lines_of(chunks()), fmt),
            rules=settings.bins,
            client_ids=settings.client_ids,
            now=utcnow(),
            step_timeout_s=settings.admin_db_timeout_s,
            keep=keep,
        )
        progress.update(1.0, "done", final=True)
        if args.json:
            print_json(result.document() | {"valid": result.valid, "saved": result.saved})
        else:
            for rejection in result.rejected:
                print(f"line {rejection.line}: {rejection.error}", file=sys.stderr)
            if result.rejected_count > len(result.rejected):
                print(
                    f"… and {result.rejected_count - len(result.rejected)} more rejected lines",
                    file=sys.stderr,
                )
            if args.check:
                print(
                    f"checked: {result.valid:,} codes valid, {result.rejected_count:,} lines rejected; "
                    "nothing saved (--check)"
                )
            elif not result.saved:
                print(
                    f"imported nothing: {result.rejected_count:,} lines rejected (--all-or-nothing); "
                    f"{result.valid:,} valid codes were not saved"
                )
            else:
                rate = result.imported / result.seconds if result.seconds else 0.0
                print(
                    f"imported {result.imported:,} codes, rejected {result.rejected_count:,} lines "
                    f"in {result.seconds:.2f} s ({rate:,.0f} codes/s)"
                )
        return import_exit_code(result)

    return _with_db(args, work)


EXIT_PARTIAL = 3


def import_exit_code(result: manage.ImportResult) -> int:
    """0 all imported (or all valid), 1 nothing imported because of rejected lines, 3 partly imported."""
    if result.rejected_count == 0:
        return 0
    if result.saved and result.imported:
        return EXIT_PARTIAL
    return EXIT_FAILURE
