"""Reading request bodies within a size limit and a time limit, and writing JSON responses with orjson.

A body is read before its sender is authenticated (the signature covers it), so reading is where a
hostile client can hold memory and connections: every read here is bounded in bytes, in time
(``DIPC_BODY_TIMEOUT_S``) and in how many run at once (``DIPC_MAX_BODY_READS``).

A ``Content-Encoding`` of gzip or deflate is undone here, not by aiohttp (``auto_decompress`` is off in
server/http/protocol.py): aiohttp inflated all that arrived, whatever the limit, and went on inflating
what it drained after the refusal, in the event loop (a review held every other request for up to 2 s,
and got a signed inquiry a 503, with three chunked bodies of 2 MB: 2 GiB of spaces each). Here no more
than the limit, plus a byte, is ever inflated.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http import HttpVersion11
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

# What is inflated at a time from one piece of a compressed body: a chunk of an import, or what a JSON
# body may still hold.
_INFLATE_PIECE = 256 * 1024


class _Body:
    """A request body's bytes as sent (its ``Content-Encoding`` is ``encoding``), decoded and counted
    against ``limit`` (``what`` names the body in the refusal): :meth:`take` gives the decoded bytes of
    each piece that arrives, :meth:`end` checks that the encoding is complete."""

    __slots__ = ("_coding", "_inflate", "_pending", "limit", "taken", "what")

    def __init__(self, encoding: str | None, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.taken = 0
        self._coding = _coding(encoding)
        self._inflate: Any = None  # made from the first bytes (deflate comes in two forms)
        self._pending = False  # the last call filled what it asked for: more output may be waiting

    def take(self, data: bytes) -> list[bytes]:
        if self._coding is None:
            self._count(len(data))
            return [data]
        pieces = []
        try:
            while data or self._pending:
                if self._inflate is None or self._inflate.eof:
                    if self._inflate is not None and self._coding != "gzip":
                        raise BadRequest("the body has bytes after the end of its Content-Encoding")
                    # gzip: one member after another is one body (RFC 1952; `cat a.gz b.gz`).
                    self._inflate = zlib.decompressobj(_window_bits(self._coding, data))
                # Never more than the limit allows, plus one byte to see that it is over.
                room = min(_INFLATE_PIECE, self.limit - self.taken + 1)
                piece = self._inflate.decompress(data, room)
                self._count(len(piece))
                pieces.append(piece)
                data = self._inflate.unconsumed_tail or self._inflate.unused_data
                self._pending = len(piece) == room and not self._inflate.eof
        except zlib.error as error:
            raise BadRequest(f"the body is not valid for its Content-Encoding: {error}") from None
        return pieces

    def end(self) -> None:
        if self._coding is not None and not (self._inflate is not None and self._inflate.eof):
            raise BadRequest("the body ends before its Content-Encoding does")

    def _count(self, size: int) -> None:
        self.taken += size
        if self.taken > self.limit:
            raise BodyTooLarge(f"{self.what} is over the limit of {self.limit} bytes")


def _coding(encoding: str | None) -> str | None:
    """``gzip`` or ``deflate``; None for none, and for a coding dipc does not know, whose bytes are taken
    as they are (as aiohttp took them: a signature over them verifies)."""
    coding = (encoding or "").strip().lower()
    if coding in ("gzip", "x-gzip"):
        return "gzip"
    return "deflate" if coding == "deflate" else None


def _window_bits(coding: str, first: bytes) -> int:
    """zlib's ``wbits`` for the coding. ``deflate`` is zlib's format (RFC 9110), but some senders send
    bare deflate: a zlib header tells them apart, by its first byte (as aiohttp did) and, when the
    second has come, its check bits."""
    if coding == "gzip":
        return 16 + zlib.MAX_WBITS
    zlib_header = first[0] & 0x0F == 8 and (len(first) < 2 or int.from_bytes(first[:2]) % 31 == 0)
    return zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole body, decoded, or :class:`BodyTooLarge` as soon as it passes ``limit`` bytes.

    A body that has not fully arrived is read within the body timeout and takes one of the
    concurrent-read slots; one that arrived with its headers (the usual case) is simply taken.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    body = _Body(request.headers.get("Content-Encoding"), limit, "the body")
    if request.content.is_eof():
        # The whole body arrived with the headers (the usual case): it is all in aiohttp's buffer, and
        # taking it at once costs a fraction of the read loop below (a coroutine per chunk).
        with _transport_errors:
            pieces = body.take(request.content.read_nowait())
        body.end()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)
    settings = request.config_dict[SETTINGS]
    with request.config_dict[BODY_READS].slot(), _transport_errors:
        await _ask_for_the_body(request)
        try:
            async with asyncio.timeout(settings.body_timeout_s):
                return await _read(request, body)
        except TimeoutError:
            raise RequestTimeout(f"the body did not arrive within {settings.body_timeout_s:g} s") from None


async def _ask_for_the_body(request: web.Request) -> None:
    """Say 100 Continue to a client that waits for it before it sends its body (``Expect:
    100-continue``, which server/http/protocol.py hides from aiohttp): only here, once the body is
    wanted, so that a refusal by the head alone (413 by the declared length, 401 for a missing admin
    token) is the first and only answer."""
    if request.version == HttpVersion11 and any(
        name.lower() == b"expect" and value.strip().lower() == b"100-continue"
        for name, value in request.raw_headers
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # not the answer's start: an error may still be answered


async def _read(request: web.Request, body: _Body) -> bytes:
    decoded = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        for piece in body.take(chunk):
            decoded += piece
    body.end()
    return bytes(decoded)


async def stream_chunks(request: web.Request, limit: int) -> AsyncIterator[bytes]:
    """A long upload (an import) chunk by chunk, decoded: at most ``limit`` bytes, each chunk within the
    body timeout of the one before (the whole may take as long as it takes)."""
    timeout = request.config_dict[SETTINGS].body_timeout_s
    body = _Body(request.headers.get("Content-Encoding"), limit, "the import")
    with _transport_errors:
        if not request.content.is_eof():
            await _ask_for_the_body(request)
        while True:
            try:
                async with asyncio.timeout(timeout):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise RequestTimeout(f"the upload stalled for {timeout:g} s") from None
            if not chunk:
                body.end()
                return
            for piece in body.take(chunk):
                yield piece


def require_json(request: web.Request) -> None:
    if request.content_type != JSON:
        shown = request.content_type or "none"
        raise UnsupportedMediaType(f"Content-Type must be {JSON}, not {escape(shown, 64)!r}")


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any]:
    require_json(request)
    return load_object(await read_bounded(request, limit))


def json_response(document: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(document), status=status, content_type=JSON, headers=headers)
