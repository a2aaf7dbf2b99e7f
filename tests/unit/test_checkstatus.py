"""Check Status (spec §8): the request's signature, reading DOKU's answers, and the schedule's rules."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from server.config import DEFAULT_RECONCILE_SCHEDULE, ConfigError, load_settings
from server.core.errors import DipcError
from server.core.outcomes import CheckResult
from server.core.reconciliation import after_check, next_check, retry_after
from server.doku import signature
from server.doku.auth import Client, signed_headers
from server.doku.checkstatus import CheckAnswer, CheckStatusClient
from server.doku.messages import parse_check_status
from server.store.reconciliation import QuotedInvoice
from tests.conftest import CLIENT_ID, SECRET_KEY

INVOICE = "INV-2026-000123"
CODE = "8896512345678123"

# The spec's §8 answer, as DOKU sends it.
SPEC_ANSWER = orjson.dumps(
    {
        "order": {"invoice_number": INVOICE, "amount": 150000},
        "transaction": {
            "status": "SUCCESS",
            "date": "2026-11-25T08:47:10Z",
            "original_request_id": "5b8e438f-fac1-4103-9e0e-ebfdc38b5acb",
        },
        "service": {"id": "ONLINE_TO_OFFLINE"},
        "acquirer": {"id": "ALFA"},
        "channel": {"id": "ONLINE_TO_OFFLINE_ALFA"},
        "online_to_offline_info": {
            "payment_code": CODE,
            "created_date": "20261125154500",
            "expired_date": "20261126154500",
            "reusable_status": "false",
        },
        "online_to_offline_payment": {
            "identifier": [
                {"name": "AGENT_ID", "value": "ALFAMART"},
                {"name": "AGENT_STORE_ID", "value": "TZ01"},
                {"name": "AGENT_TRX_ID", "value": "1246"},
            ]
        },
    }
)


def test_the_check_status_request_reproduces_the_spec_vector():
    client = CheckStatusClient(None, "https://api.doku.com", timeout_s=5)  # type: ignore[arg-type]
    target = client.target(INVOICE)
    assert target == "/orders/v1/status/INV-2026-000123"
    headers = signed_headers(
        Client(CLIENT_ID, (SECRET_KEY.encode(),)),
        request_id="e71fe02a-bfef-4af9-a6f6-2cf1f03b00e7",
        target=target,
        body=b"",
        now=datetime(2026, 11, 25, 9, 0, 0, tzinfo=UTC),
        response=False,
    )
    assert headers == {
        "Client-Id": CLIENT_ID,
        "Request-Id": "e71fe02a-bfef-4af9-a6f6-2cf1f03b00e7",
        "Request-Timestamp": "2026-11-25T09:00:00Z",
        "Signature": "HMACSHA256=Gddj4DRr9Iq4/d6hdN99ioz8SuPA2XkQfpMiph3yHMg=",
    }
    message = signature.components(
        client_id=CLIENT_ID,
        request_id="e71fe02a-bfef-4af9-a6f6-2cf1f03b00e7",
        timestamp="2026-11-25T09:00:00Z",
        target=target,
        body=b"",
    )
    assert b"Digest" not in message
    assert message.count(b"\n") == 3


def test_the_target_keeps_a_gateway_path_and_encodes_the_invoice_as_one_segment():
    client = CheckStatusClient(None, "http://gateway.local/doku/", timeout_s=5)  # type: ignore[arg-type]
    assert client.target("INV/2026/7") == "/doku/orders/v1/status/INV%2F2026%2F7"


def test_the_spec_answer_is_a_paid_transaction_with_its_reference():
    message = parse_check_status(SPEC_ANSWER, payment_code=CODE, invoice_number=INVOICE)
    assert message.transaction_status == "SUCCESS"
    assert message.amount == 150000
    assert message.channel == "ALFA"
    assert message.transaction_date == datetime(2026, 11, 25, 8, 47, 10, tzinfo=UTC)
    assert message.transaction_reference(INVOICE) == "5b8e438f-fac1-4103-9e0e-ebfdc38b5acb"


def test_an_answer_naming_no_transaction_is_known_by_its_invoice():
    body = orjson.dumps({"order": {"amount": 150000}, "transaction": {"status": "SUCCESS"}})
    message = parse_check_status(body, payment_code=CODE, invoice_number=INVOICE)
    assert message.transaction_reference(INVOICE) == f"check-status:{INVOICE}"
    with_store = orjson.dumps(
        {
            "order": {"amount": 150000},
            "transaction": {"status": "SUCCESS"},
            "online_to_offline_payment": {
                "identifier": [
                    {"name": "AGENT_ID", "value": "ALFAMART"},
                    {"name": "AGENT_STORE_ID", "value": "TZ01"},
                    {"name": "AGENT_TRX_ID", "value": "1246"},
                ]
            },
        }
    )
    message = parse_check_status(with_store, payment_code=CODE, invoice_number=INVOICE)
    assert message.transaction_reference(INVOICE) == "agent:ALFAMART/TZ01/1246"


def test_a_pending_answer_needs_only_its_status():
    message = parse_check_status(
        b'{"transaction":{"status":"pending"}}', payment_code=CODE, invoice_number=INVOICE
    )
    assert message.transaction_status == "PENDING"
    assert message.amount is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<html>502 Bad Gateway</html>",
        b"[]",
        b'{"order":{"invoice_number":"INV-OTHER","amount":150000},"transaction":{"status":"SUCCESS"}}',
        b'{"order":{},"transaction":{"status":"SUCCESS"}}',
        b'{"order":{"amount":"lots"},"transaction":{"status":"SUCCESS"}}',
        b'{"order":{"amount":0},"transaction":{"status":"SUCCESS"}}',
        b'{"order":{"amount":"' + b"9" * 4301 + b'"},"transaction":{"status":"SUCCESS"}}',  # int() refuses it
        b'{"order":{"amount":150000},"transaction":{}}',
        b'{"order":{"amount":150000},"transaction":{"status":"SUCCESS"},'
        b'"online_to_offline_info":{"payment_code":"8896599999999999"}}',
    ],
)
def test_an_answer_that_cannot_be_read_as_about_this_invoice_is_refused(body):
    with pytest.raises(DipcError):
        parse_check_status(body, payment_code=CODE, invoice_number=INVOICE)


QUOTED = datetime(2026, 11, 25, 8, 0, 0, tzinfo=UTC)


def quoted(state: str = "pending") -> QuotedInvoice:
    return QuotedInvoice(
        payment_code=CODE, invoice_number=INVOICE, client_id=CLIENT_ID, channel="ALFA", amount=150000,
        state=state, first_quoted_at=QUOTED, attempts=0, timeouts_in_a_row=0, next_check_at=None,
        last_checked_at=None,
        last_result=None, last_detail=None, payment_id=None, settled_by=None, updated_at=QUOTED,
    )  # fmt: skip


def answer(result: CheckResult) -> CheckAnswer:
    return CheckAnswer("rid", "/orders/v1/status/x", result, "detail")


def test_the_next_check_is_the_next_slot_of_the_schedule_after_now():
    schedule = DEFAULT_RECONCILE_SCHEDULE
    assert next_check(QUOTED, schedule, QUOTED) == QUOTED + timedelta(minutes=2)
    assert next_check(QUOTED, schedule, QUOTED + timedelta(minutes=2)) == QUOTED + timedelta(minutes=15)
    # Checks missed while nobody reconciled collapse into the next slot.
    assert next_check(QUOTED, schedule, QUOTED + timedelta(hours=7)) == QUOTED + timedelta(hours=24)
    assert next_check(QUOTED, schedule, QUOTED + timedelta(hours=72)) is None


@pytest.mark.parametrize(
    "result",
    [
        r
        for r in CheckResult
        if r not in (CheckResult.PAID, CheckResult.EXPIRED, CheckResult.RATE_LIMITED) and not r.unanswered
    ],
)
def test_an_unknown_or_pending_answer_never_closes_an_invoice_before_the_schedule_ends(result):
    now = QUOTED + timedelta(minutes=3)
    outcome = after_check(quoted(), answer(result), DEFAULT_RECONCILE_SCHEDULE, now, retry_s=2)
    assert (outcome.state, outcome.next_check_at, outcome.counted) == (
        "pending",
        QUOTED + timedelta(minutes=15),
        True,
    )
    at_the_end = after_check(
        quoted(), answer(result), DEFAULT_RECONCILE_SCHEDULE, QUOTED + timedelta(days=3), 2
    )
    assert (at_the_end.state, at_the_end.next_check_at) == ("gave_up", None)


def test_expired_is_final_and_paid_was_settled_by_its_payment():
    now = QUOTED + timedelta(minutes=3)
    assert (
        after_check(quoted(), answer(CheckResult.EXPIRED), DEFAULT_RECONCILE_SCHEDULE, now, 2).state
        == "expired"
    )
    assert after_check(quoted(), answer(CheckResult.PAID), DEFAULT_RECONCILE_SCHEDULE, now, 2).state == "paid"


@pytest.mark.parametrize("result", [CheckResult.RATE_LIMITED, CheckResult.UNREACHABLE, CheckResult.TIMEOUT])
@pytest.mark.parametrize("after", [timedelta(minutes=3), timedelta(days=4)], ids=["on schedule", "past it"])
def test_a_throttled_or_unanswered_call_is_not_an_attempt_and_comes_back_after_the_backoff(result, after):
    """Also past the last slot (DOKU down through it): the invoice waits for an answer, it is not given
    up on for the want of one."""
    now = QUOTED + after
    outcome = after_check(quoted(), answer(result), DEFAULT_RECONCILE_SCHEDULE, now, retry_s=8)
    assert (outcome.state, outcome.next_check_at, outcome.counted) == (
        "pending",
        now + timedelta(seconds=8),
        False,
    )


def test_each_timeout_in_a_row_doubles_the_invoices_wait_up_to_15_minutes_and_never_gives_it_up():
    """DOKU may answer about the others and hang on this invoice: asked less and less, never given up."""
    invoice, now, waits = quoted(), QUOTED + timedelta(days=4), []
    for _ in range(12):
        outcome = after_check(
            invoice, answer(CheckResult.TIMEOUT), DEFAULT_RECONCILE_SCHEDULE, now, retry_s=4
        )
        assert (outcome.state, outcome.counted) == ("pending", False)
        assert outcome.next_check_at is not None
        waits.append((outcome.next_check_at - now).total_seconds())
        invoice = replace(invoice, timeouts_in_a_row=outcome.timeouts_in_a_row)
    assert waits == [4, 8, 16, 32, 64, 128, 256, 512, 900, 900, 900, 900]
    assert invoice.timeouts_in_a_row == 12
    # A longer pause of every reconciler (DOKU slow for all) is never cut short by the cap.
    assert retry_after(300, 1) == 300
    assert retry_after(1200, 5) == 1200
    assert retry_after(300, 10**9) == 900


@pytest.mark.parametrize("result", [CheckResult.RATE_LIMITED, CheckResult.UNREACHABLE])
def test_a_429_or_a_failed_connection_says_nothing_about_the_invoice_and_keeps_its_timeouts(result):
    now = QUOTED + timedelta(minutes=3)
    timed_out = replace(quoted(), timeouts_in_a_row=3)
    outcome = after_check(timed_out, answer(result), DEFAULT_RECONCILE_SCHEDULE, now, retry_s=2)
    assert (outcome.timeouts_in_a_row, outcome.next_check_at) == (3, now + timedelta(seconds=8))


@pytest.mark.parametrize(
    "result", [r for r in CheckResult if r not in (CheckResult.RATE_LIMITED,) and not r.unanswered]
)
def test_any_answer_about_the_invoice_or_counted_error_starts_its_timeouts_again(result):
    now = QUOTED + timedelta(minutes=3)
    outcome = after_check(
        replace(quoted(), timeouts_in_a_row=7), answer(result), DEFAULT_RECONCILE_SCHEDULE, now, 2
    )
    assert (outcome.timeouts_in_a_row, outcome.counted) == (0, True)


def test_a_check_by_hand_without_an_answer_leaves_a_later_scheduled_check_where_it_was():
    now = QUOTED + timedelta(minutes=3)
    scheduled = replace(quoted(), next_check_at=QUOTED + timedelta(minutes=15))
    outcome = after_check(scheduled, answer(CheckResult.UNREACHABLE), DEFAULT_RECONCILE_SCHEDULE, now, 2)
    assert (outcome.state, outcome.next_check_at, outcome.counted) == (
        "pending",
        QUOTED + timedelta(minutes=15),
        False,
    )
    given_up = after_check(quoted("gave_up"), answer(CheckResult.TIMEOUT), DEFAULT_RECONCILE_SCHEDULE, now, 2)
    assert (given_up.state, given_up.counted, given_up.timeouts_in_a_row) == ("gave_up", False, 0)
    # One that timed out many times before may be asked again later than scheduled, never earlier.
    silent = replace(scheduled, timeouts_in_a_row=9)
    outcome = after_check(silent, answer(CheckResult.TIMEOUT), DEFAULT_RECONCILE_SCHEDULE, now, 2)
    assert (outcome.next_check_at, outcome.timeouts_in_a_row) == (now + timedelta(seconds=900), 10)


def test_a_check_by_hand_of_a_given_up_invoice_keeps_it_given_up_unless_final():
    now = QUOTED + timedelta(days=4)
    gave_up = quoted("gave_up")
    assert (
        after_check(gave_up, answer(CheckResult.PENDING), DEFAULT_RECONCILE_SCHEDULE, now, 2).state
        == "gave_up"
    )
    assert (
        after_check(gave_up, answer(CheckResult.EXPIRED), DEFAULT_RECONCILE_SCHEDULE, now, 2).state
        == "expired"
    )


def test_only_answers_about_the_invoice_are_known():
    assert {r for r in CheckResult if r.known} == {CheckResult.PAID, CheckResult.PENDING, CheckResult.EXPIRED}


@pytest.mark.parametrize("raw", ["", "120,900", "1", "0.5,1,2"])
def test_reconcile_schedules_that_are_accepted(raw):
    settings = load_settings({"DIPC_RECONCILE_SCHEDULE": raw})
    assert settings.reconcile_schedule == (
        tuple(float(v) for v in raw.split(",")) if raw else DEFAULT_RECONCILE_SCHEDULE
    )


@pytest.mark.parametrize("raw", ["0", "-1", "900,120", "120,120", "a,b", "120,,900", "nan", "inf"])
def test_reconcile_schedules_that_are_refused(raw):
    with pytest.raises(ConfigError, match="DIPC_RECONCILE_SCHEDULE"):
        load_settings({"DIPC_RECONCILE_SCHEDULE": raw})


def test_the_doku_api_defaults_to_production_and_demo_never_calls_the_real_doku():
    assert load_settings({}).doku_api_url == "https://api.doku.com"
    assert load_settings({}, demo=True).doku_api_url is None
    assert load_settings({"DIPC_DOKU_API_URL": "http://127.0.0.1:8090/"}, demo=True).doku_api_url == (
        "http://127.0.0.1:8090"
    )
    with pytest.raises(ConfigError, match="never calls the real DOKU"):
        load_settings({"DIPC_DOKU_API_URL": "https://api-sandbox.doku.com"}, demo=True)
    with pytest.raises(ConfigError, match="DIPC_DOKU_API_URL"):
        load_settings({"DIPC_DOKU_API_URL": "ftp://x"})
    assert load_settings({"DIPC_RECONCILE": "off"}).reconcile is False
    with pytest.raises(ConfigError, match="DIPC_RECONCILE"):
        load_settings({"DIPC_RECONCILE": "maybe"})


@pytest.mark.parametrize(
    "name",
    ["DIPC_RECONCILE_RPS", "DIPC_DOKU_API_TIMEOUT_S", "DIPC_ADMIN_DB_TIMEOUT_S", "DIPC_DOKU_DB_TIMEOUT_S"],
)
@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_a_number_setting_must_be_finite(name, raw):
    # NaN passed "must be positive" (NaN <= 0 is false): DIPC_RECONCILE_RPS=nan made every reconciler
    # step fail with a traceback (int(nan)) and never check anything.
    with pytest.raises(ConfigError, match=name):
        load_settings({name: raw})


@pytest.mark.parametrize(
    "url",
    ["http://api.doku.com", "http://10.0.0.7:8090", "https://user:pw@api.doku.com", "https://:pw@x.test"],
)
def test_doku_api_urls_that_could_forge_or_leak_are_refused(url):
    with pytest.raises(ConfigError, match="DIPC_DOKU_API_URL"):
        load_settings({"DIPC_DOKU_API_URL": url})


@pytest.mark.parametrize(
    "url", ["https://api-sandbox.doku.com", "http://127.0.0.1:8090", "http://localhost:8090"]
)
def test_doku_api_urls_that_are_accepted(url):
    assert load_settings({"DIPC_DOKU_API_URL": url}).doku_api_url == url
