"""Payment recordings in batches (store/payments.py, PaymentBatches; migration 0011; ADR 13): the
notifications whose recordings arrive while a batch is at the database share the next round trip and
commit, are recorded as they would be one after the other, and cannot hold each other up for longer
than the batch's lock wait (store/batches.py, BATCH_LOCK_WAIT_MS).

To hold the lane busy, a test pays the code SLOW first: a trigger keeps the batch that records its
payment at the database, working and waiting for no lock, until the test opens a gate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from server.doku.client import DokuSimulator, inquiry_body, notification_body
from server.http.keys import PAYMENT_BATCHES, POOL
from server.ops import metrics
from server.store import batches as batches_module
from server.store.payments import PaymentBatches
from tests.conftest import CLIENT_ID, waiting_for_a_lock
from tests.integration.gates import Gate, gate_on, queued
from tests.integration.test_inquiry_batches import rows_held

SLOW = "8896500000000779"  # one-shot: its payment holds the lane at the gate
ONE_SHOT = [f"88965{n:011d}" for n in range(1, 9)]
HELD = "8896500000000780"  # one-shot, whose row another transaction holds
REFUSED = "8896500000000781"  # one-shot, whose payment the database refuses inside a batch
TOPUP = "8896500000000777"  # reusable: two of its invoices are paid in one batch
COLUMNS = ["payment_code", "client_id", "channel", "invoice_number", "amount", "customer_name", "reusable"]


@pytest.fixture
async def codes(pool: asyncpg.Pool) -> None:
    await pool.copy_records_to_table(
        "payment_codes",
        records=[
            (code, CLIENT_ID, "ALFA", f"INV-{code}", 10_000, "Pelanggan", False)
            for code in [SLOW, HELD, REFUSED, *ONE_SHOT]
        ]
        + [(TOPUP, CLIENT_ID, "ANY", "TOP77", 50_000, "Pelanggan", True)],
        columns=COLUMNS,
    )


@pytest.fixture
async def gate(pool: asyncpg.Pool) -> AsyncIterator[Gate]:
    async with gate_on(
        pool,
        table="payments",
        where=f"NEW.payment_code = '{SLOW}'",
        query_part="dipc_payment_context_within",
        # A batch sets lock_timeout (migration 0011); a recording alone does not.
        then=f"""IF NEW.payment_code = '{REFUSED}' AND current_setting('lock_timeout') <> '0' THEN
                     RAISE EXCEPTION 'refused in a batch';
                 END IF;""",
    ) as gate:
        yield gate


def pay(doku: DokuSimulator, code: str, invoice: str, transaction: str, amount: int = 10_000) -> asyncio.Task:
    body = notification_body(code, invoice_number=invoice, amount=amount, original_request_id=transaction)
    return asyncio.create_task(doku.post("/doku/notification", body))


def batch_sizes() -> tuple[float, float]:
    """How many batches of recordings were sent so far, and how many recordings they held."""
    [family] = metrics.PAYMENT_BATCH_SIZE.collect()
    totals = {
        sample.name: sample.value for sample in family.samples if sample.labels["statement"] == "record"
    }
    return totals["dipc_payment_batch_size_count"], totals["dipc_payment_batch_size_sum"]


async def payments(pool: asyncpg.Pool) -> dict[tuple[str, str], list[str]]:
    """The kinds of the payments recorded, by code and invoice."""
    recorded: dict[tuple[str, str], list[str]] = {}
    for row in await pool.fetch("SELECT payment_code, invoice_number, kind FROM payments ORDER BY id"):
        recorded.setdefault((row["payment_code"], row["invoice_number"]), []).append(row["kind"])
    return recorded


async def test_payments_that_arrive_while_a_batch_is_out_share_the_next_commit(
    client, doku, pool, codes, gate
):
    """Ten payments behind a slow one: two commits, each payment recorded once with its notification
    and its event, and a reusable code's two invoices counted one after the other in one batch."""
    for _ in range(2):  # TOP77-1 and TOP77-2
        assert (await doku.post("/doku/inquiry", inquiry_body(TOPUP))).status == 200
    sent_before, held_before = batch_sizes()
    first = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")
    await gate.reached()
    others = [pay(doku, code, f"INV-{code}", f"trx-{code}") for code in ONE_SHOT]
    others += [pay(doku, TOPUP, f"TOP77-{n}", f"trx-top-{n}", 50_000) for n in (1, 2)]
    await queued(client.app[PAYMENT_BATCHES], len(others))
    await gate.open()
    replies = [await first, *[await other for other in others]]

    assert [reply.status for reply in replies] == [200] * len(replies)
    assert all(reply.signature_valid for reply in replies)
    sent, held = batch_sizes()
    assert (sent - sent_before, held - held_before) == (2, len(replies))
    expected = {(code, f"INV-{code}"): ["normal"] for code in [SLOW, *ONE_SHOT]}
    expected |= {(TOPUP, "TOP77-1"): ["normal"], (TOPUP, "TOP77-2"): ["normal"]}
    assert await payments(pool) == expected
    assert await pool.fetchval("SELECT paid_count FROM payment_codes WHERE payment_code = $1", TOPUP) == 2
    assert await pool.fetchval("SELECT count(*) FROM notifications WHERE outcome = 'normal'") == len(replies)
    # Every event is in the feed once its answer has left, each with its own payment's ids.
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0
    events = await pool.fetch("SELECT payload FROM events WHERE type = 'payment.received'")
    ids = await pool.fetch("SELECT id, notification_id FROM payments")
    assert sorted(
        (event["payload"]["id"], event["payload"]["notification_id"]) for event in events
    ) == sorted((row["id"], row["notification_id"]) for row in ids)
    # The reusable code's events tell of its count after each payment, in the order they were counted.
    counted = [
        (event["payload"]["invoice_number"], event["payload"]["code"]["paid_count"])
        for event in sorted(events, key=lambda event: event["payload"]["id"])
        if event["payload"]["payment_code"] == TOPUP
    ]
    assert counted == [("TOP77-1", 1), ("TOP77-2", 2)]


