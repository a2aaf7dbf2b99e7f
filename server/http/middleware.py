"""Cross-cutting concerns: one log line per request, and the one place errors become responses."""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from server.core.errors import DipcError
from server.http.bodies import json_response
from server.http.keys import ERROR_RENDERER, LOG_FIELDS

log = structlog.get_logger("dipc.http")


class _HttpError(DipcError):
    """aiohttp's own refusals (unknown route, wrong method) in our error shape."""

    def __init__(self, exc: web.HTTPException) -> None:
        super().__init__(exc.reason)
        self.http_status = exc.status
        self.code = exc.reason.upper().replace(" ", "_")


def render_json_error(request: web.Request, error: DipcError) -> web.StreamResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.http_status == 401 else None
    return json_response({"error": error.to_dict()}, status=error.http_status, headers=headers)


@web.middleware
async def errors(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except DipcError as error:
        render = request.get(ERROR_RENDERER, render_json_error)
        return render(request, error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = render_json_error(request, _HttpError(exc))
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("http.unhandled", method=request.method, path=request.path)
        render = request.get(ERROR_RENDERER, render_json_error)
        return render(request, DipcError("internal error; the incident is logged"))


@web.middleware
async def access_log(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """One structured line per request: route, status, latency, DOKU's Request-Id, handler's fields."""
    started = time.perf_counter()
    fields: dict[str, object] = {}
    request[LOG_FIELDS] = fields
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        route = request.match_info.route.resource
        log.info(
            "http.request",
            method=request.method,
            route=route.canonical if route is not None else "unmatched",
            status=status,
            ms=elapsed_ms,
            request_id=(request.headers.get("Request-Id") or "")[:128] or None,
            **fields,
        )
