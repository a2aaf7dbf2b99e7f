"""Inquiries recorded in batches (store/inquiries.py, InquiryBatches; migration 0010): those that arrive
while their lane's batch is at the database share the next statement and commit, answer as they would
alone, and cannot hold each other up for longer than the batch's lock wait (BATCH_LOCK_WAIT_MS).

To hold a lane busy, a test sends an inquiry with the Request-Id ``slow`` first: a trigger keeps the batch
that records it at the database, working and waiting for no lock, until the test opens a gate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import pytest

from server.config import Settings
from server.core.errors import Unavailable
from server.doku.client import inquiry_body
from server.http.keys import INQUIRY_BATCHES
from server.ops import metrics
from server.store.inquiries import Inquiry, InquiryBatches, RecordedInquiry
from server.store.pool import deadline
from tests.conftest import CLIENT_ID, make_settings, waiting_for_a_lock
from tests.integration.gates import Gate, gate_on, queued

TOPUP = "8896500000000777"  # reusable: an inquiry of it mints, under the code's row lock
OTHER_TOPUP = "8896500000000778"
SLOW = "8896500000000779"  # one-shot, for the inquiry that holds its lane at the gate
ONE_SHOT = [f"88965{n:011d}" for n in range(1, 9)]
HELD = [f"88965999{n:08d}" for n in range(1, 17)]  # reusable, for rows other transactions hold
GATED = b"\x00"  # the body hash that stops an inquiry at the gate too
COLUMNS = ["payment_code", "client_id", "channel", "invoice_number", "amount", "customer_name", "reusable"]


@pytest.fixture
async def codes(pool: asyncpg.Pool) -> None:
    one_shot, reusable = [*ONE_SHOT, SLOW], [TOPUP, OTHER_TOPUP, *HELD]
    await pool.copy_records_to_table(
        "payment_codes",
        records=[(code, CLIENT_ID, "ALFA", f"INV-{code}", 10_000, "Pelanggan", False) for code in one_shot]
        + [(code, CLIENT_ID, "ANY", f"TOP{code[-2:]}", 50_000, "Pelanggan", True) for code in reusable],
        columns=COLUMNS,
    )


@pytest.fixture
async def gate(pool: asyncpg.Pool) -> AsyncIterator[Gate]:
    async with gate_on(
        pool,
        table="inquiries",
        where="NEW.request_id = 'slow' OR NEW.body_sha256 = '\\x00'::bytea",
        query_part="dipc_inquire",
    ) as gate:
        yield gate


def inquiry(code: str, request_id: str, body_sha256: bytes = b"\x01") -> Inquiry:
    return Inquiry(
        payment_code=code,
        request_id=request_id,
        client_id=CLIENT_ID,
        channel="ALFA",
        body_sha256=body_sha256,
        bin_channels=frozenset({"ALFA"}),
        at=datetime.now(UTC),
    )


@asynccontextmanager
async def rows_held(
    database_url: str, *codes: str, table: str = "payment_codes"
) -> AsyncIterator[list[asyncpg.Connection]]:
    """Another transaction for each of ``codes`` holds its rows of ``table`` (its row of payment_codes,
    its invoices' of reconciliation), until the block ends or the test commits that transaction (the
    connections, in the order of ``codes``)."""
    holders = [await asyncpg.connect(database_url) for _ in codes]
    try:
        for conn, code in zip(holders, codes, strict=True):
            await conn.execute("BEGIN")
            await conn.execute(f"SELECT FROM {table} WHERE payment_code = $1 FOR UPDATE", code)
        yield holders
    finally:
        for conn in holders:
            await conn.close()


@pytest.fixture
def batches(pool: asyncpg.Pool) -> InquiryBatches:
    """One lane, whose batches have a minute at the database until a test's ``queued`` says otherwise."""
    return InquiryBatches(pool, first_check_s=120, timeout_s=60, lanes=1)


