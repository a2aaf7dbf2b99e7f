"""Making untrusted text safe for logs: payment codes masked, bytes that are not UTF-8 escaped.

Every log line that carries text from a request (a path, a header, a parser's message) passes through
:func:`for_log`, so a full payment code never reaches a log and a hostile byte never breaks a line.
"""

from __future__ import annotations

import re

# A run of this many digits could be a payment code (the shortest BIN is 5 digits, codes are longer):
# mask it, whatever it is. Shorter numbers (ports, amounts, counts) stay readable.
_CODE_RUN = re.compile(r"\d{10,}")
# C0/C1 controls and lone surrogates (undecodable bytes under surrogateescape) never reach a log as is.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# What PostgreSQL ``text`` cannot hold (NUL), and what was not UTF-8 on the wire (lone surrogates).
_NOT_STORABLE = re.compile(r"[\x00\ud800-\udfff]")


def mask_code(payment_code: str) -> str:
    """A payment code with all but its last four digits hidden: ``************8123``."""
    if len(payment_code) <= 4:
        return "*" * len(payment_code)
    return "*" * (len(payment_code) - 4) + payment_code[-4:]


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    point = ord(char)
    if 0xDC80 <= point <= 0xDCFF:  # a byte that was not UTF-8, decoded with surrogateescape
        return f"\\x{point - 0xDC00:02x}"
    return f"\\x{point:02x}" if point <= 0xFF else f"\\u{point:04x}"


def escape(text: str, limit: int = 256) -> str:
    """``text`` with control characters and undecodable bytes as ``\\xNN``, cut at ``limit`` characters."""
    # Printable ASCII, most of what reaches a log, has nothing to escape (and the check is far cheaper).
    escaped = text if text.isascii() and text.isprintable() else _UNSAFE.sub(_escape, text)
    return escaped if len(escaped) <= limit else escaped[:limit] + "…"


def mask_codes_in(text: str) -> str:
    """``text`` with every digit run that could be a payment code masked."""
    return _CODE_RUN.sub(_mask_match, text)


def _mask_match(match: re.Match[str]) -> str:
    return mask_code(match.group())


def for_log(text: str | bytes | None, limit: int = 256) -> str | None:
    """Untrusted text (or raw bytes) as a log field: escaped, capped, payment codes masked."""
    if text is None:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    return mask_codes_in(escape(text, limit))


def is_clean_text(text: str) -> bool:
    """Whether PostgreSQL ``text`` can hold ``text`` and a reader sees it as sent: valid UTF-8, no NUL."""
    return _NOT_STORABLE.search(text) is None
