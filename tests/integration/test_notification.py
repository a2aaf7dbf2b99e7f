"""DOKU's payment notifications against the real app and PostgreSQL: exactly once, under retries and races."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import asyncpg
import orjson
import pytest

from server.app import make_app
from server.core import notifications
from server.core.notifications import planned_payment
from server.core.payments import NotificationOutcome, PaymentKind, PaymentNotice, decide_payment
from server.core.times import utcnow
from server.doku import conventions
from server.doku.auth import Client
from server.doku.client import DokuSimulator, notification_body
from server.ops import metrics
from server.store import inbox as inbox_store
from server.store import outbox
from server.store import payments as payment_store
from tests.conftest import (
    CLIENT,
    CLIENT_ID,
    CODE,
    OTHER_CLIENT_ID,
    make_settings,
    spec_example,
    table_locked,
    waiting_for_a_lock,
)
from tests.integration.test_inquiry_batches import rows_held

INVOICE = "INV-2026-000123"
ACK = b'{"status":"success"}'


async def payments(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM payments ORDER BY id")


async def inbox(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM notifications ORDER BY id")


async def code_row(pool: asyncpg.Pool, code: str = CODE) -> asyncpg.Record:
    return await pool.fetchrow("SELECT status, paid_count FROM payment_codes WHERE payment_code = $1", code)


async def event_types(pool: asyncpg.Pool) -> list[str]:
    return [
        row["type"]
        for row in await pool.fetch("SELECT type FROM events WHERE type LIKE 'payment.%' ORDER BY id")
    ]


async def pay(doku: DokuSimulator, *, code=CODE, invoice=INVOICE, amount=150000, ref="trx-1", **kwargs):
    return await doku.notify(code, invoice_number=invoice, amount=amount, original_request_id=ref, **kwargs)


def paid_notice(code=CODE, invoice=INVOICE, amount=150000, ref="ref:trx-1") -> PaymentNotice:
    """A successful store transaction's notice, as the protocol adapter hands it to the core."""
    return PaymentNotice(
        client_id=CLIENT_ID,
        payment_code=code,
        invoice_number=invoice,
        amount=amount,
        transaction_ref=ref,
        channel="ALFA",
        paid=True,
        transaction_status="SUCCESS",
        paid_at=None,
        agent_id=None,
        agent_store_id=None,
        agent_trx_id=None,
    )


def stored(outcome: NotificationOutcome, request_id: str, source: str = "notification") -> tuple:
    """The inbox values of a notification with an empty body."""
    return inbox_store.values(
        payment_code=CODE,
        client_id=CLIENT_ID,
        request_id=request_id,
        headers=[],
        body=b"{}",
        transaction_status="SUCCESS",
        outcome=outcome,
        source=source,
    )


# --- the normal case -------------------------------------------------------------------------------


async def test_the_spec_notification_pays_the_code_and_is_stored_raw(doku, register, pool):
    await register()
    body = spec_example("notification-alfa.json")
    reply = await doku.post("/doku/notification", body, request_id="notif-1")
    assert reply.status == 200
    assert reply.body == ACK
    assert reply.signature_valid
    [payment] = await payments(pool)
    assert (payment["kind"], payment["amount"], payment["invoice_number"]) == ("normal", 150000, INVOICE)
    assert payment["transaction_ref"] == "5b8e438f-fac1-4103-9e0e-ebfdc38b5acb"  # original_request_id
    assert (payment["agent_id"], payment["agent_store_id"], payment["agent_trx_id"]) == (
        "ALFAMART",
        "TZ01",
        "1246",
    )
    assert payment["paid_at"].isoformat() == "2026-11-25T08:47:10+00:00"
    assert tuple(await code_row(pool)) == ("paid", 1)
    [stored] = await inbox(pool)
    assert bytes(stored["body"]) == body  # the exact bytes
    assert ["Request-Id", "notif-1"] in stored["headers"]
    assert (stored["outcome"], stored["id"]) == ("normal", payment["notification_id"])
    assert await event_types(pool) == ["payment.received"]
    event = await pool.fetchval("SELECT payload FROM events WHERE type = 'payment.received'")
    assert event["code"]["status"] == "paid"
    assert event["amount"] == 150000


async def test_a_paid_code_then_answers_already_paid(doku, register):
    await register()
    await pay(doku)
    reply = await doku.inquiry(CODE)
    assert reply.json()["online_to_offline_inquiry"]["status"] == "billing_already_paid"


# --- exactly once ---------------------------------------------------------------------------------


async def test_fifty_concurrent_copies_record_one_payment(doku, register, pool):
    await register()
    body = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="trx-50")
    replies = await asyncio.gather(*(doku.post("/doku/notification", body) for _ in range(50)))
    assert [reply.status for reply in replies] == [200] * 50
    assert len(await payments(pool)) == 1
    outcomes = sorted(row["outcome"] for row in await inbox(pool))
    assert outcomes == ["normal"] + ["repeat"] * 49
    assert tuple(await code_row(pool)) == ("paid", 1)
    assert await event_types(pool) == ["payment.received"]


async def test_a_retry_hours_later_with_a_new_request_id_and_date_records_nothing(doku, register, pool):
    await register()
    first = await pay(doku, ref="trx-retry")
    later = utcnow() + timedelta(hours=6)
    retry = await pay(
        doku, ref="trx-retry", now=later - timedelta(hours=6, seconds=-1), request_id="another-id"
    )
    again = await doku.post(
        "/doku/notification",
        notification_body(
            CODE, invoice_number=INVOICE, amount=150000, original_request_id="trx-retry", when=later
        ),
        now=utcnow() - timedelta(hours=6),  # signed six hours ago, as an unre-signed retry would be
    )
    assert (first.status, retry.status, again.status) == (200, 200, 200)
    assert len(await payments(pool)) == 1
    assert [row["outcome"] for row in await inbox(pool)] == ["normal", "repeat", "repeat"]