async def test_a_batch_that_meets_a_held_code_lets_its_other_payments_through(
    client, doku, pool, database_url, codes, gate
):
    """The payment of a code whose row another transaction holds fails its batch after
    BATCH_LOCK_WAIT_MS; the others are then recorded alone and answered while the row is still held
    (without the bound, the batch would wait with it), and it is recorded once the row is free."""
    async with rows_held(database_url, HELD):
        first = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")
        await gate.reached()
        stuck = pay(doku, HELD, f"INV-{HELD}", "trx-held")
        others = [pay(doku, code, f"INV-{code}", f"trx-{code}") for code in ONE_SHOT]
        await queued(client.app[PAYMENT_BATCHES], 1 + len(others))
        await gate.open()
        replies = [await first, *[await other for other in others]]
        assert [reply.status for reply in replies] == [200] * len(replies)
        assert not stuck.done()  # alone now, waiting for the row
    assert (await stuck).status == 200
    assert await payments(pool) == {(code, f"INV-{code}"): ["normal"] for code in [SLOW, HELD, *ONE_SHOT]}


async def dipc_backends_waiting_for_a_lock(pool: asyncpg.Pool) -> int:
    return await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dipc' AND wait_event_type = 'Lock'"
    )


async def test_a_held_codes_payments_made_alone_wait_for_its_row_one_at_a_time(
    client, doku, pool, database_url, codes, gate
):
    """When a batch is refused at a held row, its payments are made alone. Those of the held code go one
    at a time: the row keeps one of the pool's connections waiting, not all of them (with every one
    waiting, any other payment would find none and get a 503)."""
    pool_max = client.app[POOL].get_max_size()
    async with rows_held(database_url, HELD) as [holder]:
        first = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")
        await gate.reached()
        stuck = [pay(doku, HELD, f"INV-{HELD}", f"trx-held-{n}") for n in range(pool_max + 2)]
        others = [pay(doku, code, f"INV-{code}", f"trx-{code}") for code in ONE_SHOT]
        await queued(client.app[PAYMENT_BATCHES], len(stuck) + len(others))
        await gate.open()
        replies = [await first, *[await other for other in others]]
        assert [reply.status for reply in replies] == [200] * len(replies)
        await waiting_for_a_lock(pool, "dipc_payment_context_within")
        assert await dipc_backends_waiting_for_a_lock(pool) == 1
        late = pay(doku, ONE_SHOT[0], f"INV-{ONE_SHOT[0]}", "trx-late")  # a retry, while the row is held
        assert (await late).status == 200
        assert not any(each.done() for each in stuck)
        await holder.execute("COMMIT")
        held_replies = [await each for each in stuck]
    assert [reply.status for reply in held_replies] == [200] * len(stuck)
    assert (await payments(pool))[(HELD, f"INV-{HELD}")] == ["normal"] + ["conflict"] * (len(stuck) - 1)


