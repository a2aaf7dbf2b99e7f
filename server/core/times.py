"""Time, one way: aware datetimes in UTC, and the one parser of ISO 8601 timestamps."""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime

# RFC 3339's date-time (the profile of ISO 8601 the spec and the API name), with ISO 8601's leave to
# omit the seconds and to write an offset +0700 or +07, and the offset optional here so that a time
# without one is told so. Fractions of any length (.NET writes 7 digits, Go and Java 9) are cut to the
# microsecond. Python's fromisoformat alone also takes week dates, the basic format, other scripts'
# digits and (3.11) a NUL.
_RFC_3339 = re.compile(
    r"(?P<time>[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2})?)(?:\.(?P<fraction>[0-9]+))?"
    r"(?P<offset>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
_UNREADABLE = "must be an ISO 8601 timestamp with a UTC offset, such as 2026-12-31T23:59:59Z or …+07:00"


def utcnow() -> datetime:
    return datetime.now(UTC)


@functools.lru_cache(maxsize=4)
def iso_second(epoch_second: int) -> str:
    """A UTC second in ISO 8601, without a zone: ``2026-11-25T08:45:42``.

    Formatted once per second, however many signatures and log lines of that second ask for it:
    strftime per request showed in profiles."""
    return datetime.fromtimestamp(epoch_second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def parse_timestamp(text: object) -> datetime:
    """An ISO 8601 timestamp with a UTC offset (or ``Z``), as an aware UTC datetime.

    Raises ValueError saying what is wrong, also for dates the offset pushes out of range.
    """
    if not isinstance(text, str):
        raise ValueError("must be an ISO 8601 timestamp string")
    text = text.strip()
    match = _RFC_3339.fullmatch(text)
    if match is None:
        if " " in text and _RFC_3339.fullmatch("+".join(text.rsplit(" ", 1))):
            raise ValueError(f"{_UNREADABLE} (in a URL, write + as %2B)")
        raise ValueError(_UNREADABLE)
    time, fraction, offset = match.group("time", "fraction", "offset")
    micro = f".{fraction[:6]}" if fraction else ""
    try:
        parsed = datetime.fromisoformat(f"{time}{micro}{offset or ''}".upper())
    except ValueError:  # a month 13, a 25th hour
        raise ValueError(_UNREADABLE) from None
    if parsed.tzinfo is None:
        raise ValueError("must carry a UTC offset or Z")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None
