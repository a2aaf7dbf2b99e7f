"""``dipc exceptions …`` (work the queue of conflicts and anomalies) and the audit trail from the terminal:
``dipc inquiries list``, ``dipc notifications list``. The same rules as the admin API, on the database."""

from __future__ import annotations

import argparse

import asyncpg

from server.cli.codes import _print_page, _show, _with_db
from server.cli.common import A_TIME, EXIT_USAGE, CommandFailed
from server.config import Settings
from server.core import audit, casework
from server.core.payments import EXCEPTION_KINDS, EXCEPTION_REASONS
from server.core.resolutions import Resolution
from server.core.times import parse_timestamp, utcnow

EXCEPTION_COLUMNS = [
    "payment_id",
    "payment_code",
    "invoice_number",
    "amount",
    "expected_amount",
    "kind",
    "reason",
    "state",
    "recorded_at",
    "agent_store_id",
    "resolution",
    "resolved_by",
]
INQUIRY_COLUMNS = [
    "received_at",
    "payment_code",
    "request_id",
    "channel",
    "outcome",
    "http_status",
    "invoice_number",
    "amount",
]
NOTIFICATION_COLUMNS = [
    "id",
    "received_at",
    "payment_code",
    "request_id",
    "transaction_status",
    "outcome",
    "payment_id",
    "kind",
    "reason",
]
REASONS = sorted({reason.value for reasons in EXCEPTION_REASONS.values() for reason in reasons})

RESOLUTIONS_HELP = """\
resolutions (final: a resolution is never edited or deleted):
  refunded   the money went back to the customer (give the refund id as --reference)
  accepted   the merchant keeps the money and honours the payment: its invoice is paid (money
             taken for it again is a conflict); for an anomaly of a one-shot code of the same
             merchant that is still payable, the code becomes paid
  dismissed  no money moved (a test, a duplicate record)
"""


def _common(parser: argparse.ArgumentParser, *, paged: bool = True) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--demo", action="store_true", help="use the demo client and BINs of `serve --demo` for defaults"
    )
    if paged:
        parser.add_argument("--limit", type=int, default=50, help="at most this many (default 50, max 1000)")


def register(commands: argparse._SubParsersAction) -> None:
    exceptions = commands.add_parser(
        "exceptions",
        help="list and resolve conflicts and anomalies (money to refund or settle)",
        description="Every conflict (a bill paid twice) and anomaly (money that matched no payable bill) "
        "is an exception, open until resolved once.",
        epilog=RESOLUTIONS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = exceptions.add_subparsers(title="actions", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list",
        help="list exceptions, oldest first",
        epilog="examples:\n"
        "  dipc exceptions list --state open\n"
        "  dipc exceptions list --kind anomaly --reason AMOUNT_MISMATCH --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument("--state", choices=["open", "resolved"], help="only open or only resolved ones")
    listing.add_argument("--kind", choices=[kind.value for kind in EXCEPTION_KINDS])
    listing.add_argument("--reason", choices=REASONS)
    listing.add_argument("--after", type=int, help="start after this payment id (the previous page's last)")
    _common(listing)
    listing.set_defaults(run=run_list)

    resolve = actions.add_parser(
        "resolve",
        help="resolve one exception, once and for good",
        description="Resolve an exception. The same resolution again shows the stored one unchanged; "
        "another resolution is refused (exit code 1).",
        epilog=RESOLUTIONS_HELP + "\nexample:\n"
        "  dipc exceptions resolve 42 --resolution refunded --by 'Sari (finance)' "
        "--note 'refunded at the counter' --reference RF-2026-0042",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    resolve.add_argument("payment_id", type=int, help="the exception's payment id (see `exceptions list`)")
    resolve.add_argument("--resolution", required=True, choices=[member.value for member in Resolution])
    resolve.add_argument("--by", required=True, dest="resolved_by", help="who resolves it (a name or email)")
    resolve.add_argument("--note", default="", help="why; kept with the resolution (default: empty)")
    resolve.add_argument("--reference", help="an external reference, e.g. the refund id")
    _common(resolve, paged=False)
    resolve.set_defaults(run=run_resolve)

    inquiries = commands.add_parser("inquiries", help="the inquiry log: what DOKU asked, what we answered")
    inquiry_actions = inquiries.add_subparsers(title="actions", metavar="ACTION", required=True)
    inquiry_list = inquiry_actions.add_parser(
        "list",
        help="list inquiries, oldest first (--json shows the exact answers)",
        epilog="example:\n  dipc inquiries list --code 8896512345678123 --since 2026-11-25T00:00:00Z --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inquiry_list.add_argument("--code", dest="payment_code", help="only this payment code")
    inquiry_list.add_argument("--since", help=f"only inquiries received at or after {A_TIME}")
    inquiry_list.add_argument("--after", help="the previous page's cursor (printed after a full page)")
    _common(inquiry_list)
    inquiry_list.set_defaults(run=run_inquiries)

    notifications = commands.add_parser("notifications", help="the notification inbox, raw")
    notification_actions = notifications.add_subparsers(title="actions", metavar="ACTION", required=True)
    notification_list = notification_actions.add_parser(
        "list",
        help="list notifications, oldest first (--json shows raw headers and bodies)",
        epilog="example: dipc notifications list --outcome rejected --json",
    )
    notification_list.add_argument("--code", dest="payment_code", help="only this payment code")
    notification_list.add_argument("--outcome", choices=list(audit.NOTIFICATION_OUTCOMES))
    notification_list.add_argument("--after", type=int, help="start after this notification id")
    _common(notification_list)
    notification_list.set_defaults(run=run_notifications)


def run_list(args: argparse.Namespace) -> int:
    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        page = await casework.list_cases(
            pool, state=args.state, kind=args.kind, reason=args.reason, after=args.after, limit=args.limit
        )
        documents = [case.document() for case in page.items]
        _print_page(args, documents, page.next, EXCEPTION_COLUMNS)
        return 0

    return _with_db(args, work)


def run_resolve(args: argparse.Namespace) -> int:
    raw = {"resolution": args.resolution, "resolved_by": args.resolved_by, "note": args.note}
    if args.reference is not None:
        raw["reference"] = args.reference
    request = casework.parse_resolution(raw)

    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        result = await casework.resolve(pool, args.payment_id, request, now=utcnow())
        _show(args, result.case.document())
        return 0

    return _with_db(args, work)


def run_inquiries(args: argparse.Namespace) -> int:
    try:
        since = parse_timestamp(args.since) if args.since else None
    except ValueError as problem:
        raise CommandFailed(f"--since: {problem}", EXIT_USAGE) from None

    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        page = await audit.list_inquiries(
            pool, payment_code=args.payment_code, since=since, after=args.after, limit=args.limit
        )
        documents = [audit.inquiry_document(record) for record in page.items]
        _print_page(args, documents, page.next, INQUIRY_COLUMNS)
        return 0

    return _with_db(args, work)


def run_notifications(args: argparse.Namespace) -> int:
    async def work(pool: asyncpg.Pool, settings: Settings) -> int:
        page = await audit.list_notifications(
            pool, payment_code=args.payment_code, outcome=args.outcome, after=args.after, limit=args.limit
        )
        documents = [audit.notification_document(record) for record in page.items]
        _print_page(args, documents, page.next, NOTIFICATION_COLUMNS)
        return 0

    return _with_db(args, work)