async def test_a_code_stays_held_while_a_write_of_it_still_waits_for_its_row(
    client, doku, pool, database_url, codes, monkeypatch
):
    """A held code's writes skip the lanes for HELD_CODE_S after it is marked. The mark ran out while
    the write that made it still waited for the row (a notification may wait 5 s): the code's next
    payments went back into batches, each refused after BATCH_LOCK_WAIT_MS, holding up the lane's other
    payments. Now a code is held for as long as one of its writes made alone has waited that long."""
    monkeypatch.setattr(batches_module, "HELD_CODE_S", 0.2)
    recordings = client.app[PAYMENT_BATCHES]
    async with rows_held(database_url, HELD) as [holder]:
        first = pay(doku, HELD, f"INV-{HELD}", "trx-held-1")  # a batch of one, refused: then alone
        await waiting_for_a_lock(pool, "dipc_payment_context_within")
        await asyncio.sleep(0.5)  # past the first mark's HELD_CODE_S; the write still waits
        sent_before, _ = batch_sizes()
        second = pay(doku, HELD, f"INV-{HELD}", "trx-held-2")
        await queued(recordings, 1)  # waiting for its turn behind the first
        assert batch_sizes()[0] == sent_before  # it joined no batch
        await holder.execute("COMMIT")
        replies = [await first, await second]
    assert [reply.status for reply in replies] == [200, 200]


async def test_a_batch_the_database_refuses_records_each_of_its_payments_alone(
    client, doku, pool, codes, gate
):
    """An error of one recording rolls its batch back whole; each is then recorded alone, so the others
    are answered, and so is that one when alone it succeeds."""
    sent_before, held_before = batch_sizes()
    first = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")
    await gate.reached()
    others = [pay(doku, code, f"INV-{code}", f"trx-{code}") for code in [REFUSED, *ONE_SHOT]]
    await queued(client.app[PAYMENT_BATCHES], len(others))
    await gate.open()
    replies = [await first, *[await other for other in others]]

    assert [reply.status for reply in replies] == [200] * len(replies)
    assert batch_sizes() == (sent_before + 2, held_before + len(replies))
    assert await payments(pool) == {(code, f"INV-{code}"): ["normal"] for code in [SLOW, REFUSED, *ONE_SHOT]}
    assert await pool.fetchval("SELECT count(*) FROM notifications") == len(replies)


async def test_two_payments_of_one_invoice_in_one_batch_are_decided_as_one_after_the_other(
    client, doku, pool, codes, gate
):
    """Both were decided before either was recorded, each as the invoice's payment. In the batch the
    first is recorded; the second finds the invoice paid, writes nothing, and is read and decided again
    under the lock: a conflict (money taken twice), recorded once, never a second normal payment."""
    first = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")
    await gate.reached()
    code = ONE_SHOT[0]
    twice = [pay(doku, code, f"INV-{code}", f"trx-{n}") for n in (1, 2)]
    await queued(client.app[PAYMENT_BATCHES], 2)
    await gate.open()
    replies = [await first, *[await each for each in twice]]

    assert [reply.status for reply in replies] == [200] * 3
    assert sorted((await payments(pool))[(code, f"INV-{code}")]) == ["conflict", "normal"]
    rows = await pool.fetch("SELECT kind, transaction_ref FROM payments WHERE payment_code = $1", code)
    assert {row["transaction_ref"] for row in rows} == {"trx-1", "trx-2"}
    assert await pool.fetchval("SELECT paid_count FROM payment_codes WHERE payment_code = $1", code) == 1


