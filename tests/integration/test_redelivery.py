"""After the merchant's receiver recovers, waiting deliveries can be hurried; dipc says who is calling."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import orjson
import pytest
from aiohttp import web

from server import __version__
from tests.conftest import code_fields, make_settings
from tests.integration.test_cli import run_async
from tests.integration.test_webhooks import SECRET, start


@dataclass
class Backend:
    """The merchant's receiver: records each request's event id and User-Agent; 503 while ``down``."""

    url: str = ""
    down: bool = False
    seen: list[tuple[int, str, int]] = field(default_factory=list)  # (event id, User-Agent, status)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        status = 503 if self.down else 200
        self.seen.append(
            (int(request.headers["Dipc-Event-Id"]), request.headers.get("User-Agent", ""), status)
        )
        return web.Response(status=status)


@pytest.fixture
async def backend(aiohttp_server) -> Backend:
    backend = Backend()
    app = web.Application()
    app.router.add_post("/hooks", backend.handle)
    server = await aiohttp_server(app)
    backend.url = str(server.make_url("/hooks"))
    return backend


async def wait_for(pool, sql: str, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await pool.fetchval(sql):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {sql}")


async def test_a_pending_delivery_is_hurried_once_the_receiver_is_back(
    aiohttp_client, database_url, pool, backend, admin_headers
):
    # A failed attempt waits an hour before the next: only a redelivery brings it sooner.
    settings = make_settings(webhook_url=backend.url, webhook_secrets=(SECRET,), webhook_backoff_base_s=3600)
    client = await start(aiohttp_client, database_url, pool, settings)
    assert (await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)).status == 201
    await wait_for(pool, "SELECT status = 'delivered' FROM webhook_deliveries WHERE event_id = 1")
    assert backend.seen == [(1, f"dipc/{__version__}", 200)]  # dipc says who calls, with its version

    backend.down = True
    await client.post("/v1/payment-codes/8896512345678123/cancel", headers=admin_headers)
    await wait_for(pool, "SELECT last_error IS NOT NULL FROM webhook_deliveries WHERE event_id = 2")
    backend.down = False
    response = await client.post(
        "/v1/webhook-deliveries/redeliver", json={"event_ids": [1, 2, 99]}, headers=admin_headers
    )
    assert response.status == 200
    assert await response.json() == {
        "redelivered": 0,
        "hurried": 1,
        "skipped": [{"event_id": 1, "status": "delivered"}, {"event_id": 99, "status": "none"}],
    }
    await wait_for(pool, "SELECT status = 'delivered' FROM webhook_deliveries WHERE event_id = 2")
    assert [(event, status) for event, _, status in backend.seen] == [(1, 200), (2, 503), (2, 200)]


async def test_events_redeliver_hurries_pending_and_says_when_there_is_nothing_to_do(env, pool):
    for event_id in (1, 2, 3):
        await pool.execute(
            "INSERT INTO events (type, payment_code, payload) VALUES ('code.created', $1, '{}')",
            str(event_id),
        )
    await pool.execute(
        "INSERT INTO webhook_deliveries "
        "(event_id, payment_code, status, attempts, next_attempt_at, last_error) VALUES "
        "(1, '1', 'delivered', 1, now(), NULL), "
        "(2, '2', 'pending', 4, now() + interval '1 hour', 'HTTP 502'), "
        "(3, '3', 'failed', 20, now(), 'HTTP 500')"
    )
    code, stdout, stderr = await run_async("events", "redeliver", "1", env=env)
    assert code == 1
    assert b"event 1: nothing to redeliver, its delivery is delivered" in stderr
    code, stdout, _ = await run_async("events", "redeliver", "--all-pending", "--json", env=env)
    assert code == 0
    assert orjson.loads(stdout) == {"redelivered": 0, "hurried": 1, "skipped": []}
    row = await pool.fetchrow(
        "SELECT status, attempts, next_attempt_at <= now() AS due FROM webhook_deliveries WHERE event_id = 2"
    )
    assert tuple(row) == ("pending", 4, True)  # due now, its attempts kept
    code, stdout, _ = await run_async("events", "redeliver", "3", "2", env=env)
    assert code == 0
    assert b"1 failed deliveries put back in line" in stdout
    assert b"1 pending deliveries due now" in stdout
    assert (await run_async("events", "redeliver", "--all-failed", "--all-pending", env=env))[0] == 2
