"""Reading request bodies within a size limit and a time limit, and writing JSON responses with orjson.

A body is read before its sender is authenticated (the signature covers it), so reading is where a
hostile client can hold memory and connections: every read here is bounded in bytes, in time
(``DIPC_BODY_TIMEOUT_S``) and in how many run at once (``DIPC_MAX_BODY_READS``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from server.core.documents import load_object
from server.core.errors import (
    BadRequest,
    BodyTooLarge,
    ClientAborted,
    Overloaded,
    RequestTimeout,
    UnsupportedMediaType,
)
from server.http.keys import SETTINGS
from server.ops.masking import escape

JSON = "application/json"


class Slots:
    """How many of something run at once; past ``limit`` a new one is refused (503), not queued.

    Refusing at once bounds what they hold (bodies being read may each hold up to the body limit; an
    import holds a database connection for its whole upload) and answers a flood in microseconds; a
    genuine caller retries (DOKU does), and a body takes milliseconds when the sender is not stalling
    on purpose.
    """

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what  # "requests sending their bodies": what the refusal says is too many
        self.active = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            raise Overloaded(f"too many {self.what} at once (limit {self.limit})")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


BODY_READS = web.AppKey("body_reads", Slots)


class _TransportErrors:
    """What can go wrong while the client sends its body, as the errors we answer with.

    A class rather than a generator-based context manager: it guards every request's body, and a
    generator per request cost the read of a body that had already arrived half its time.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: type[BaseException] | None, error: BaseException | None, _tb: Any) -> None:
        if isinstance(error, ConnectionError):
            raise ClientAborted(f"the client closed the connection: {type(error).__name__}") from None
        if isinstance(error, (HttpProcessingError, RequestPayloadError)):  # broken chunked or gzip encoding
            raise BadRequest(f"the body is not valid HTTP: {type(error).__name__}") from None


_transport_errors = _TransportErrors()


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole body, or :class:`BodyTooLarge` as soon as it passes ``limit`` bytes.

    A body that has not fully arrived is read within the body timeout and takes one of the
    concurrent-read slots; one that arrived with its headers (the usual case) is simply taken.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    if request.content.is_eof():
        # The whole body arrived with the headers (the usual case): it is all in aiohttp's buffer, and
        # taking it at once costs a fraction of the read loop below (a coroutine per chunk).
        with _transport_errors:
            body = request.content.read_nowait()
        if len(body) > limit:
            raise BodyTooLarge(f"the body is over the limit of {limit} bytes")
        return body
    settings = request.config_dict[SETTINGS]
    with request.config_dict[BODY_READS].slot(), _transport_errors:
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                return await _read(request, limit)
        except TimeoutError:
            raise RequestTimeout(f"the body did not arrive within {settings.body_timeout_s:g} s") from None


async def _read(request: web.Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"the body is over the limit of {limit} bytes")
    return bytes(body)


async def stream_chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """A long upload (an import) chunk by chunk: at most ``limit`` bytes, each chunk within the body
    timeout of the one before (the whole may take as long as it takes)."""
    timeout = request.config_dict[SETTINGS].body_timeout_s
    received = 0
    with _transport_errors:
        while True:
            try:
                async with asyncio.timeout(timeout):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise RequestTimeout(f"the upload stalled for {timeout:g} s") from None
            if not chunk:
                return
            received += len(chunk)
            if received > limit:
                raise BodyTooLarge(f"the import is over the limit of {limit} bytes")
            yield chunk


def require_json(request: web.Request) -> None:
    if request.content_type != JSON:
        shown = request.content_type or "none"
        raise UnsupportedMediaType(f"Content-Type must be {JSON}, not {escape(shown, 64)!r}")


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any]:
    require_json(request)
    return load_object(await read_bounded(request, limit))


def json_response(document: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(document), status=status, content_type=JSON, headers=headers)
