"""Log lines that library code writes about a database outage: one line each, no traceback."""

from __future__ import annotations

import logging

import asyncpg


def _raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_asyncpg_pool_floor_retries_during_an_outage_are_one_line_without_a_traceback(captured_log):
    # asyncpg 0.32's pool logs this (exc_info=True) every time it fails to reopen its minimum of
    # connections: during an outage, a traceback per worker per retry (seen with kill -9, pg_ctl stop).
    pool_log = logging.getLogger("asyncpg.pool")
    for error in (
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
    ):
        try:
            raise _raised(error)
        except BaseException:
            pool_log.warning("Failed to restore the pool connection floor; retrying", exc_info=True)

    lines = captured_log.lines()
    assert len(lines) == 3
    assert "Traceback" not in captured_log.text()
    for line in lines:
        assert "exception" not in line
        assert line["level"] == "warning"
        assert line["event"].startswith("Failed to restore the pool connection floor")
    assert "ConnectionRefusedError" in lines[0]["error"]
    assert lines[1]["error"] == "TimeoutError"
    assert "shutting down" in lines[2]["error"]


def test_a_library_failure_that_is_not_an_outage_keeps_its_traceback(captured_log):
    try:
        raise ValueError("a bug")
    except ValueError:
        logging.getLogger("asyncpg.pool").warning("something else", exc_info=True)
    (line,) = captured_log.lines()
    assert "ValueError: a bug" in line["exception"]
