"""The audit trail without psql: GET /v1/inquiries and GET /v1/notifications show what DOKU asked and
sent and what we answered, byte for byte, page by page."""

from __future__ import annotations

import base64

import orjson
import pytest

from tests.conftest import CODE

INVOICE = "INV-2026-000123"
OTHER = "8896512345678125"


async def get(client, admin_headers, path: str) -> dict:
    response = await client.get(path, headers=admin_headers)
    assert response.status == 200, await response.text()
    return await response.json()


async def walk(client, admin_headers, path: str, limit: int) -> list[dict]:
    """Every item of a listing, following ``next`` with pages of ``limit``."""
    items: list[dict] = []
    cursor = None
    separator = "&" if "?" in path else "?"
    while True:
        query = f"{separator}limit={limit}" + (f"&after={cursor}" if cursor else "")
        page = await get(client, admin_headers, path + query)
        items += page["items"]
        cursor = page["next"]
        if cursor is None:
            return items
        assert len(page["items"]) == limit


async def test_inquiries_show_what_was_asked_and_the_exact_answer(client, admin_headers, doku, register):
    await register()
    quoted = await doku.inquiry(CODE, request_id="ask-1")
    missing = await doku.inquiry("8896599999999999", request_id="ask-2")
    await doku.inquiry(CODE, request_id="ask-1")  # a replay is answered from the record, not recorded again

    items = (await get(client, admin_headers, "/v1/inquiries"))["items"]
    assert [(item["request_id"], item["outcome"], item["http_status"]) for item in items] == [
        ("ask-1", "SUCCESS", 200),
        ("ask-2", "NOT_FOUND", 404),
    ]
    first, second = items
    assert base64.b64decode(first["response_base64"]) == quoted.body  # the bytes DOKU received
    assert first["response"] == quoted.json()
    assert (first["payment_code"], first["invoice_number"], first["amount"]) == (CODE, INVOICE, 150000)
    assert (first["client_id"], first["channel"]) == ("MCH-0001-10791114622547", "ALFA")
    assert first["received_at"].endswith("Z")
    assert base64.b64decode(second["response_base64"]) == missing.body
    assert (second["invoice_number"], second["amount"]) == (None, None)


async def test_inquiries_filter_by_code_and_time_and_page_with_a_cursor(
    client, admin_headers, doku, register
):
    await register()
    await register(payment_code=OTHER, invoice_number="INV-2")
    for index in range(5):
        await doku.inquiry(CODE, request_id=f"a-{index}")
        await doku.inquiry(OTHER, request_id=f"b-{index}")

    everything = (await get(client, admin_headers, "/v1/inquiries"))["items"]
    assert len(everything) == 10
    times = [item["received_at"] for item in everything]
    assert times == sorted(times)
    for limit in (1, 3, 10):
        paged = await walk(client, admin_headers, "/v1/inquiries", limit)
        assert paged == everything
    only = await walk(client, admin_headers, f"/v1/inquiries?payment_code={OTHER}", 2)
    assert [item["request_id"] for item in only] == [f"b-{index}" for index in range(5)]
    since = everything[6]["received_at"]
    later = (await get(client, admin_headers, f"/v1/inquiries?since={since}"))["items"]
    assert later == [item for item in everything if item["received_at"] >= since]
    assert (await get(client, admin_headers, "/v1/inquiries?since=2999-01-01T00:00:00Z"))["items"] == []


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("after=not-a-cursor", "after"),
        ("after=" + base64.urlsafe_b64encode(b'["x", 1, 2]').decode(), "after"),
        ("payment_code=12ab", "payment_code"),
        ("since=yesterday", "since"),
        ("limit=0", "limit"),
    ],
)
async def test_bad_inquiry_filters_are_422(client, admin_headers, query, field):
    response = await client.get(f"/v1/inquiries?{query}", headers=admin_headers)
    assert response.status == 422
    assert set((await response.json())["error"]["fields"]) == {field}


