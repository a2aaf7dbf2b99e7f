"""Reading bulk imports line by line: CSV with a header row, or NDJSON (one JSON object per line).

Shared by ``POST /v1/payment-codes/import`` and ``dipc codes import``. Lines are read as they arrive, so
an import of millions of codes never sits in memory whole.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterable, AsyncIterator

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


def format_for_path(name: str) -> str | None:
    lowered = name.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".ndjson", ".jsonl")):
        return "ndjson"
    return None


class RowReader:
    """Turns lines into import rows; the CSV header (line 1) and blank lines yield nothing."""

    def __init__(self, fmt: str) -> None:
        if fmt not in FORMATS:
            raise BadRequest(f"import format must be one of {', '.join(FORMATS)}")
        self.format = fmt
        self.line = 0
        self.header: list[str] | None = None

    def feed(self, text: str) -> ImportRow | None:
        self.line += 1
        if self.line == 1:
            text = text.removeprefix("\ufeff")
        text = text.rstrip("\r\n")
        if self.format == "csv" and self.header is None:
            self.header = self._read_header(text)
            return None
        if not text.strip():
            return None
        if self.format == "ndjson":
            return self._json_row(text)
        return self._csv_row(text)

    def _read_header(self, text: str) -> list[str]:
        try:
            header = [name.strip().lower() for name in next(csv.reader([text]), [])]
        except csv.Error as error:
            raise BadRequest(f"CSV header line 1 is not CSV: {error}") from None
        unknown = [name for name in header if name not in NEW_CODE_COLUMNS]
        if unknown:
            raise BadRequest(
                f"CSV header line 1: unknown column(s) {', '.join(unknown)}; "
                f"known columns are {', '.join(NEW_CODE_COLUMNS)}"
            )
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        if missing:
            raise BadRequest(f"CSV header line 1: missing column(s) {', '.join(missing)}")
        if len(set(header)) != len(header):
            raise BadRequest("CSV header line 1: a column appears twice")
        return header

    def _csv_row(self, text: str) -> ImportRow:
        assert self.header is not None
        try:
            values = next(csv.reader([text]))
        except csv.Error as error:
            return (self.line, f"not a CSV row: {error}")
        if len(values) != len(self.header):
            return (self.line, f"has {len(values)} fields; the header has {len(self.header)}")
        return (self.line, dict(zip(self.header, values, strict=True)), True)

    def _json_row(self, text: str) -> ImportRow:
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError as error:
            return (self.line, f"not JSON: {error}")
        if not isinstance(document, dict):
            return (self.line, "must be a JSON object")
        return (self.line, document, False)


async def read_rows(lines: AsyncIterable[str], fmt: str) -> AsyncIterator[ImportRow]:
    reader = RowReader(fmt)
    async for text in lines:
        row = reader.feed(text)
        if row is not None:
            yield row
    if reader.line == 0 or (fmt == "csv" and reader.header is None):
        # Nothing at all (or not even a header) is a mistake worth saying, not "0 imported".
        raise BadRequest("the import is empty" + ("; a CSV starts with a header row" if fmt == "csv" else ""))
