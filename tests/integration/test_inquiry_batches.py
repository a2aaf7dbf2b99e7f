"""Inquiries recorded in batches (store/inquiries.py, InquiryBatches; migration 0010): those that arrive
while their lane's batch is at the database share the next statement and commit, answer as they would
alone, and cannot hold each other up for longer than a lock timeout.

Each test holds its lane busy the same way: a reusable code's row is locked by another transaction, and
an inquiry of that code (which mints, so it needs the row) is sent first and waits for it.
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

TOPUP = "8896500000000777"  # reusable: an inquiry of it mints, under the code's row lock
OTHER_TOPUP = "8896500000000778"
TOPUPS = (TOPUP, OTHER_TOPUP)
ONE_SHOT = [f"88965{n:011d}" for n in range(1, 9)]
COLUMNS = ["payment_code", "client_id", "channel", "invoice_number", "amount", "customer_name", "reusable"]


@pytest.fixture
async def codes(pool: asyncpg.Pool) -> None:
    await pool.copy_records_to_table(
        "payment_codes",
        records=[(code, CLIENT_ID, "ALFA", f"INV-{code}", 10_000, "Pelanggan", False) for code in ONE_SHOT]
        + [(code, CLIENT_ID, "ANY", f"TOPUP{code[-1]}", 50_000, "Pelanggan", True) for code in TOPUPS],
        columns=COLUMNS,
    )


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
async def row_locked(pool: asyncpg.Pool, code: str) -> AsyncIterator[None]:
    """Another transaction holds ``code``'s row for the block."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT FROM payment_codes WHERE payment_code = $1 FOR UPDATE", code)
        yield


async def queued(batches: InquiryBatches, count: int) -> None:
    """Until ``count`` inquiries wait for their lane's next batch."""
    for _ in range(500):
        if batches.waiting == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{batches.waiting} inquiries wait, not {count}")


@pytest.fixture
def batches(pool: asyncpg.Pool) -> InquiryBatches:
    return InquiryBatches(pool, first_check_s=120, timeout_s=0.8, lanes=1)


@pytest.fixture
def settings() -> Settings:
    return make_settings(inquiry_batches=1)


def batch_sizes() -> tuple[float, float]:
    """How many batches were sent so far, and how many inquiries they held."""
    [family] = metrics.INQUIRY_BATCH_SIZE.collect()
    totals = {sample.name: sample.value for sample in family.samples}
    return totals["dipc_inquiry_batch_size_count"], totals["dipc_inquiry_batch_size_sum"]


async def test_inquiries_that_arrive_while_a_batch_is_out_share_the_next_commit(client, doku, pool, codes):
    batches = client.app[INQUIRY_BATCHES]
    sent_before, held_before = batch_sizes()
    async with row_locked(pool, TOPUP):
        first = asyncio.create_task(doku.post("/doku/inquiry", inquiry_body(TOPUP), request_id="first"))
        await waiting_for_a_lock(pool, "dipc_inquire")
        others = [
            asyncio.create_task(doku.post("/doku/inquiry", inquiry_body(code), request_id=f"r-{code}"))
            for code in ONE_SHOT
        ]
        await queued(batches, len(ONE_SHOT))
    replies = [await first, *[await other for other in others]]

    assert [reply.status for reply in replies] == [200] * (1 + len(ONE_SHOT))
    assert all(reply.signature_valid for reply in replies)
    assert replies[0].json()["order"]["invoice_number"] == "TOPUP7-1"
    assert [reply.json()["order"]["invoice_number"] for reply in replies[1:]] == [
        f"INV-{c}" for c in ONE_SHOT
    ]
    # Two commits for nine inquiries: the first alone, then the eight that waited for it together.
    sent, held = batch_sizes()
    assert (sent - sent_before, held - held_before) == (2, 1 + len(ONE_SHOT))
    # Each recorded with the bytes it was answered with, and its invoice reconciled.
    rows = await pool.fetch("SELECT request_id, response_body FROM inquiries")
    assert {row["request_id"]: row["response_body"] for row in rows} == {
        reply.request_id: reply.body for reply in replies
    }
    assert await pool.fetchval("SELECT count(*) FROM reconciliation") == 1 + len(ONE_SHOT)