async def test_without_original_request_id_the_store_transaction_identifies_the_payment(doku, register, pool):
    await register()
    for request_id in ("a", "b"):
        reply = await doku.notify(
            CODE, invoice_number=INVOICE, amount=150000, agent_trx_id="1246", request_id=request_id
        )
        assert reply.status == 200
    [payment] = await payments(pool)
    assert payment["transaction_ref"] == "agent:ALFAMART/TZ01/1246"


async def test_a_notification_named_by_its_store_transaction_is_never_taken_for_another(doku, register, pool):
    """(Found by a review of migration 0026.) A payment named by its store transaction can be repeated by a
    notice that also carries an original_request_id only if it came from Check Status, which may leave
    that out. One from DOKU's notification is its own transaction: another with the same store
    transaction number (a placeholder, 0) and its own original_request_id is money taken again, a
    conflict. 0026 as first written took it for a repeat, and the money was in no payment."""
    await register()
    assert (await doku.notify(CODE, invoice_number=INVOICE, amount=150000, agent_trx_id="0")).status == 200
    assert (await pay(doku, ref="Y", agent_trx_id="0")).status == 200
    recorded = [(row["kind"], row["transaction_ref"], row["notified_ref"]) for row in await payments(pool)]
    assert recorded == [("normal", "agent:ALFAMART/TZ01/0", None), ("conflict", "Y", None)]


async def test_without_any_reference_the_request_id_identifies_the_payment(doku, register, pool):
    await register()
    await doku.notify(CODE, invoice_number=INVOICE, amount=150000, request_id="only-this")
    await doku.notify(CODE, invoice_number=INVOICE, amount=150000, request_id="only-this")
    [payment] = await payments(pool)
    assert payment["transaction_ref"] == "request:only-this"


async def test_two_store_transactions_racing_on_a_one_shot_code_are_one_payment_and_one_conflict(
    doku, register, pool
):
    await register()
    first = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="counter-A")
    second = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="counter-B")
    bodies = [first, second] * 10
    replies = await asyncio.gather(*(doku.post("/doku/notification", body) for body in bodies))
    assert {reply.status for reply in replies} == {200}
    kinds = sorted((row["kind"], row["transaction_ref"]) for row in await payments(pool))
    assert [kind for kind, _ in kinds] == ["conflict", "normal"]
    assert {ref for _, ref in kinds} == {"counter-A", "counter-B"}
    conflict = await pool.fetchrow("SELECT * FROM payments WHERE kind = 'conflict'")
    assert conflict["reason"] == "ALREADY_PAID"
    assert tuple(await code_row(pool)) == ("paid", 1)
    assert sorted(await event_types(pool)) == ["payment.conflict", "payment.received"]


async def test_each_invoice_of_a_reusable_code_is_one_payment(doku, register, pool):
    await register(reusable=True, invoice_number="TOPUP")
    invoices = []
    for _ in range(3):
        reply = await doku.inquiry(CODE)
        invoices.append((reply.request_id, reply.json()["order"]["invoice_number"]))
    notifications = [
        pay(doku, invoice=invoice, amount=150000, ref=request_id)
        for request_id, invoice in invoices
        for _ in range(5)
    ]
    replies = await asyncio.gather(*notifications)
    assert {reply.status for reply in replies} == {200}
    rows = await payments(pool)
    assert sorted(row["invoice_number"] for row in rows) == ["TOPUP-1", "TOPUP-2", "TOPUP-3"]
    assert {row["kind"] for row in rows} == {"normal"}
    assert tuple(await code_row(pool)) == ("active", 3)
    assert (await doku.inquiry(CODE)).status == 200  # still payable


async def test_payments_of_one_reusable_code_at_once_are_each_counted_once_and_decided_once(
    client, admin_headers, doku, register, pool, capsys
):
    """Every normal payment of a reusable code moves its count. The recording counts relative to the row
    as it is and compares the code without what counting moves, so payments of one code at once are not
    decided again; each event shows the code exactly as its own payment left it."""
    await register(reusable=True, invoice_number="TOPUP")
    count = 24
    quotes = [await doku.inquiry(CODE) for _ in range(count)]
    capsys.readouterr()
    invoices = [(quote.json()["order"]["invoice_number"], quote.request_id) for quote in quotes]
    replies = await asyncio.gather(*(pay(doku, invoice=invoice, ref=ref) for invoice, ref in invoices))
    assert {reply.status for reply in replies} == {200}
    assert {row["kind"] for row in await payments(pool)} == {"normal"}
    assert tuple(await code_row(pool)) == ("active", count)
    events = await pool.fetch("SELECT payload FROM events WHERE type = 'payment.received' ORDER BY id")
    codes = [event["payload"]["code"] for event in events]
    assert sorted(code["paid_count"] for code in codes) == list(range(1, count + 1))
    assert len({code["version"] for code in codes}) == count
    # The last count's event shows the code as the API does now, member for member.
    last = max(codes, key=lambda code: code["paid_count"])
    assert last == await (await client.get(f"/v1/payment-codes/{CODE}", headers=admin_headers)).json()
    assert capsys.readouterr().out.count("notification.decided_again") == 0


