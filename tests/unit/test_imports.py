"""Reading import files line by line."""

from __future__ import annotations

import pytest

from server.core.errors import BadRequest
from server.core.imports import RowReader, format_for_path


def rows(fmt: str, text: str) -> list:
    reader = RowReader(fmt)
    return [row for line in text.splitlines(keepends=True) if (row := reader.feed(line)) is not None]


def test_csv_rows_are_mapped_by_the_header_with_line_numbers():
    got = rows(
        "csv",
        "\ufeffpayment_code,amount,invoice_number,customer_name\r\n"
        '8896500000000001,1000,INV-1,"Santoso, Budi"\r\n'
        "\n"
        "8896500000000002,2000,INV-2,Siti\n",
    )
    assert got == [
        (2, {"payment_code": "8896500000000001", "amount": "1000", "invoice_number": "INV-1",
             "customer_name": "Santoso, Budi"}, True),
        (4, {"payment_code": "8896500000000002", "amount": "2000", "invoice_number": "INV-2",
             "customer_name": "Siti"}, True),
    ]  # fmt: skip


def test_a_csv_row_with_the_wrong_number_of_fields_is_its_own_rejection():
    got = rows("csv", "payment_code,amount,invoice_number,customer_name\n1,2,3\n")
    assert got == [(2, "has 3 fields; the header has 4")]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("payment_code,ammount,invoice_number,customer_name", "unknown column"),
        ("payment_code,invoice_number,customer_name", "missing column"),
        ("payment_code,amount,amount,invoice_number,customer_name", "twice"),
    ],
)
def test_a_bad_csv_header_refuses_the_whole_import(header, message):
    with pytest.raises(BadRequest, match=message):
        rows("csv", header + "\n")


def test_ndjson_rows_keep_json_types():
    got = rows("ndjson", '{"payment_code": "1", "amount": 5}\nnot json\n[1]\n')
    assert got[0] == (1, {"payment_code": "1", "amount": 5}, False)
    assert got[1][0] == 2
    assert got[1][1].startswith("not JSON")
    assert got[2] == (3, "must be a JSON object")


def test_format_follows_the_extension():
    assert format_for_path("codes.CSV") == "csv"
    assert format_for_path("codes.jsonl") == "ndjson"
    assert format_for_path("codes.txt") is None