async def test_a_batch_that_meets_a_held_lock_lets_its_other_inquiries_through(pool, codes, batches):
    """One inquiry waiting for a lock fails its batch after BATCH_LOCK_TIMEOUT_MS; the others are then
    recorded alone and answered while the lock is still held (without the timeout, the batch would wait
    with it until its deadline and all of them would be 503s)."""
    async with row_locked(pool, TOPUP):
        first = asyncio.create_task(batches.inquire(inquiry(TOPUP, "first")))
        await waiting_for_a_lock(pool, "dipc_inquire")
        locked = asyncio.create_task(batches.inquire(inquiry(TOPUP, "locked")))
        others = [asyncio.create_task(batches.inquire(inquiry(code, f"r-{code}"))) for code in ONE_SHOT]
        await queued(batches, 1 + len(ONE_SHOT))
        with pytest.raises(Unavailable):  # alone, it waited for the lock until its batch's deadline
            await first
        answered = [await other for other in others]
        assert [answer.outcome for answer in answered] == ["SUCCESS"] * len(ONE_SHOT)
        assert not locked.done()  # alone now, still waiting for the lock
    # The first's deadline ended our wait, not its statement: it took the lock first, and recorded.
    assert (await locked).invoice_number == "TOPUP7-2"
    assert (
        await pool.fetchval("SELECT invoice_number FROM inquiries WHERE request_id = 'first'") == "TOPUP7-1"
    )
    assert await pool.fetchval("SELECT count(*) FROM inquiries") == 2 + len(ONE_SHOT)


async def test_a_batch_outlives_the_request_that_started_it(pool, codes, batches):
    """The lane's sender is started by a request but is not part of it: when that request's deadline
    passes, its batch goes on (and may commit: its answer was a 503, a resend gets the recorded one), and
    the lane goes on serving the requests that queued behind it."""
    async with row_locked(pool, TOPUP):

        async def first() -> RecordedInquiry:
            async with deadline(0.2, "test"):
                return await batches.inquire(inquiry(TOPUP, "first"))

        starter = asyncio.create_task(first())
        await waiting_for_a_lock(pool, "dipc_inquire")
        behind = asyncio.create_task(batches.inquire(inquiry(ONE_SHOT[0], "behind")))
        with pytest.raises(Unavailable):
            await starter
        await asyncio.sleep(0.1)  # past the starter's deadline, still within the batch's
    assert (await behind).outcome == "SUCCESS"
    assert (
        await pool.fetchval("SELECT invoice_number FROM inquiries WHERE request_id = 'first'") == "TOPUP7-1"
    )


async def test_inquiries_in_one_batch_see_each_other_as_they_would_one_after_the_other(pool, codes, batches):
    """A resend in the same batch gets the first one's answer and mints nothing; a Request-Id used for
    another code in the same batch is a reuse."""
    async with row_locked(pool, TOPUP):
        first = asyncio.create_task(batches.inquire(inquiry(TOPUP, "first")))
        await waiting_for_a_lock(pool, "dipc_inquire")
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
    await first
    one, resent, reused, minted, minted_resent, minted_again = [await task for task in tasks]

    assert (one.replayed, resent.replayed) in ((False, True), (True, False))
    assert one.response_body == resent.response_body
    assert one.invoice_number == f"INV-{ONE_SHOT[0]}"
    # The other code's inquiry got the twin's record back: the caller sees another body, a reuse.
    assert reused.replayed
    assert (reused.body_sha256, reused.invoice_number) == (b"\x01", f"INV-{ONE_SHOT[0]}")
    assert {minted.invoice_number, minted_resent.invoice_number} == {"TOPUP8-1"}
    assert minted_again.invoice_number == "TOPUP8-2"
    assert (
        await pool.fetchval("SELECT invoice_seq FROM payment_codes WHERE payment_code = $1", OTHER_TOPUP) == 2
    )
    rows = await pool.fetch("SELECT request_id, count(*) FROM inquiries GROUP BY request_id")
    assert {row["request_id"]: row["count"] for row in rows} == {
        "first": 1,
        "twin": 1,
        "mint": 1,
        "mint-again": 1,
    }


async def test_an_inquiry_the_database_refuses_fails_alone(pool, codes, batches):
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
        async with row_locked(pool, TOPUP):
            first = asyncio.create_task(batches.inquire(inquiry(TOPUP, "first")))
            await waiting_for_a_lock(pool, "dipc_inquire")
            poison = asyncio.create_task(batches.inquire(inquiry(ONE_SHOT[0], "poison")))
            others = [
                asyncio.create_task(batches.inquire(inquiry(code, f"r-{code}"))) for code in ONE_SHOT[1:]
            ]
            await queued(batches, len(ONE_SHOT))
        await first
        with pytest.raises(asyncpg.RaiseError):
            await poison
        assert [(await other).outcome for other in others] == ["SUCCESS"] * (len(ONE_SHOT) - 1)
    finally:
        await pool.execute("DROP TRIGGER test_refuse_poison ON inquiries; DROP FUNCTION test_refuse_poison()")
    assert await pool.fetchval("SELECT count(*) FROM inquiries") == len(ONE_SHOT)
