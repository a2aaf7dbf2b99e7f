"""The admin API under hostile query strings, JSON bodies and imports: 4xx in ``{"error": …}``, never a 5xx,
and a refused request changes no row."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from yarl import URL

from server.core.codes import NEW_CODE_COLUMNS
from server.core.registration import PATCHABLE_FIELDS
from tests.conftest import CODE, code_fields
from tests.hostile.conftest import assert_log_clean, assert_no_5xx, counts, examples
from tests.hostile.strategies import content_types, hostile_text, json_values, raw_bodies

LIST_ROUTES = [
    "/v1/payment-codes",
    "/v1/payments",
    "/v1/events",
    "/v1/webhook-deliveries",
    "/v1/reconciliation",
    "/v1/exceptions",
    "/v1/inquiries",
    "/v1/notifications",
]
QUERY_NAMES = [
    "status", "client_id", "after", "limit", "payment_code", "kind", "since", "format", "state", "reason",
    "outcome", "x",
]  # fmt: skip

# A query value as it travels: any text percent-encoded, or raw escapes of bytes that are not UTF-8.
query_values = st.one_of(
    hostile_text.map(lambda text: quote(text, safe="")),
    st.binary(max_size=8).map(lambda raw: "".join(f"%{byte:02X}" for byte in raw)),
    st.sampled_from(["%", "%zz", "%00", "%ff%fe", "+", "%2B1", "-1", "1e3", "0x10", "9" * 30, "%E2%80%A8"]),
)


def assert_error_shape(status: int, document: dict) -> None:
    if status >= 400:
        assert set(document) == {"error"}, document
        assert {"code", "message"} <= set(document["error"])


@pytest.fixture
async def code(register) -> None:
    await register()


@given(
    route=st.sampled_from(LIST_ROUTES),
    query=st.lists(st.tuples(st.sampled_from(QUERY_NAMES), query_values), max_size=4),
)
@examples(300)
async def test_any_query_string_on_a_list_route_is_answered_or_refused_clearly(
    client, admin_headers, code, pool, hostile_log, route, query
):
    assume(not any(name == "wait" and _long_poll(value) for name, value in query))
    before = await counts(pool)
    encoded = "&".join(f"{name}={value}" for name, value in query)
    response = await client.get(URL(f"{route}?{encoded}", encoded=True), headers=admin_headers)
    assert_no_5xx(response.status)
    assert response.status in (200, 400, 404, 422), await response.text()
    assert_error_shape(response.status, await response.json())
    assert await counts(pool) == before
    assert_log_clean(hostile_log)


def _long_poll(wait: str) -> bool:
    """Whether ``wait`` is a real wait worth waiting for (those are not what this test is about)."""
    from urllib.parse import unquote

    try:
        return 0.01 < float(unquote(wait)) <= 60
    except ValueError:
        return False


@given(wait=query_values | st.sampled_from(["nan", "inf", "-inf", "1e400", "61", "-0.0", "1_0", "٣"]))
@examples(60)
async def test_any_wait_of_the_event_feed_is_bounded(client, admin_headers, hostile_log, wait):
    assume(not _long_poll(wait))
    response = await client.get(URL(f"/v1/events?wait={wait}", encoded=True), headers=admin_headers)
    assert response.status in (200, 422), await response.text()
    assert_log_clean(hostile_log)


@given(
    changes=st.dictionaries(
        st.sampled_from([*NEW_CODE_COLUMNS, "version", "x"]) | hostile_text, json_values, max_size=5
    )
)
@examples(300)
async def test_any_registration_is_created_or_refused_naming_fields(
    client, admin_headers, pool, hostile_log, changes
):
    before = await counts(pool)
    response = await client.post("/v1/payment-codes", json=code_fields(**changes), headers=admin_headers)
    assert_no_5xx(response.status)
    assert response.status in (201, 400, 409, 422), await response.text()
    assert_error_shape(response.status, await response.json())
    if response.status != 201:
        assert await counts(pool) == before
    assert_log_clean(hostile_log, (await response.json()).get("payment_code", CODE))


@given(
    changes=st.dictionaries(
        st.sampled_from([*PATCHABLE_FIELDS, "version", "status"]), json_values, max_size=4
    )
)
@examples(300)
async def test_any_change_is_applied_or_refused_without_a_trace(
    client, admin_headers, code, pool, hostile_log, changes
):
    before = await counts(pool)
    response = await client.patch(f"/v1/payment-codes/{CODE}", json=changes, headers=admin_headers)
    assert_no_5xx(response.status)
    assert response.status in (200, 400, 409, 422), await response.text()
    assert_error_shape(response.status, await response.json())
    if response.status != 200:
        assert await counts(pool) == before
    assert_log_clean(hostile_log)


@given(
    path=st.sampled_from(
        [
            "/v1/payment-codes",
            f"/v1/payment-codes/{CODE}",
            "/v1/webhook-deliveries/redeliver",
            "/v1/reconciliation/check",
            "/v1/exceptions/1/resolve",
        ]
    ),
    method=st.sampled_from(["POST", "PATCH", "PUT"]),
    body=raw_bodies,
    content_type=content_types,
)
@examples(300)
async def test_any_body_on_a_write_route_is_refused_clearly(
    client, admin_headers, code, pool, hostile_log, path, method, body, content_type
):
    before = await counts(pool)
    headers = admin_headers | ({"Content-Type": content_type} if content_type else {})
    response = await client.request(method, path, data=body, headers=headers)
    assert_no_5xx(response.status)
    assert 200 <= response.status < 500, await response.text()
    assert_error_shape(response.status, await response.json())
    if response.status >= 400:
        assert await counts(pool) == before
    assert_log_clean(hostile_log)


csv_cells = st.one_of(
    hostile_text,
    st.sampled_from(['"', '""', '"a\nb"', '"open', "a\rb", "\ufeff", ",", "8896500000000001"]),
)


@given(
    rows=st.lists(st.lists(csv_cells, min_size=1, max_size=6), max_size=5),
    header=st.sampled_from(
        [
            "payment_code,amount,invoice_number,customer_name,client_id",
            "payment_code,amount",
            "",
            '"payment_code',
        ]
    ),
    fmt=st.sampled_from(["csv", "ndjson"]),
)
@examples(250)
async def test_any_import_is_imported_or_rejected_by_line(
    client, admin_headers, pool, hostile_log, rows, header, fmt
):
    body = "\n".join([header, *(",".join(row) for row in rows)]).encode("utf-8", "surrogatepass")
    before = await counts(pool)
    response = await client.post(
        f"/v1/payment-codes/import?format={fmt}",
        data=body,
        headers=admin_headers | {"Content-Type": "text/csv"},
    )
    assert_no_5xx(response.status)
    assert response.status in (200, 400, 413, 422), await response.text()
    document = await response.json()
    assert_error_shape(response.status, document)
    if response.status != 200 or document["imported"] == 0:
        assert await counts(pool) == before
    # Imported codes may appear in rejections by number ("repeats line 2"): mask only what we sent.
    assert_log_clean(
        hostile_log, *(cell for row in rows for cell in row if len(cell) >= 10 and cell.isdigit())
    )


@given(
    path=st.lists(
        st.one_of(
            hostile_text.map(lambda text: quote(text, safe="")),
            st.sampled_from(
                [
                    "..",
                    ".",
                    "%2e%2e",
                    "%2F",
                    "%00",
                    "%ff",
                    "v1",
                    "payment-codes",
                    CODE,
                    "cancel",
                    "doku",
                    "exceptions",
                    "resolve",
                    "reconciliation",
                    "check",
                    str(2**63),
                    "-1",
                ]
            ),
        ),
        max_size=4,
    ).map(lambda parts: "/" + "/".join(parts)),
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "CONNECT"]),
)
@examples(300)
async def test_any_path_and_method_is_answered_in_json(client, pool, hostile_log, path, method):
    from tests.conftest import ADMIN_TOKEN
    from tests.rawhttp import exchange, request_bytes

    before = await counts(pool)
    request = request_bytes(method, path, [("Authorization", f"Bearer {ADMIN_TOKEN}")])
    reply = await exchange(client.server.host, client.server.port, request, wait_s=4.0)
    assert reply is not None
    assert_no_5xx(reply.status)
    if method != "HEAD" and reply.status >= 400:
        assert reply.headers["content-type"].startswith("application/json")
        document = reply.json()
        assert "error" in document or "online_to_offline_inquiry" in document or "status" in document
    assert await counts(pool) == before
    assert_log_clean(hostile_log)