async def test_a_second_transaction_for_one_reusable_invoice_is_a_conflict(doku, register, pool):
    await register(reusable=True, invoice_number="TOPUP")
    invoice = (await doku.inquiry(CODE)).json()["order"]["invoice_number"]
    await pay(doku, invoice=invoice, ref="store-1")
    await pay(doku, invoice=invoice, ref="store-2")
    assert [(row["kind"], row["reason"]) for row in await payments(pool)] == [
        ("normal", None),
        ("conflict", "INVOICE_ALREADY_PAID"),
    ]
    assert tuple(await code_row(pool)) == ("active", 1)


async def test_the_quoted_amount_is_accepted_after_the_merchant_changed_it(
    client, doku, register, admin_headers, pool
):
    await register()
    await doku.inquiry(CODE)  # quotes 150000
    await client.patch(f"/v1/payment-codes/{CODE}", json={"amount": 175000}, headers=admin_headers)
    await pay(doku, amount=150000)
    assert [row["kind"] for row in await payments(pool)] == ["normal"]


# --- anomalies -----------------------------------------------------------------------------------


async def assert_anomaly(doku, pool, reason: str, *, code=CODE, **pay_kwargs):
    reply = await pay(doku, code=code, **pay_kwargs)
    assert reply.status == 200
    assert reply.body == ACK
    [payment] = await payments(pool)
    assert (payment["kind"], payment["reason"]) == ("anomaly", reason)
    assert await event_types(pool) == ["payment.anomaly"]
    return payment


async def test_a_wrong_amount_is_an_anomaly_and_the_code_stays_unpaid(doku, register, pool):
    await register()
    payment = await assert_anomaly(doku, pool, "AMOUNT_MISMATCH", amount=15000)
    assert (payment["amount"], payment["expected_amount"]) == (15000, 150000)
    assert tuple(await code_row(pool)) == ("active", 0)


async def test_an_unknown_code_is_an_anomaly(doku, pool):
    await assert_anomaly(doku, pool, "UNKNOWN_CODE", code="8896599999999999")


async def test_another_merchants_code_is_an_anomaly(doku, register, pool):
    await register(client_id=OTHER_CLIENT_ID)
    await assert_anomaly(doku, pool, "OTHER_CLIENT")
    assert tuple(await code_row(pool)) == ("active", 0)


async def test_an_unknown_invoice_of_a_one_shot_code_is_an_anomaly(doku, register, pool):
    await register()
    await assert_anomaly(doku, pool, "UNKNOWN_INVOICE", invoice="INV-OTHER")
    assert tuple(await code_row(pool)) == ("active", 0)


async def test_an_invoice_no_inquiry_minted_for_a_reusable_code_is_an_anomaly(doku, register, pool):
    await register(reusable=True, invoice_number="TOPUP")
    await assert_anomaly(doku, pool, "UNKNOWN_INVOICE", invoice="TOPUP-99")
    assert tuple(await code_row(pool)) == ("active", 0)


async def test_a_payment_of_a_cancelled_code_is_an_anomaly(client, doku, register, admin_headers, pool):
    await register()
    await client.post(f"/v1/payment-codes/{CODE}/cancel", headers=admin_headers)
    await assert_anomaly(doku, pool, "CANCELLED")
    assert tuple(await code_row(pool)) == ("cancelled", 0)


async def test_a_payment_after_expiry_is_an_anomaly(doku, register, pool):
    await register(expires_at=(utcnow() + timedelta(hours=1)).isoformat())
    await pool.execute("UPDATE payment_codes SET expires_at = now() - interval '1 minute'")
    await assert_anomaly(doku, pool, "EXPIRED")
    assert tuple(await code_row(pool)) == ("active", 0)


async def test_a_payment_made_before_expiry_and_notified_after_is_normal(doku, register, pool):
    await register(expires_at=(utcnow() + timedelta(hours=1)).isoformat())
    await pool.execute("UPDATE payment_codes SET expires_at = now() - interval '1 minute'")
    body = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="t",
                             when=utcnow() - timedelta(minutes=5))  # fmt: skip
    assert (await doku.post("/doku/notification", body)).status == 200
    assert [row["kind"] for row in await payments(pool)] == ["normal"]


async def test_a_transaction_that_did_not_succeed_is_stored_and_changes_nothing(doku, register, pool):
    await register()
    reply = await pay(doku, status="FAILED")
    assert reply.status == 200
    assert await payments(pool) == []
    [stored] = await inbox(pool)
    assert (stored["outcome"], stored["transaction_status"]) == ("ignored", "FAILED")
    assert tuple(await code_row(pool)) == ("active", 0)
    assert await event_types(pool) == []


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "age"),
    [("SK-wrong", timedelta(0)), (None, timedelta(days=8)), (None, -timedelta(seconds=301))],
    ids=["wrong-key", "older-than-max-age", "future"],
)
async def test_an_unauthenticated_notification_changes_nothing(client, register, pool, key, age):
    await register()
    signer = Client(CLIENT_ID, (key.encode(),)) if key else CLIENT
    doku = DokuSimulator(client.session, str(client.make_url("")), signer)
    reply = await pay(doku, now=utcnow() - age)
    assert reply.status == 401
    assert orjson.loads(reply.body)["status"] == "invalid_signature"
    assert reply.signature_valid is None
    assert await inbox(pool) == []
    assert await payments(pool) == []


