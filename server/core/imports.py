"""Reading bulk imports record by record: CSV with a header row (RFC 4180: a quoted field may span
lines), or NDJSON (one JSON object per line).

Shared by ``POST /v1/payment-codes/import`` and ``dipc codes import``. Bytes are split into lines as they
arrive (:func:`lines_of`, at most :data:`MAX_LINE_BYTES` held per line), so an import of millions of codes
never sits in memory whole, and a line without end costs a rejection, not the process's memory.
Rejections name the line a record starts on.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

import orjson

from server.core.codes import NEW_CODE_COLUMNS
from server.core.errors import BadRequest
from server.core.manage import ImportRow

FORMATS = ("csv", "ndjson")
REQUIRED_COLUMNS = ("payment_code", "amount", "invoice_number", "customer_name")

MEDIA_TYPES = {
    "text/csv": "csv",
    "application/csv": "csv",
    "application/x-ndjson": "ndjson",
    "application/ndjson": "ndjson",
    "application/jsonl": "ndjson",
    "application/x-jsonlines": "ndjson",
}


# One line, without its "\n" (or one CSV record, across the lines of its quoted fields and the line breaks
# between them), may hold at most this much: bytes as read, characters once decoded.
MAX_LINE_BYTES = 512 * 1024


class Unreadable:
    """A line that could not be taken as text: over :data:`MAX_LINE_BYTES`, or not UTF-8."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


TOO_LONG: Final = Unreadable(f"is over {MAX_LINE_BYTES // 1024} KiB")
NOT_UTF8: Final = Unreadable("is not UTF-8 text")


def _decoded(line: bytes | bytearray) -> str | Unreadable:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        return NOT_UTF8


async def lines_of(
    chunks: AsyncIterable[bytes], max_line: int = MAX_LINE_BYTES
) -> AsyncIterator[str | Unreadable]:
    """The lines in a stream of bytes, split at "\n" only and without it (a "\r" before it stays), one
    over ``max_line`` bytes as :data:`TOO_LONG`."""
    pending = bytearray()  # the start of a line that ends in a later chunk
    too_long = False  # that line is over max_line: counted, not held
    async for chunk in chunks:
        *ended, rest = chunk.split(b"\n")  # one split per chunk: a find and a slice per line cost more
        for piece in ended:
            if pending or too_long:
                if not too_long:
                    pending += piece
                yield TOO_LONG if too_long or len(pending) > max_line else _decoded(pending)
                pending = bytearray()
                too_long = False
            else:
                yield TOO_LONG if len(piece) > max_line else _decoded(piece)
        if not too_long:
            pending += rest
            if len(pending) > max_line:
                too_long = True  # keep counting the line, not holding it
                pending = bytearray()
    if too_long:
        yield TOO_LONG
    elif pending:
        yield _decoded(pending)


def _ends_in_quotes(text: str, inside: bool) -> bool:
    """Whether a CSV record is still inside a quoted field after ``text`` (as the csv module reads:
    a quote opens a field only at its start, ``""`` inside one is a quote)."""
    if '"' not in text:  # most lines: nothing opens or closes a field (a scan per character is slow)
        return inside
    at_start = not inside
    index, length = 0, len(text)
    while index < length:
        char = text[index]
        if inside:
            if char == '"':
                if index + 1 < length and text[index + 1] == '"':
                    index += 2
                    continue
                inside = False
        else:
            if char == '"' and at_start:
                inside = True
            at_start = char == ","
        index += 1
    return inside


def format_for_path(name: str) -> str | None:
    lowered = name.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".ndjson", ".jsonl")):
        return "ndjson"
    return None


