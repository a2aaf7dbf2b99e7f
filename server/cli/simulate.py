"""``dipc simulate …``: act as DOKU against a running server, to test a setup end to end."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import orjson

from server.cli.common import EXIT_FAILURE, EXIT_USAGE, CommandFailed, print_json
from server.config import Settings, load_settings
from server.doku import channels
from server.doku.auth import Client
from server.doku.client import DokuSimulator, Reply

SIMULATE_HELP = """\
Send requests exactly as DOKU does, signed with the configured Client-Id and secret key (or the demo
ones with --demo), and check that the server's answers are signed correctly.
"""


def register(commands: argparse._SubParsersAction) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="act as DOKU against a running server",
        description=SIMULATE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = simulate.add_subparsers(title="actions", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--demo", action="store_true", help="sign with the demo credentials of `serve --demo`"
    )
    common.add_argument("--url", help="the server's base URL (default http://$DIPC_HOST:$DIPC_PORT)")
    common.add_argument("--client-id", help="which configured DOKU client to sign as (default: the only one)")
    common.add_argument(
        "--channel",
        choices=list(channels.CHANNELS),
        help="the store chain asking (default: the channel of the code's BIN in DIPC_BINS, else ALFA)",
    )
    common.add_argument("--request-id", help="the Request-Id to send (default: a fresh UUID)")
    common.add_argument("--json", action="store_true", help="print the reply as JSON only")

    inquiry = actions.add_parser(
        "inquiry",
        parents=[common],
        help="ask for the bill of a payment code, as a store counter does through DOKU",
        epilog="example: dipc simulate inquiry --demo 8896512345678123",
    )
    inquiry.add_argument("payment_code")
    inquiry.set_defaults(run=run_inquiry)

    notify = actions.add_parser(
        "notify",
        parents=[common],
        help="notify a payment, as DOKU does after the customer paid",
        epilog="example:\n"
        "  dipc simulate notify --demo 8896512345678123 --invoice INV-2026-000123 --amount 150000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    notify.add_argument("payment_code")
    notify.add_argument("--invoice", required=True, help="the invoice number the inquiry quoted")
    notify.add_argument("--amount", required=True, type=int, help="whole rupiah paid")
    notify.add_argument("--ref", help="transaction.original_request_id (default: a fresh one per call)")
    notify.add_argument("--status", default="SUCCESS", help="transaction.status (default SUCCESS)")
    notify.set_defaults(run=run_notify)

    flow = actions.add_parser(
        "flow",
        parents=[common],
        help="inquiry, then the payment notification of what it quoted: a whole counter payment",
        epilog="example: dipc simulate flow --demo 8896500000000777",
    )
    flow.add_argument("payment_code")
    flow.set_defaults(run=run_flow)


def _client(settings: Settings, client_id: str | None) -> Client:
    if client_id:
        client = settings.clients.get(client_id)
        if client is None:
            raise CommandFailed(f"--client-id {client_id} is not configured", EXIT_USAGE)
    elif len(settings.clients) == 1:
        client = next(iter(settings.clients.values()))
    elif not settings.clients:
        raise CommandFailed(
            "no DOKU client configured: set DIPC_CLIENT_ID and DIPC_SECRET_KEY, or pass --demo", 2
        )
    else:
        raise CommandFailed("several DOKU clients are configured: pass --client-id", EXIT_USAGE)
    if not client.secret_keys:
        raise CommandFailed(f"no secret key for {client.client_id}: set DIPC_SECRET_KEY", EXIT_USAGE)
    return client


def channel_for(args: argparse.Namespace, settings: Settings) -> str:
    """The channel asked for, or the one the code's BIN belongs to: an Indomaret BIN asks as Indomaret."""
    if args.channel:
        return args.channel
    possible = settings.bins.channels_for(args.payment_code) if settings.bins else None
    if possible and len(possible) == 1:
        return next(iter(possible))
    return channels.ALFA


def simulator_for(args: argparse.Namespace, session: aiohttp.ClientSession) -> DokuSimulator:
    settings = load_settings(demo=args.demo)
    args.channel = channel_for(args, settings)
    base_url = args.url or f"http://{settings.host}:{settings.port}"
    return DokuSimulator(
        session,
        base_url,
        _client(settings, args.client_id),
        inquiry_path=settings.inquiry_path,
        notification_path=settings.notification_path,
    )


def report(args: argparse.Namespace, what: str, reply: Reply) -> int:
    try:
        body = reply.json()
    except orjson.JSONDecodeError:
        body = reply.body.decode(errors="replace")
    if args.json:
        print_json({"status": reply.status, "signature_valid": reply.signature_valid, "body": body})
    else:
        print(f"{what} Request-Id {reply.request_id}")
        print(f"HTTP {reply.status}")
        if reply.signature_valid is None:
            print("response signature: none (the server could not authenticate us, or is not dipc)")
        elif reply.signature_valid:
            print("response signature: valid")
        else:
            print(f"response signature: INVALID ({reply.signature_problem})")
        print_json(body)
    return 0 if reply.signature_valid else EXIT_FAILURE


def _simulate(args: argparse.Namespace, work: Callable[[DokuSimulator], Awaitable[int]]) -> int:
    async def run() -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            simulator = simulator_for(args, session)
            try:
                return await work(simulator)
            except aiohttp.ClientError as error:
                raise CommandFailed(f"cannot reach {simulator.base_url}: {error}") from None

    return asyncio.run(run())


def run_inquiry(args: argparse.Namespace) -> int:
    async def work(simulator: DokuSimulator) -> int:
        reply = await simulator.inquiry(args.payment_code, channel=args.channel, request_id=args.request_id)
        return report(args, "inquiry", reply)

    return _simulate(args, work)


def run_notify(args: argparse.Namespace) -> int:
    async def work(simulator: DokuSimulator) -> int:
        reply = await simulator.notify(
            args.payment_code,
            invoice_number=args.invoice,
            amount=args.amount,
            channel=args.channel,
            original_request_id=args.ref or f"sim-{uuid.uuid4()}",
            status=args.status,
            request_id=args.request_id,
        )
        return report(args, "notification", reply)

    return _simulate(args, work)


def run_flow(args: argparse.Namespace) -> int:
    """An inquiry, then the notification of exactly what it quoted (its Request-Id as the reference)."""

    async def work(simulator: DokuSimulator) -> int:
        inquiry = await simulator.inquiry(args.payment_code, channel=args.channel)
        if report(args, "inquiry", inquiry) or inquiry.status != 200:
            return EXIT_FAILURE
        order = inquiry.json()["order"]
        notification = await simulator.notify(
            args.payment_code,
            invoice_number=order["invoice_number"],
            amount=order["amount"],
            channel=args.channel,
            original_request_id=inquiry.request_id,
        )
        return report(args, "notification", notification)

    return _simulate(args, work)