async def test_the_inbox_shows_every_notification_raw_and_the_payment_it_made(
    client, admin_headers, doku, register, pool
):
    await register()
    paid = await doku.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id="t1", request_id="n1"
    )
    await doku.notify(CODE, invoice_number=INVOICE, amount=150000, original_request_id="t1", request_id="n2")
    await doku.notify(CODE, invoice_number=INVOICE, amount=150000, original_request_id="t2", request_id="n3")
    garbage = b"\xff\xfe not json, not UTF-8"
    assert (await doku.post("/doku/notification", garbage, request_id="n4")).status == 400
    assert paid.status == 200

    items = (await get(client, admin_headers, "/v1/notifications"))["items"]
    assert [(i["request_id"], i["outcome"], i["kind"], i["reason"]) for i in items] == [
        ("n1", "normal", "normal", None),
        ("n2", "repeat", None, None),
        ("n3", "conflict", "conflict", "ALREADY_PAID"),
        ("n4", "rejected", None, None),
    ]
    payments = {row["transaction_ref"]: row["id"] for row in await pool.fetch("SELECT * FROM payments")}
    assert [i["payment_id"] for i in items] == [payments["t1"], None, payments["t2"], None]
    normal, _, _, rejected = items
    stored = await pool.fetchrow("SELECT body, headers FROM notifications WHERE request_id = 'n1'")
    assert base64.b64decode(normal["body_base64"]) == bytes(stored["body"])
    assert normal["body"] == bytes(stored["body"]).decode()
    assert orjson.loads(normal["body"])["transaction"]["original_request_id"] == "t1"
    assert normal["headers"] == stored["headers"]  # rendered as stored, whatever its shape
    assert (normal["transaction_status"], normal["payment_code"]) == ("SUCCESS", CODE)
    assert rejected["body"] is None  # not UTF-8: only the exact bytes
    assert base64.b64decode(rejected["body_base64"]) == garbage


async def test_the_inbox_filters_and_pages(client, admin_headers, doku, register):
    await register()
    await register(payment_code=OTHER, invoice_number="INV-2")
    for index in range(3):
        await doku.notify(CODE, invoice_number=INVOICE, amount=150000, original_request_id=f"t{index}")
        await doku.notify(OTHER, invoice_number="INV-2", amount=1, original_request_id=f"u{index}")
    everything = (await get(client, admin_headers, "/v1/notifications"))["items"]
    assert len(everything) == 6
    assert await walk(client, admin_headers, "/v1/notifications", 4) == everything
    conflicts = (await get(client, admin_headers, "/v1/notifications?outcome=conflict"))["items"]
    assert [(i["payment_code"], i["reason"]) for i in conflicts] == [(CODE, "ALREADY_PAID")] * 2
    other = await walk(client, admin_headers, f"/v1/notifications?payment_code={OTHER}", 1)
    assert [(i["outcome"], i["reason"]) for i in other] == [("anomaly", "AMOUNT_MISMATCH")] * 3
    for query, field in (
        ("outcome=paid", "outcome"),
        ("after=-1", "after"),
        ("payment_code=x", "payment_code"),
    ):
        response = await client.get(f"/v1/notifications?{query}", headers=admin_headers)
        assert response.status == 422
        assert set((await response.json())["error"]["fields"]) == {field}


async def test_audit_requests_never_log_a_full_payment_code(client, admin_headers, doku, register, capsys):
    await register()
    await doku.inquiry(CODE)
    capsys.readouterr()
    await get(client, admin_headers, f"/v1/inquiries?payment_code={CODE}")
    await get(client, admin_headers, f"/v1/notifications?payment_code={CODE}")
    logged = capsys.readouterr()
    assert "route=/v1/inquiries" in logged.out + logged.err or "/v1/inquiries" in logged.out + logged.err
    assert CODE not in logged.out + logged.err