async def test_reads_that_share_a_batch_each_get_their_own_codes_facts(pool, codes):
    """Reads that share a batch each get their own code and their own invoice's history back, in their
    place, and a code we do not know reads as none. (A read given another's facts would only be decided
    again under the lock, so the notification tests would not see it.)"""
    await pool.execute(
        "INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, amount, client_id,"
        " channel, notification_id, source) VALUES ($1, $2, 'trx-paid', 'normal', 10000, $3, 'ALFA', 1,"
        " 'notification')",
        ONE_SHOT[3],
        f"INV-{ONE_SHOT[3]}",
        CLIENT_ID,
    )
    batches = PaymentBatches(pool, timeout_s=10)
    reads_before = read_batch_sizes()
    wanted = [*ONE_SHOT, "8896599999999999"]
    try:
        contexts = await asyncio.gather(
            *(
                batches.read_context(code, f"INV-{code}", "trx-new", 10_000, unnamed_ref="check-status:x")
                for code in wanted
            )
        )
    finally:
        await batches.close()
    sent, held = read_batch_sizes()
    assert held - reads_before[1] == len(wanted)
    assert sent - reads_before[0] < len(wanted)  # some went together
    assert [context.code.payment_code if context.code else None for context in contexts] == [
        *ONE_SHOT,
        None,
    ]
    assert [context.history.invoice_paid for context in contexts] == [n == 3 for n in range(len(wanted))]


def read_batch_sizes() -> tuple[float, float]:
    [family] = metrics.PAYMENT_BATCH_SIZE.collect()
    totals = {sample.name: sample.value for sample in family.samples if sample.labels["statement"] == "read"}
    return totals.get("dipc_payment_batch_size_count", 0.0), totals.get("dipc_payment_batch_size_sum", 0.0)


async def test_the_statements_run_the_history_and_the_codes_state_inline(pool):
    # Not as functions of their own, each with its own executor (migration 0014): PostgreSQL inlines a
    # SQL function only if its body is no more volatile than it claims, and in FROM only if it returns a
    # set.
    from server.store import payments

    read = await pool.fetch(
        f"EXPLAIN VERBOSE {payments._READ_CONTEXT[False]}", SLOW, "INV", "T", 1, "U", "A", "notification"
    )
    record = await pool.fetch(
        "EXPLAIN VERBOSE SELECT dipc_code_state(c, $1) FROM payment_codes c WHERE payment_code = $2",
        True,
        SLOW,
    )
    plans = "\n".join(row[0] for row in [*read, *record])
    assert "dipc_payment_history" not in plans
    assert "dipc_code_state" not in plans
    assert "to_jsonb" in plans  # the state, computed in the statement itself


async def test_a_committed_batch_is_answered_though_the_next_cannot_begin(client, doku, pool, codes, gate):
    """A batch's answers wait for the next batch's first round trip (store/batches.py, ANSWER_HOLD_S),
    no longer: here the next batch cannot get a connection, and the first is answered all the same."""
    first = pay(doku, SLOW, f"INV-{SLOW}", "trx-slow")
    await gate.reached()
    second = pay(doku, ONE_SHOT[0], f"INV-{ONE_SHOT[0]}", "trx-second")
    await queued(client.app[PAYMENT_BATCHES], 1)
    app_pool = client.app[POOL]
    taken = []
    with contextlib.suppress(TimeoutError):
        while True:  # every connection the lane does not hold
            taken.append(await asyncio.wait_for(app_pool.acquire(), 0.5))
    # And the one it holds, once it is released: the pool gives it to the first in line.
    after_the_lane = asyncio.ensure_future(app_pool.acquire())
    try:
        await asyncio.sleep(0.1)
        await gate.open()
        assert (await asyncio.wait_for(first, 5)).status == 200
        taken.append(await after_the_lane)
        assert not second.done()
    finally:
        for conn in taken:
            await app_pool.release(conn)
    assert (await second).status == 200
    assert await payments(pool) == {(code, f"INV-{code}"): ["normal"] for code in (SLOW, ONE_SHOT[0])}
