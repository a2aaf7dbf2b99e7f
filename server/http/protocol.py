"""The HTTP/1.1 connection under the routes: what a client gets before any route runs.

aiohttp answers requests its parser refuses (a header over 8 KB, a bare CR, obs-fold, Content-Length
with chunked, an unknown method, an HTTP/2 preface…) with a plain-text 400 that echoes part of the
request, and logs each at ERROR with a traceback and a dump of the raw bytes: a free log flood that also
copies payment codes and tokens into the log. It also has no timeout for reading a request's headers: a
client trickling them is held until the keep-alive timeout (75 s). Here:

- a refused request gets our JSON error shape, never an echo, and one log line at info
  (``http.bad_request``: status, code, the parser's exception class, the caller; not the bytes);
- a connection must deliver its request line and headers within ``DIPC_HEADER_TIMEOUT_S`` of their
  first byte (of connecting, for the first request), or it gets a 408 and is closed
  (``http.header_timeout``);
- after a refused or timed-out body, unread bytes are drained for at most :data:`LINGERING_TIME_S`;
- a client that takes none of its answers (the connection's send buffer full, and not shrinking) for
  ``DIPC_BODY_TIMEOUT_S`` is cut off (``http.write_timeout``): aiohttp waits for it for ever, holding the
  request and the answers it wrote (about 0.75 MB for one that pipelined forty ``GET /metrics``); one
  that reads slowly is not;
- an ``Expect`` other than ``100-continue`` is ignored rather than answered by aiohttp in plain text.

:class:`EdgeApplication` is ``web.Application`` with this connection class: ``web.run_app`` and the test
server both build their server through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
import warnings
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
)
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from server.http.keys import SETTINGS
from server.ops import metrics

log = structlog.get_logger(component="dipc.http")

# How long unread body bytes are drained after an answer sent before the body was read (aiohttp: 10 s).
LINGERING_TIME_S = 2.0

_PARSER_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (LineTooLong, "HEADER_TOO_LARGE", "the request line or a header is too long"),
    (BadHttpMethod, "BAD_METHOD", "the request method is not HTTP/1.1"),
    (BadStatusLine, "BAD_REQUEST_LINE", "the request line is not HTTP/1.1"),
    (InvalidHeader, "BAD_HEADER", "a header is not valid HTTP/1.1"),
)


def _describe(status: int, exc: BaseException | None) -> tuple[str, str]:
    """Our error code and message for a request the connection refused; never the request's bytes."""
    if status == 504:
        return "TIMEOUT", "the request took too long"
    if status >= 500:
        return "INTERNAL", "internal error; the incident is logged"
    for kind, code, message in _PARSER_ERRORS:
        if isinstance(exc, kind):
            return code, message
    return "BAD_REQUEST", "the request is not valid HTTP/1.1"


def _unsent(transport: asyncio.WriteTransport) -> int:
    """Bytes the client has not taken: the transport's buffer, and the kernel's send queue (Linux's
    TIOCOUTQ). The buffer alone shows no progress for seconds while the client reads: the kernel
    reports the socket writable again only once a good part of its own queue has gone."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(termios, "TIOCOUTQ"):
        with contextlib.suppress(OSError, ValueError):
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return unsent


def _remote(transport: asyncio.BaseTransport) -> str | None:
    """The peer's address, for a line logged before (or without) a request to take it from."""
    peer = transport.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) else None


