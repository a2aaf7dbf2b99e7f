"""The event feed: in order, never missed or read twice, and woken by LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import CODE

INVOICE = "INV-2026-000123"


async def feed(client, admin_headers, **params) -> dict:
    response = await client.get(
        "/v1/events", params={k: str(v) for k, v in params.items()}, headers=admin_headers
    )
    assert response.status == 200, await response.text()
    return await response.json()


async def test_events_are_read_after_a_cursor(client, doku, register, admin_headers):
    await register()
    await doku.notify(CODE, invoice_number=INVOICE, amount=150000, original_request_id="t1")
    page = await feed(client, admin_headers)
    assert [(e["id"], e["type"], e["payment_code"]) for e in page["items"]] == [
        (1, "code.created", CODE),
        (2, "payment.received", CODE),
    ]
    assert page["next"] == 2
    assert page["items"][1]["payload"]["code"]["status"] == "paid"
    assert (await feed(client, admin_headers, after=1))["items"][0]["id"] == 2
    empty = await feed(client, admin_headers, after=2)
    assert (empty["items"], empty["next"]) == ([], 2)


async def test_a_long_poll_returns_when_an_event_commits(client, register, admin_headers):
    waiting = asyncio.create_task(feed(client, admin_headers, after=0, wait=30))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    await register()
    committed = time.perf_counter()
    page = await waiting
    woke_after_ms = (time.perf_counter() - committed) * 1000
    assert [event["type"] for event in page["items"]] == ["code.created"]
    print(f"long-poll woke {woke_after_ms:.1f} ms after the commit")  # reported, not asserted


async def test_a_long_poll_without_events_returns_empty_after_the_wait(client, admin_headers):
    page = await feed(client, admin_headers, after=0, wait=0.3)
    assert (page["items"], page["next"]) == ([], 0)


@pytest.mark.parametrize("params", [{"wait": "61"}, {"wait": "-1"}, {"after": "-1"}, {"wait": "soon"}])
async def test_bad_feed_parameters_are_422(client, admin_headers, params):
    response = await client.get("/v1/events", params=params, headers=admin_headers)
    assert response.status == 422


async def consume(
    client, admin_headers, until: asyncio.Event, expected: list[int] | None = None
) -> list[int]:
    """A consumer that keeps its cursor and long-polls in small pages, as a merchant's would."""
    seen: list[int] = []
    cursor = 0
    while True:
        page = await feed(client, admin_headers, after=cursor, limit=7, wait=0.5)
        seen += [event["id"] for event in page["items"]]
        cursor = page["next"]
        if until.is_set() and not page["items"] and (expected is None or len(seen) >= len(expected)):
            return seen


async def test_consumers_before_and_after_a_burst_see_every_event_once_in_order(
    client, doku, register, admin_headers, pool
):
    codes = [f"88965000000{n:05d}" for n in range(40)]
    for code in codes[:20]:
        await register(payment_code=code, invoice_number=f"I-{code}")
    burst_done = asyncio.Event()
    early = asyncio.create_task(consume(client, admin_headers, burst_done))

    async def pay(code: str, ref: str):
        return await doku.notify(code, invoice_number=f"I-{code}", amount=150000, original_request_id=ref)

    async def create(code: str):
        return await client.post(
            "/v1/payment-codes",
            json={"payment_code": code, "amount": 1, "invoice_number": f"I-{code}", "customer_name": "N",
                  "client_id": "MCH-0001-10791114622547"},
            headers=admin_headers,
        )  # fmt: skip

    # Payments, conflicts and registrations, all at once, so event ids are taken by racing transactions.
    work = [pay(code, "A") for code in codes[:20]] + [pay(code, "B") for code in codes[:20]]
    work += [create(code) for code in codes[20:]]
    await asyncio.gather(*work)
    burst_done.set()
    expected = [row["id"] for row in await pool.fetch("SELECT id FROM events ORDER BY id")]
    assert len(expected) == 20 + 40 + 20  # created, payments (normal + conflict), created
    # Causal order per code: the second payment waited for the first's row lock and saw it (a conflict),
    # so its event comes after the first's, though both were sequenced after their commits.
    by_code: dict[str, list[str]] = {}
    for row in await pool.fetch("SELECT payment_code, type FROM events ORDER BY id"):
        by_code.setdefault(row["payment_code"], []).append(row["type"])
    assert {tuple(types) for code, types in by_code.items() if code in codes[:20]} == {
        ("code.created", "payment.received", "payment.conflict")
    }

    late = await consume(client, admin_headers, burst_done, expected)
    assert await early == expected
    assert late == expected


async def test_an_event_that_commits_late_comes_after_every_cursor_given_before(client, admin_headers, pool):
    from server.store import outbox

    appended, release = asyncio.Event(), asyncio.Event()

    async def slow_writer() -> None:
        async with outbox.transaction(pool) as conn:
            await outbox.append(conn, "code.created", "1", {})
            appended.set()
            await release.wait()  # appended, not committed

    slow = asyncio.create_task(slow_writer())
    await appended.wait()
    async with asyncio.timeout(5):  # a writer never waits for another writer's commit
        async with outbox.transaction(pool) as conn:
            await outbox.append(conn, "code.created", "2", {})
    page = await feed(client, admin_headers, after=0)
    assert [event["payment_code"] for event in page["items"]] == ["2"]

    release.set()
    await slow
    later = await feed(client, admin_headers, after=page["next"])
    assert [event["payment_code"] for event in later["items"]] == ["1"]
    assert later["items"][0]["id"] > page["next"]
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0


async def test_events_a_dead_writer_left_unsequenced_reach_the_feed(client, admin_headers, pool):
    # What a process killed between its commit and the sequencing leaves: committed, pending events.
    await pool.executemany(
        "INSERT INTO events_pending (type, payment_code, payload) VALUES ('code.created', $1, '{}')",
        [("1",), ("2",)],
    )
    page = await feed(client, admin_headers, after=0, wait=15)  # the server's sweep moves them
    assert [event["payment_code"] for event in page["items"]] in (["1", "2"], ["1"])
    rest = await feed(client, admin_headers, after=page["next"], wait=15)
    assert [event["payment_code"] for event in page["items"] + rest["items"]] == ["1", "2"]


async def test_append_outside_an_outbox_transaction_is_refused(pool):
    from server.store import outbox

    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(RuntimeError, match=r"outside outbox\.transaction"):
            await outbox.append(conn, "code.created", "1", {})
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0
