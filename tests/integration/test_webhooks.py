"""The webhook forwarder against a real HTTP receiver on loopback that fails on purpose."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson
import pytest
from aiohttp import web

from server.app import make_app
from server.doku.client import DokuSimulator
from server.store import deliveries as delivery_store
from server.webhooks import signing
from server.webhooks.forwarder import backoff_s
from tests.conftest import CLIENT, make_settings

SECRET = b"whsec-test-secret"


@dataclass
class Receiver:
    """The merchant's backend: answers 500 to the first ``failures`` requests, 200 afterwards."""

    failures: int = 0
    fail_events: set[int] = field(default_factory=set)
    requests: list[tuple[int, int, bool]] = field(default_factory=list)  # (event id, status, signature ok)
    acknowledged: list[int] = field(default_factory=list)
    bodies: dict[int, dict] = field(default_factory=dict)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event_id = int(request.headers[signing.EVENT_ID_HEADER])
        valid = signing.verify(SECRET, body, request.headers[signing.SIGNATURE_HEADER], time.time())
        fail = len(self.requests) < self.failures or event_id in self.fail_events
        status = 500 if fail or not valid else 200
        self.requests.append((event_id, status, valid))
        if status == 200:
            self.acknowledged.append(event_id)
            self.bodies[event_id] = orjson.loads(body)
        return web.Response(status=status)


@pytest.fixture
async def receiver(aiohttp_server) -> Receiver:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/dipc", receiver.handle)
    server = await aiohttp_server(app)
    receiver.url = str(server.make_url("/hooks/dipc"))
    return receiver


def webhook_settings(receiver: Receiver, **overrides):
    values = {
        "webhook_url": receiver.url,
        "webhook_secrets": (SECRET,),
        "webhook_backoff_base_s": 0.02,
        "webhook_backoff_cap_s": 0.2,
        "webhook_max_attempts": 50,
    }
    return make_settings(**(values | overrides))


async def start(aiohttp_client, database_url, pool, settings):
    client = await aiohttp_client(make_app(settings, database_url))
    # The subscriber's stream starts at its registration; wait for it before making events.
    for _ in range(200):
        if await pool.fetchval("SELECT count(*) FROM webhook_subscribers"):
            return client
        await asyncio.sleep(0.02)
    raise AssertionError("the forwarder did not register its subscriber")


