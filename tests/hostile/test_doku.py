"""DOKU's two routes under hostile bodies and headers, signed per case so the parser behind the signature
is reached: DOKU's error shape, signed answers, and rule 1 of spec §4 (signed means stored raw)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import spec_example
from tests.hostile.conftest import assert_log_clean, assert_no_5xx, counts, examples
from tests.hostile.strategies import content_types, mutated, raw_bodies

INQUIRY = orjson.loads(spec_example("inquiry-alfa.json"))
NOTIFICATION = orjson.loads(spec_example("notification-alfa.json"))
INQUIRY_PATHS = [
    ("online_to_offline_info", "payment_code"),
    ("channel", "id"),
    ("acquirer", "id"),
    ("service", "id"),
    ("online_to_offline_inquiry", "identifier"),
    ("online_to_offline_inquiry",),
    ("online_to_offline_info",),
]
NOTIFICATION_PATHS = [
    ("online_to_offline_info", "payment_code"),
    ("channel", "id"),
    ("acquirer", "id"),
    ("order", "amount"),
    ("order", "invoice_number"),
    ("order",),
    ("transaction", "status"),
    ("transaction", "date"),
    ("transaction", "original_request_id"),
    ("transaction",),
    ("online_to_offline_payment", "identifier"),
]
# HTTP trims a header value's surrounding whitespace (the signature then covers the trimmed value).
request_ids = (
    st.one_of(
        st.uuids().map(str),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=140),
        st.text(
            st.characters(min_codepoint=0xA0, exclude_categories=["Cs", "Zl", "Zp", "Zs"]),
            min_size=1,
            max_size=20,
        ),
    )
    .map(str.strip)
    .filter(bool)
)


@pytest.fixture
async def code(register) -> None:
    await register()


@given(
    body=mutated(INQUIRY, INQUIRY_PATHS) | raw_bodies,
    request_id=request_ids,
    content_type=content_types,
)
@examples(200)
async def test_any_signed_inquiry_gets_dokus_shape_and_no_5xx(
    doku, code, pool, hostile_log, body, request_id, content_type
):
    before = await counts(pool)
    reply = await doku.post("/doku/inquiry", body, request_id=request_id, content_type=content_type)
    assert_no_5xx(reply.status)
    assert reply.status in (200, 400, 404, 409, 413, 415), reply.body
    assert "status" in reply.json()["online_to_offline_inquiry"]
    if reply.status != 413:  # a body over the limit is refused before it is read, so before the signature
        assert reply.signature_valid, reply.signature_problem
    after = await counts(pool)
    assert after["codes"] == before["codes"]  # an inquiry of a one-shot code never changes it
    assert after["inquiries"] - before["inquiries"] in (0, 1)
    if "error" in reply.json():  # a protocol error records nothing
        assert after["inquiries"] == before["inquiries"]
    assert_log_clean(hostile_log)


@given(
    body=mutated(NOTIFICATION, NOTIFICATION_PATHS) | raw_bodies,
    request_id=request_ids,
    content_type=content_types,
)
@examples(200)
async def test_any_signed_notification_is_stored_raw_then_answered(
    doku, code, pool, hostile_log, body, request_id, content_type
):
    before = await counts(pool)
    reply = await doku.post("/doku/notification", body, request_id=request_id, content_type=content_type)
    assert_no_5xx(reply.status)
    assert reply.status in (200, 400, 413, 415), reply.body
    after = await counts(pool)
    if reply.status == 413:
        assert after == before
    else:
        assert reply.signature_valid, reply.signature_problem
        # Signed means kept: exactly one new inbox row holding the exact bytes, whatever they were.
        assert after["notifications"] == before["notifications"] + 1
        stored = await pool.fetchval("SELECT body FROM notifications ORDER BY id DESC LIMIT 1")
        assert stored == body
    if reply.status != 200:
        assert (after["payments"], after["codes"]) == (before["payments"], before["codes"])
    assert_log_clean(hostile_log)


header_names = st.sampled_from(
    ["Client-Id", "Request-Id", "Request-Timestamp", "Signature", "Content-Type", "Content-Length",
     "Transfer-Encoding", "X-Forwarded-For", "Authorization", "Expect", "Connection", "X-Anything"]
)  # fmt: skip
header_values = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from(
        [b"", b" ", b"\xff", b"caf\xe9", b"-1", b"99999999999999999999999", b"chunked", b"100-continue"]
    ),
)


@given(
    path=st.sampled_from(["/doku/inquiry", "/doku/notification"]),
    headers=st.lists(st.tuples(header_names, header_values), max_size=6),
    body=raw_bodies,
)
@examples(200)
async def test_any_unsigned_headers_on_doku_routes_change_nothing(
    client, code, pool, hostile_log, path, headers, body
):
    from tests.rawhttp import exchange, request_bytes

    before = await counts(pool)
    reply = await exchange(
        client.server.host, client.server.port, request_bytes("POST", path, headers, body), wait_s=4.0
    )
    if reply is not None:
        assert_no_5xx(reply.status)
        if reply.headers.get("content-type", "").startswith("application/json"):
            document = reply.json()
            assert "error" in document
    assert await counts(pool) == before
    assert_log_clean(hostile_log)
