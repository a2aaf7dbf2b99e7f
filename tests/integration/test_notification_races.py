"""Notifications racing everything else that touches their code or invoice (ADR 11: read, decide, record).

Each test races a notification's recording with something else that touches its code or invoice, then
checks the invariants exactly-once rests on: one normal payment per invoice, the code's count and status
agree with its payments, each payment has one inbox row and one event in the feed, and the code documents
the feed carries are the code as it was (versions only grow; the last one is the row).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import defaultdict

import asyncpg

from server.app import make_app
from server.core.notifications import RawNotification, record_notification
from server.core.times import utcnow
from server.doku import conventions
from server.doku.client import DokuSimulator, notification_body
from tests.conftest import CLIENT, CLIENT_ID, CODE, make_settings, waiting_for_a_lock
from tests.integration.test_notification import INVOICE, paid_notice, pay


async def check_status_record(pool: asyncpg.Pool, code: str, invoice: str, amount: int, request_id: str):
    """What reconciliation records for a Check Status answer that named no transaction."""
    raw = RawNotification(
        client_id=CLIENT_ID, request_id=request_id, headers=[], body=b"{}", source="check_status"
    )
    notice = paid_notice(code, invoice, amount, ref=conventions.check_status_reference(invoice))
    return await record_notification(pool, raw, notice, now=utcnow())


async def check_invariants(pool: asyncpg.Pool) -> None:
    codes = {row["payment_code"]: row for row in await pool.fetch("SELECT * FROM payment_codes")}
    payments = await pool.fetch("SELECT * FROM payments ORDER BY id")
    accepted = await pool.fetch("SELECT payment_code FROM payment_resolutions WHERE code_paid")
    normals: dict[str, int] = defaultdict(int)
    for row in payments:
        if row["kind"] == "normal":
            normals[row["payment_code"]] += 1
    for row in accepted:
        normals[row["payment_code"]] += 1
    per_invoice: dict[tuple[str, str], list] = defaultdict(list)
    for row in payments:
        per_invoice[(row["payment_code"], row["invoice_number"])].append(row)
    for key, rows in per_invoice.items():
        assert sum(r["kind"] == "normal" for r in rows) <= 1, key
        unnamed = [r for r in rows if r["transaction_ref"].startswith("check-status:")]
        for u in unnamed:
            # An unnamed Check Status payment is one store transaction: the first notification of its
            # amount is matched with it (not recorded again), and only then can another be recorded.
            twins = [r for r in rows if r is not u and r["amount"] == u["amount"]]
            assert not twins or u["notified_ref"] is not None, ("a twin, and nothing matched", key, u, twins)
            twice = [r for r in twins if r["transaction_ref"] == u["notified_ref"]]
            assert not twice, ("one payment recorded twice (unnamed Check Status answer)", key, u, twice)
    for code, row in codes.items():
        assert row["paid_count"] == normals[code], (code, dict(row), normals[code])
        if not row["reusable"]:
            if row["paid_count"] == 1:
                assert row["status"] == "paid", dict(row)
            else:
                assert row["status"] in ("active", "cancelled"), dict(row)
    # One inbox row per payment, with the payment's outcome.
    inbox = {row["id"]: row for row in await pool.fetch("SELECT * FROM notifications")}
    for row in payments:
        assert inbox[row["notification_id"]]["outcome"] == row["kind"], dict(row)
    # Every payment's event is in the feed exactly once (every answer has been given).
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0
    events = await pool.fetch("SELECT id, type, payment_code, payload FROM events ORDER BY id")
    seen: dict[int, int] = defaultdict(int)
    for event in events:
        if event["type"].startswith("payment."):
            seen[event["payload"]["id"]] += 1
    assert {row["id"]: 1 for row in payments} == dict(seen)
    # The code documents of the feed: per code, versions never go back, one version is one document,
    # and the last one is the row.
    docs: dict[str, list[dict]] = defaultdict(list)
    for event in events:
        payload = event["payload"]
        doc = payload if event["type"].startswith("code.") else payload.get("code")
        if doc:
            doc = {k: v for k, v in doc.items() if k != "changed"}
            docs[doc["payment_code"]].append(doc)
    for code, chain in docs.items():
        by_version: dict[int, dict] = {}
        for before, after in itertools.pairwise(chain):
            assert after["version"] >= before["version"], (code, before, after)
        for doc in chain:
            assert by_version.setdefault(doc["version"], doc) == doc, (code, by_version[doc["version"]], doc)
        row = codes[code]
        last = chain[-1]
        assert (last["version"], last["paid_count"], last["status"]) == (
            row["version"],
            row["paid_count"],
            row["status"],
        ), (code, last, dict(row))


# --- one-shot codes: twins, a second transaction, cancel, PATCH, Check Status, all at once ------------


async def test_one_shot_codes_paid_twice_cancelled_edited_and_checked_at_once(
    client, doku, register, admin_headers, pool
):
    rng = random.Random(11)
    codes = [f"88965100000{n:05d}" for n in range(24)]
    for code in codes:
        await register(payment_code=code)

    async def cancel(code):
        return (await client.post(f"/v1/payment-codes/{code}/cancel", headers=admin_headers)).status

    async def patch(code, n):
        return (
            await client.patch(
                f"/v1/payment-codes/{code}", json={"customer_name": f"Siti {n}"}, headers=admin_headers
            )
        ).status

    work = []
    for i, code in enumerate(codes):
        ops = [pay(doku, code=code, ref="trx-A") for _ in range(3)]
        ops += [pay(doku, code=code, ref="trx-B")]
        ops += [check_status_record(pool, code, INVOICE, 150000, f"cs-{code}")]
        if i % 3 == 0:
            ops.append(cancel(code))
        ops += [patch(code, n) for n in range(2)]
        rng.shuffle(ops)
        work += ops
    results = await asyncio.gather(*work, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    for r in results:
        if hasattr(r, "status"):
            assert r.status == 200, r.body
    await check_invariants(pool)


async def test_an_unnamed_check_status_payment_is_one_store_transaction_not_every_one(
    client, doku, register, admin_headers, pool
):
    """A Check Status answer that named no transaction is DOKU's word that the invoice is paid, once: the
    late notification of that payment is a repeat of it (spec §8 rule 3), and only that one. Other store
    transactions of the same amount for the invoice (two counters took the money) are each a conflict for
    refund; taken for repeats, that money would be in no payment and in no exception. Each notification
    comes twice at once (DOKU retries), all of them racing for the unnamed payment."""
    await register()
    await check_status_record(pool, CODE, INVOICE, 150000, "cs-1")
    refs = [f"trx-{n}" for n in range(8)]
    work = [pay(doku, ref=ref) for ref in refs for _ in range(2)]
    random.Random(13).shuffle(work)
    replies = await asyncio.gather(*work)
    assert [reply.status for reply in replies] == [200] * len(work)
    rows = await pool.fetch("SELECT transaction_ref, kind, reason FROM payments ORDER BY id")
    assert (rows[0]["transaction_ref"], rows[0]["kind"]) == (f"check-status:{INVOICE}", "normal")
    conflicts = rows[1:]
    assert [(row["kind"], row["reason"]) for row in conflicts] == [("conflict", "ALREADY_PAID")] * (
        len(refs) - 1
    )
    assert len({row["transaction_ref"] for row in conflicts}) == len(refs) - 1
    # The API says which store transaction the unnamed payment turned out to be: the one not a conflict.
    listed = (await (await client.get("/v1/payments", headers=admin_headers)).json())["items"]
    assert [item["notified_ref"] for item in listed[1:]] == [None] * (len(refs) - 1)
    matched = listed[0]["notified_ref"]
    assert matched is not None
    assert matched.endswith(tuple(refs))
    assert matched not in {row["transaction_ref"] for row in conflicts}
    outcomes = [row["outcome"] for row in await pool.fetch("SELECT outcome FROM notifications ORDER BY id")]
    # The unnamed payment's own answer; the one transaction taken as its notification, twice; every other
    # transaction once as a conflict and once as its repeat.
    assert sorted(outcomes) == sorted(
        ["normal"] + ["conflict"] * (len(refs) - 1) + ["repeat"] * (len(refs) + 1)
    )
    await check_invariants(pool)
    # Later retries of every transaction change nothing.
    for ref in refs:
        assert (await pay(doku, ref=ref)).status == 200
    assert len(await pool.fetch("SELECT 1 FROM payments")) == len(refs)
    await check_invariants(pool)


# --- reusable codes: inquiries minting invoices while their notifications are recorded ---------------


async def test_a_reusable_code_paid_edited_and_minting_invoices_at_once(
    client, doku, register, admin_headers, pool
):
    await register(reusable=True, invoice_number="TOPUP")
    minted = []
    for _ in range(10):
        reply = await doku.inquiry(CODE)
        minted.append(reply.json()["order"]["invoice_number"])
    work = []
    for n, invoice in enumerate(minted):
        work += [pay(doku, invoice=invoice, ref=f"s-{invoice}") for _ in range(2)]
        work += [pay(doku, invoice=invoice, ref=f"t-{invoice}")]
        work += [check_status_record(pool, CODE, invoice, 150000, f"cs-{n}")]
        work += [doku.inquiry(CODE) for _ in range(3)]
    work += [
        client.patch(f"/v1/payment-codes/{CODE}", json={"info1": f"x{n}"}, headers=admin_headers)
        for n in range(3)
    ]
    random.Random(5).shuffle(work)
    results = await asyncio.gather(*work, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)]
    inquiries_ok = await pool.fetchval(
        "SELECT count(*) FROM inquiries WHERE payment_code = $1 AND outcome = 'SUCCESS'", CODE
    )
    assert await pool.fetchval("SELECT invoice_seq FROM payment_codes") == inquiries_ok
    await check_invariants(pool)


# --- unknown codes: twins racing the code's registration ----------------------------------------------


async def test_twins_of_a_notification_racing_their_codes_registration(client, doku, register, pool):
    codes = [f"88965200000{n:05d}" for n in range(24)]
    work = []
    for code in codes:
        work += [pay(doku, code=code, ref="trx-1") for _ in range(4)]
        work.append(register(payment_code=code))
    random.Random(3).shuffle(work)
    results = await asyncio.gather(*work, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)], results
    await check_invariants(pool)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM payments"
            " GROUP BY payment_code, invoice_number HAVING count(*) > 1) x"
        )
        == 0
    )


# --- casework: an accepted anomaly racing the code's normal payment ---------------------------------


async def test_an_accepted_anomaly_racing_the_codes_normal_payment(
    client, doku, register, admin_headers, pool
):
    codes = [f"88965300000{n:05d}" for n in range(16)]
    for code in codes:
        await register(payment_code=code)
        assert (await pay(doku, code=code, ref="wrong", amount=1)).status == 200
    ids = {
        row["payment_code"]: row["id"]
        for row in await pool.fetch("SELECT payment_code, id FROM payments WHERE kind = 'anomaly'")
    }

    async def accept(code):
        reply = await client.post(
            f"/v1/exceptions/{ids[code]}/resolve",
            json={"resolution": "accepted", "resolved_by": "finance", "note": ""},
            headers=admin_headers,
        )
        return reply.status

    work = []
    for code in codes:
        work += [accept(code), pay(doku, code=code, ref="ok"), pay(doku, code=code, ref="ok")]
    random.Random(7).shuffle(work)
    results = await asyncio.gather(*work, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)], results
    await check_invariants(pool)


# --- the request's deadline expiring while the recording waits for the lock -------------------------


async def test_a_retry_while_a_503d_recording_still_waits_for_the_lock(
    aiohttp_client, database_url, register, pool
):
    short = await aiohttp_client(make_app(make_settings(notification_db_timeout_s=0.5), database_url))
    long = await aiohttp_client(make_app(make_settings(notification_db_timeout_s=10), database_url))
    doku_short = DokuSimulator(short.session, str(short.make_url("")), CLIENT)
    doku_long = DokuSimulator(long.session, str(long.make_url("")), CLIENT)
    await register()
    body = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="trx-1")
    async with pool.acquire() as holder:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM payment_codes WHERE payment_code = $1 FOR UPDATE", CODE)
            first = await doku_short.post("/doku/notification", body)
            assert first.status == 503
            # DOKU resends while the first statement (its process gave up on it) still waits.
            retry = asyncio.create_task(doku_long.post("/doku/notification", body))
            for _ in range(200):
                waiting = await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%dipc_payment_context%'"
                )
                if waiting >= 1 and not retry.done():
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)
        reply = await retry
    assert reply.status == 200
    kinds = [row["kind"] for row in await pool.fetch("SELECT kind FROM payments")]
    assert kinds == ["normal"]
    outcomes = sorted(row["outcome"] for row in await pool.fetch("SELECT outcome FROM notifications"))
    await check_invariants(pool)
    assert outcomes in (["normal", "repeat"], ["normal"])


async def test_a_recording_that_commits_after_its_503_makes_the_retry_a_repeat(
    aiohttp_client, database_url, register, pool
):
    short = await aiohttp_client(make_app(make_settings(notification_db_timeout_s=0.5), database_url))
    doku_short = DokuSimulator(short.session, str(short.make_url("")), CLIENT)
    await register()
    body = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="trx-1")
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM payment_codes WHERE payment_code = $1 FOR UPDATE", CODE)
        first = await doku_short.post("/doku/notification", body)
        assert first.status == 503
        await waiting_for_a_lock(pool, "dipc_payment_context")
    for _ in range(100):
        if await pool.fetchval("SELECT count(*) FROM payments"):
            break
        await asyncio.sleep(0.05)
    # The statement its process gave up on went on once the lock was free, and committed.
    assert await pool.fetchval("SELECT count(*) FROM payments") == 1
    retry = await doku_short.post("/doku/notification", body)
    assert retry.status == 200
    assert [row["outcome"] for row in await pool.fetch("SELECT outcome FROM notifications ORDER BY id")] == [
        "normal",
        "repeat",
    ]
    await check_invariants(pool)


# --- PostgreSQL ends the backend whose recording waits for the lock -------------------------------


async def test_a_recording_whose_backend_is_terminated_while_it_waits(client, doku, register, pool):
    await register()
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT 1 FROM payment_codes WHERE payment_code = $1 FOR UPDATE", CODE)
        waiting = asyncio.create_task(pay(doku, ref="trx-1"))
        await waiting_for_a_lock(pool, "dipc_payment_context")
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%dipc_payment_context%' AND pid <> pg_backend_pid()"
        )
        first = await waiting
    assert first.status == 503
    assert await pool.fetchval("SELECT count(*) FROM payments") == 0
    assert (await pay(doku, ref="trx-1")).status == 200
    await check_invariants(pool)
