"""Time, one way: aware datetimes in UTC, and the one parser of ISO 8601 timestamps."""

from __future__ import annotations

import functools
from datetime import UTC, datetime


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
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError("must be an ISO 8601 timestamp such as 2026-12-31T23:59:59Z") from None
    if parsed.tzinfo is None:
        raise ValueError("must carry a UTC offset or Z")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None
