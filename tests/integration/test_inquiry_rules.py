"""The rules of inquiries and the bytes of their answers, where they live: the SQL of dipc_inquire.

Each function is called on its own, with a code built in the test (``jsonb_populate_record``), so every
rule and every answer is checked without HTTP. tests/integration/test_inquiry.py covers the whole path.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from server.core.outcomes import InquiryOutcome
from tests.conftest import spec_example

NOW = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
ALL = ["ALFA", "INDOMARET"]

ACTIVE: dict[str, Any] = {
    "payment_code": "8896512345678123",
    "client_id": "C1",
    "channel": "ANY",
    "invoice_number": "INV-1",
    "amount": 150000,
    "customer_name": "Budi",
    "customer_email": "",
    "info1": "",
    "info2": "",
    "info3": "",
    "reusable": False,
    "status": "active",
    "expires_at": None,
    "paid_count": 0,
    "invoice_seq": 0,
}

_CODE = "jsonb_populate_record(NULL::payment_codes, $1::jsonb)"


async def decide(
    pool: asyncpg.Pool,
    code: dict[str, Any] | None,
    *,
    client_id: str = "C1",
    channel: str = "ALFA",
    bin_channels: list[str] | None = ALL,
) -> InquiryOutcome:
    outcome = await pool.fetchval(
        f"SELECT dipc_inquiry_outcome({_CODE}, $2, $3, $4, $5)",
        code,
        client_id,
        channel,
        bin_channels,
        NOW,
    )
    return InquiryOutcome(outcome)


async def answer(pool: asyncpg.Pool, outcome: str, payment_code: str, code=None, invoice=None):
    row = await pool.fetchrow(
        f"SELECT http_status, body FROM dipc_inquiry_answer($2, $3, {_CODE}, $4)",  # noqa: S608
        code,
        outcome,
        payment_code,
        invoice,
    )
    return row["http_status"], row["body"]


async def test_an_active_code_is_payable(pool):
    assert await decide(pool, ACTIVE) is InquiryOutcome.SUCCESS


@pytest.mark.parametrize(
    ("change", "kwargs", "outcome"),
    [
        ({}, {"bin_channels": None}, InquiryOutcome.UNKNOWN_BIN),
        ({}, {"client_id": "C2"}, InquiryOutcome.OTHER_CLIENT),
        ({"status": "cancelled"}, {}, InquiryOutcome.CANCELLED),
        ({"status": "paid", "paid_count": 1}, {}, InquiryOutcome.ALREADY_PAID),
        ({"expires_at": NOW.isoformat()}, {}, InquiryOutcome.EXPIRED),
        ({"expires_at": (NOW - timedelta(seconds=1)).isoformat()}, {}, InquiryOutcome.EXPIRED),
        ({"channel": "INDOMARET"}, {}, InquiryOutcome.CHANNEL_MISMATCH),
        ({}, {"bin_channels": ["INDOMARET"]}, InquiryOutcome.CHANNEL_MISMATCH),
    ],
)
async def test_each_refusal_reason(pool, change, kwargs, outcome):
    assert await decide(pool, ACTIVE | change, **kwargs) is outcome


async def test_an_unknown_code_is_not_found(pool):
    assert await decide(pool, None) is InquiryOutcome.NOT_FOUND


async def test_a_code_outside_the_bins_is_unknown_whether_or_not_it_exists(pool):
    assert await decide(pool, None, bin_channels=None) is InquiryOutcome.UNKNOWN_BIN


async def test_paid_wins_over_expired_and_cancelled_over_paid(pool):
    expired = (NOW - timedelta(days=1)).isoformat()
    assert (
        await decide(pool, ACTIVE | {"status": "paid", "expires_at": expired}) is InquiryOutcome.ALREADY_PAID
    )
    assert await decide(pool, ACTIVE | {"status": "cancelled", "paid_count": 1}) is InquiryOutcome.CANCELLED


async def test_a_code_expiring_later_is_payable(pool):
    later = (NOW + timedelta(seconds=1)).isoformat()
    assert await decide(pool, ACTIVE | {"expires_at": later}) is InquiryOutcome.SUCCESS


async def test_a_code_restricted_to_the_asking_channel_is_payable(pool):
    assert await decide(pool, ACTIVE | {"channel": "ALFA"}) is InquiryOutcome.SUCCESS
    assert (
        await decide(pool, ACTIVE | {"channel": "ALFA"}, channel="INDOMARET")
        is InquiryOutcome.CHANNEL_MISMATCH
    )


# --- the bytes of each answer ------------------------------------------------------------------


async def test_a_success_renders_exactly_the_spec_example(pool):
    code = ACTIVE | {
        "invoice_number": "INV-2026-000123",
        "customer_name": "Budi Santoso",
        "info1": "Toko Contoh",
    }
    status, body = await answer(pool, "SUCCESS", code["payment_code"], code, "INV-2026-000123")
    assert status == 200
    assert body == spec_example("inquiry-response-success.json")


async def test_all_receipt_texts_render_in_order_and_amount_is_an_integer(pool):
    code = ACTIVE | {"payment_code": "1", "amount": 10, "customer_email": "n@example.com"}
    code |= {"info1": "a", "info2": "b", "info3": "c"}
    _, body = await answer(pool, "SUCCESS", "1", code, "I")
    document = orjson.loads(body)
    assert list(document["online_to_offline_info"]) == ["payment_code", "info1", "info2", "info3"]
    assert b'"amount":10}' in body  # an integer, never 10.0
    assert document["order"]["invoice_number"] == "I"


@pytest.mark.parametrize(
    "text", ['q"uote', "back\\slash", "ctl\x01\x1f\x7f", "tab\tnl\nret\r", "é漢字😀", "\u2028", "</script>"]
)
async def test_any_text_renders_as_orjson_would(pool, text):
    """Names and receipt texts are the merchant's: whatever they hold, the body is the JSON they make."""
    code = ACTIVE | {"customer_name": text, "info2": text}
    _, body = await answer(pool, "SUCCESS", ACTIVE["payment_code"], code, "INV-1")
    assert body == orjson.dumps(
        {
            "order": {"invoice_number": "INV-1", "amount": 150000},
            "online_to_offline_info": {"payment_code": ACTIVE["payment_code"], "info2": text},
            "online_to_offline_inquiry": {"status": "success"},
            "customer": {"name": text, "email": ""},
            "additional_info": {},
        }
    )