async def test_a_signed_but_unusable_notification_is_kept_and_refused(doku, pool):
    body = b'{"online_to_offline_info":{"payment_code":"8896512345678123"},"order":{"amount":"lots"}}'
    reply = await doku.post("/doku/notification", body)
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "INVALID_FIELD"
    assert reply.signature_valid
    [stored] = await inbox(pool)
    assert (stored["outcome"], stored["payment_code"], bytes(stored["body"])) == ("rejected", CODE, body)
    not_json = await doku.post("/doku/notification", b"\x00garbage")
    assert not_json.status == 400
    assert len(await inbox(pool)) == 2


async def test_an_amount_written_as_text_is_still_money(doku, register, pool):
    await register()
    body = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="t")
    reply = await doku.post("/doku/notification", body.replace(b'"amount":150000', b'"amount":"150000"'))
    assert reply.status == 200
    assert [row["kind"] for row in await payments(pool)] == ["normal"]


async def test_a_hanging_database_gets_503_and_the_retry_records_it(
    aiohttp_client, pool, database_url, admin_headers
):
    client = await aiohttp_client(make_app(make_settings(notification_db_timeout_s=0.5), database_url))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    async with table_locked(pool):
        reply = await pay(doku, code="8896599999999999")  # answered while the table is still locked
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "UNAVAILABLE"
    assert "did not answer within 0.5 s" in reply.json()["error"]["message"]
    assert await inbox(pool) == []  # a 503 promises nothing: DOKU retries
    assert (await pay(doku, code="8896599999999999")).status == 200
    assert len(await payments(pool)) == 1


async def test_payments_are_listed_by_kind(client, doku, register, admin_headers):
    await register()
    await pay(doku, ref="A")
    await pay(doku, ref="B")
    conflicts = await (
        await client.get("/v1/payments", params={"kind": "conflict"}, headers=admin_headers)
    ).json()
    [conflict] = conflicts["items"]
    assert (conflict["transaction_ref"], conflict["reason"], conflict["payment_code"]) == (
        "B",
        "ALREADY_PAID",
        CODE,
    )


async def test_a_cancel_racing_a_notification_never_leaves_both_believing_they_won(
    client, doku, register, admin_headers, pool
):
    codes = [f"88965000000{n:05d}" for n in range(30)]
    for code in codes:
        await register(payment_code=code)

    async def cancel(code: str) -> int:
        return (await client.post(f"/v1/payment-codes/{code}/cancel", headers=admin_headers)).status

    results = await asyncio.gather(
        *(coroutine for code in codes for coroutine in (cancel(code), pay(doku, code=code)))
    )
    for index, code in enumerate(codes):
        cancel_status, notify_reply = results[2 * index], results[2 * index + 1]
        assert notify_reply.status == 200
        kind = await pool.fetchval("SELECT kind FROM payments WHERE payment_code = $1", code)
        status = (await code_row(pool, code))["status"]
        if cancel_status == 200:  # the merchant was told "cancelled": the money is an anomaly to settle
            assert (status, kind) == ("cancelled", "anomaly")
        else:  # the payment won: the code is paid and the cancel was refused
            assert (cancel_status, status, kind) == (409, "paid", "normal")


async def test_a_notification_waits_for_a_cancel_in_progress_and_then_sees_it(doku, register, pool):
    await register()
    async with pool.acquire() as conn, conn.transaction():
        # A cancel holds the code's row while the notification arrives.
        await conn.execute("SELECT 1 FROM payment_codes WHERE payment_code = $1 FOR UPDATE", CODE)
        notification = asyncio.create_task(pay(doku))
        await asyncio.sleep(0.3)  # give it time to reach the database (and, were it not to wait, to decide)
        assert not notification.done()
        await conn.execute("UPDATE payment_codes SET status = 'cancelled' WHERE payment_code = $1", CODE)
    assert (await notification).status == 200
    assert [(row["kind"], row["reason"]) for row in await payments(pool)] == [("anomaly", "CANCELLED")]
    assert tuple(await code_row(pool)) == ("cancelled", 0)


@pytest.mark.parametrize(
    ("cancelled", "kind", "reason", "code_after"),
    [(False, "normal", None, ("paid", 1)), (True, "anomaly", "CANCELLED", ("cancelled", 0))],
)
async def test_a_notification_waiting_for_the_lock_reads_what_its_holder_recorded(
    client, doku, register, admin_headers, pool, cancelled, kind, reason, code_after
):
    """A notification is decided on what it read without a lock, and recorded only if that is still so
    once it holds the code's row lock. Here the lock's holder is reconciliation recording the payment
    from a Check Status answer that named no transaction; DOKU's notification of the same payment (same
    invoice and amount) waits for it, then must be a repeat. Recorded on what it read before the wait it
    would be a second payment: a conflict, or for a cancelled code a second anomaly, either a refund of
    money the customer paid once. (For the active code the one-normal-payment index would catch it too.)"""
    await register()
    if cancelled:
        assert (await client.post(f"/v1/payment-codes/{CODE}/cancel", headers=admin_headers)).status == 200
    answer = stored(NotificationOutcome(kind), "check-1", "check_status")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM payment_codes WHERE payment_code = $1 FOR UPDATE", CODE)
        notification = asyncio.create_task(pay(doku))
        await waiting_for_a_lock(pool, "dipc_payment_context")
        # What reconciliation records for that answer (core/reconciliation.py), under the same lock.
        notification_id = await inbox_store.insert(conn, answer)
        await conn.execute(
            """
            INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, reason, amount,
                                  expected_amount, client_id, channel, notification_id, source)
            VALUES ($1, $2, $3, $4, $5, 150000, 150000, $6, 'ALFA', $7, 'check_status')
            """,
            CODE,
            INVOICE,
            conventions.check_status_reference(INVOICE),
            kind,
            reason,
            CLIENT_ID,
            notification_id,
        )
        if not cancelled:
            await conn.execute(
                "UPDATE payment_codes SET status = 'paid', paid_count = 1, version = version + 1"
                " WHERE payment_code = $1",
                CODE,
            )
    assert (await notification).status == 200
    assert [(row["transaction_ref"], row["kind"]) for row in await payments(pool)] == [
        (f"check-status:{INVOICE}", kind)
    ]
    assert [row["outcome"] for row in await inbox(pool)] == [kind, "repeat"]
    assert tuple(await code_row(pool)) == code_after


