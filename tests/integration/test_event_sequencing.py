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
from tests.conftest import ADMIN_TOKEN, CLIENT, CLIENT_ID
from tests.dbproxy import SilencingProxy
from tests.integration.test_cli import free_port
from tests.integration.test_crash import one_shot_codes, start_server

CODES = 60


@contextlib.contextmanager
def two_servers(database_url: str) -> Iterator[tuple[int, int]]:
    ports = (free_port(), free_port())
    servers = []
    try:
        for port in ports:
            servers.append(start_server(database_url, port, DIPC_ADMIN_TOKEN=ADMIN_TOKEN))
        yield ports
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(timeout=30)


async def test_two_processes_sequence_one_feed_with_every_event_once_in_causal_order(database_url, pool):
    paid = await one_shot_codes(pool, CODES // 2)
    created = [f"88965{n:011d}" for n in range(CODES // 2, CODES)]
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


async def test_connections_lost_without_a_word_stop_neither_writers_nor_the_feed_nor_shutdown(
    database_url, pool, tmp_path
):
    codes = await one_shot_codes(pool, CODES)
    proxy = SilencingProxy(database_url)
    await proxy.start()
    port = free_port()
    server = await asyncio.to_thread(start_server, proxy.url, port, DIPC_NOTIFICATION_DB_TIMEOUT_S="2")
    answers: list[tuple[int, int]] = []
    try:
        await asyncio.sleep(1)
        proxy.lose_every_open_connection()
        await asyncio.sleep(6)  # the sweep's next pass (every 5 s) takes a pooled connection: a lost one
        async with aiohttp.ClientSession() as session:
            doku = DokuSimulator(session, f"http://127.0.0.1:{port}", CLIENT)
            for code in codes:
                body = notification_body(
                    code, invoice_number=f"INV-{code}", amount=10_000, original_request_id=code
                )
                reply = await doku.post("/doku/notification", body)
                paid = await pool.fetchval("SELECT count(*) FROM payments WHERE payment_code = $1", code)
                answers.append((reply.status, paid))
                if [status for status, _ in answers[-3:]] == [200, 200, 200]:
                    break
        pending = await pool.fetchval("SELECT count(*) FROM events_pending")
    finally:
        server.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(server.wait, 30)
        server.kill()
        await proxy.close()
    # Requests on lost connections are cut at their deadline (503, nothing committed) and the pool opens
    # new ones; a 200 is a committed payment, whose event reached the feed before the answer.
    assert answers[-3:] == [(200, 1)] * 3, answers
    assert all(paid == (status == 200) for status, paid in answers), answers
    assert pending == 0
    assert server.returncode == 0  # SIGTERM: it stopped within the shutdown timeout, on its own
