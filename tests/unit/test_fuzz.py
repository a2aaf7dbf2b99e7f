"""Whatever arrives, parsing ends in a named error or a message: never an exception we did not mean."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from server.core.errors import DipcError
from server.core.imports import RowReader
from server.doku import messages
from tests.conftest import spec_example

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)

# Bodies shaped like DOKU's, with any member replaced by anything.
SPEC_PATHS = [
    ("online_to_offline_info", "payment_code"),
    ("channel", "id"),
    ("acquirer", "id"),
    ("order", "amount"),
    ("order", "invoice_number"),
    ("transaction", "status"),
    ("transaction", "date"),
    ("transaction", "original_request_id"),
    ("online_to_offline_payment", "identifier"),
]


@st.composite
def mutated_notification(draw) -> bytes:
    document = orjson.loads(spec_example("notification-alfa.json"))
    for outer, inner in draw(st.lists(st.sampled_from(SPEC_PATHS), max_size=4)):
        if draw(st.booleans()):
            document.setdefault(outer, {})
            if isinstance(document[outer], dict):
                document[outer][inner] = draw(json_values)
        else:
            document[outer] = draw(json_values)
    return orjson.dumps(document)


@given(st.binary(max_size=300) | json_values.map(orjson.dumps))
@settings(max_examples=300)
def test_any_body_is_an_inquiry_or_a_named_error(body):
    try:
        message = messages.parse_inquiry(body)
    except DipcError as error:
        refused = error.http_status
    else:
        refused = None
        assert message.payment_code.isdigit()
    assert refused in (None, 400)


@given(mutated_notification())
@settings(max_examples=300)
def test_any_notification_is_parsed_or_refused_with_a_named_error(body):
    try:
        message = messages.parse_notification(body)
    except DipcError as error:
        refused = error.http_status
    else:
        refused = None
        assert isinstance(message.amount, int)
        assert message.payment_code.isdigit()
        assert message.transaction_reference("rid")
    assert refused in (None, 400)


# Lines as they arrive from a stream split on "\n": anything else may be in them, "\r" included.
lines_of_text = st.lists(st.text(max_size=60).map(lambda text: text.replace("\n", "")), max_size=6)


@given(lines_of_text, st.sampled_from(["csv", "ndjson"]))
@settings(max_examples=300)
def test_any_import_line_is_a_row_or_a_rejection(lines, fmt):
    reader = RowReader(fmt)
    rows = []
    refused = None
    try:
        rows = [row for line in lines if (row := reader.feed(line)) is not None]
    except DipcError as error:  # a CSV header can refuse the whole import
        refused = error.http_status
    assert refused in (None, 400)
    for row in rows:
        assert isinstance(row[0], int)
        assert isinstance(row[1], (dict, str))


registration_fields = st.sampled_from(
    ["payment_code", "amount", "invoice_number", "customer_name", "customer_email", "reusable", "channel",
     "expires_at", "info1", "info2", "info3", "client_id", "version", "unknown"]
)  # fmt: skip


@given(st.dictionaries(registration_fields, json_values, max_size=8), st.booleans())
@settings(max_examples=500)
def test_any_registration_is_a_code_or_a_validation_error(raw, text):
    from datetime import UTC, datetime

    from server.core.errors import ValidationFailed
    from server.core.registration import parse_changes, parse_new_code
    from server.doku.channels import BinTable

    now = datetime(2026, 11, 25, tzinfo=UTC)
    for parse in (
        lambda: parse_new_code(
            raw, rules=BinTable.parse("ALFA:88965"), client_ids={"C1"}, now=now, text=text
        ),
        lambda: parse_changes(raw, now=now),
    ):
        fields: dict[str, str] | None = {"": "parsed"}
        try:
            parse()
        except ValidationFailed as invalid:
            fields = invalid.fields
        assert fields  # parsed, or refused naming at least one field
