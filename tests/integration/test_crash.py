"""SIGKILL in the middle of a burst of notifications: every 200 is on disk, no payment is doubled."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import aiohttp

from server.doku.client import DokuSimulator, notification_body
from tests.conftest import CLIENT, CLIENT_ID, dipc_env
from tests.integration.test_cli import DIPC, free_port, wait_ready

COUNT = 300


def start_server(database_url: str, port: int) -> subprocess.Popen:
    env = dipc_env(database_url, DIPC_PORT=str(port), DIPC_LOG_LEVEL="WARNING")
    server = subprocess.Popen([*DIPC, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_ready(f"http://127.0.0.1:{port}/readyz", server)
    return server


async def send_all(port: int, bodies: dict[str, bytes], *, kill: subprocess.Popen | None = None) -> set[str]:
    """Send every body once, concurrently; return the codes whose notification got a 200.

    With ``kill``, the server is SIGKILLed once a sixth of the answers are in.
    """
    acknowledged: set[str] = set()
    answered = 0
    killed = asyncio.Event()

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=40), timeout=aiohttp.ClientTimeout(total=20)
    ) as session:
        doku = DokuSimulator(session, f"http://127.0.0.1:{port}", CLIENT)

        async def send(code: str, body: bytes) -> None:
            nonlocal answered
            try:
                reply = await doku.post("/doku/notification", body)
            except (aiohttp.ClientError, TimeoutError):
                return
            answered += 1
            if reply.status == 200:
                acknowledged.add(code)
            if kill is not None and answered >= len(bodies) // 6 and not killed.is_set():
                killed.set()
                kill.send_signal(signal.SIGKILL)

        await asyncio.gather(*(send(code, body) for code, body in bodies.items()))
    return acknowledged


async def test_a_killed_server_loses_no_acknowledged_notification_and_doubles_no_payment(
    database_url, pool, tmp_path
):
    codes = [f"88965{n:011d}" for n in range(COUNT)]
    await pool.copy_records_to_table(
        "payment_codes",
        records=[(code, CLIENT_ID, "ALFA", f"INV-{code}", 10_000, "Pelanggan") for code in codes],
        columns=["payment_code", "client_id", "channel", "invoice_number", "amount", "customer_name"],
    )
    bodies = {
        code: notification_body(
            code, invoice_number=f"INV-{code}", amount=10_000, original_request_id=f"trx-{code}"
        )
        for code in codes
    }
    port = free_port()
    server = start_server(database_url, port)
    try:
        acknowledged = await send_all(port, bodies, kill=server)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert server.returncode == -signal.SIGKILL
    assert 0 < len(acknowledged) < COUNT, "the kill should land in the middle of the burst"

    # Every notification that got a 200 is on disk, with its payment.
    recorded = {row["payment_code"] for row in await pool.fetch("SELECT payment_code FROM payments")}
    assert acknowledged <= recorded
    stored = {row["payment_code"] for row in await pool.fetch("SELECT payment_code FROM notifications")}
    assert acknowledged <= stored

    # DOKU resends what was not acknowledged (and, for good measure, everything else too).
    server = start_server(database_url, port)
    try:
        missing = {code: body for code, body in bodies.items() if code not in acknowledged}
        assert await send_all(port, missing) == set(missing)
        assert await send_all(port, {code: bodies[code] for code in acknowledged}) == acknowledged
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    rows = await pool.fetch(
        "SELECT payment_code, kind, count(*) OVER (PARTITION BY payment_code) AS n FROM payments"
    )
    assert len(rows) == COUNT
    assert {row["kind"] for row in rows} == {"normal"}
    assert max(row["n"] for row in rows) == 1
    assert (
        await pool.fetchval("SELECT count(*) FROM payment_codes WHERE status = 'paid' AND paid_count = 1")
        == COUNT
    )
