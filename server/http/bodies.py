"""Reading request bodies within a size limit, and writing JSON responses with orjson."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from server.core.documents import load_object
from server.core.errors import BodyTooLarge, UnsupportedMediaType

JSON = "application/json"


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """The whole body, or :class:`BodyTooLarge` as soon as it passes ``limit`` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"the body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"the body is over the limit of {limit} bytes")
    return bytes(body)


def require_json(request: web.Request) -> None:
    if request.content_type != JSON:
        shown = request.content_type or "none"
        raise UnsupportedMediaType(f"Content-Type must be {JSON}, not {shown}")


async def read_json_object(request: web.Request, limit: int) -> dict[str, Any]:
    require_json(request)
    return load_object(await read_bounded(request, limit))


def json_response(document: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(document), status=status, content_type=JSON, headers=headers)
