"""Money assurance under hostile bodies: resolving an exception and asking DOKU by hand are answered or
refused naming fields, never a 5xx, and a refused request changes nothing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile.conftest import assert_log_clean, assert_no_5xx, counts, examples
from tests.hostile.strategies import hostile_text, json_values
from tests.hostile.test_admin import assert_error_shape

UNKNOWN_CODE = "8896599999999999"


@pytest.fixture
async def anomaly(doku, pool) -> int:
    """An open exception: money for a code nobody registered."""
    reply = await doku.notify(UNKNOWN_CODE, invoice_number="INV-X", amount=1000, original_request_id="t")
    assert reply.status == 200
    return await pool.fetchval("SELECT id FROM payments WHERE kind = 'anomaly'")


@given(
    body=st.dictionaries(
        st.sampled_from(["resolution", "resolved_by", "note", "reference", "x"]) | hostile_text,
        json_values | st.sampled_from(["refunded", "accepted", "dismissed", "Sari", ""]),
        max_size=5,
    )
)
@examples(250)
async def test_any_resolution_is_recorded_once_or_refused_naming_fields(
    client, admin_headers, anomaly, pool, hostile_log, body
):
    before = await counts(pool)
    response = await client.post(f"/v1/exceptions/{anomaly}/resolve", json=body, headers=admin_headers)
    assert_no_5xx(response.status)
    assert response.status in (200, 409, 422), await response.text()
    assert_error_shape(response.status, await response.json())
    if response.status != 200:
        assert await counts(pool) == before
    assert_log_clean(hostile_log, UNKNOWN_CODE)


@given(
    body=st.dictionaries(
        st.sampled_from(["invoice_number", "since", "x"]) | hostile_text,
        json_values | st.sampled_from(["INV-X", "2026-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59"]),
        max_size=3,
    )
)
@examples(200)
async def test_any_check_by_hand_is_answered_or_refused_naming_fields(
    client, admin_headers, anomaly, pool, hostile_log, body
):
    before = await counts(pool)
    response = await client.post("/v1/reconciliation/check", json=body, headers=admin_headers)
    assert_no_5xx(response.status)
    # The suite's app has no DOKU API: a well-formed check by invoice is 404 (never quoted) or 409.
    assert response.status in (202, 404, 409, 422), await response.text()
    assert_error_shape(response.status, await response.json())
    assert await counts(pool) == before
    assert_log_clean(hostile_log, UNKNOWN_CODE)
