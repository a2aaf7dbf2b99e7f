"""The rules of payment codes: what a registration must hold, and DOKU's BIN rules.

Which inquiry a code answers is SQL: tests/integration/test_inquiry_rules.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.core import registration
from server.core.codes import NewCode
from server.core.errors import ValidationFailed
from server.core.registration import parse_changes, parse_new_code
from server.doku.channels import BinConfigError, BinTable, parse_bin_rule

NOW = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
BINS = BinTable.parse("ALFA:88965:direct,INDOMARET:33012,ALFA:889660")
ALL = frozenset({"ALFA", "INDOMARET"})


# --- BIN rules (spec §2) ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "channels"),
    [
        ("88965" + "1" * 20, {"ALFA"}),  # direct: 20 free digits, 25 in all
        ("330121", {"INDOMARET"}),
        ("889660" + "1" * 14, {"ALFA"}),  # exclusive: 14 free digits, 20 in all
    ],
)
def test_codes_within_their_bin_rule(code, channels):
    assert BINS.check(code) == channels


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        ("88965" + "1" * 21, "at most 20 digits after the BIN"),
        ("889660" + "1" * 15, "at most 14 digits after the BIN"),
        ("88965", "must have digits after BIN"),
        ("12345678", "does not start with a configured BIN"),
    ],
)
def test_codes_breaking_their_bin_rule(code, problem):
    with pytest.raises(ValueError, match=problem):
        BINS.check(code)
    assert BINS.channels_for(code) is None


def test_codes_that_share_first_digits_get_their_own_verdicts():
    # The verdicts are remembered by the code's first digits and length: asked in turn, each code must
    # still meet the rules that its own digits and length call for.
    table = BinTable.parse("ALFA:88965,INDOMARET:889651")
    expected = [
        ("889651" + "1" * 14, {"ALFA", "INDOMARET"}),  # under both BINs, 20 digits: both allow it
        ("889651" + "1" * 15, {"ALFA"}),  # 21 digits: too long for the exclusive BIN
        ("889652" + "1" * 14, {"ALFA"}),  # the same first five digits, under the direct BIN only
        ("889651", {"ALFA"}),  # all of the exclusive BIN, but a digit after the direct one
    ]
    for _ in range(2):
        for code, channels in expected:
            assert table.check(code) == channels, code
    with pytest.raises(ValueError, match="must have digits after BIN 88965"):
        table.check("88965")
    assert table.channels_for("88964" + "1" * 10) is None


def test_without_bins_every_code_and_channel_is_allowed():
    assert BinTable.parse("").check("1") == ALL
    assert not BinTable.parse(None)


@pytest.mark.parametrize(
    "spec",
    [
        "ALFA",
        "SHOPEE:88965",
        "ALFA:8896",
        "ALFA:88a65",
        "ALFA:88965:exclusive",
        "ALFA:889651:direct",
        "ALFA:1:2:3",
    ],
)
def test_malformed_bin_rules_are_refused(spec):
    with pytest.raises(BinConfigError):
        parse_bin_rule(spec)


# --- registration --------------------------------------------------------------------------------

VALID = {
    "payment_code": "8896512345678123",
    "amount": 150000,
    "invoice_number": "INV-2026-000123",
    "customer_name": "Budi Santoso",
}


def register(raw, *, client_ids=("C1",), text=False):
    return parse_new_code(raw, rules=BINS, client_ids=client_ids, now=NOW, text=text)


def test_a_minimal_registration_takes_defaults():
    new = register(VALID)
    assert new.client_id == "C1"
    assert new.channel == "ALFA"  # from the code's BIN
    assert new.reusable is False
    assert new.expires_at is None
    assert (new.customer_email, new.info1) == ("", "")


def problems(raw, **kwargs) -> dict[str, str]:
    with pytest.raises(ValidationFailed) as failure:
        register(raw, **kwargs)
    return failure.value.fields


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        ({"payment_code": "8896512345678abc"}, "payment_code", "digits only"),
        ({"payment_code": 8896512345678123}, "payment_code", "never a number"),
        ({"payment_code": "1234567"}, "payment_code", "configured BIN"),
        ({"amount": 0}, "amount", "greater than 0"),
        ({"amount": -5}, "amount", "greater than 0"),
        ({"amount": 1500.5}, "amount", "integer"),
        ({"amount": "150000"}, "amount", "integer"),
        ({"amount": True}, "amount", "integer"),
        ({"invoice_number": "INV 1"}, "invoice_number", "letters, digits"),
        ({"invoice_number": "I" * 65}, "invoice_number", "at most 64"),
        ({"customer_name": "  "}, "customer_name", "required"),
        ({"customer_name": "Budi \u202eSantoso"}, "customer_name", "control characters"),  # a bidi override
        ({"customer_name": "Budi\u2028Santoso"}, "customer_name", "control characters"),
        ({"customer_name": "Budi\x85Santoso"}, "customer_name", "control characters"),  # C1: NEL
        ({"info1": "Lunas\u2066"}, "info1", "control characters"),
        ({"customer_email": "not-an-email"}, "customer_email", "email"),
        ({"info1": "x" * 41}, "info1", "at most 40"),
        ({"channel": "SHOPEE"}, "channel", "one of"),
        ({"channel": "INDOMARET"}, "channel", "configured for ALFA"),
        ({"expires_at": "2026-11-25T08:00:00Z"}, "expires_at", "future"),
        ({"expires_at": "2026-12-31 23:59"}, "expires_at", "offset"),
        ({"expires_at": "9999-12-31T23:59:59-23:59"}, "expires_at", "out of range"),
        ({"client_id": "C9"}, "client_id", "not a configured"),
        ({"reusable": "yes"}, "reusable", "true or false"),
        ({"ammount": 5}, "ammount", "not a known field"),
    ],
)
def test_each_invalid_field_is_named(change, field, problem):
    assert problem in problems(VALID | change)[field]


def test_every_problem_is_reported_at_once():
    found = problems({"payment_code": "x", "amount": 0})
    assert set(found) == {"payment_code", "amount", "invoice_number", "customer_name"}


def test_a_reusable_invoice_leaves_room_for_the_sequence():
    assert (
        "room for the sequence"
        in problems(VALID | {"reusable": True, "invoice_number": "I" * 50})["invoice_number"]
    )
    assert register(VALID | {"reusable": True, "invoice_number": "I" * 48}).reusable


def test_client_id_is_required_when_several_clients_could_own_the_code():
    assert "several" in problems(VALID, client_ids=("C1", "C2"))["client_id"]
    assert register(VALID | {"client_id": "C2"}, client_ids=("C1", "C2")).client_id == "C2"


def test_csv_text_values_are_understood():
    new = register(
        {k: str(v) for k, v in VALID.items()} | {"reusable": "true", "expires_at": "", "channel": ""},
        text=True,
    )
    assert new.amount == 150000
    assert new.reusable is True
    assert new.expires_at is None
    assert "whole number" in problems(VALID | {"amount": "1e5"}, text=True)["amount"]
    for other_digits in ("\u0661\u0665\u0660\u0660\u0660\u0660", "150_000", "+150000", "\u00b2"):
        assert "whole number" in problems(VALID | {"amount": other_digits}, text=True)["amount"]
    assert "at most" in problems(VALID | {"amount": "9" * 4301}, text=True)["amount"]  # past int()'s limit
    assert register(VALID | {"amount": "0" * 5000 + "150000"}, text=True).amount == 150000


# Values of each field, right and wrong, as JSON and as CSV text: enough to reach every branch of its check.
_CANDIDATES = {
    "payment_code": ["8896512345678123", " 8896512345678123 ", "8896512345678abc", 8896512345678123,
                     "1234567", "88965" + "1" * 21, "", "330121", "889660" + "1" * 14, "\u0661" * 8],
    "amount": [150000, "150000", " 150000 ", "0", 0, -5, "1e5", 1500.5, True, "9" * 20, "", "x"],
    "invoice_number": ["INV-1", "INV 1", "I" * 48, "I" * 50, "I" * 65, "", " INV/2 ", 7],
    "customer_name": ["Budi", "  ", "Budi \u202eSantoso", "x" * 128, "x" * 129, 5, "Budi\x85"],
    "customer_email": ["", "a@b.c", "not-an-email", "a@b@c", "a b@c", 5],
    "info1": ["", "Toko", "x" * 40, "x" * 41, "Lunas\u2066", 5],
    "info2": ["", "Toko", "\t"],
    "info3": ["", "Toko", "x" * 41],
    "reusable": [True, False, "true", "yes", "", "0", "maybe", 1],
    "channel": ["", "ALFA", " indomaret ", "INDOMARET", "ANY", "SHOPEE", 5],
    "expires_at": ["", "2026-12-31T23:59:59Z", "2026-12-31T23:59:59+07:00", "2026-11-25T08:00:00Z",
                   "2026-12-31 23:59", "9999-12-31T23:59:59-23:59", 5],
    "client_id": ["", "C1", "C2", "C9", 5],
    "ammount": [5],
}  # fmt: skip
# And in JSON any field may hold what Python takes as false, or another type altogether.
_ODD_JSON = [0, False, 0.0, 1.0, [], {}, {"x": 1}, ["8896512345678123"]]


@given(
    st.dictionaries(st.sampled_from(list(_CANDIDATES)), st.none(), max_size=3).flatmap(
        lambda changed: st.fixed_dictionaries(
            {name: st.sampled_from(_CANDIDATES[name] + _ODD_JSON) | st.none() for name in changed}
        )
    ),
    st.sampled_from([VALID, VALID | {"reusable": True}]),
    st.booleans(),
    st.sampled_from([("C1",), ("C1", "C2"), ()]),
)
# The fields whose check depends on another's value: a reusable code's invoice, a code's BIN's channel.
@example({"invoice_number": "I" * 50}, VALID | {"reusable": True}, False, ("C1",))
@example({"reusable": "true", "invoice_number": "I" * 50}, VALID, True, ("C1",))
@example({"reusable": "0", "invoice_number": "I" * 50}, VALID, True, ("C1",))
@example({"reusable": "False", "invoice_number": "I" * 49}, VALID, True, ("C1",))
@example({"client_id": 0}, VALID, False, ("C1",))  # a false value is not an absent one
@example({"customer_email": False}, VALID, False, ("C1",))
@example({"channel": "INDOMARET"}, VALID, False, ("C1",))
@example({"payment_code": "330121", "channel": "ALFA"}, VALID, True, ("C1",))
@settings(max_examples=1000)
def test_the_straight_check_and_the_check_field_by_field_agree(changes, valid, text, client_ids):
    # An import checks a row straight through, and field by field only once that found a problem, to name
    # every one: the two must take the same rows, with the same values, and refuse the same rows.
    # A valid registration (one-shot or reusable) with up to three fields changed, or left out (None):
    # most rows of an import are valid, and a row with one wrong value must be refused by both.
    raw = {name: value for name, value in (valid | changes).items() if value is not None}
    if text:  # a CSV row: every value text
        raw = {name: str(value) for name, value in raw.items()}
    args = (raw, BINS, client_ids, NOW, text)
    try:
        straight = registration._straight(*args)
    except registration._Invalid:
        straight = None
    try:
        field_by_field = registration._field_by_field(*args)
    except ValidationFailed:
        field_by_field = None
    # repr, not ==: True == 1 == 1.0, and a value of another type would be stored otherwise.
    assert repr(straight) == repr(field_by_field)


def test_an_import_row_holds_the_values_in_column_order():
    row = registration.new_code_values(
        VALID | {"reusable": "yes", "expires_at": "2026-12-31T23:59:59+07:00", "info2": " Toko "},
        rules=BINS, client_ids=("C1",), now=NOW, text=True,
    )  # fmt: skip
    assert row == (
        "8896512345678123", "C1", "ALFA", "INV-2026-000123", 150000, "Budi Santoso", "", "", "Toko", "",
        True, datetime(2026, 12, 31, 16, 59, 59, tzinfo=UTC),
    )  # fmt: skip
    assert NewCode(*row) == register(VALID | {"reusable": True, "expires_at": "2026-12-31T16:59:59Z",
                                              "info2": "Toko"})  # fmt: skip


def test_expiry_is_normalised_to_utc():
    new = register(VALID | {"expires_at": "2026-12-31T23:59:59+07:00"})
    assert new.expires_at == datetime(2026, 12, 31, 16, 59, 59, tzinfo=UTC)


def test_a_change_validates_only_what_it_names():
    changes = parse_changes({"amount": 200000, "expires_at": None, "version": 3}, now=NOW)
    assert changes.values == {"amount": 200000, "expires_at": None}
    assert changes.expected_version == 3


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"amount": 0}, "amount"),
        ({"payment_code": "1"}, "payment_code"),
        ({"reusable": True}, "reusable"),
        ({}, "body"),
        ({"amount": 5, "version": "3"}, "version"),
    ],
)
def test_a_bad_change_is_refused(raw, field):
    with pytest.raises(ValidationFailed) as failure:
        parse_changes(raw, now=NOW)
    assert field in failure.value.fields
