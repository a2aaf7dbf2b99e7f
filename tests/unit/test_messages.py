"""Parsing DOKU's inquiry bodies leniently and rendering our answers byte-exactly."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from server.core.errors import InvalidField, InvalidJson, RequestIdReused, Unavailable
from server.doku import messages
from tests.conftest import spec_example


def test_the_spec_alfa_inquiry_parses():
    message = messages.parse_inquiry(spec_example("inquiry-alfa.json"))
    assert message == messages.InquiryMessage(payment_code="8896512345678123", channel="ALFA")


def test_the_spec_indomaret_inquiry_parses():
    message = messages.parse_inquiry(spec_example("inquiry-indomaret.json"))
    assert message == messages.InquiryMessage(payment_code="3301200000000042", channel="INDOMARET")


def test_unknown_members_are_ignored():
    document = orjson.loads(spec_example("inquiry-alfa.json"))
    document["new_doku_member"] = {"anything": [1, 2]}
    document["online_to_offline_info"]["extra"] = "x"
    assert messages.parse_inquiry(orjson.dumps(document)).payment_code == "8896512345678123"


def test_the_acquirer_names_the_channel_when_channel_id_is_unknown():
    document = orjson.loads(spec_example("inquiry-indomaret.json"))
    document["channel"]["id"] = "SOMETHING_NEW"
    assert messages.parse_inquiry(orjson.dumps(document)).channel == "INDOMARET"


def test_leading_zeros_are_kept():
    document = orjson.loads(spec_example("inquiry-alfa.json"))
    document["online_to_offline_info"]["payment_code"] = "0088965123"
    assert messages.parse_inquiry(orjson.dumps(document)).payment_code == "0088965123"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", InvalidJson),
        (b"{not json", InvalidJson),
        (b"[1, 2]", InvalidJson),
        (b"{}", InvalidField),
        (
            b'{"online_to_offline_info": {"payment_code": 8896512345678123}, "channel": {"id": "x"}}',
            InvalidField,
        ),
        (b'{"online_to_offline_info": {"payment_code": "88965-123"}}', InvalidField),
        (b'{"online_to_offline_info": {"payment_code": "' + b"1" * 26 + b'"}}', InvalidField),
        (b'{"online_to_offline_info": {"payment_code": "8896512345678123"}}', InvalidField),
        (
            b'{"online_to_offline_info": {"payment_code": "8896512345678123"}, "channel": {"id": "X"}}',
            InvalidField,
        ),
    ],
)
def test_unusable_bodies_are_refused_with_the_field_named(body, error):
    with pytest.raises(error) as refused:
        messages.parse_inquiry(body)
    if error is InvalidField:
        assert refused.value.field in ("online_to_offline_info.payment_code", "channel.id")


def test_protocol_errors_carry_doku_status_and_a_human_error():
    body = orjson.loads(messages.render_inquiry_error(RequestIdReused("used before")))
    assert body == {
        "online_to_offline_inquiry": {"status": "decline"},
        "error": {"code": "REQUEST_ID_REUSED", "message": "used before"},
    }
    assert orjson.loads(messages.render_inquiry_error(Unavailable("down")))["error"]["code"] == "UNAVAILABLE"


def test_the_simulator_sends_the_spec_examples_byte_for_byte():
    from datetime import UTC, datetime

    from server.doku.client import inquiry_body, notification_body

    assert inquiry_body(
        "8896512345678123", when=datetime(2026, 11, 25, 8, 45, 42, tzinfo=UTC)
    ) == spec_example("inquiry-alfa.json")
    assert inquiry_body(
        "3301200000000042", channel="INDOMARET", when=datetime(2026, 11, 25, 9, 1, 5, tzinfo=UTC)
    ) == spec_example("inquiry-indomaret.json")
    assert notification_body(
        "8896512345678123",
        invoice_number="INV-2026-000123",
        amount=150000,
        original_request_id="5b8e438f-fac1-4103-9e0e-ebfdc38b5acb",
        agent_trx_id="1246",
        when=datetime(2026, 11, 25, 8, 47, 10, tzinfo=UTC),
    ) == spec_example("notification-alfa.json")


def test_the_spec_notification_parses():
    message = messages.parse_notification(spec_example("notification-alfa.json"))
    assert (message.payment_code, message.invoice_number, message.amount, message.channel) == (
        "8896512345678123",
        "INV-2026-000123",
        150000,
        "ALFA",
    )
    assert message.transaction_status == "SUCCESS"
    assert message.transaction_reference("ignored") == "5b8e438f-fac1-4103-9e0e-ebfdc38b5acb"
    assert (message.agent_id, message.agent_store_id, message.agent_trx_id) == ("ALFAMART", "TZ01", "1246")


@pytest.mark.parametrize(
    ("date", "read_as"),
    [
        ("2026-11-25T15:47:10+07:00", datetime(2026, 11, 25, 8, 47, 10, tzinfo=UTC)),
        ("2026-11-25T08:47:10Z", datetime(2026, 11, 25, 8, 47, 10, tzinfo=UTC)),
        ("2026-11-25T08:47:10", None),  # no offset: not a moment we can place
        ("9999-12-31T23:59:59-23:59", None),  # out of range once in UTC
        ("25/11/2026", None),
        ("", None),
        (20261125, None),
        (None, None),
    ],
)
def test_a_transaction_date_is_read_where_it_can_be_and_never_refuses_the_payment(date, read_as):
    notification = orjson.loads(spec_example("notification-alfa.json"))
    notification["transaction"]["date"] = date
    assert messages.parse_notification(orjson.dumps(notification)).transaction_date == read_as
    check_answer = {"order": {"amount": 150000}, "transaction": {"status": "SUCCESS", "date": date}}
    message = messages.parse_check_status(
        orjson.dumps(check_answer), payment_code="8896512345678123", invoice_number="INV-2026-000123"
    )
    assert message.transaction_date == read_as