# What may change between a notification's read and its recording, each a fact the decision rests on.
# None of them changes the code's version: the recording compares the facts themselves.
CHANGES = {  # each with the code ($1), the invoice ($2) and the transaction's reference ($3)
    "the code": (
        "UPDATE payment_codes SET customer_name = 'Siti'"
        " WHERE payment_code = $1 AND invoice_number = $2 AND $3::text IS NOT NULL"
    ),
    "this very transaction recorded": (
        "INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, reason, amount,"
        " client_id, channel, notification_id)"
        " VALUES ($1, $2, $3, 'anomaly', 'EXPIRED', 150000, 'X', 'ALFA', 0)"
    ),
    "the invoice paid": (
        "INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, amount, client_id,"
        " channel, notification_id) VALUES ($1, $2, $3 || '-other', 'normal', 150000, 'X', 'ALFA', 0)"
    ),
    "another amount quoted": (
        "INSERT INTO inquiries (payment_code, request_id, client_id, channel, body_sha256, outcome,"
        " invoice_number, amount, http_status, response_body)"
        " VALUES ($1, $3, 'X', 'ALFA', '', 'SUCCESS', $2, 175000, 200, '')"
    ),
}


async def test_a_payment_that_waited_for_its_code_lock_is_not_left_behind_a_reader_paging_by_id(
    client, doku, register, admin_headers, pool
):
    """Finance pages the exception queue (and anyone /v1/payments or the inbox) by id, keeping the last
    id seen. A payment's id is given once its recording holds the code's row lock, so a notification that
    waited for the lock does not commit with an id smaller than one already shown. (Found by review: the
    ids were first taken by the read, before the wait.)"""
    await register()
    assert (await client.post(f"/v1/payment-codes/{CODE}/cancel", headers=admin_headers)).status == 200
    async with pool.acquire() as holder:
        async with holder.transaction():
            # Anything holding the code's row: a cancel, an edit, a casework resolution, another payment.
            await holder.execute("SELECT 1 FROM payment_codes WHERE payment_code = $1 FOR UPDATE", CODE)
            waiting = asyncio.create_task(pay(doku))  # an anomaly: the code is cancelled
            await waiting_for_a_lock(pool, "dipc_payment_context")
            other = await pay(doku, code="8896599999999999", invoice="INV-X", ref="trx-2")  # no code to lock
            assert other.status == 200
            page = await (await client.get("/v1/exceptions", headers=admin_headers)).json()
            [cursor] = [item["payment_id"] for item in page["items"]]
            [inbox_cursor] = [row["id"] for row in await inbox(pool)]
        assert (await waiting).status == 200
    after = await (await client.get(f"/v1/exceptions?after={cursor}", headers=admin_headers)).json()
    assert [item["payment_code"] for item in after["items"]] == [CODE]
    after = await (await client.get(f"/v1/payments?after={cursor}", headers=admin_headers)).json()
    assert [item["payment_code"] for item in after["items"]] == [CODE]
    assert [row["payment_code"] for row in await inbox(pool) if row["id"] > inbox_cursor] == [CODE]
    [event] = [
        row["payload"]
        for row in await pool.fetch("SELECT payload FROM events WHERE payment_code = $1", CODE)
        if row["payload"].get("kind") == "anomaly"
    ]
    row = await pool.fetchrow("SELECT id, notification_id FROM payments WHERE payment_code = $1", CODE)
    assert (event["id"], event["notification_id"]) == (row["id"], row["notification_id"])


async def test_a_payment_recorded_alone_takes_its_ids_after_its_invoices_lock(
    client, doku, register, admin_headers, pool, database_url
):
    """(Found by review.) The same for the invoice's reconciliation row, which the recording settles:
    whoever holds it (an inquiry's batch that quoted the invoice and waits for another lock, a
    reconciler) is waited for before the recording takes its ids, not after. A recording alone (its
    batch refused, or decided again under the lock) locks it itself (migration 0016)."""
    await register()
    assert (await doku.inquiry(CODE)).status == 200  # quoted: the invoice has its reconciliation row
    notice = paid_notice()
    held = rows_held(database_url, CODE, table="reconciliation")
    async with held as [holder], outbox.connection(pool) as conn:
        context = await payment_store.read_context(
            conn, CODE, INVOICE, notice.transaction_ref, notice.amount, unnamed_ref="check-status:x"
        )
        decision = decide_payment(notice, context.code, context.history, utcnow())
        payment = planned_payment(notice, decision, context, "notification")
        event = ("payment.received", {"code": {}})
        recording = asyncio.create_task(
            payment_store.record(conn, context, stored(decision.outcome, "r-1"), payment, event)
        )
        await waiting_for_a_lock(pool, "dipc_payment_context_within")
        other = await pay(doku, code="8896599999999999", invoice="INV-X", ref="trx-2")  # no code to lock
        assert other.status == 200
        page = await (await client.get("/v1/payments", headers=admin_headers)).json()
        cursor = max(item["id"] for item in page["items"])
        await holder.execute("COMMIT")
        assert await recording is not None
    after = await (await client.get(f"/v1/payments?after={cursor}", headers=admin_headers)).json()
    assert [item["payment_code"] for item in after["items"]] == [CODE]


