"""``dipc simulate …``: act as DOKU against a running server, to test a setup end to end."""

from __future__ import annotations

import argparse
import asyncio

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
    common.add_argument("--channel", default=channels.ALFA, choices=list(channels.CHANNELS))
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


def simulator_for(args: argparse.Namespace, session: aiohttp.ClientSession) -> DokuSimulator:
    settings = load_settings(demo=args.demo)
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


def run_inquiry(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            simulator = simulator_for(args, session)
            try:
                reply = await simulator.inquiry(
                    args.payment_code, channel=args.channel, request_id=args.request_id
                )
            except aiohttp.ClientError as error:
                raise CommandFailed(f"cannot reach {simulator.base_url}: {error}") from None
            return report(args, "inquiry", reply)

    return asyncio.run(run())