def _json_error(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


class EdgeRequestHandler(RequestHandler):
    """aiohttp's connection, with a header-read timeout and our answer to requests it cannot parse."""

    def __init__(
        self, manager: web.Server, *, header_timeout_s: float, write_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._write_timeout_s = write_timeout_s
        self._write_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # what the client had not taken (_unsent) when the write timer was set
        self._last_payload: Any = None

    # --- header timeout -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        self._stop_write_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        # Bytes that end a body are not the next request's first bytes (checked before they are fed).
        in_body = self._last_payload is not None and not self._last_payload.is_eof()
        super().data_received(data)
        if self._request_count != parsed:
            # Headers are complete; the body has a timeout of its own where it is read.
            self._stop_header_timer()
            if self._messages:
                self._last_payload = self._messages[-1][1]
        elif data and not in_body:
            # Bytes after a complete request: the next request's headers have begun. (aiohttp calls
            # this with b"" when it resumes reading: that is no byte from the client.)
            self._start_header_timer()

    def _start_header_timer(self) -> None:
        if self._header_timer is None and self._header_timeout_s > 0:
            self._header_timer = self._loop.call_later(self._header_timeout_s, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or self._request_in_progress or self._messages:
            return
        log.info("http.header_timeout", remote=_remote(transport), timeout_s=self._header_timeout_s)
        metrics.HTTP_REQUESTS.labels("unmatched", "other", "408", "HEADER_TIMEOUT").inc()
        body = _json_error("REQUEST_TIMEOUT", "the request headers did not arrive in time")
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        self.force_close()

    # --- write timeout -------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._start_write_timer()

    def _start_write_timer(self) -> None:
        transport = self.transport
        if self._write_timer is None and self._write_timeout_s > 0 and transport is not None:
            self._unsent = _unsent(transport)
            self._write_timer = self._loop.call_later(self._write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self._stop_write_timer()
        super().resume_writing()

    def _stop_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        transport = self.transport
        if transport is None:
            return
        unsent = _unsent(transport)
        if unsent < self._unsent:
            # The client took some (a slow link, a large answer): it is reading. Wait again.
            self._start_write_timer()
            return
        log.info(
            "http.write_timeout",
            remote=_remote(transport),
            timeout_s=self._write_timeout_s,
            unsent_bytes=unsent,
        )
        transport.abort()  # what it did not take is dropped; its handler ends as for a client that left

    # --- requests the parser refused --------------------------------------------------------------

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, ConnectionError | HttpProcessingError | RequestPayloadError):
            # A body broken on the wire (bad gzip, bad chunks, a reset) surfacing again while aiohttp
            # drains it after our answer: the client's doing, already answered. One line, no traceback.
            log.info("http.connection_closed", problem=type(exc).__name__)
            return
        super().log_exception(*args, **kwargs)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        code, text = _describe(status, exc)
        fields = {
            "status": status,
            "code": code,
            "problem": type(exc).__name__ if exc is not None else None,
            "remote": request.remote,
        }
        if status >= 500:
            # Not a hostile request: a failure of ours outside every route (the middleware renders the
            # rest). Its traceback matters; its message may hold request bytes, so it is not logged.
            log.error("http.unhandled", **fields, exc_info=exc)
        else:
            log.info("http.bad_request", **fields)
        metrics.HTTP_REQUESTS.labels("unmatched", "other", str(status), code).inc()
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; the connection is closed instead")
        response = web.Response(status=status, body=_json_error(code, text), content_type="application/json")
        response.force_close()
        return response


def _ignoring_expectations(factory: Any) -> Any:
    """The request factory, with every ``Expect`` header hidden from aiohttp.

    aiohttp answers ``100-continue`` itself, before any handler: a client was told to send a body that
    its declared length then got refused (413), and a 1 TB upload was started on. The body readers
    (server/http/bodies.py) say 100 Continue once they know the body is wanted. Any other expectation
    aiohttp answers with a plain-text 417 that echoes the header (a 500 when the value is not UTF-8); RFC
    9110 lets a server ignore it instead. The header stays in ``raw_headers``, which is what the
    notification inbox stores and the body readers look at.
    """

    def make_request(message: Any, *args: Any, **kwargs: Any) -> Any:
        if "Expect" in message.headers:
            kept = CIMultiDict(
                (name, value) for name, value in message.headers.items() if name.lower() != "expect"
            )
            message = message._replace(headers=CIMultiDictProxy(kept))
        return factory(message, *args, **kwargs)

    return make_request


class EdgeServer(web.Server):
    """aiohttp's server, making :class:`EdgeRequestHandler` connections."""

    def __init__(self, *args: Any, header_timeout_s: float, write_timeout_s: float, **kwargs: Any) -> None:
        kwargs.setdefault("lingering_time", LINGERING_TIME_S)
        # Bodies are decoded where they are read, within their limit (server/http/bodies.py): aiohttp
        # inflated all that arrived, and what it drained after a refusal, in the event loop.
        kwargs["auto_decompress"] = False
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.write_timeout_s = write_timeout_s
        self.request_factory = _ignoring_expectations(self.request_factory)

    def __call__(self) -> RequestHandler:
        return EdgeRequestHandler(
            self,
            loop=self._loop,
            header_timeout_s=self.header_timeout_s,
            write_timeout_s=self.write_timeout_s,
            **self._kwargs,
        )


with warnings.catch_warnings():
    # aiohttp discourages subclassing Application (for attributes); this overrides only the hook that
    # builds the server, which AppRunner (so web.run_app and the test server) calls.
    warnings.simplefilter("ignore", DeprecationWarning)

    class EdgeApplication(web.Application):
        def _make_handler(
            self,
            *,
            loop: asyncio.AbstractEventLoop | None = None,
            access_log_class: type = AccessLogger,
            **kwargs: Any,
        ) -> web.Server:
            plain = super()._make_handler(loop=loop, access_log_class=access_log_class, **kwargs)
            return EdgeServer(
                plain.request_handler,
                request_factory=plain.request_factory,
                handler_cancellation=plain.handler_cancellation,
                loop=plain._loop,
                header_timeout_s=self[SETTINGS].header_timeout_s,
                write_timeout_s=self[SETTINGS].body_timeout_s,
                **plain._kwargs,
            )
