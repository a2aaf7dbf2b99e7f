"""Reading import files line by line."""

from __future__ import annotations

import re

import pytest

from server.core.errors import BadRequest
from server.core.imports import RowReader, format_for_path


def rows(fmt: str, text: str) -> list:
    """The rows of ``text`` fed line by line as lines_of gives them: split at "\n" only, without it."""
    reader = RowReader(fmt)
    lines = text.removesuffix("\n").split("\n")
    return [row for line in lines if (row := reader.feed(line)) is not None]


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
        ("payment_code,ammount,invoice_number,customer_name", "unknown column(s) 'ammount'"),
        ("payment_code,amount,invoice_number,customer_name,", "'' (an empty name: a comma at the end"),
        ("payment_code,amount,invoice_number,customer_name,\ufeffinfo1", "'\\ufeffinfo1'"),
        ("payment_code,invoice_number,customer_name", "missing column"),
        ("payment_code,amount,amount,invoice_number,customer_name", "twice"),
    ],
)
def test_a_bad_csv_header_refuses_the_whole_import(header, message):
    with pytest.raises(BadRequest, match=re.escape(message)):
        rows("csv", header + "\n")


@pytest.mark.parametrize(
    "line",
    [
        "1,2,3,4",
        " 1 , 2,3 ,  4 ",
        "1,,,",
        ",,,",
        "1,2\x00,3,4",
        "1,2\u2028x,3,4",
        "1,2\x0bx,3,\x1c4",
        "1,é,3,4",
    ],
)
def test_a_line_without_quotes_reads_as_the_csv_module_reads_it(line):
    """Lines without quotes or line breaks are split without the csv module: the same fields."""
    import csv
    import io

    reader = RowReader("csv")  # fed as lines_of splits, at "\n" only (str.splitlines splits at more)
    reader.feed("payment_code,amount,invoice_number,customer_name")
    got = [reader.feed(line)]
    expected = next(csv.reader(io.StringIO(line, newline="")))
    assert got == [
        (
            2,
            dict(zip(("payment_code", "amount", "invoice_number", "customer_name"), expected, strict=True)),
            True,
        )
    ]


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


async def _aiter(items):
    for item in items:
        yield item


async def _rows(fmt: str, chunks: list[bytes], max_line: int = 512 * 1024) -> list:
    from server.core.imports import lines_of, read_rows

    return [row async for row in read_rows(lines_of(_aiter(chunks), max_line), fmt)]


HEADER = "payment_code,amount,invoice_number,customer_name\n"


async def test_a_quoted_csv_field_may_span_lines_and_keeps_its_line_breaks():
    text = HEADER + '8896500000000001,1000,INV-1,"multi\nline"\n8896500000000002,2000,INV-2,Siti\n'
    got = await _rows("csv", [text.encode()[i : i + 7] for i in range(0, len(text.encode()), 7)])
    assert got == [
        (2, {"payment_code": "8896500000000001", "amount": "1000", "invoice_number": "INV-1",
             "customer_name": "multi\nline"}, True),
        (4, {"payment_code": "8896500000000002", "amount": "2000", "invoice_number": "INV-2",
             "customer_name": "Siti"}, True),
    ]  # fmt: skip


async def test_escaped_quotes_and_commas_inside_a_multi_line_field():
    text = HEADER + '8896500000000001,1000,INV-1,"say ""hi"",\nthen, go"\n'
    [(line, row, _)] = await _rows("csv", [text.encode()])
    assert (line, row["customer_name"]) == (2, 'say "hi",\nthen, go')


async def test_a_quoted_field_that_never_closes_is_rejected_whole_at_its_first_line():
    text = HEADER + '8896500000000001,1000,INV-1,Siti\n8896500000000002,2000,INV-2,"open\nand on\n'
    got = await _rows("csv", [text.encode()])
    assert got[0][0] == 2
    assert got[1] == (3, "a quoted field never closes")


async def test_a_line_over_the_limit_is_a_rejection_and_reading_goes_on():
    text = HEADER + "8896500000000001,1000,INV-1," + "x" * 100 + "\n8896500000000002,2000,INV-2,Siti\n"
    got = await _rows("csv", [text.encode()], max_line=80)
    assert got[0] == (2, "is over 512 KiB")
    assert got[1][0] == 3
    assert got[1][1]["customer_name"] == "Siti"


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
async def test_a_line_may_hold_the_limit_exactly_wherever_the_chunks_end(chunk_size):
    from server.core.imports import NOT_UTF8, TOO_LONG, lines_of

    full = "é" * 40  # 80 bytes: the limit, without the line's "\n"
    crlf = "é" * 39 + "x\r"  # 80 bytes with the "\r" of a CRLF ending
    data = f"{full}\n{full}x\n{crlf}\n\n".encode() + b"\xff\xfe\n" + b"end"
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    got = [line async for line in lines_of(_aiter(chunks), max_line=80)]
    assert got == [full, TOO_LONG, crlf, "", NOT_UTF8, "end"]


async def test_a_record_of_line_breaks_alone_is_capped_too():
    # Lines come without their "\n"; each still counts towards the record's bound, or a quote followed by
    # nothing but line breaks would be held whole, however long.
    from server.core import imports

    text = HEADER + '8896500000000001,1000,INV-1,"' + "\n" * 20 + '"\n8896500000000002,2000,INV-2,Siti\n'
    original = imports.MAX_LINE_BYTES
    imports.MAX_LINE_BYTES = 40  # the record's first line is 29 characters, its line breaks 21
    try:
        got = await _rows("csv", [text.encode()])
    finally:
        imports.MAX_LINE_BYTES = original
    assert got[0] == (2, "is over 0 KiB")
    assert got[1][0] == 23
    assert got[1][1]["customer_name"] == "Siti"


async def test_a_record_spanning_lines_is_capped_too():
    from server.core import imports

    text = HEADER + '8896500000000001,1000,INV-1,"' + "x\n" * 10 + '"\n8896500000000002,2000,INV-2,Siti\n'
    original = imports.MAX_LINE_BYTES
    imports.MAX_LINE_BYTES = 10
    try:
        got = await _rows("csv", [text.encode()], max_line=1000)
    finally:
        imports.MAX_LINE_BYTES = original
    assert got[0][0] == 2
    assert "over" in got[0][1]
    assert got[1][0] == 13
    assert got[1][1]["customer_name"] == "Siti"


async def test_a_line_that_is_not_utf8_is_its_own_rejection():
    got = await _rows("ndjson", [b'{"a":1}\n\xff\xfe\n{"b":2}\n'])
    assert got == [(1, {"a": 1}, False), (2, "is not UTF-8 text"), (3, {"b": 2}, False)]