async def settle(pool, *, count: int, status: str = "delivered", seconds: float = 30.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE status = $1", status) >= count:
            return
        await asyncio.sleep(0.05)
    rows = await pool.fetch(
        "SELECT event_id, status, attempts, last_error FROM webhook_deliveries ORDER BY 1"
    )
    raise AssertionError(f"deliveries did not settle: {[tuple(r) for r in rows]}")


async def make_traffic(client, admin_headers, codes: list[str]) -> None:
    """Per code: created, paid, paid again by another store (a conflict); codes interleaved."""
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    for code in codes:
        response = await client.post(
            "/v1/payment-codes",
            json={"payment_code": code, "amount": 5000, "invoice_number": f"I-{code}", "customer_name": "N",
                  "client_id": CLIENT.client_id},
            headers=admin_headers,
        )  # fmt: skip
        assert response.status == 201
    for ref in ("A", "B"):
        replies = await asyncio.gather(
            *(
                doku.notify(code, invoice_number=f"I-{code}", amount=5000, original_request_id=ref)
                for code in codes
            )
        )
        assert {reply.status for reply in replies} == {200}


def assert_in_order_per_code(receiver: Receiver, expected: dict[int, str | None]) -> None:
    # Every event acknowledged exactly once, and never sent again after its acknowledgement.
    assert sorted(receiver.acknowledged) == sorted(expected)
    for event_id in expected:
        attempts = [status for eid, status, _ in receiver.requests if eid == event_id]
        assert attempts[-1] == 200, (event_id, attempts)
        assert attempts.count(200) == 1, (event_id, attempts)
    # Per code, an event is first sent only after the previous one of that code was acknowledged.
    acknowledged_so_far: set[int] = set()
    for event_id, status, _ in receiver.requests:
        code = expected[event_id]
        earlier = [eid for eid, c in expected.items() if c == code and c is not None and eid < event_id]
        assert set(earlier) <= acknowledged_so_far, f"event {event_id} sent before {earlier}"
        if status == 200:
            acknowledged_so_far.add(event_id)


async def test_every_event_is_delivered_signed_in_order_per_code_despite_failures(
    aiohttp_client, database_url, pool, receiver, admin_headers
):
    receiver.failures = 7
    client = await start(aiohttp_client, database_url, pool, webhook_settings(receiver))
    codes = [f"88965000000{n:05d}" for n in range(6)]
    await make_traffic(client, admin_headers, codes)
    expected = {
        row["id"]: row["payment_code"] for row in await pool.fetch("SELECT id, payment_code FROM events")
    }
    assert len(expected) == 18
    await settle(pool, count=len(expected))
    assert all(valid for _, _, valid in receiver.requests)
    assert sum(1 for _, status, _ in receiver.requests if status == 500) == 7
    assert_in_order_per_code(receiver, expected)
    # The body is the event's feed document.
    first = min(expected)
    assert receiver.bodies[first]["id"] == first
    assert receiver.bodies[first]["type"] == "code.created"


async def test_a_delivery_that_fails_for_good_holds_its_code_until_redelivered(
    aiohttp_client, database_url, pool, receiver, admin_headers
):
    settings = webhook_settings(receiver, webhook_max_attempts=3)
    client = await start(aiohttp_client, database_url, pool, settings)
    receiver.fail_events = {1}  # the first event (code.created of the first code) is refused
    codes = ["8896500000000001", "8896500000000002"]
    await make_traffic(client, admin_headers, codes)
    await settle(pool, count=1, status="failed")
    failed = await (
        await client.get("/v1/webhook-deliveries", params={"status": "failed"}, headers=admin_headers)
    ).json()
    [delivery] = failed["items"]
    assert (delivery["event_id"], delivery["attempts"], delivery["last_status"]) == (1, 3, 500)
    assert delivery["last_error"] == "HTTP 500"
    await settle(pool, count=3)  # the other code's three events go through meanwhile
    held = await pool.fetch(
        "SELECT event_id FROM webhook_deliveries WHERE payment_code = $1 AND status = 'pending'", codes[0]
    )
    assert len(held) == 2  # its payment events wait behind the failed one
    assert all(eid != 1 for eid in receiver.acknowledged)

    receiver.fail_events = set()
    for ambiguous in ({}, {"event_ids": None}, {"event_ids": [1], "all_failed": True}, {"all_failed": "yes"}):
        refused = await client.post("/v1/webhook-deliveries/redeliver", json=ambiguous, headers=admin_headers)
        assert refused.status == 422, ambiguous  # retrying everything must be asked for by name
    response = await client.post(
        "/v1/webhook-deliveries/redeliver", json={"all_failed": True}, headers=admin_headers
    )
    assert (await response.json()) == {"redelivered": 1, "hurried": 0, "skipped": []}
    await settle(pool, count=6)
    expected = {
        row["id"]: row["payment_code"] for row in await pool.fetch("SELECT id, payment_code FROM events")
    }
    assert_in_order_per_code(receiver, expected)


async def test_deliveries_survive_a_restart_and_two_forwarders_share_the_work(
    aiohttp_client, database_url, pool, receiver, admin_headers
):
    receiver.failures = 1000  # nothing gets through while the first server runs
    first = await start(aiohttp_client, database_url, pool, webhook_settings(receiver))
    codes = [f"88965000000{n:05d}" for n in range(5)]
    await make_traffic(first, admin_headers, codes)
    await asyncio.sleep(0.3)
    await first.close()  # stop the server, and its forwarder, with everything undelivered
    assert await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'") == 0

    receiver.failures = 0
    receiver.requests.clear()
    await start(aiohttp_client, database_url, pool, webhook_settings(receiver))
    await start(aiohttp_client, database_url, pool, webhook_settings(receiver))
    await settle(pool, count=15)
    expected = {
        row["id"]: row["payment_code"] for row in await pool.fetch("SELECT id, payment_code FROM events")
    }
    assert_in_order_per_code(receiver, expected)


def test_backoff_doubles_and_is_capped():
    delays = [backoff_s(attempt, base_s=1.0, cap_s=60.0) for attempt in range(1, 10)]
    assert 0.8 <= delays[0] <= 1.2
    assert 3.2 <= delays[2] <= 4.8
    assert all(delay <= 72.0 for delay in delays)
    assert delays[-1] >= 48.0


def test_a_signature_verifies_only_with_the_secret_the_body_and_a_fresh_time():
    body = b'{"id":1}'
    header = signing.sign([b"new", SECRET], body, 1_700_000_000)
    assert signing.verify(SECRET, body, header, 1_700_000_100)
    assert signing.verify(b"new", body, header, 1_700_000_100)
    assert not signing.verify(b"other", body, header, 1_700_000_100)
    assert not signing.verify(SECRET, body + b" ", header, 1_700_000_100)
    assert not signing.verify(SECRET, body, header, 1_700_000_000 + 301)
    # A time that is not ASCII digits, or too long for int(), is a refusal, never an exception.
    for hostile in ("\u00b2", "\u0663", "9" * 4301, "+1700000000", "1_700_000_000"):
        assert not signing.verify(SECRET, body, header.replace("t=1700000000", f"t={hostile}"), 1_700_000_100)


async def test_a_resolution_reaches_the_webhook_after_the_conflict_it_closes(
    aiohttp_client, database_url, pool, receiver, admin_headers
):
    client = await start(aiohttp_client, database_url, pool, webhook_settings(receiver))
    code = "8896512345678123"
    await make_traffic(client, admin_headers, [code])  # created, paid, conflict
    conflict = await pool.fetchval("SELECT id FROM payments WHERE kind = 'conflict'")
    response = await client.post(
        f"/v1/exceptions/{conflict}/resolve",
        json={"resolution": "refunded", "resolved_by": "finance", "note": "", "reference": "RF-9"},
        headers=admin_headers,
    )
    assert response.status == 200
    await settle(pool, count=4)
    types = [receiver.bodies[event_id]["type"] for event_id in sorted(receiver.bodies)]
    assert types == ["code.created", "payment.received", "payment.conflict", "exception.resolved"]
    resolved = receiver.bodies[max(receiver.bodies)]["payload"]
    assert (resolved["payment_id"], resolved["reference"], resolved["code"]["status"]) == (
        conflict,
        "RF-9",
        "paid",
    )


async def test_the_forwarder_sleeps_while_every_pending_delivery_waits_behind_an_earlier_one(
    aiohttp_client, receiver, database_url, pool, monkeypatch
):
    """(Found by review.) A receiver that was down: each of 5,000 codes has a delivery that failed for
    good and three later ones held back behind it (ADR 5). Nothing can be claimed, so the forwarder
    sleeps until something changes. It took the earliest attempt of any pending delivery for the next
    due, and the held-back ones were due when enqueued: it claimed back to back for as long as the
    backlog lasted, each claim a scan of every pending delivery, in every process, on the database
    that answers DOKU."""
    claims: list[float] = []
    claim = delivery_store.claim

    async def counted_claim(*args, **kwargs):
        claims.append(time.monotonic())
        return await claim(*args, **kwargs)

    monkeypatch.setattr(delivery_store, "claim", counted_claim)
    await start(aiohttp_client, database_url, pool, webhook_settings(receiver))
    start_after = await pool.fetchval("SELECT started_after FROM webhook_subscribers")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO events (type, payment_code, payload)
            SELECT 'payment.received', '88965' || lpad((g % 5000)::text, 11, '0'), '{}'::jsonb
              FROM generate_series(1, 20000) g
            """
        )
        await conn.execute(  # the first event of each code failed for good; three wait behind it
            """
            INSERT INTO webhook_deliveries (event_id, subscriber, payment_code, status, attempts,
                                            next_attempt_at, created_at)
            SELECT id, 'default', payment_code, CASE WHEN id <= $1 + 5000 THEN 'failed' ELSE 'pending' END,
                   CASE WHEN id <= $1 + 5000 THEN 20 ELSE 0 END, now() - interval '1 hour',
                   now() - interval '1 hour'
              FROM events WHERE id > $1
            """,
            start_after,
        )
    await asyncio.sleep(1.0)  # woken by the events' NOTIFY, it finds nothing to claim
    claims.clear()
    await asyncio.sleep(6.0)
    assert len(claims) <= 2, f"nothing claimable, yet {len(claims)} claims in 6 s: the forwarder never slept"
    assert receiver.requests == []  # nothing was sendable


async def test_when_the_next_claim_can_succeed_is_found_in_a_pass_over_one_codes_backlog(pool):
    """(Found by review.) A receiver down while one code's events pile up: next_due, asked at every wake
    of the forwarder, planned "no earlier undelivered delivery of the same code" as a hash anti-join on
    the code, which compares every delivery of the code with every other (n²/2: 867 ms at 5,000)."""
    backlog = 3_000
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            """
            INSERT INTO events (type, payment_code, payload)
            SELECT 'payment.received', CASE WHEN g <= $1 THEN '8896500000000001' ELSE '8896500000000002' END,
                   '{}'::jsonb
              FROM generate_series(1, $1 + 1) g
            """,
            backlog,
        )
        # The code's first delivery backs off for an hour, and the rest wait behind it; the other
        # code's only delivery is due in two hours.
        await conn.execute(
            """
            INSERT INTO webhook_deliveries (event_id, subscriber, payment_code, status, next_attempt_at)
            SELECT id, 'default', payment_code, 'pending',
                   CASE WHEN id = min(id) OVER () THEN timestamptz '2026-01-01 01:00+00'
                        WHEN payment_code = '8896500000000002' THEN timestamptz '2026-01-01 02:00+00'
                        ELSE timestamptz '2025-12-31 23:00+00' END
              FROM events
            """
        )
    await pool.execute("ANALYZE webhook_deliveries")
    assert await delivery_store.next_due(pool, "default") == datetime(2026, 1, 1, 1, tzinfo=UTC)
    plan = await pool.fetch(f"EXPLAIN (ANALYZE, FORMAT TEXT) {delivery_store.NEXT_DUE}", "default")
    compared = sum(int(line.split(":")[1]) for (line,) in plan if "Rows Removed by Join Filter" in line)
    assert compared < backlog, "\n".join(line for (line,) in plan)
