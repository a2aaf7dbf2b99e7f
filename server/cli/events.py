"""``dipc events …``: follow the event feed, and look after webhook deliveries."""

from __future__ import annotations

import argparse
import asyncio
import sys

from server.cli.common import EXIT_FAILURE, EXIT_USAGE, Database, open_database, print_json, print_table
from server.config import load_settings
from server.core import feed
from server.core.errors import Unavailable
from server.core.events import Event
from server.store import outbox
from server.store.listener import EventListener
from server.store.pool import deadline

# Each poll waits this long for an event, and the database has DIPC_ADMIN_DB_TIMEOUT_S beyond it to
# answer: one that hangs is noticed within their sum. After a failed poll, the next one begins this soon.
POLL_WAIT_S = 10.0
RETRY_S = 1.0

DELIVERY_COLUMNS = [
    "event_id",
    "payment_code",
    "status",
    "attempts",
    "last_status",
    "last_error",
    "next_attempt_at",
]


def register(commands: argparse._SubParsersAction) -> None:
    events = commands.add_parser(
        "events",
        help="follow the event feed; list and retry webhook deliveries",
        description="The events the merchant's other systems learn from (payments, conflicts, anomalies, "
        "code changes), and the webhook forwarder's deliveries of them.",
    )
    actions = events.add_subparsers(title="actions", metavar="ACTION", required=True)
    demo_flag = argparse.ArgumentParser(add_help=False)
    demo_flag.add_argument(
        "--demo", action="store_true", help="without DATABASE_URL: the embedded database of `serve --demo`"
    )

    tail = actions.add_parser(
        "tail",
        parents=[demo_flag],
        help="print events as they happen (Ctrl+C to stop)",
        description="Print new events as they commit, woken by PostgreSQL LISTEN/NOTIFY. Starts after the "
        "newest event unless --after or --from-start says otherwise.",
    )
    tail.add_argument("--after", type=int, help="start after this event id")
    tail.add_argument("--from-start", action="store_true", help="print every event since the first")
    tail.add_argument("--json", action="store_true", help="one JSON document per line (NDJSON)")
    tail.add_argument("--count", type=int, help="stop after printing this many events")
    tail.set_defaults(run=run_tail)

    listing = actions.add_parser(
        "deliveries", parents=[demo_flag], help="list webhook deliveries (e.g. --status failed)"
    )
    listing.add_argument("--status", choices=list(feed.DELIVERY_STATUSES))
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=run_deliveries)

    redeliver = actions.add_parser(
        "redeliver",
        parents=[demo_flag],
        help="retry failed webhook deliveries, or hurry pending ones",
        description="Put failed deliveries back in line (attempts start over), and make pending ones due "
        "now instead of after their backoff (the receiver is back): the given events, every failed one "
        "with --all-failed, or every pending one with --all-pending. Later events of the same payment "
        "code, held back meanwhile, follow in order. A delivery in flight at that moment may be sent "
        "twice: receivers deduplicate on Dipc-Event-Id.",
    )
    redeliver.add_argument("event_ids", nargs="*", type=int, metavar="EVENT_ID")
    which = redeliver.add_mutually_exclusive_group()
    which.add_argument("--all-failed", action="store_true", help="every failed delivery")
    which.add_argument("--all-pending", action="store_true", help="every pending delivery, due now")
    redeliver.add_argument("--json", action="store_true")
    redeliver.set_defaults(run=run_redeliver)


def _print_event(event: Event, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(event.document_json() + "\n")
    else:
        payload = event.payload
        detail = " ".join(
            f"{name}={payload[name]}" for name in ("kind", "reason", "amount", "invoice_number", "status")
            if payload.get(name) is not None
        )  # fmt: skip
        when = f"{event.created_at:%Y-%m-%d %H:%M:%S}"
        print(f"#{event.id} {when} {event.type} {event.payment_code or '-'} {detail}")
    sys.stdout.flush()


def run_tail(args: argparse.Namespace) -> int:
    settings = load_settings(demo=args.demo)

    async def follow(database: Database) -> int:
        listener = EventListener(database.listen_dsn)
        await listener.start()
        try:
            if args.from_start:
                cursor = 0
            elif args.after is not None:
                cursor = args.after
            else:
                cursor = await outbox.last_id(database.pool)
            printed = 0
            down = False
            while args.count is None or printed < args.count:
                # A database that hangs or restarts is said once on stderr, and the tail goes on from
                # where it was once the database answers again (it waited for ever on a frozen one).
                after = cursor
                try:
                    async with deadline(settings.admin_db_timeout_s + POLL_WAIT_S, "cli.events_tail"):
                        events, cursor = await feed.read_feed(
                            database.pool, listener, after=after, limit=100, wait=POLL_WAIT_S
                        )
                except Unavailable as error:
                    if not down:
                        print(f"dipc: {error}; trying again until it answers", file=sys.stderr, flush=True)
                        down = True
                    await asyncio.sleep(RETRY_S)
                    continue
                if down:
                    print(f"dipc: the database answers again; going on after event {after}", file=sys.stderr)
                    down = False
                for event in events:
                    _print_event(event, args.json)
                    printed += 1
                    if args.count is not None and printed >= args.count:
                        break
        finally:
            await listener.close()
        return 0

    async def run() -> int:
        async with open_database(settings) as database:
            return await follow(database)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


def run_deliveries(args: argparse.Namespace) -> int:
    settings = load_settings(demo=args.demo)

    async def run() -> int:
        async with open_database(settings) as database:
            page = await feed.list_deliveries(database.pool, status=args.status, after=None, limit=args.limit)
        documents = [feed.delivery_document(delivery) for delivery in page.items]
        if args.json:
            print_json({"items": documents, "next": page.next})
        else:  # only a pending delivery has a next attempt (the column holds a finished one's last lease)
            print_table(
                [row if row["status"] == "pending" else row | {"next_attempt_at": None} for row in documents],
                DELIVERY_COLUMNS,
            )
        return 0

    return asyncio.run(run())


def run_redeliver(args: argparse.Namespace) -> int:
    settings = load_settings(demo=args.demo)
    if bool(args.event_ids) + args.all_failed + args.all_pending != 1:
        print(
            "dipc: name the events to redeliver, or pass --all-failed or --all-pending (not both)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.event_ids:
        wanted = feed.RedeliveryRequest(args.event_ids, feed.REDELIVERABLE)
    else:
        wanted = feed.RedeliveryRequest(None, ("failed",) if args.all_failed else ("pending",))

    async def run() -> feed.Redelivery:
        async with open_database(settings) as database:
            return await feed.redeliver(database.pool, wanted)

    result = asyncio.run(run())
    if args.json:
        print_json(result.document())
    else:
        if not args.all_pending:
            print(f"{len(result.requeued)} failed deliveries put back in line")
        if not args.all_failed:
            print(f"{len(result.hurried)} pending deliveries due now")
        for event_id, status in result.skipped.items():
            reason = "it has no webhook delivery" if status == "none" else f"its delivery is {status}"
            print(f"event {event_id}: nothing to redeliver, {reason}", file=sys.stderr)
    # Naming an event that cannot be redelivered is a failure the caller should see.
    return EXIT_FAILURE if result.skipped else 0
