"""Timestamps from outside (DOKU's headers and bodies, the admin API, the CLI): RFC 3339 and nothing else."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from server.core.times import parse_timestamp


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2026-11-25T08:45:42Z", datetime(2026, 11, 25, 8, 45, 42, tzinfo=UTC)),
        ("2026-11-25t08:45:42z", datetime(2026, 11, 25, 8, 45, 42, tzinfo=UTC)),
        ("2026-11-25T15:45:42+07:00", datetime(2026, 11, 25, 8, 45, 42, tzinfo=UTC)),
        ("2026-11-25 08:45:42.5-00:30", datetime(2026, 11, 25, 9, 15, 42, 500000, tzinfo=UTC)),
        (" 2026-11-25T08:45:42Z ", datetime(2026, 11, 25, 8, 45, 42, tzinfo=UTC)),
        ("2026-11-25T15:45+07:00", datetime(2026, 11, 25, 8, 45, tzinfo=UTC)),  # ISO 8601 may omit seconds
        ("2026-11-25T15:45:42+0700", datetime(2026, 11, 25, 8, 45, 42, tzinfo=UTC)),  # and write +0700
        ("2026-11-25T15:45:42+07", datetime(2026, 11, 25, 8, 45, 42, tzinfo=UTC)),
        ("2026-11-25T08:45:42.1234567Z", datetime(2026, 11, 25, 8, 45, 42, 123456, tzinfo=UTC)),  # .NET
        ("2026-11-25T08:45:42.123456789+00:00", datetime(2026, 11, 25, 8, 45, 42, 123456, tzinfo=UTC)),
    ],
)
def test_rfc_3339_times_are_read_as_utc(text, moment):
    assert parse_timestamp(text) == moment


@pytest.mark.parametrize(
    "text",
    [
        "2030-01-01T00:00:00Z\x00",  # (found by review) Python 3.11's fromisoformat took these four
        "20300101T000000Z",
        "2030-W01-1T00:00:00Z",
        "2030-01-01T00:00:00+7",
        "٢٠٣٠-01-01T00:00:00Z",
        "2030-01-01",
        "",
    ],
)
def test_anything_else_is_refused(text):
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_timestamp(text)


def test_an_offset_whose_plus_a_url_turned_into_a_space_is_explained():
    with pytest.raises(ValueError, match="%2B"):
        parse_timestamp("2026-11-25T00:00:00 07:00")


def test_a_time_without_an_offset_says_so():
    with pytest.raises(ValueError, match="must carry a UTC offset or Z"):
        parse_timestamp("2026-11-25T00:00:00")