@pytest.fixture
def settings() -> Settings:
    return make_settings(inquiry_batches=1)


def batch_sizes() -> tuple[float, float]:
    """How many batches were sent so far, and how many inquiries they held."""
    [family] = metrics.INQUIRY_BATCH_SIZE.collect()
    totals = {sample.name: sample.value for sample in family.samples}
    return totals["dipc_inquiry_batch_size_count"], totals["dipc_inquiry_batch_size_sum"]


async def test_inquiries_that_arrive_while_a_batch_is_out_share_the_next_commit(
    client, doku, pool, codes, gate
):
    batches = client.app[INQUIRY_BATCHES]
    sent_before, held_before = batch_sizes()
    first = asyncio.create_task(doku.post("/doku/inquiry", inquiry_body(SLOW), request_id="slow"))
    await gate.reached()
    others = [
        asyncio.create_task(doku.post("/doku/inquiry", inquiry_body(code), request_id=f"r-{code}"))
        for code in [TOPUP, *ONE_SHOT]
    ]
    await queued(batches, 1 + len(ONE_SHOT))
    await gate.open()
    replies = [await first, *[await other for other in others]]

    assert [reply.status for reply in replies] == [200] * (2 + len(ONE_SHOT))
    assert all(reply.signature_valid for reply in replies)
    invoices = [reply.json()["order"]["invoice_number"] for reply in replies]
    assert invoices == [f"INV-{SLOW}", "TOP77-1", *[f"INV-{code}" for code in ONE_SHOT]]
    # Two commits for ten inquiries: the first alone, then the nine that waited for it together.
    sent, held = batch_sizes()
    assert (sent - sent_before, held - held_before) == (2, 2 + len(ONE_SHOT))
    # Each recorded with the bytes it was answered with, and its invoice reconciled.
    rows = await pool.fetch("SELECT request_id, response_body FROM inquiries")
    assert {row["request_id"]: row["response_body"] for row in rows} == {
        reply.request_id: reply.body for reply in replies
    }
    assert await pool.fetchval("SELECT count(*) FROM reconciliation") == 2 + len(ONE_SHOT)


async def test_an_inquiry_alone_at_a_held_lock_does_not_hold_up_the_others(
    client, doku, pool, database_url, codes
):
    """(Found by review.) The inquiry waits for its code's row; those behind it in its lane are answered
    within their budget all the same. (A lone inquiry waited without the lock-wait bound at first, until
    its batch's deadline, and every inquiry of its lane got a 503.)"""
    async with rows_held(database_url, TOPUP):
        stuck = asyncio.create_task(doku.post("/doku/inquiry", inquiry_body(TOPUP), request_id="stuck"))
        await waiting_for_a_lock(pool, "dipc_inquire")
        others = [
            asyncio.create_task(doku.post("/doku/inquiry", inquiry_body(code), request_id=f"r-{code}"))
            for code in ONE_SHOT
        ]
        replies = [await other for other in others]
        assert [reply.status for reply in replies] == [200] * len(ONE_SHOT)
        assert (await stuck).status == 503  # its own budget, waiting alone for the row
    assert [reply.json()["order"]["invoice_number"] for reply in replies] == [f"INV-{c}" for c in ONE_SHOT]


async def test_a_batch_that_meets_a_held_lock_lets_its_other_inquiries_through(
    pool, database_url, codes, batches, gate
):
    """One inquiry waiting for a lock fails its batch after BATCH_LOCK_WAIT_MS; the others are then
    recorded alone and answered while the lock is still held (without the bound, the batch would wait
    with it until its deadline and all of them would be 503s)."""
    async with rows_held(database_url, TOPUP):
        first = asyncio.create_task(batches.inquire(inquiry(SLOW, "slow")))
        await gate.reached()
        locked = asyncio.create_task(batches.inquire(inquiry(TOPUP, "locked")))
        others = [asyncio.create_task(batches.inquire(inquiry(code, f"r-{code}"))) for code in ONE_SHOT]
        await queued(batches, 1 + len(ONE_SHOT), then_timeout_s=0.8)
        await gate.open()
        await first
        answered = [await other for other in others]
        assert [answer.outcome for answer in answered] == ["SUCCESS"] * len(ONE_SHOT)
        assert not locked.done()  # alone now, waiting for the row
    assert (await locked).invoice_number == "TOP77-1"
    assert await pool.fetchval("SELECT count(*) FROM inquiries") == 2 + len(ONE_SHOT)