def refused_payment_batches() -> float:
    """Batches of recordings refused by the database so far (their writes then made alone)."""
    [family] = metrics.DB_DURATION.collect()
    return sum(
        sample.value
        for sample in family.samples
        if sample.name.endswith("_count")
        and sample.labels == {"operation": "payment.batch", "result": "error"}
    )


async def test_a_notification_the_database_gives_up_for_a_deadlock_is_answered_503(
    client, doku, register, pool, database_url
):
    """(Found by review.) A transaction that takes an invoice's reconciliation row and then its code's
    (an operator closing an unpaid bill by hand) and a recording alone, which takes them the other way
    round, form a cycle; PostgreSQL breaks it by giving one of them up (40P01). When that one is dipc's,
    nothing was written: DOKU gets a 503, as for a database that could not serve it, and retries. So does
    a write refused by a lock_timeout (55P03) outside a batch. Not a 500 and a traceback."""
    await register()
    assert (await doku.inquiry(CODE)).status == 200  # quoted: the invoice has its reconciliation row
    refused_before = refused_payment_batches()
    operator = await asyncpg.connect(database_url)
    try:
        await operator.execute("BEGIN")
        await operator.execute(
            "UPDATE reconciliation SET state = 'expired', next_check_at = NULL WHERE payment_code = $1", CODE
        )
        paid = asyncio.create_task(pay(doku))
        for _ in range(500):  # its batch of one waits 100 ms for the invoice's row, is refused, goes alone
            if refused_payment_batches() > refused_before:
                break
            await asyncio.sleep(0.01)
        await waiting_for_a_lock(pool, "dipc_payment_context_within")  # alone: holds the code's row
        closing = asyncio.create_task(
            operator.execute("UPDATE payment_codes SET status = 'cancelled' WHERE payment_code = $1", CODE)
        )
        reply = await paid
        await asyncio.wait_for(closing, 5)  # PostgreSQL gave the recording up, not the operator
        await operator.execute("ROLLBACK")
    finally:
        await operator.close()
    assert reply.status == 503, reply.body
    assert reply.json()["error"]["code"] == "UNAVAILABLE"
    assert await pool.fetchval("SELECT count(*) FROM payments") == 0
    assert (await pay(doku)).status == 200  # DOKU's retry


async def test_a_recording_of_a_dipc_from_before_migration_0016_still_records(register, pool):
    """While a deploy replaces the workers, those from before migration 0016 call the recording's function
    with seven arguments: that one is kept, as the new one without a batch's invoices."""
    await register()
    invoices = r",\s*CASE r\.ordinality WHEN 1 THEN \$4::text\[\] END\) AS c"
    before_0016 = re.sub(invoices, ") AS c", _before_0026())
    assert before_0016 != _before_0026()
    async with outbox.connection(pool) as conn:
        [row] = await conn.fetch(before_0016, [await _old_recording(conn)], None, None)
    await _recorded_once(pool, row)


async def test_a_notification_of_a_dipc_from_before_migration_0026_still_reads_and_records(register, pool):
    """While a deploy replaces the workers, those from before migration 0026 read with the history's five
    arguments and record with eight: those functions are kept, as the new ones without a store
    transaction's reference."""
    await register()
    notice = paid_notice()
    async with outbox.connection(pool) as conn:
        row = await conn.fetchrow(
            payment_store._READ_CONTEXT[False].replace(", $6, $7)", ")").replace("_by_source", ""),
            CODE,
            INVOICE,
            notice.transaction_ref,
            notice.amount,
            "check-status:x",
        )
        assert (row["repeat"], row["invoice_paid"]) == (False, False)
        [row] = await conn.fetch(_before_0026(), [await _old_recording(conn)], None, None, None)
    await _recorded_once(pool, row)


async def test_a_notification_of_a_dipc_from_before_migration_0032_still_reads_and_records(register, pool):
    """While a deploy replaces the workers, those of migrations 0030 and 0031 read the history and record
    through the functions named _by_ids, without the notice's source: those are kept."""
    await register()
    notice = paid_notice()
    async with outbox.connection(pool) as conn:
        row = await conn.fetchrow(
            _read_before_0032(),
            CODE,
            INVOICE,
            notice.transaction_ref,
            notice.amount,
            "check-status:x",
            None,
        )
        assert (row["repeat"], row["invoice_paid"]) == (False, False)
        recording = await _old_recording(conn)
        [row] = await conn.fetch(_before_0032(), [recording], None, None, None, [None])
    await _recorded_once(pool, row)


def store_notice(ref: str, agent: tuple[str | None, str | None, str]) -> PaymentNotice:
    """The spec's bill paid by the store transaction ``agent`` (AGENT_ID, AGENT_STORE_ID, AGENT_TRX_ID)."""
    return replace(paid_notice(ref=ref), agent_id=agent[0], agent_store_id=agent[1], agent_trx_id=agent[2])