class RowReader:
    """Turns lines, as :func:`lines_of` gives them (without their "\n"), into import rows; the CSV header
    (line 1) and blank lines yield nothing.

    A CSV record whose quoted field holds a line break is gathered over as many lines as it spans and
    reported under the line it starts on; it is a row only once whole, never half a field.
    """

    def __init__(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise BadRequest(f"import format must be one of {', '.join(FORMATS)}")
        self.format = fmt
        self.line = 0
        self.header: list[str] | None = None
        self._record: list[str] = []  # the lines of a CSV record still inside a quoted field
        self._record_start = 0
        self._record_size = 0
        self._record_broken: str | None = None

    def feed(self, text: str | Unreadable) -> ImportRow | None:
        self.line += 1
        if self._record:
            return self._continue_record(text)
        if isinstance(text, Unreadable):
            if self.line == 1 and self.format == "csv":
                raise BadRequest(f"CSV header line 1 {text.problem}")
            return (self.line, text.problem)
        if self.line == 1:
            text = text.removeprefix("\ufeff")
        if self.format == "csv" and _ends_in_quotes(text, False):
            self._record, self._record_start, self._record_size = [text], self.line, len(text)
            self._record_broken = None
            return None
        text = text.rstrip("\r")  # of a CRLF ending
        if self.format == "csv" and self.header is None:
            self.header = self._read_header(text)
            return None
        if not text.strip():
            return None
        if self.format == "ndjson":
            return self._json_row(text)
        return self._csv_row(text, self.line)

    def finish(self) -> ImportRow | None:
        """What is left at the end of the input: a record whose quoted field never closed."""
        if not self._record:
            return None
        start = self._record_start
        self._record = []
        if self.header is None:
            raise BadRequest("CSV header line 1: a quoted name never closes")
        return (start, "a quoted field never closes")

    def _continue_record(self, text: str | Unreadable) -> ImportRow | None:
        if isinstance(text, Unreadable):
            self._record_broken = self._record_broken or f"line {self.line} {text.problem}"
            text = '"'  # an unreadable line cannot end the field honestly; count it and go on
        size = self._record_size + 1 + len(text)  # the "\n" that joins the line to the record counts too
        if size > MAX_LINE_BYTES:
            self._record_broken = self._record_broken or f"is over {MAX_LINE_BYTES // 1024} KiB"
        if self._record_broken is None:
            self._record.append(text)
            self._record_size = size
        still_open = _ends_in_quotes(text, True)
        if still_open:
            return None
        record, start, broken = self._record, self._record_start, self._record_broken
        self._record = []
        if broken is not None:
            if self.header is None:
                raise BadRequest(f"CSV header line 1: {broken}")
            return (start, broken)
        text = "\n".join(record).rstrip("\r")
        if self.header is None:
            self.header = self._read_header(text)
            return None
        return self._csv_row(text, start)

    def _read_header(self, text: str) -> list[str]:
        try:
            header = [name.strip().lower() for name in next(csv.reader([text]), [])]
        except csv.Error as error:
            raise BadRequest(f"CSV header line 1 is not CSV: {error}") from None
        unknown = [name for name in header if name not in NEW_CODE_COLUMNS]
        if unknown:
            empty = " (an empty name: a comma at the end of the line?)" if "" in unknown else ""
            raise BadRequest(  # quoted and escaped: an empty name, a BOM or a space would not show
                f"CSV header line 1: unknown column(s) {', '.join(map(ascii, unknown))}{empty}; "
                f"known columns are {', '.join(NEW_CODE_COLUMNS)}"
            )
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        if missing:
            raise BadRequest(f"CSV header line 1: missing column(s) {', '.join(missing)}")
        if len(set(header)) != len(header):
            raise BadRequest("CSV header line 1: a column appears twice")
        return header

    def _csv_row(self, text: str, line: int) -> ImportRow:
        assert self.header is not None
        if '"' in text or "\r" in text or "\n" in text:
            try:
                rows = list(csv.reader(io.StringIO(text, newline="")))
            except csv.Error as error:
                return (line, f"not a CSV row: {error}")
            if len(rows) != 1:
                return (line, "not a CSV row: a line break outside quotes")
            values = rows[0]
        else:
            values = text.split(",")  # what the csv module reads from a line without quotes or breaks
        if len(values) != len(self.header):
            return (line, f"has {len(values)} fields; the header has {len(self.header)}")
        # Lengths compared just above: zip's own check (strict=True) cost a third of the row's dict.
        return (line, dict(zip(self.header, values, strict=False)), True)

    def _json_row(self, text: str) -> ImportRow:
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            return (self.line, f"not JSON: {error}")
        if not isinstance(document, dict):
            return (self.line, "must be a JSON object")
        return (self.line, document, False)


# Lines read between turns for the rest of the event loop, the checks of their rows included: about
# 1.5 ms on a slow machine (22 µs a row). Lines that arrive faster than they are read and checked (an
# upload already buffered, a file) would otherwise hold it for as long as they keep coming: the checks of
# a whole batch (about 110 ms there), or a file of blank lines from end to end. The worker's inquiries
# would wait, as would the next step of the batch at the database.
YIELD_EVERY_LINES = 64


async def read_rows(lines: AsyncIterable[str | Unreadable], fmt: str) -> AsyncIterator[ImportRow]:
    """The rows of ``lines``; each is checked by the caller before the next line is read."""
    reader = RowReader(fmt)
    async for text in lines:
        row = reader.feed(text)
        if row is not None:
            yield row
        if reader.line % YIELD_EVERY_LINES == 0:
            await asyncio.sleep(0)
    if (row := reader.finish()) is not None:
        yield row
    if reader.line == 0 or (fmt == "csv" and reader.header is None):
        # Nothing at all (or not even a header) is a mistake worth saying, not "0 imported".
        raise BadRequest("the import is empty" + ("; a CSV starts with a header row" if fmt == "csv" else ""))