async def test_lock_waits_in_one_batch_do_not_add_up(pool, database_url, codes, gate):
    """(Found by review.) Rows freed one after the other, each within BATCH_LOCK_WAIT_MS, would add up
    past the batch's deadline if each wait had its own bound, and the inquiries that need no lock would
    fail with it. The bound is the batch's, from its start: they are answered."""
    batches = InquiryBatches(pool, first_check_s=120, timeout_s=60, lanes=1)
    held = HELD[:5]
    async with rows_held(database_url, *held) as holders:
        first = asyncio.create_task(batches.inquire(inquiry(SLOW, "slow")))
        await gate.reached()
        waiting = [
            asyncio.create_task(batches.inquire(inquiry(code, f"r-{code}"))) for code in ONE_SHOT + held
        ]
        await queued(batches, len(waiting), then_timeout_s=0.25)
        await gate.open()
        await first
        for holder in holders:  # the rows are freed 60 ms apart: 300 ms in all
            await asyncio.sleep(0.06)
            await holder.execute("COMMIT")
        results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [getattr(result, "outcome", result) for result in results] == ["SUCCESS"] * len(waiting)


async def test_a_batch_outlives_the_request_that_started_it(pool, codes, batches, gate):
    """The lane's sender is started by a request but is not part of it: when that request's deadline
    passes, its batch goes on (and may commit: its answer was a 503, a resend gets the recorded one), and
    the lane goes on serving the requests that queued behind it."""

    async def first() -> RecordedInquiry:
        async with deadline(0.2, "test"):
            return await batches.inquire(inquiry(SLOW, "slow"))

    starter = asyncio.create_task(first())
    await gate.reached()
    behind = asyncio.create_task(batches.inquire(inquiry(ONE_SHOT[0], "behind")))
    with pytest.raises(Unavailable):
        await starter
    await gate.open()
    assert (await behind).outcome == "SUCCESS"
    assert (
        await pool.fetchval("SELECT invoice_number FROM inquiries WHERE request_id = 'slow'") == f"INV-{SLOW}"
    )


async def test_inquiries_in_one_batch_see_each_other_as_they_would_one_after_the_other(
    pool, codes, batches, gate
):
    """A resend in the same batch gets the first one's answer and mints nothing; a Request-Id used for
    another code in the same batch is a reuse."""
    first = asyncio.create_task(batches.inquire(inquiry(SLOW, "slow")))
    await gate.reached()
    together = [
        inquiry(ONE_SHOT[0], "twin"),
        inquiry(ONE_SHOT[0], "twin"),
        inquiry(ONE_SHOT[1], "twin", body_sha256=b"\x02"),
        inquiry(OTHER_TOPUP, "mint"),
        inquiry(OTHER_TOPUP, "mint"),
        inquiry(OTHER_TOPUP, "mint-again"),
    ]
    tasks = [asyncio.create_task(batches.inquire(each)) for each in together]
    await queued(batches, len(together))
    await gate.open()
    await first
    one, resent, reused, minted, minted_resent, minted_again = [await task for task in tasks]

    assert (one.replayed, resent.replayed) in ((False, True), (True, False))
    assert one.response_body == resent.response_body
    assert one.invoice_number == f"INV-{ONE_SHOT[0]}"
    # The other code's inquiry got the twin's record back: the caller sees another body, a reuse.
    assert reused.replayed
    assert (reused.body_sha256, reused.invoice_number) == (b"\x01", f"INV-{ONE_SHOT[0]}")
    assert {minted.invoice_number, minted_resent.invoice_number} == {"TOP78-1"}
    assert minted_again.invoice_number == "TOP78-2"
    assert (
        await pool.fetchval("SELECT invoice_seq FROM payment_codes WHERE payment_code = $1", OTHER_TOPUP) == 2
    )
    rows = await pool.fetch("SELECT request_id, count(*) FROM inquiries GROUP BY request_id")
    counts = {row["request_id"]: row["count"] for row in rows}
    assert counts == {"slow": 1, "twin": 1, "mint": 1, "mint-again": 1}