async def test_a_worker_from_before_0032_and_one_after_record_a_transaction_once(register, pool):
    """(Found by a review of migration 0032.) During a deploy, DOKU's notification without
    original_request_id of a transaction whose Check Status answer was recorded by fewer ids reached a
    worker of 0031 and one of 0032 at once (a notification may come concurrently with its own retry). The
    old one recorded a conflict, holding the code's row lock until its commit; the new one matched the
    notification with the answer's payment without that lock, unseen by the old one: the one transaction
    was recorded twice. A notice is matched with a payment only under the code's row lock now."""
    await register()
    answer = store_notice("agent://1246", (None, None, "1246"))
    raw_answer = notifications.RawNotification(
        CLIENT_ID, "answer", [], b"{}", source=notifications.CHECK_STATUS_SOURCE
    )
    await notifications.record_notification(pool, raw_answer, answer, now=utcnow())
    ref = "agent:ALFAMART/TZ01/1246"
    notice = store_notice(ref, ("ALFAMART", "TZ01", "1246"))
    old = await pool.acquire()
    try:
        transaction = old.transaction()
        await transaction.start()
        # The old worker: its read (0031's, which gave such a notification no agent_ref) and its recording.
        row = await old.fetchrow(
            _read_before_0032(), CODE, INVOICE, ref, notice.amount, f"check-status:{INVOICE}", None
        )
        context = payment_store._context(row, f"check-status:{INVOICE}", None)
        decision = decide_payment(notice, context.code, context.history, utcnow())
        assert decision.kind is PaymentKind.CONFLICT
        payment = planned_payment(notice, decision, context, "notification")
        recording = payment_store._recording(
            context, stored(decision.outcome, "old"), payment, ("payment.conflict", {})
        )
        await old.fetch(_before_0032(), [recording[:-1]], None, None, None, [None])
        # The new worker, meanwhile.
        new = asyncio.ensure_future(
            notifications.record_notification(
                pool, notifications.RawNotification(CLIENT_ID, "new", [], b"{}"), notice, now=utcnow()
            )
        )
        await asyncio.wait({new}, timeout=2.0)
        await transaction.commit()
    finally:
        await pool.release(old)
    result = await asyncio.wait_for(new, 10)
    assert result.outcome is NotificationOutcome.REPEAT
    recorded = [(row["kind"], row["transaction_ref"], row["notified_ref"]) for row in await payments(pool)]
    assert recorded == [("normal", "agent://1246", None), ("conflict", ref, None)]


def _read_before_0032() -> str:
    """The unlocked read of a dipc of migrations 0030 and 0031: the history named _by_ids, without the
    notice's source."""
    return payment_store._READ_CONTEXT[False].replace(", $7)", ")").replace("_by_source", "_by_ids")


def _before_0032() -> str:
    """The recording statement of a dipc of migrations 0030 and 0031: no source in its call of the
    history's functions, named _by_ids."""
    statement = re.sub(r"\[r\.ordinality\],\s*r\.source,", "[r.ordinality],", payment_store._RECORD)
    statement = statement.replace("_by_source", "_by_ids")
    assert "r.source," not in statement
    return statement


def _before_0026() -> str:
    """The recording statement of a dipc from before migration 0026: no agent_ref ($5) nor source in its
    call, and the functions' names from before 0030."""
    agent_ref = r"\(\$5::text\[\]\)\[r\.ordinality\],\s*r\.source,\s*"
    statement = re.sub(agent_ref, "", payment_store._RECORD).replace("_by_source", "")
    assert statement != payment_store._RECORD
    return statement


async def _old_recording(conn) -> tuple:
    """A first-time notice's recording, read and decided now, as a dipc before 0026 encodes it (without
    the agent_ref that follows the dipc_recording)."""
    notice = paid_notice()
    context = await payment_store.read_context(
        conn, CODE, INVOICE, notice.transaction_ref, notice.amount, unnamed_ref="check-status:x"
    )
    decision = decide_payment(notice, context.code, context.history, utcnow())
    payment = planned_payment(notice, decision, context, "notification")
    event = ("payment.received", {"code": {}})
    return payment_store._recording(context, stored(decision.outcome, "r-1"), payment, event)[:-1]


async def _recorded_once(pool, row) -> None:
    assert row["payment_id"] is not None
    assert tuple(await code_row(pool)) == ("paid", 1)
    assert [row["outcome"] for row in await inbox(pool)] == ["normal"]


@pytest.mark.parametrize("change", [None, *CHANGES])
async def test_a_recording_writes_only_what_it_was_decided_on(register, pool, change):
    """``payments.record`` writes nothing when any fact the notice was decided on changed since it was
    read (without a lock); the notification is then read and decided again. Without a change it writes."""
    await register()
    notice = paid_notice()
    async with outbox.connection(pool) as conn:
        context = await payment_store.read_context(
            conn, CODE, INVOICE, notice.transaction_ref, notice.amount, unnamed_ref="check-status:x"
        )
        decision = decide_payment(notice, context.code, context.history, utcnow())
        assert decision.kind is PaymentKind.NORMAL
        if change is not None:
            await pool.execute(CHANGES[change], CODE, INVOICE, notice.transaction_ref)
        payment = planned_payment(notice, decision, context, "notification")
        values = stored(decision.outcome, "r-1")
        event = ("payment.received", {"code": {}})
        recorded = await payment_store.record(conn, context, values, payment, event)
    mine = "FROM payments WHERE transaction_ref = $1 AND kind = 'normal'"
    written = await pool.fetchval(f"SELECT count(*) {mine}", notice.transaction_ref)
    if change is None:
        assert recorded is not None
        ids = await pool.fetchrow(f"SELECT id, notification_id {mine}", notice.transaction_ref)
        assert recorded.payment == replace(payment, id=ids["id"], notification_id=ids["notification_id"])
        assert written == 1
        assert tuple(await code_row(pool)) == ("paid", 1)
        assert [row["outcome"] for row in await inbox(pool)] == ["normal"]
        assert await event_types(pool) == ["payment.received"]
    else:
        assert recorded is None
        assert written == 0
        assert tuple(await code_row(pool)) == ("active", 0)
        assert await inbox(pool) == []
        assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ((b'"amount":150000', b'"amount":' + str(2**64).encode()), "order.amount"),
        (
            (b'"invoice_number":"INV-2026-000123"', b'"invoice_number":"' + b"I" * 65 + b'"'),
            "order.invoice_number",
        ),
        (
            (b'"original_request_id":"t"', b'"original_request_id":"' + b"r" * 3000 + b'"'),
            "original_request_id",
        ),
        ((b'"value":"TZ01"', b'"value":"' + b"S" * 3000 + b'"'), "identifier"),
    ],
)
async def test_values_too_big_to_key_a_payment_are_refused_and_kept(doku, register, pool, change, field):
    await register()
    body = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="t")
    reply = await doku.post("/doku/notification", body.replace(*change))
    assert reply.status == 400
    assert field in reply.json()["error"]["message"]
    assert [row["outcome"] for row in await inbox(pool)] == ["rejected"]
    assert await payments(pool) == []


