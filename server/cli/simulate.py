"""``dipc simulate …``: act as DOKU against a running server, to test a setup end to end."""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
from aiohttp import web

from server.cli.common import EXIT_FAILURE, EXIT_USAGE, CommandFailed, print_json
from server.config import Settings, load_settings
from server.doku import channels
from server.doku.auth import Client
from server.doku.client import DokuSimulator, Reply
from server.doku.standin import DokuStandIn

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
    common.add_argument(
        "--json",
        action="store_true",
        help="print each reply as a line of JSON only (flow: the inquiry's, then the notification's)",
    )

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
    flow.add_argument(
        "--lost-notification",
        action="store_true",
        help="pay at the DOKU stand-in, send dipc no notification: its reconciler must find the payment",
    )
    flow.add_argument("--doku-api", help="the stand-in's base URL (default $DIPC_DOKU_API_URL)")
    flow.set_defaults(run=run_flow)

    standin = actions.add_parser(
        "doku-api",
        help="serve a stand-in for DOKU's Check Status API, to rehearse reconciliation",
        description="Serve DOKU's Check Status API (GET /orders/v1/status/<invoice>) for the configured DOKU "
        "client (or the demo one with --demo), checking every request's headers and signature as DOKU does. "
        "It answers SUCCESS for the invoices paid at it (`dipc simulate flow --lost-notification`), "
        "PENDING for the rest. Point dipc at it with DIPC_DOKU_API_URL.",
        epilog="example:\n"
        "  dipc simulate doku-api --demo --port 8090 &\n"
        "  DIPC_DOKU_API_URL=http://127.0.0.1:8090 DIPC_RECONCILE_SCHEDULE=5,30,60 dipc serve --demo &\n"
        "  dipc simulate flow --demo --lost-notification --doku-api http://127.0.0.1:8090 8896500000000777",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    standin.add_argument("--demo", action="store_true", help="answer the demo client of `serve --demo`")
    standin.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    standin.add_argument("--port", type=int, default=8090, help="listen port (default 8090)")
    standin.set_defaults(run=run_doku_api)


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


async def _pay_at_standin(
    simulator: DokuSimulator, doku_api: str, args: argparse.Namespace, order: dict, reference: str
) -> int:
    """The customer pays at the counter and DOKU's notification is lost: only the stand-in knows."""
    payment = {
        "payment_code": args.payment_code,
        "invoice_number": order["invoice_number"],
        "amount": order["amount"],
        "original_request_id": reference,
        "channel": args.channel,
    }
    async with simulator.session.post(f"{doku_api.rstrip('/')}/_standin/payments", json=payment) as response:
        if response.status != 201:
            raise CommandFailed(f"the stand-in at {doku_api} refused the payment: HTTP {response.status}")
    if args.json:
        print_json({"paid_at_standin": payment, "notification": None})
    else:
        print(
            f"paid {order['amount']} for invoice {order['invoice_number']} at the DOKU stand-in {doku_api};"
        )
        print("no notification was sent: dipc's reconciler finds the payment at its next scheduled check")
        print(f"(or ask now: dipc reconcile --invoice {order['invoice_number']})")
    return 0


def run_doku_api(args: argparse.Namespace) -> int:
    settings = load_settings(demo=args.demo)
    if not settings.clients:
        raise CommandFailed(
            "no DOKU client configured: set DIPC_CLIENT_ID and DIPC_SECRET_KEY, or pass --demo", 2
        )
    standin = DokuStandIn(settings.clients)
    base = f"http://{args.host}:{args.port}"
    print(
        f"DOKU Check Status stand-in on {base} for {', '.join(sorted(settings.clients))}\n"
        f"point dipc at it: DIPC_DOKU_API_URL={base} dipc serve{' --demo' if args.demo else ''}",
        flush=True,
    )
    try:
        web.run_app(standin.app(), host=args.host, port=args.port, print=None, access_log=None)
    except OSError as error:
        raise CommandFailed(f"cannot listen on {args.host}:{args.port}: {error}", EXIT_USAGE) from None
    return 0


def run_flow(args: argparse.Namespace) -> int:
    """An inquiry, then the notification of exactly what it quoted (its Request-Id as the reference)."""

    doku_api = None
    if args.lost_notification:
        doku_api = args.doku_api or load_settings(demo=args.demo).doku_api_url
        if not doku_api:
            raise CommandFailed("--lost-notification needs the stand-in's URL: --doku-api URL", EXIT_USAGE)

    async def work(simulator: DokuSimulator) -> int:
        inquiry = await simulator.inquiry(args.payment_code, channel=args.channel)
        if report(args, "inquiry", inquiry) or inquiry.status != 200:
            return EXIT_FAILURE
        order = inquiry.json()["order"]
        if doku_api is not None:
            return await _pay_at_standin(simulator, doku_api, args, order, inquiry.request_id)
        notification = await simulator.notify(
            args.payment_code,
            invoice_number=order["invoice_number"],
            amount=order["amount"],
            channel=args.channel,
            original_request_id=inquiry.request_id,
        )
        return report(args, "notification", notification)

    return _simulate(args, work)
