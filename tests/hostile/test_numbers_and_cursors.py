"""Numbers and cursors a hostile client writes where dipc reads an integer or a key (found by review).

Python's ``int()`` refuses a run of more than 4,300 digits with a plain ValueError, which no parser
expected: a signed notification was then answered 500 and never stored. It also reads other scripts'
digits, a sign, spaces and '_' as a number, so ``/v1/exceptions/٣`` resolved payment 3. And a cursor's
NUL reached PostgreSQL, which cannot compare it.
"""

from __future__ import annotations

import base64

import orjson
import pytest

from tests.conftest import CODE
from tests.hostile.conftest import assert_log_clean, counts
from tests.hostile.test_admin import assert_error_shape

TOO_LONG_FOR_INT = "9" * 4301
MOMENT = "2026-11-25T00:00:00Z"


@pytest.fixture
async def code(register) -> None:
    await register()


async def test_a_signed_notification_with_an_amount_too_long_for_int_is_stored_then_refused(
    doku, code, pool, hostile_log
):
    body = orjson.dumps(
        {
            "order": {"invoice_number": "INV-2026-000123", "amount": TOO_LONG_FOR_INT},
            "transaction": {"status": "SUCCESS", "original_request_id": "long-amount"},
            "online_to_offline_info": {"payment_code": CODE},
        }
    )
    before = await counts(pool)
    reply = await doku.post("/doku/notification", body)
    assert reply.status == 400, reply.body
    assert reply.json()["error"]["code"] == "INVALID_FIELD"
    assert "order.amount" in reply.json()["error"]["message"]
    assert reply.signature_valid, reply.signature_problem
    after = await counts(pool)
    assert after["notifications"] == before["notifications"] + 1
    assert await pool.fetchval("SELECT body FROM notifications ORDER BY id DESC LIMIT 1") == body
    assert (after["payments"], after["codes"]) == (before["payments"], before["codes"])
    assert_log_clean(hostile_log)


@pytest.fixture
async def exception_id(doku, pool) -> int:
    """An open exception: money for a code nobody registered."""
    reply = await doku.notify(
        "8896599999999999", invoice_number="INV-X", amount=1000, original_request_id="t"
    )
    assert reply.status == 200
    return await pool.fetchval("SELECT id FROM payments WHERE kind = 'anomaly'")


@pytest.mark.parametrize("written", [TOO_LONG_FOR_INT, "0" * 5000, "its id in Arabic-Indic digits"])
async def test_an_exception_is_named_by_its_id_in_ascii_digits_only(
    client, admin_headers, pool, hostile_log, exception_id, written
):
    assert exception_id < 10
    path = chr(0x660 + exception_id) if written.startswith("its id") else written
    resolution = {"resolution": "refunded", "resolved_by": "finance", "note": ""}
    for response in (
        await client.get(f"/v1/exceptions/{path}", headers=admin_headers),
        await client.post(f"/v1/exceptions/{path}/resolve", json=resolution, headers=admin_headers),
    ):
        assert response.status == 404, await response.text()
        assert_error_shape(response.status, await response.json())
    assert await pool.fetchval("SELECT count(*) FROM payment_resolutions") == 0
    assert_log_clean(hostile_log)


@pytest.mark.parametrize("limit", ["1_0", "%D9%A1", "+1", "%201", TOO_LONG_FOR_INT, "-1", "0", "1001"])
async def test_a_limit_is_written_in_ascii_digits_alone(client, admin_headers, hostile_log, limit):
    response = await client.get(f"/v1/payments?limit={limit}", headers=admin_headers)
    assert response.status == 422, await response.text()
    assert (await response.json())["error"]["fields"] == {
        "limit": "must be between 1 and 1000"
    }  # one wording
    assert_log_clean(hostile_log)


@pytest.mark.parametrize("route", ["/v1/inquiries", "/v1/reconciliation"])
@pytest.mark.parametrize(
    "key", [["2026-11-25T00:00:00Z", "1", "\u0000"], ["2026-11-25T00:00:00Z", "\u0000", "1"]]
)
async def test_a_cursor_holding_nul_is_refused_as_a_cursor(client, admin_headers, hostile_log, route, key):
    cursor = base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")
    response = await client.get(f"{route}?after={cursor}", headers=admin_headers)
    assert response.status == 422, await response.text()
    assert "after" in (await response.json())["error"]["fields"]
    assert_log_clean(hostile_log)
