"""Exceptions (spec §9) against the real app and PostgreSQL: conflicts and anomalies made by real signed
notifications, listed, resolved once, with their effect, event and metrics."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest

from server.core.times import utcnow
from server.doku.client import DokuSimulator
from tests.conftest import CODE, OTHER_CLIENT, OTHER_CLIENT_ID
from tests.integration.test_metrics import sampled, scrape, value

INVOICE = "INV-2026-000123"
REUSABLE = "8896512345678124"
RESOLVE = {"resolution": "refunded", "resolved_by": "finance@merchant", "note": "refund 991 sent"}


async def pay(doku: DokuSimulator, *, code=CODE, invoice=INVOICE, amount=150000, ref="trx-1"):
    reply = await doku.notify(code, invoice_number=invoice, amount=amount, original_request_id=ref)
    assert reply.status == 200, reply.body
    return reply


async def payment_id(pool: asyncpg.Pool, ref: str) -> int:
    return await pool.fetchval("SELECT id FROM payments WHERE transaction_ref = $1", ref)


async def listing(client, admin_headers, query: str = "") -> dict:
    response = await client.get(f"/v1/exceptions{query}", headers=admin_headers)
    assert response.status == 200, await response.text()
    return await response.json()


async def resolve(client, admin_headers, pid: int, **fields):
    return await client.post(f"/v1/exceptions/{pid}/resolve", json=RESOLVE | fields, headers=admin_headers)


@pytest.fixture
async def exceptions(doku, register, pool) -> dict[str, int]:
    """A normal payment, then a conflict (paid twice) and an anomaly (wrong amount) on a second code."""
    await register()
    await register(payment_code="8896512345678125", invoice_number="INV-2")
    await pay(doku, ref="normal")
    await pay(doku, ref="twice")  # ALREADY_PAID conflict
    await pay(doku, code="8896512345678125", invoice="INV-2", amount=1, ref="short")  # AMOUNT_MISMATCH
    return {name: await payment_id(pool, name) for name in ("normal", "twice", "short")}


# --- the queue -------------------------------------------------------------------------------------


async def test_conflicts_and_anomalies_are_open_exceptions_oldest_first(client, admin_headers, exceptions):
    page = await listing(client, admin_headers)
    assert page["next"] is None
    assert [item["payment_id"] for item in page["items"]] == [exceptions["twice"], exceptions["short"]]
    conflict, anomaly = page["items"]
    assert conflict | {"recorded_at": None} == {
        "payment_id": exceptions["twice"],
        "payment_code": CODE,
        "invoice_number": INVOICE,
        "amount": 150000,
        "expected_amount": 150000,
        "kind": "conflict",
        "reason": "ALREADY_PAID",
        "state": "open",
        "recorded_at": None,
        "client_id": "MCH-0001-10791114622547",
        "channel": "ALFA",
        "transaction_ref": "twice",
        "paid_at": conflict["paid_at"],
        # Where the money was taken, for the refund, and whether DOKU's notification or its Check Status
        # answer told of it.
        "source": "notification",
        "agent_id": "ALFAMART",
        "agent_store_id": "TZ01",
        "agent_trx_id": None,
        "resolution": None,
        "resolved_by": None,
        "note": None,
        "reference": None,
        "code_paid": None,
        "resolved_at": None,
    }
    assert (anomaly["kind"], anomaly["reason"], anomaly["amount"]) == ("anomaly", "AMOUNT_MISMATCH", 1)
    assert anomaly["expected_amount"] == 150000


async def test_the_queue_filters_and_pages(client, admin_headers, exceptions):
    assert [i["payment_id"] for i in (await listing(client, admin_headers, "?kind=anomaly"))["items"]] == [
        exceptions["short"]
    ]
    assert [i["kind"] for i in (await listing(client, admin_headers, "?reason=ALREADY_PAID"))["items"]] == [
        "conflict"
    ]
    first = await listing(client, admin_headers, "?limit=1")
    assert [i["payment_id"] for i in first["items"]] == [exceptions["twice"]]
    assert first["next"] == str(exceptions["twice"])
    second = await listing(client, admin_headers, f"?limit=1&after={first['next']}")
    assert [i["payment_id"] for i in second["items"]] == [exceptions["short"]]
    assert second["next"] is None

    assert (await resolve(client, admin_headers, exceptions["twice"])).status == 200
    assert [i["payment_id"] for i in (await listing(client, admin_headers, "?state=open"))["items"]] == [
        exceptions["short"]
    ]
    resolved = (await listing(client, admin_headers, "?state=resolved"))["items"]
    assert [(i["payment_id"], i["state"], i["resolution"]) for i in resolved] == [
        (exceptions["twice"], "resolved", "refunded")
    ]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=closed", "state"),
        ("kind=normal", "kind"),
        ("reason=NOPE", "reason"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("after=-1", "after"),
        ("after=x", "after"),
    ],
)
async def test_bad_queue_filters_are_422_naming_the_field(client, admin_headers, query, field):
    response = await client.get(f"/v1/exceptions?{query}", headers=admin_headers)
    assert response.status == 422
    assert set((await response.json())["error"]["fields"]) == {field}


# --- resolving -------------------------------------------------------------------------------------


async def test_resolving_records_who_why_and_when_and_is_final(client, admin_headers, exceptions, pool):
    pid = exceptions["twice"]
    response = await resolve(client, admin_headers, pid, reference="RF-991")
    assert response.status == 200
    resolved = await response.json()
    assert (resolved["state"], resolved["resolution"], resolved["resolved_by"]) == (
        "resolved",
        "refunded",
        "finance@merchant",
    )
    assert (resolved["note"], resolved["reference"], resolved["code_paid"]) == (
        "refund 991 sent",
        "RF-991",
        False,
    )
    assert resolved["resolved_at"]

    # The same resolution again, by someone else with another note: the stored one, unchanged.
    again = await resolve(client, admin_headers, pid, resolved_by="someone-else", note="again")
    assert again.status == 200
    assert await again.json() == resolved
    fetched = await client.get(f"/v1/exceptions/{pid}", headers=admin_headers)
    assert await fetched.json() == resolved

    # Another resolution: refused, nothing changes.
    other = await resolve(client, admin_headers, pid, resolution="dismissed")
    assert other.status == 409
    error = (await other.json())["error"]
    assert error["code"] == "ALREADY_RESOLVED"
    assert "refunded" in error["message"]
    assert await pool.fetchval("SELECT count(*) FROM payment_resolutions") == 1
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'exception.resolved'") == 1


async def test_only_exceptions_can_be_resolved(client, admin_headers, exceptions):
    for pid in (exceptions["normal"], 999999, 0, 2**63):
        response = await resolve(client, admin_headers, pid)
        assert response.status == 404, pid
        assert (await response.json())["error"]["code"] == "NOT_FOUND"
    assert (await client.get(f"/v1/exceptions/{exceptions['normal']}", headers=admin_headers)).status == 404


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"note": "x", "resolution": "refunded"}, {"resolved_by"}),
        ({"note": "x", "resolution": "refunded", "resolved_by": "  "}, {"resolved_by"}),
        ({"resolution": "refunded", "resolved_by": "a"}, {"note"}),
        ({"resolution": "refund", "resolved_by": "a", "note": ""}, {"resolution"}),
        ({"resolved_by": "a", "note": ""}, {"resolution"}),
        ({"resolution": "refunded", "resolved_by": "a", "note": "", "amount": 5, "by": 1}, {"amount", "by"}),
        ({"resolution": "refunded", "resolved_by": "a" * 201, "note": "n" * 2001}, {"resolved_by", "note"}),
        ({"resolution": "refunded", "resolved_by": "a\x00b", "note": "x\x1b[31m"}, {"resolved_by", "note"}),
        ({"resolution": "refunded", "resolved_by": "a\nb", "note": "", "reference": "r\x00"},
         {"resolved_by", "reference"}),
        ({"resolution": "refunded", "resolved_by": 7, "note": None, "reference": "r" * 201},
         {"resolved_by", "note", "reference"}),
        ({"resolution": ["refunded"], "resolved_by": "a", "note": ""}, {"resolution"}),
        ({"resolution": "refunded", "resolved_by": "a\u202eb", "note": "x\u2066"}, {"resolved_by", "note"}),
    ],
)  # fmt: skip
async def test_an_invalid_resolution_is_422_naming_each_field(
    client, admin_headers, exceptions, pool, body, fields
):
    response = await client.post(
        f"/v1/exceptions/{exceptions['twice']}/resolve", json=body, headers=admin_headers
    )
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "VALIDATION_FAILED"
    assert set(error["fields"]) == fields
    assert await pool.fetchval("SELECT count(*) FROM payment_resolutions") == 0


async def test_a_note_may_be_empty_or_span_lines(client, admin_headers, exceptions):
    response = await resolve(client, admin_headers, exceptions["twice"], note="line one\r\n\tline two")
    assert response.status == 200
    assert (await response.json())["note"] == "line one\r\n\tline two"
    response = await resolve(client, admin_headers, exceptions["short"], resolution="dismissed", note="")
    assert (response.status, (await response.json())["note"]) == (200, "")


async def test_a_body_that_is_not_a_json_object_is_refused(client, admin_headers, exceptions):
    url = f"/v1/exceptions/{exceptions['twice']}/resolve"
    assert (
        await client.post(url, data=b"[1]", headers=admin_headers | {"Content-Type": "application/json"})
    ).status == 400
    assert (
        await client.post(url, data=b"x", headers=admin_headers | {"Content-Type": "text/plain"})
    ).status == 415
    assert (await client.post(url, json=RESOLVE)).status == 401


async def test_concurrent_resolutions_of_one_exception_have_one_winner(
    client, admin_headers, exceptions, pool
):
    pid = exceptions["short"]
    choices = ["refunded", "dismissed", "accepted"] * 4
    responses = await asyncio.gather(
        *(
            resolve(client, admin_headers, pid, resolution=choice, resolved_by=f"clerk-{i}")
            for i, choice in enumerate(choices)
        )
    )
    [stored] = await pool.fetch("SELECT * FROM payment_resolutions")
    winners = set()
    for response, choice in zip(responses, choices, strict=True):
        if choice == stored["resolution"]:
            assert response.status == 200
            document = await response.json()
            assert (document["resolution"], document["resolved_by"]) == (
                stored["resolution"],
                stored["resolved_by"],
            )
            winners.add(document["resolved_at"])
        else:
            assert response.status == 409
    assert len(winners) == 1
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'exception.resolved'") == 1
    paid_count = await pool.fetchval(
        "SELECT paid_count FROM payment_codes WHERE payment_code = '8896512345678125'"
    )
    assert paid_count == (1 if stored["resolution"] == "accepted" else 0)


# --- what "accepted" does --------------------------------------------------------------------------


async def code_state(pool: asyncpg.Pool, code: str = CODE) -> tuple:
    row = await pool.fetchrow(
        "SELECT status, paid_count, version FROM payment_codes WHERE payment_code = $1", code
    )
    return tuple(row)


async def test_accepting_an_anomaly_of_a_payable_one_shot_code_pays_it(
    client, admin_headers, doku, register, pool
):
    await register()
    await pay(doku, amount=149000, ref="short")  # the customer paid less; the code is still active
    assert await code_state(pool) == ("active", 0, 1)
    pid = await payment_id(pool, "short")

    response = await resolve(
        client, admin_headers, pid, resolution="accepted", note="keep it, write off 1000"
    )
    assert response.status == 200
    assert (await response.json())["code_paid"] is True
    assert await code_state(pool) == ("paid", 1, 2)
    reply = await doku.inquiry(CODE)
    assert reply.json()["online_to_offline_inquiry"]["status"] == "billing_already_paid"

    feed = await (await client.get("/v1/events", headers=admin_headers)).json()
    [event] = [item for item in feed["items"] if item["type"] == "exception.resolved"]
    assert event["payment_code"] == CODE
    assert event["payload"]["payment_id"] == pid
    assert event["payload"]["resolution"] == "accepted"
    assert (event["payload"]["code"]["status"], event["payload"]["code"]["paid_count"]) == ("paid", 1)

    # Accepting again changes nothing more.
    assert (await resolve(client, admin_headers, pid, resolution="accepted")).status == 200
    assert await code_state(pool) == ("paid", 1, 2)


async def accepted_leaves_code_alone(client, admin_headers, pool, pid: int, code: str = CODE) -> None:
    before = await code_state(pool, code)
    response = await resolve(client, admin_headers, pid, resolution="accepted")
    assert response.status == 200
    assert (await response.json())["code_paid"] is False
    assert await code_state(pool, code) == before
    event = await pool.fetchval("SELECT payload FROM events WHERE type = 'exception.resolved'")
    assert event["code"]["status"] == before[0]


async def test_accepting_a_conflict_changes_no_code(client, admin_headers, exceptions, pool):
    await accepted_leaves_code_alone(client, admin_headers, pool, exceptions["twice"])
    assert await code_state(pool) == ("paid", 1, 2)


async def test_accepting_an_anomaly_of_a_reusable_code_changes_no_code(
    client, admin_headers, doku, register, pool
):
    await register(payment_code=REUSABLE, invoice_number="TOP", reusable=True)
    await pay(doku, code=REUSABLE, invoice="TOP-1", ref="unquoted")  # UNKNOWN_INVOICE: never quoted
    await accepted_leaves_code_alone(
        client, admin_headers, pool, await payment_id(pool, "unquoted"), REUSABLE
    )


@pytest.mark.parametrize(
    ("resolution", "then"),
    [
        ("accepted", "(conflict,INVOICE_ALREADY_PAID)"),
        ("refunded", "(normal,)"),
        ("dismissed", "(normal,)"),
    ],
)
async def test_an_invoice_of_a_reusable_code_is_paid_once_its_anomaly_is_accepted(
    client, admin_headers, doku, register, pool, resolution, then
):
    """(Found by a finance review.) `accepted` means the merchant keeps the money and honours the payment
    (spec §9): the invoice is paid. On a reusable code nothing said so, and the same invoice paid again at
    its quoted amount by another store transaction was a normal payment: a customer charged twice for one
    bill, with no exception to refund. It is a conflict now, as after a normal payment (spec §4 rule 4).
    A refunded or dismissed anomaly left the bill unpaid, and the next payment pays it."""
    await register(payment_code=REUSABLE, invoice_number="TOP", reusable=True)
    invoice = (await doku.inquiry(REUSABLE)).json()["order"]["invoice_number"]
    await pay(doku, code=REUSABLE, invoice=invoice, amount=1, ref="short")  # AMOUNT_MISMATCH
    short = await payment_id(pool, "short")
    assert (await resolve(client, admin_headers, short, resolution=resolution)).status == 200
    await pay(doku, code=REUSABLE, invoice=invoice, ref="again")
    recorded = "SELECT (kind, reason)::text FROM payments WHERE transaction_ref = 'again'"
    assert await pool.fetchval(recorded) == then
    paid_count = await pool.fetchval("SELECT paid_count FROM payment_codes WHERE payment_code = $1", REUSABLE)
    assert paid_count == (1 if then == "(normal,)" else 0)


async def test_accepting_an_anomaly_of_a_cancelled_code_changes_no_code(
    client, admin_headers, doku, register, pool
):
    await register()
    assert (await client.post(f"/v1/payment-codes/{CODE}/cancel", headers=admin_headers)).status == 200
    await pay(doku, ref="late")
    assert await pool.fetchval("SELECT reason FROM payments") == "CANCELLED"
    await accepted_leaves_code_alone(client, admin_headers, pool, await payment_id(pool, "late"))


async def test_accepting_an_anomaly_of_an_expired_code_changes_no_code(
    client, admin_headers, doku, register, pool
):
    await register(expires_at=(utcnow() + timedelta(days=1)).isoformat())
    await pay(doku, amount=1, ref="short")
    # The code expired since (arranged in SQL: the API refuses an expiry in the past).
    await pool.execute("UPDATE payment_codes SET expires_at = now() - interval '1 minute'")
    await accepted_leaves_code_alone(client, admin_headers, pool, await payment_id(pool, "short"))


async def test_accepting_an_anomaly_of_another_merchants_code_changes_no_code(
    client, admin_headers, register, pool
):
    await register()
    other = DokuSimulator(client.session, str(client.make_url("")), OTHER_CLIENT)
    await pay(other, ref="foreign")
    assert (
        await pool.fetchval("SELECT (client_id, reason)::text FROM payments")
        == f"({OTHER_CLIENT_ID},OTHER_CLIENT)"
    )
    await accepted_leaves_code_alone(client, admin_headers, pool, await payment_id(pool, "foreign"))


async def test_an_anomaly_of_an_unknown_code_can_be_resolved(client, admin_headers, doku, pool):
    await pay(doku, code="8896599999999999", ref="ghost")
    response = await resolve(client, admin_headers, await payment_id(pool, "ghost"), resolution="accepted")
    assert response.status == 200
    event = await pool.fetchval("SELECT payload FROM events WHERE type = 'exception.resolved'")
    assert (event["reason"], event["code"]) == ("UNKNOWN_CODE", None)


# --- the record is final, in SQL too ---------------------------------------------------------------


async def test_postgresql_refuses_to_update_or_delete_a_resolution(client, admin_headers, exceptions, pool):
    assert (await resolve(client, admin_headers, exceptions["twice"])).status == 200
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="final"):
        await pool.execute("UPDATE payment_resolutions SET resolution = 'dismissed'")
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="final"):
        await pool.execute("DELETE FROM payment_resolutions")
    assert await pool.fetchval("SELECT resolution FROM payment_resolutions") == "refunded"


async def test_a_resolution_must_name_an_exception_payment_in_sql_too(pool):
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await pool.execute(
            "INSERT INTO payment_resolutions (payment_code, payment_id, resolution, resolved_by, note) "
            "VALUES ('1', 1, 'refunded', 'a', '')"
        )


# --- metrics ---------------------------------------------------------------------------------------


async def test_open_exceptions_and_resolutions_are_measured(client, admin_headers, exceptions):
    labels = {"kind": "anomaly", "reason": "AMOUNT_MISMATCH"}
    await sampled(client, "dipc_exceptions_open", 1, **labels)
    await sampled(client, "dipc_exceptions_open", 1, kind="conflict", reason="ALREADY_PAID")
    samples = await scrape(client)
    assert value(samples, "dipc_exceptions_open", kind="anomaly", reason="EXPIRED") == 0  # present at 0
    assert value(samples, "dipc_exceptions_oldest_open_seconds") > 0
    before = value(samples, "dipc_exception_resolutions_total", resolution="dismissed")

    for pid in exceptions["twice"], exceptions["short"]:
        assert (await resolve(client, admin_headers, pid, resolution="dismissed")).status == 200
    assert (await resolve(client, admin_headers, exceptions["short"], resolution="dismissed")).status == 200

    await sampled(client, "dipc_exceptions_open", 0)
    await sampled(client, "dipc_exceptions_oldest_open_seconds", 0)
    after = await scrape(client)
    assert (
        value(after, "dipc_exception_resolutions_total", resolution="dismissed") - before == 2
    )  # not the repeat


async def test_accepting_and_a_notification_racing_for_one_code_never_pay_it_twice(
    client, admin_headers, doku, register, pool
):
    """Both lock the code's row first: whichever comes second sees the code paid (the notification
    becomes a conflict, or the acceptance leaves the code alone)."""
    codes = [f"88965123456781{n:02d}" for n in range(8)]
    anomalies = {}
    for code in codes:
        await register(payment_code=code, invoice_number=f"INV-{code[-2:]}")
        await pay(doku, code=code, invoice=f"INV-{code[-2:]}", amount=1, ref=f"short-{code}")
        anomalies[code] = await payment_id(pool, f"short-{code}")

    async def race(code: str):
        return await asyncio.gather(
            resolve(client, admin_headers, anomalies[code], resolution="accepted"),
            doku.notify(
                code, invoice_number=f"INV-{code[-2:]}", amount=150000, original_request_id=f"ok-{code}"
            ),
        )

    results = await asyncio.gather(*(race(code) for code in codes))
    for code, (resolved, notified) in zip(codes, results, strict=True):
        assert (resolved.status, notified.status) == (200, 200)
        code_paid = (await resolved.json())["code_paid"]
        kind = await pool.fetchval("SELECT kind FROM payments WHERE transaction_ref = $1", f"ok-{code}")
        assert kind == ("conflict" if code_paid else "normal"), code
        assert (await code_state(pool, code))[:2] == ("paid", 1)


@pytest.mark.parametrize("amount", [0, -150000])
async def test_a_payment_of_no_money_is_an_anomaly_that_cannot_be_accepted(
    client, doku, register, admin_headers, pool, amount
):
    """DOKU said SUCCESS for 0 rupiah or less: recorded as an anomaly and answered 200 (spec §4 rule 5),
    but there is no money to keep: accepting it made the bill paid, by nobody's money (a finance review).
    Refunded or dismissed, as finance finds it."""
    await register()
    await pay(doku, amount=amount, ref="nothing")
    [anomaly] = (await listing(client, admin_headers))["items"]
    assert (anomaly["reason"], anomaly["amount"]) == ("AMOUNT_MISMATCH", amount)
    refused = await resolve(client, admin_headers, anomaly["payment_id"], resolution="accepted")
    assert refused.status == 422, await refused.text()
    assert "resolution" in (await refused.json())["error"]["fields"]
    code = await (await client.get(f"/v1/payment-codes/{CODE}", headers=admin_headers)).json()
    assert (code["status"], code["paid_count"]) == ("active", 0)
    dismissed = await resolve(client, admin_headers, anomaly["payment_id"], resolution="dismissed")
    assert dismissed.status == 200, await dismissed.text()