async def test_two_workers_batches_in_a_lock_cycle_are_answered_as_one_after_the_other(
    pool, database_url, codes, gate
):
    """(Found by review.) Each call of dipc_inquire writes its audit row, then locks the invoice's
    reconciliation row, so the sort by code and Request-Id cannot order every lock: worker A's batch
    [(C, x1), (C, x2)] and worker B's [(C, x2)] (DOKU resending x2 to the other worker) can wait for each
    other. B's lock-wait bound ends the cycle: its batch fails, and its inquiry, recorded alone after A
    commits, gets A's answer. (A's batch is held at the gate between its two inquiries, as by work.)"""
    code = ONE_SHOT[0]
    worker_b = InquiryBatches(pool, first_check_s=120, timeout_s=5, lanes=1)
    worker_a = await asyncpg.connect(database_url)
    try:
        batch_a = asyncio.create_task(
            worker_a.fetch(
                "SELECT * FROM dipc_inquire_each($1, $2, $3, $4, $5, $6, $7, 120, 5000)",
                [code, code], ["x1", "x2"], [CLIENT_ID] * 2, ["ALFA"] * 2, [b"\x01", GATED], ["ALFA"] * 2,
                [datetime.now(UTC)] * 2,
            )
        )  # fmt: skip
        await gate.reached()  # x1 recorded, its reconciliation row held; x2 waits at the gate
        b_x2 = asyncio.create_task(worker_b.inquire(inquiry(code, "x2")))
        await waiting_for_a_lock(pool, "dipc_inquire_each")  # B: x2 written, waiting for A's row
        await gate.open()  # A goes on to x2, which B holds: a cycle
        a_x1, a_x2 = await batch_a
        answered = await b_x2
    finally:
        await worker_a.close()
    assert (a_x1["replayed"], a_x2["replayed"]) == (False, False)
    assert answered.replayed
    assert (answered.response_body, answered.invoice_number) == (a_x2["response_body"], f"INV-{code}")
    assert await pool.fetchval("SELECT count(*) FROM inquiries WHERE request_id IN ('x1', 'x2')") == 2


async def test_an_inquiry_the_database_refuses_fails_alone(pool, codes, batches, gate):
    """A batch the database refuses is rolled back whole and each of its inquiries recorded alone: the
    one that cannot be recorded fails, the others are answered (here a trigger refuses one Request-Id)."""
    await pool.execute(
        """
        CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.request_id = 'poison' THEN RAISE EXCEPTION 'refused for the test'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_refuse_poison BEFORE INSERT ON inquiries
            FOR EACH ROW EXECUTE FUNCTION test_refuse_poison();
        """
    )
    try:
        first = asyncio.create_task(batches.inquire(inquiry(SLOW, "slow")))
        await gate.reached()
        poison = asyncio.create_task(batches.inquire(inquiry(ONE_SHOT[0], "poison")))
        others = [asyncio.create_task(batches.inquire(inquiry(code, f"r-{code}"))) for code in ONE_SHOT[1:]]
        await queued(batches, len(ONE_SHOT))
        await gate.open()
        await first
        with pytest.raises(asyncpg.RaiseError):
            await poison
        assert [(await other).outcome for other in others] == ["SUCCESS"] * (len(ONE_SHOT) - 1)
    finally:
        await pool.execute("DROP TRIGGER test_refuse_poison ON inquiries; DROP FUNCTION test_refuse_poison()")
    assert await pool.fetchval("SELECT count(*) FROM inquiries") == len(ONE_SHOT)


