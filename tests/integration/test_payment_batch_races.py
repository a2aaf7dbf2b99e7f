# ruff: noqa: F811 - pytest fixtures imported by name
"""Payment recordings in batches (PaymentBatches, migration 0011, ADR 13) under races and faults, from
a review: real concurrency against a real PostgreSQL, one or two workers (two apps on two pools in this
process).

Uses the gate of test_payment_batches: the batch that records SLOW's payment waits at the database until
the test opens the gate, so that what arrives meanwhile is queued for the next batch.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.app import make_app
from server.doku.client import DokuSimulator, notification_body
from server.http.keys import PAYMENT_BATCHES, POOL
from server.store import payments as payment_store
from tests.conftest import ADMIN_TOKEN, CLIENT, make_settings, waiting_for_a_lock
from tests.integration.gates import Gate, gate_on, queued
from tests.integration.test_crash import one_shot_codes
from tests.integration.test_inquiry_batches import rows_held
from tests.integration.test_payment_batches import (  # noqa: F401 - fixtures
    ONE_SHOT,
    SLOW,
    TOPUP,
    batch_sizes,
    codes,
    gate,
    pay,
)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
UNKNOWN = "8896577777777777"  # no row: nothing to lock


async def second_worker(aiohttp_client, database_url: str, **settings) -> tuple[object, DokuSimulator]:
    """Another dipc worker on the same database: its own pool and its own batches."""
    other = await aiohttp_client(make_app(make_settings(**settings), database_url))
    return other, DokuSimulator(other.session, str(other.make_url("")), CLIENT)


async def page_of_payments(client, after: int | None = None) -> list[dict]:
    params = {"limit": "500"} | ({"after": str(after)} if after is not None else {})
    response = await client.get("/v1/payments", params=params, headers=ADMIN)
    assert response.status == 200, await response.text()
    return (await response.json())["items"]


# --- 1. ids and commit order (ADR 11, "Ids follow commit order"; ADR 13) --------------------------------


@pytest.mark.parametrize("table", ["payment_codes", "reconciliation"])
async def test_a_batched_payment_is_not_left_behind_a_reader_paging_by_id(
    client, doku, pool, database_url, aiohttp_client, codes, gate, monkeypatch, table
):
    """(Found by review, twice.) A batch whose second payment's code row is held (another worker's
    payment of that code, a cancel), or its invoice's reconciliation row (an inquiry's batch that quoted
    it and waits for another lock, a reconciler), waits for it. Meanwhile another worker commits a
    payment, and finance, paging /v1/payments by id, keeps its id as the cursor. Had the batch taken its
    first payment's ids before that wait, it would commit them below the cursor, and the reader would
    never see that payment: the first recording of a batch takes every code's row lock and every
    invoice's reconciliation row lock before any takes its ids (migrations 0011 and 0016). The bound is
    stretched here only so that the test need not race it."""
    monkeypatch.setattr(payment_store, "BATCH_LOCK_WAIT_MS", 3000)
    first_code, held_code, other_code = ONE_SHOT[0], ONE_SHOT[1], ONE_SHOT[2]
    _, other_doku = await second_worker(aiohttp_client, database_url)
    for code in (first_code, held_code):
        assert (await doku.inquiry(code)).status == 200  # quoted: the invoice has its reconciliation row
    async with rows_held(database_url, held_code, table=table) as [holder]:
        slow = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")
        await gate.reached()
        batched = [pay(doku, code, f"INV-{code}", f"trx-{code}") for code in (first_code, held_code)]
        await queued(client.app[PAYMENT_BATCHES], 2)
        await gate.open()
        assert (await slow).status == 200
        # The batch [first_code, held_code]: first_code's payment is written, held_code's waits.
        await waiting_for_a_lock(pool, "dipc_payment_context_within")
        reply = await other_doku.notify(
            other_code, invoice_number=f"INV-{other_code}", amount=10_000, original_request_id="trx-other"
        )
        assert reply.status == 200
        seen = await page_of_payments(client)
        cursor = max(item["id"] for item in seen)
        assert first_code not in {item["payment_code"] for item in seen}  # not committed yet
        await holder.execute("COMMIT")  # the row is free well within the bound
        assert [(await each).status for each in batched] == [200, 200]
    later = await page_of_payments(client, after=cursor)
    shown = {item["payment_code"] for item in seen} | {item["payment_code"] for item in later}
    ids = {
        row["payment_code"]: row["id"] for row in await pool.fetch("SELECT payment_code, id FROM payments")
    }
    for code in (first_code, held_code):
        assert code in shown, (
            f"{code} committed with id {ids[code]} after the reader's cursor {cursor}"
            f" ({other_code}: {ids[other_code]}): a reader paging by id never sees it"
        )


# --- 2. what held: exactly once under two workers' batches ---------------------------------------------


async def test_two_workers_batches_record_each_transaction_once(
    client, doku, pool, database_url, aiohttp_client, codes, gate
):
    """Each notification sent twice to each of two workers (the same Request-Id: DOKU's resends), a
    second transaction for every one-shot invoice, a reusable code's invoices and an unknown code's
    transaction, all at once, while both workers batch: every answer 200, each transaction one payment,
    one normal payment per invoice, every request one inbox row, every payment one event."""
    _, other_doku = await second_worker(aiohttp_client, database_url)
    sent_before, held_before = batch_sizes()
    for _ in range(4):  # TOP77-1 .. TOP77-4
        assert (await doku.inquiry(TOPUP)).status == 200
    jobs: list[tuple[str, str, str, int]] = []  # code, invoice, transaction, amount
    for code in ONE_SHOT:
        jobs += [
            (code, f"INV-{code}", f"trx-{code}-a", 10_000),
            (code, f"INV-{code}", f"trx-{code}-b", 10_000),
        ]
    jobs += [(TOPUP, f"TOP77-{n}", f"trx-top-{n}", 50_000) for n in range(1, 5)]
    jobs += [(UNKNOWN, "INV-U", "trx-unknown", 10_000), (UNKNOWN, "INV-U", "trx-unknown-2", 10_000)]

    slow = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")  # worker 1's lane is busy: its batch is gathered
    await gate.reached()
    sends = []
    for code, invoice, transaction, amount in jobs:
        body = notification_body(code, invoice_number=invoice, amount=amount, original_request_id=transaction)
        request_id = str(uuid.uuid4())
        for simulator in (doku, other_doku, doku, other_doku):
            sends.append(
                asyncio.create_task(simulator.post("/doku/notification", body, request_id=request_id))
            )
    await asyncio.sleep(0.3)
    await gate.open()
    replies = [await slow, *[await each for each in sends]]
    assert [reply.status for reply in replies] == [200] * len(replies)
    sent, held = batch_sizes()  # both workers' batches (one registry in this process)
    assert held - held_before > sent - sent_before  # recordings did share batches

    rows = await pool.fetch("SELECT payment_code, invoice_number, transaction_ref, kind, id FROM payments")
    assert sorted(row["transaction_ref"] for row in rows) == sorted(["trx-slow", *(j[2] for j in jobs)])
    normal: dict[tuple[str, str], int] = {}
    for row in rows:
        if row["kind"] == "normal":
            key = (row["payment_code"], row["invoice_number"])
            normal[key] = normal.get(key, 0) + 1
    assert set(normal.values()) == {1}
    assert len(normal) == 1 + len(ONE_SHOT) + 4
    assert await pool.fetchval("SELECT count(*) FROM notifications") == len(replies)
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE outcome <> 'repeat'") == len(rows)
    assert await pool.fetchval("SELECT paid_count FROM payment_codes WHERE payment_code = $1", TOPUP) == 4
    for _ in range(100):
        if not await pool.fetchval("SELECT count(*) FROM events_pending"):
            break
        await asyncio.sleep(0.05)
    events = await pool.fetch("SELECT payload FROM events WHERE type LIKE 'payment.%'")
    assert sorted(event["payload"]["id"] for event in events) == sorted(row["id"] for row in rows)


async def test_twins_of_an_unknown_codes_transaction_in_one_batch(client, doku, pool, codes, gate):
    """No row to lock: the second twin sees the first's payment in the batch's transaction, writes
    nothing, and is decided again: a repeat."""
    slow = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")
    await gate.reached()
    body = notification_body(UNKNOWN, invoice_number="INV-U", amount=10_000, original_request_id="trx-u")
    twins = [asyncio.create_task(doku.post("/doku/notification", body, request_id="same")) for _ in range(3)]
    await queued(client.app[PAYMENT_BATCHES], 3)
    await gate.open()
    assert [(await each).status for each in [slow, *twins]] == [200] * 4
    assert [
        row["kind"] for row in await pool.fetch("SELECT kind FROM payments WHERE payment_code = $1", UNKNOWN)
    ] == ["anomaly"]
    outcomes = sorted(
        row["outcome"]
        for row in await pool.fetch("SELECT outcome FROM notifications WHERE payment_code = $1", UNKNOWN)
    )
    assert outcomes == ["anomaly", "repeat", "repeat"]


# --- 3. a misbehaving database ---------------------------------------------------------------------------


GATED = ONE_SHOT[7]  # its payment waits at a second gate, in whatever batch it is


@pytest.fixture
async def second_gate(pool: asyncpg.Pool) -> AsyncIterator[Gate]:
    async with gate_on(
        pool,
        table="payments",
        where=f"NEW.payment_code = '{GATED}'",
        query_part="dipc_payment_context_within",
        name="review_gate",
    ) as gate:
        yield gate


@pytest.mark.parametrize("how", ["pg_terminate_backend", "pg_cancel_backend"])
async def test_a_batch_whose_backend_is_ended_is_a_503_for_each_and_loses_nothing(
    client, doku, pool, codes, gate, second_gate, captured_log, how
):
    batch = [*ONE_SHOT[:4], GATED]
    slow = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")
    await gate.reached()
    others = [pay(doku, code, f"INV-{code}", f"trx-{code}") for code in batch]
    await queued(client.app[PAYMENT_BATCHES], len(batch))
    await gate.open()
    assert (await slow).status == 200
    await second_gate.reached()  # the batch of the five, held by GATED's payment (the last)
    assert await second_gate.end(how) == 1
    replies = [await each for each in others]
    statuses = [reply.status for reply in replies]
    assert statuses == [503] * len(batch), statuses
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE payment_code <> $1", SLOW) == 0
    await second_gate.open()
    # DOKU resends: each is then recorded once.
    again = [pay(doku, code, f"INV-{code}", f"trx-{code}") for code in batch]
    assert [(await each).status for each in again] == [200] * len(batch)
    rows = await pool.fetch("SELECT payment_code, kind FROM payments")
    assert sorted((row["payment_code"], row["kind"]) for row in rows) == sorted(
        (code, "normal") for code in [*batch, SLOW]
    )
    text = captured_log.text()
    assert "Traceback" not in text, text[-3000:]
    assert '"status":500' not in text.replace(" ", "")


# --- 4. session state left on a pooled connection ----------------------------------------------------------


async def test_a_batch_leaves_no_lock_timeout_on_its_pooled_connection(
    aiohttp_client, pool, database_url, codes
):
    """One pooled connection: after batches, the connection's lock_timeout is the session's (0), and two
    transactions for one invoice (decided again under the lock) do not deadlock the one connection."""
    app_client = await aiohttp_client(make_app(make_settings(db_pool_min=1, db_pool_max=1), database_url))
    doku1 = DokuSimulator(app_client.session, str(app_client.make_url("")), CLIENT)
    code = ONE_SHOT[0]
    replies = await asyncio.gather(
        *(
            doku1.notify(code, invoice_number=f"INV-{code}", amount=10_000, original_request_id=f"t-{n}")
            for n in range(4)
        ),
        *(
            doku1.notify(c, invoice_number=f"INV-{c}", amount=10_000, original_request_id=f"t-{c}")
            for c in ONE_SHOT[1:5]
        ),
    )
    assert [reply.status for reply in replies] == [200] * 8
    app_pool: asyncpg.Pool = app_client.app[POOL]
    assert app_pool.get_size() == 1
    assert await app_pool.fetchval("SHOW lock_timeout") == "0"
    kinds = sorted(
        row["kind"] for row in await pool.fetch("SELECT kind FROM payments WHERE payment_code = $1", code)
    )
    assert kinds == ["conflict", "conflict", "conflict", "normal"]


# --- 5. PostgreSQL frozen (SIGSTOP) with batches in flight ---------------------------------------------


async def test_batches_in_flight_when_the_database_freezes(aiohttp_client, tmp_path, captured_log):
    """Every notification is answered within its budget, 200 only if recorded; after the thaw dipc
    recovers alone, and DOKU's resends record each transaction once."""
    import time

    from server.embedded import EmbeddedPostgres
    from server.store import migrate
    from tests.integration.test_outage import SLACK_S, frozen

    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    dsn = await asyncio.to_thread(server.start)
    try:
        await migrate.migrate_dsn(dsn)
        budget = 1.5
        app_client = await aiohttp_client(make_app(make_settings(notification_db_timeout_s=budget), dsn))
        simulator = DokuSimulator(app_client.session, str(app_client.make_url("")), CLIENT)
        setup = await asyncpg.connect(dsn)
        codes_ = await one_shot_codes(setup, 48, start=100)
        await setup.close()
        bodies = {
            c: notification_body(c, invoice_number=f"INV-{c}", amount=10_000, original_request_id=f"t-{c}")
            for c in codes_
        }
        assert (await simulator.post("/doku/notification", bodies[codes_[0]])).status == 200

        async def timed(code: str) -> tuple[str, int, float]:
            started = time.perf_counter()
            reply = await simulator.post("/doku/notification", bodies[code])
            return code, reply.status, time.perf_counter() - started

        tasks = [asyncio.create_task(timed(c)) for c in codes_[1:]]
        await asyncio.sleep(0.01)
        async with frozen(server, seconds=3.0):
            answers = await asyncio.gather(*tasks)
        statuses = {status for _, status, _ in answers}
        assert statuses <= {200, 503}, answers
        assert 503 in statuses
        slow = [(c, s, round(t, 2)) for c, s, t in answers if t > budget + SLACK_S]
        assert not slow, slow
        check = await asyncpg.connect(dsn)
        try:
            recorded = {r["payment_code"] for r in await check.fetch("SELECT payment_code FROM payments")}
            assert {c for c, status, _ in answers if status == 200} <= recorded
            # DOKU resends until acknowledged: dipc recovers without a person.
            pending = set(codes_)
            deadline = time.monotonic() + 20
            while pending and time.monotonic() < deadline:
                replies = await asyncio.gather(
                    *(simulator.post("/doku/notification", bodies[c]) for c in sorted(pending))
                )
                assert {reply.status for reply in replies} <= {200, 503}
                pending = {
                    c for c, reply in zip(sorted(pending), replies, strict=True) if reply.status != 200
                }
                await asyncio.sleep(0.2)
            assert not pending
            rows = await check.fetch("SELECT payment_code, kind FROM payments")
            assert sorted((r["payment_code"], r["kind"]) for r in rows) == [(c, "normal") for c in codes_]
            inbox = await check.fetch(
                "SELECT payment_code, outcome FROM notifications WHERE outcome <> 'repeat'"
            )
            assert sorted(r["payment_code"] for r in inbox) == codes_
        finally:
            await check.close()
        text = captured_log.text()
        assert "Traceback" not in text, text[-3000:]
        assert '"status":500' not in text.replace(" ", "")
    finally:
        await asyncio.to_thread(server.stop)
