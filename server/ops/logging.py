"""Logging in one place: structlog events, one JSON line each in production, console on a TTY.

dipc's own events take structlog's direct path (rendered with orjson, written as bytes): one line per
request sits on the hot path, so it must be cheap. Standard-library loggers (aiohttp, asyncpg) are routed
through the same processors and renderer, so every line a dipc process writes has one format.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time
from typing import Any, TextIO

import orjson
import structlog

from server.core.errors import error_text
from server.core.times import iso_second
from server.ops.masking import mask_code

_SECRET_FIELDS = frozenset({"secret", "secret_key", "signature", "token", "password", "authorization"})


# The Request-Id of the request whose task is running, as its own log line writes it: set by the HTTP
# middleware, and written by the lines its database work logs (db.deadline_exceeded, db.unavailable).
# Unset in a batch's task, which serves many requests at once, and in background loops.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("dipc_request_id", default=None)

# Fields every line of this process carries (a worker's index), set once by :func:`bind_process`.
_PROCESS_FIELDS: dict[str, Any] = {}


def bind_process(**fields: Any) -> None:
    """Add ``fields`` to every later line of this process (structlog's contextvars would copy the
    whole context on every line to find them: measurable on the request path)."""
    _PROCESS_FIELDS.update(fields)


def _add_process_fields(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    if _PROCESS_FIELDS:
        for name, value in _PROCESS_FIELDS.items():
            event.setdefault(name, value)
    return event


def _add_timestamp(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """``timestamp`` as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it
    (``2026-11-27T15:29:13.742211Z``), from the second's text formatted once (``iso_second``)."""
    now = time.time()
    second = int(now)
    event["timestamp"] = f"{iso_second(second)}.{int((now - second) * 1_000_000):06d}Z"
    return event


def _mask_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """A last guard: a field named like a secret never reaches the output, and a payment code only
    masked, whoever logs it."""
    for name in _SECRET_FIELDS.intersection(event):
        event[name] = "[redacted]"
    code = event.get("payment_code")
    if isinstance(code, str):
        event["payment_code"] = mask_code(code)
    return event


class _OutageWithoutTraceback(logging.Filter):
    """A library's warning about a database outage is one line, not a traceback per retry.

    asyncpg's pool logs every failed attempt to reopen its minimum of connections with ``exc_info``:
    during an outage, a traceback per worker per retry. A failure that only says the database is down
    (``server.store.pool.UNAVAILABLE_ERRORS``) becomes an ``error`` field; anything else keeps its
    traceback, since that would be a bug worth one.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith("asyncpg"):
            from server.store.pool import UNAVAILABLE_ERRORS  # not at import: the pool imports metrics

            error = record.exc_info[1]
            if isinstance(error, UNAVAILABLE_ERRORS):
                record.error = error_text(error)
                record.exc_info = None
                record.exc_text = None
        return True


class _Sink:
    """Where log lines go: a stream whose reader may go away (a pipe to a process manager or a log
    shipper that died). Then a write fails with EPIPE, or another OSError, in the middle of whatever was
    logging, a request's answer included. The lines are lost, not the work: on the first failure the
    stream's file descriptor is pointed at /dev/null, so that every later line (and what the stream still
    buffers) is dropped without another error. dipc does not reopen the stream; restart it to log again.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: Any) -> Any:
        try:
            return self._stream.write(data)
        except OSError:
            self._lost()
            return 0

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            self._lost()

    def isatty(self) -> bool:
        return bool(self._stream.isatty())

    def _lost(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # a stream without a descriptor keeps failing alone
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
            self._stream.flush()  # what it still held goes to /dev/null now


def _orjson_dumps(value: Any, **_kwargs: Any) -> bytes:
    return orjson.dumps(value, default=str)


def configure_logging(fmt: str = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        _add_process_fields,
        structlog.processors.add_log_level,
        _add_timestamp,
        _mask_secrets,
    ]
    renderer: Any
    if use_json:
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        factory: Any = structlog.BytesLoggerFactory(_Sink(stream.buffer))
        foreign_renderer: Any = structlog.processors.JSONRenderer(
            serializer=lambda value, **kw: orjson.dumps(value, default=str).decode()
        )
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
        factory = structlog.PrintLoggerFactory(_Sink(stream))
        foreign_renderer = renderer
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder({"error"})],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            foreign_renderer,
        ],
    )
    handler = logging.StreamHandler(_Sink(stream))
    handler.setFormatter(formatter)
    handler.addFilter(_OutageWithoutTraceback())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log has its own format; ours comes from the access_log middleware instead.
    logging.getLogger("aiohttp.access").disabled = True
