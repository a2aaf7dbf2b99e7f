"""The spec's §6 test vector, both directions, and what must not verify."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from server.core.errors import AuthenticationFailed
from server.doku import signature
from server.doku.auth import Client, authenticate, signed_headers
from tests.conftest import CLIENT_ID, SECRET_KEY, spec_example

REQUEST_ID = "5b8e438f-fac1-4103-9e0e-ebfdc38b5acb"
KEY = SECRET_KEY.encode()


def test_request_digest_and_signature_match_the_spec_vector():
    body = spec_example("inquiry-alfa.json")
    assert len(body) == 242
    assert signature.digest(body) == "srptyodHd2sT1JunkGmbecGEO4RCcd06jdOZJnUg4o0="
    message = signature.components(
        client_id=CLIENT_ID,
        request_id=REQUEST_ID,
        timestamp="2026-11-25T08:45:42Z",
        target="/doku/inquiry",
        body=body,
    )
    assert signature.sign(KEY, message) == "HMACSHA256=aDo5oETQC6X59nuj+cjIXF5dV3F5bjLdEGIeYCwIKKs="


def test_response_digest_and_signature_match_the_spec_vector():
    body = spec_example("inquiry-response-success.json")
    assert signature.digest(body) == "meYXv1bxc/NZG05RkfWiQ7m0yA3MSdp3T/0vQ7qLVA0="
    headers = signed_headers(
        Client(CLIENT_ID, (KEY,)),
        request_id=REQUEST_ID,
        target="/doku/inquiry",
        body=body,
        now=datetime(2026, 11, 25, 8, 45, 43, tzinfo=UTC),
        response=True,
    )
    assert headers == {
        "Client-Id": CLIENT_ID,
        "Request-Id": REQUEST_ID,
        "Response-Timestamp": "2026-11-25T08:45:43Z",
        "Signature": "HMACSHA256=PZpwbu7TRt3WZnsqTO49ZltQ1UeA1XZtXmMBUr5YLY4=",
    }


def test_components_leave_out_the_digest_line_without_a_body():
    message = signature.components(
        client_id="C", request_id="R", timestamp="T", target="/p", body=b"", response=False
    )
    assert message == b"Client-Id:C\nRequest-Id:R\nRequest-Timestamp:T\nRequest-Target:/p"


def test_verify_reports_which_key_of_a_rotation_matched():
    message = b"anything"
    old, new = b"old-key", b"new-key"
    assert signature.verify([new, old], message, signature.sign(new, message)) == 0
    assert signature.verify([new, old], message, signature.sign(old, message)) == 1
    assert signature.verify([new], message, signature.sign(old, message)) is None


@pytest.mark.parametrize(
    "presented",
    [
        "HMACSHA256=aDo5oETQC6X59nuj+cjIXF5dV3F5bjLdEGIeYCwIKKt=",  # one character off
        "aDo5oETQC6X59nuj+cjIXF5dV3F5bjLdEGIeYCwIKKs=",  # prefix missing
        "HMACSHA512=aDo5oETQC6X59nuj+cjIXF5dV3F5bjLdEGIeYCwIKKs=",
        "",
        "HMACSHA256=ñ",
    ],
)
def test_near_misses_do_not_verify(presented):
    body = spec_example("inquiry-alfa.json")
    message = signature.components(
        client_id=CLIENT_ID,
        request_id=REQUEST_ID,
        timestamp="2026-11-25T08:45:42Z",
        target="/doku/inquiry",
        body=body,
    )
    assert signature.verify([KEY], message, presented) is None


def _spec_request_headers() -> dict[str, str]:
    return {
        "Client-Id": CLIENT_ID,
        "Request-Id": REQUEST_ID,
        "Request-Timestamp": "2026-11-25T08:45:42Z",
        "Signature": "HMACSHA256=aDo5oETQC6X59nuj+cjIXF5dV3F5bjLdEGIeYCwIKKs=",
    }


def _authenticate(headers, body, *, now, target="/doku/inquiry", keys=(KEY,)):
    return authenticate(
        headers,
        body,
        target=target,
        clients={CLIENT_ID: Client(CLIENT_ID, keys)},
        now=now,
        max_age_s=300,
        max_future_s=300,
    )


SPEC_NOW = datetime(2026, 11, 25, 8, 46, 0, tzinfo=UTC)


def test_the_spec_request_authenticates():
    result = _authenticate(_spec_request_headers(), spec_example("inquiry-alfa.json"), now=SPEC_NOW)
    assert result.request_id == REQUEST_ID
    assert result.key_index == 0
    assert result.timestamp == datetime(2026, 11, 25, 8, 45, 42, tzinfo=UTC)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"Client-Id": "MCH-UNKNOWN"}, "UNKNOWN_CLIENT"),
        ({"Request-Id": "another-id"}, "BAD_SIGNATURE"),
        ({"Request-Timestamp": "2026-11-25T08:45:43Z"}, "BAD_SIGNATURE"),
        ({"Signature": ""}, "MISSING_HEADER"),
    ],
)
def test_a_changed_header_fails_with_its_reason(change, reason):
    headers = _spec_request_headers() | change
    with pytest.raises(AuthenticationFailed) as failure:
        _authenticate(headers, spec_example("inquiry-alfa.json"), now=SPEC_NOW)
    assert failure.value.reason == reason


def test_a_changed_body_or_target_does_not_verify():
    body = spec_example("inquiry-alfa.json").replace(b"8896512345678123", b"8896512345678124")
    with pytest.raises(AuthenticationFailed, match="signature, Client-Id or timestamp"):
        _authenticate(_spec_request_headers(), body, now=SPEC_NOW)
    with pytest.raises(AuthenticationFailed):
        _authenticate(
            _spec_request_headers(), spec_example("inquiry-alfa.json"), now=SPEC_NOW, target="/inquiry"
        )


@pytest.mark.parametrize("offset_s", [-301, 301])
def test_a_timestamp_outside_the_window_is_stale(offset_s):
    from datetime import timedelta

    now = datetime(2026, 11, 25, 8, 45, 42, tzinfo=UTC) + timedelta(seconds=offset_s)
    with pytest.raises(AuthenticationFailed) as failure:
        _authenticate(_spec_request_headers(), spec_example("inquiry-alfa.json"), now=now)
    assert failure.value.reason == "STALE_TIMESTAMP"


def test_an_older_key_of_the_rotation_still_authenticates():
    result = _authenticate(
        _spec_request_headers(), spec_example("inquiry-alfa.json"), now=SPEC_NOW, keys=(b"new-key", KEY)
    )
    assert result.key_index == 1


def test_a_signed_but_impossible_timestamp_is_refused_not_crashed():
    timestamp = "9999-12-31T23:59:59-23:59"  # UTC would be in the year 10000
    message = signature.components(
        client_id=CLIENT_ID, request_id=REQUEST_ID, timestamp=timestamp, target="/doku/inquiry", body=b"{}"
    )
    headers = _spec_request_headers() | {
        "Request-Timestamp": timestamp,
        "Signature": signature.sign(KEY, message),
    }
    with pytest.raises(AuthenticationFailed) as failure:
        _authenticate(headers, b"{}", now=SPEC_NOW)
    assert failure.value.reason == "BAD_TIMESTAMP"