async def test_a_code_whose_row_is_held_goes_alone_and_leaves_the_batches_to_the_others(
    database_url, codes, batches, gate
):
    """(Found by the second review.) A code whose row a long transaction holds would join batch after
    batch, each waiting BATCH_LOCK_WAIT_MS to be refused: the lane would answer the other codes a batch
    per 100 ms. Once an inquiry of it has waited alone longer than a batch may, its next inquiries go
    alone (HELD_CODE_S), and the batches of the others are not refused."""

    async def within_budget(code: str, request_id: str) -> RecordedInquiry:
        async with deadline(0.3, "test"):
            return await batches.inquire(inquiry(code, request_id))

    async with rows_held(database_url, TOPUP):
        with pytest.raises(Unavailable):  # refused in its batch, then waited alone until its budget
            await within_budget(TOPUP, "held-1")
        sent_before, held_before = batch_sizes()
        first = asyncio.create_task(batches.inquire(inquiry(SLOW, "slow")))
        await gate.reached()
        again = asyncio.create_task(within_budget(TOPUP, "held-2"))
        others = [asyncio.create_task(batches.inquire(inquiry(code, f"r-{code}"))) for code in ONE_SHOT]
        await queued(batches, len(ONE_SHOT))  # the held code's inquiry is not among them
        await gate.open()
        await first
        assert [(await other).outcome for other in others] == ["SUCCESS"] * len(ONE_SHOT)
        with pytest.raises(Unavailable):
            await again
    sent, held = batch_sizes()
    assert (sent - sent_before, held - held_before) == (2, 1 + len(ONE_SHOT))


async def test_a_code_whose_write_alone_waited_for_a_connection_is_not_held(
    pool, database_url, codes, batches, gate
):
    """(Found by review.) A code is held when a write of it made alone waited at the database as long as
    a batch may: its row is held. A write that waited that long for one of the pool's connections says
    nothing of its row, and its code's next inquiries still go in batches (had they gone alone, each on a
    connection of its own, batching would turn itself off exactly when connections are short)."""
    free_code = OTHER_TOPUP  # nothing holds its row

    async def within(code: str, request_id: str, seconds: float) -> RecordedInquiry:
        async with deadline(seconds, "test"):
            return await batches.inquire(inquiry(code, request_id))

    async with rows_held(database_url, TOPUP) as [holder]:
        first = asyncio.create_task(batches.inquire(inquiry(SLOW, "slow")))
        await gate.reached()
        held_write = asyncio.create_task(within(TOPUP, "held", 2.0))
        free_write = asyncio.create_task(within(free_code, "free", 3.0))
        await queued(batches, 2)
        # Every other connection of the pool is busy for a while (other requests, other work).
        taken = [await pool.acquire() for _ in range(pool.get_max_size() - 1)]
        try:
            await gate.open(taken[0])
            assert (await first).outcome == "SUCCESS"
            # The batch [TOPUP, OTHER_TOPUP] is refused at TOPUP's row after 100 ms and both are made
            # alone: TOPUP's on the connection the lane gave back, waiting for its row; OTHER_TOPUP's
            # waits for a connection.
            await asyncio.sleep(0.4)
        finally:
            for conn in taken:
                await pool.release(conn)
        assert (await free_write).outcome == "SUCCESS"
        sent_before, _ = batch_sizes()
        assert (await within(free_code, "free-again", 1.0)).outcome == "SUCCESS"
        sent_after, _ = batch_sizes()
        await holder.execute("COMMIT")
        assert (await held_write).outcome == "SUCCESS"
    assert sent_after == sent_before + 1, "OTHER_TOPUP's inquiry went alone: its code was taken for held"
