"""Two `dipc serve` processes on one database: events sequenced by both reach one feed, once, in order.

Each process sequences its own writers' events after their commits (ADR 3); this checks that the two
sequencers, racing, neither lose, repeat nor reorder events, and that a consumer tailing the feed of one
process sees the other's events too, never stepping over one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Iterator

import aiohttp

from server.doku.client import DokuSimulator, notification_body
from tests.conftest import ADMIN_TOKEN, CLIENT, CLIENT_ID, dipc_env
from tests.integration.test_cli import DIPC, free_port, wait_ready

CODES = 60


@contextlib.contextmanager
def two_servers(database_url: str) -> Iterator[tuple[int, int]]:
    ports = (free_port(), free_port())
    servers = []
    try:
        for port in ports:
            env = dipc_env(
                database_url, DIPC_PORT=str(port), DIPC_ADMIN_TOKEN=ADMIN_TOKEN, DIPC_LOG_LEVEL="WARNING"
            )
            server = subprocess.Popen(
                [*DIPC, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            servers.append(server)
            wait_ready(f"http://127.0.0.1:{port}/readyz", server)
        yield ports
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(timeout=30)


async def test_two_processes_sequence_one_feed_with_every_event_once_in_causal_order(database_url, pool):
    codes = [f"88965{n:011d}" for n in range(CODES)]
    paid, created = codes[: CODES // 2], codes[CODES // 2 :]
    await pool.copy_records_to_table(
        "payment_codes",
        records=[(code, CLIENT_ID, "ALFA", f"INV-{code}", 10_000, "Pelanggan") for code in paid],
        columns=["payment_code", "client_id", "channel", "invoice_number", "amount", "customer_name"],
    )
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with two_servers(database_url) as (first, second):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            done = asyncio.Event()

            async def consume() -> list[int]:
                seen: list[int] = []
                cursor = 0
                while True:
                    async with session.get(
                        f"http://127.0.0.1:{first}/v1/events",
                        params={"after": cursor, "limit": 7, "wait": 0.5},
                        headers=headers,
                    ) as response:
                        assert response.status == 200, await response.text()
                        page = await response.json()
                    seen += [event["id"] for event in page["items"]]
                    cursor = page["next"]
                    if done.is_set() and not page["items"]:
                        return seen

            async def pay(port: int, code: str, ref: str) -> int:
                doku = DokuSimulator(session, f"http://127.0.0.1:{port}", CLIENT)
                body = notification_body(
                    code, invoice_number=f"INV-{code}", amount=10_000, original_request_id=ref
                )
                return (await doku.post("/doku/notification", body)).status

            async def create(port: int, code: str) -> int:
                document = {"payment_code": code, "amount": 1, "invoice_number": f"I-{code}",
                            "customer_name": "N", "client_id": CLIENT_ID}  # fmt: skip
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/payment-codes", json=document, headers=headers
                ) as response:
                    return response.status

            consumer = asyncio.create_task(consume())
            # Each paid code: two different payments at once, one to each process (one normal, one
            # conflict); the other codes registered half through each process.
            work = [pay(first, code, "A") for code in paid] + [pay(second, code, "B") for code in paid]
            work += [create((first, second)[n % 2], code) for n, code in enumerate(created)]
            statuses = await asyncio.gather(*work)
            done.set()
            seen = await consumer

    assert set(statuses) == {200, 201}
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0
    rows = await pool.fetch("SELECT id, type, payment_code FROM events ORDER BY id")
    assert len(rows) == 2 * len(paid) + len(created)
    assert seen == [row["id"] for row in rows]  # the tail saw every event once, in id order
    by_code: dict[str, list[str]] = {}
    for row in rows:
        by_code.setdefault(row["payment_code"], []).append(row["type"])
    assert all(by_code[code] == ["payment.received", "payment.conflict"] for code in paid)
    assert all(by_code[code] == ["code.created"] for code in created)
