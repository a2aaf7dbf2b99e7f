"""The log's lines: what library code writes about a database outage (one line each, no traceback),
every line's timestamp, and the fields bound to the process."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime

import asyncpg
import structlog

from server.ops import logging as dipc_logging


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


def test_every_line_is_stamped_in_utc_to_the_microsecond(captured_log):
    before = datetime.now(UTC)
    structlog.get_logger(component="test").info("ours")
    logging.getLogger("asyncpg.pool").warning("theirs")
    after = datetime.now(UTC)

    lines = captured_log.lines()
    assert [line["event"] for line in lines] == ["ours", "theirs"]
    for line in lines:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"]), line["timestamp"]
        stamped = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
        assert before <= stamped <= after


def test_the_fields_bound_to_the_process_are_on_every_line_and_a_line_s_own_win(captured_log, monkeypatch):
    monkeypatch.setattr(dipc_logging, "_PROCESS_FIELDS", {})  # undone after the test
    log = structlog.get_logger(component="test")
    log.info("before")
    dipc_logging.bind_process(worker=3)
    log.info("after")
    log.info("its own", worker="mine")
    logging.getLogger("asyncpg.pool").warning("a library's")

    lines = captured_log.lines()
    assert "worker" not in lines[0]
    assert [line.get("worker") for line in lines[1:]] == [3, "mine", 3]


def test_a_payment_code_is_masked_on_any_line_that_names_it(captured_log):
    """(Found by review.) Call sites masked their codes one by one, and one did not."""
    structlog.get_logger(component="test").info("ours", payment_code="8896512345678123")
    structlog.get_logger(component="test").info("short", payment_code="123")
    assert "8896512345678123" not in captured_log.text()
    assert [line["payment_code"] for line in captured_log.lines()] == ["************8123", "***"]