@pytest.mark.parametrize(
    ("outcome", "word", "status"),
    [
        (InquiryOutcome.NOT_FOUND, "billing_not_found", 404),
        (InquiryOutcome.UNKNOWN_BIN, "billing_not_found", 404),
        (InquiryOutcome.OTHER_CLIENT, "billing_not_found", 404),
        (InquiryOutcome.EXPIRED, "billing_was_expired", 400),
        (InquiryOutcome.ALREADY_PAID, "billing_already_paid", 400),
        (InquiryOutcome.CANCELLED, "decline", 400),
        (InquiryOutcome.CHANNEL_MISMATCH, "decline", 400),
    ],
)
async def test_refusals_keep_the_shape_with_their_status_word(pool, outcome, word, status):
    got_status, body = await answer(pool, outcome, "0012", ACTIVE)
    assert got_status == status
    assert body == (
        b'{"online_to_offline_info":{"payment_code":"0012"},"online_to_offline_inquiry":{"status":"'
        + word.encode()
        + b'"}}'
    )


async def test_every_outcome_has_an_answer(pool):
    """An outcome the SQL could choose but not render would be a NULL body: every one renders."""
    for outcome in InquiryOutcome:
        status, body = await answer(pool, outcome, "0012", ACTIVE, "INV-1")
        assert status in (200, 400, 404), outcome
        assert body, outcome