HISTORY = "dipc_payment_history_by_source(text, text, text, bigint, text, text, text)"


@contextlib.asynccontextmanager
async def history_saying_repeat_for(pool: asyncpg.Pool, reference: str) -> AsyncIterator[None]:
    """The database's history (renamed aside and wrapped, then put back) says "repeat" for ``reference``,
    which no payment has: a notice of it is then undecidable, as with two versions during a deploy."""
    await pool.execute(f"ALTER FUNCTION {HISTORY} RENAME TO dipc_payment_history_by_source_aside")
    try:
        await pool.execute(f"""
            CREATE FUNCTION dipc_payment_history_by_source(
                p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint,
                p_unnamed_ref text, p_agent_ref text, p_source text,
                OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
            RETURNS SETOF record LANGUAGE sql STABLE AS $$
                SELECT h.repeat OR p_transaction_ref = '{reference}', h.invoice_paid, h.quoted_amounts
                  FROM dipc_payment_history_by_source_aside(p_payment_code, p_invoice_number,
                                                            p_transaction_ref, p_amount, p_unnamed_ref,
                                                            p_agent_ref, p_source) AS h
            $$""")  # noqa: S608 - a test's own constant
        yield
    finally:
        await pool.execute(f"DROP FUNCTION IF EXISTS {HISTORY}")
        await pool.execute(
            "ALTER FUNCTION dipc_payment_history_by_source_aside(text, text, text, bigint, text, text, text)"
            " RENAME TO dipc_payment_history_by_source"
        )


async def test_a_notice_whose_read_and_recording_disagree_is_refused_not_decided_for_ever(
    doku, register, pool, capsys
):
    """(Found by a review of migration 0029.) A notice is decided again when what it was decided on changed
    before its recording held the code's row lock; the second time it holds that lock from its read on, so
    nothing can change. If the read still says "repeat" and the repeat's statement finds nothing (this dipc
    and the database's functions of two versions, during a deploy; or a bug), it was decided again about
    6,000 times in 5 s, each time taking the code's row lock, and then answered 503 with nothing said.
    Now it is refused after a few tries, with an error line, and DOKU retries. Here the database's history
    is made to say "repeat" for one reference that no payment has (renamed aside and wrapped, then put
    back)."""
    await register()
    async with history_saying_repeat_for(pool, "undecidable"):
        capsys.readouterr()
        reply = await pay(doku, ref="undecidable")
        log = capsys.readouterr().out
    decisions = log.count("notification.decided_again")
    assert log.count("notification.undecidable") == 1, f"{reply.status} after {decisions} decisions"
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "UNAVAILABLE"
    # Decided once without the lock, then LOCKED_DECISIONS_MAX times with it.
    assert decisions == 1 + notifications.LOCKED_DECISIONS_MAX
    assert await payments(pool) == []
    assert (await pay(doku)).status == 200  # and the next notification is recorded as ever


async def test_a_notice_undone_by_quotes_of_edited_amounts_is_recorded_not_refused(
    client, doku, register, admin_headers, pool, monkeypatch, capsys
):
    """(Found by a review of fe530d8.) Holding the code's row lock does not hold its quoted amounts: an
    inquiry of a one-shot code reads it without that lock, and a quote of an amount edited since can
    commit while a notice is being decided, which the recording then finds changed. Here an admin edit
    comes before each of four reads, and a customer's inquiry quoting it after each: the notice is recorded
    on its fifth decision, as before the bound, not refused after three locked ones."""
    await register()
    edits = 0
    read = payment_store.read_context

    async def read_while_the_amount_is_edited(conn, *args, **kwargs):
        nonlocal edits
        edit = edits < 4
        if edit:
            edits += 1
            edited = await client.patch(
                f"/v1/payment-codes/{CODE}", json={"amount": 150000 + edits}, headers=admin_headers
            )
            assert edited.status == 200
        context = await read(conn, *args, **kwargs)
        if edit:
            assert (await doku.inquiry(CODE)).status == 200  # quotes the edited amount, without the lock
        return context

    monkeypatch.setattr(payment_store, "read_context", read_while_the_amount_is_edited)
    capsys.readouterr()
    raw = notifications.RawNotification(CLIENT_ID, "n-1", [], b"{}")
    result = await notifications.record_notification(pool, raw, paid_notice(), now=utcnow())
    assert result.payment is not None
    assert capsys.readouterr().out.count("notification.decided_again") == 4
