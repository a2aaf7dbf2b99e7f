"""Cross-cutting concerns: one log line per request, and the one place errors become responses."""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from server.core.errors import DipcError
from server.http.bodies import json_response
from server.http.keys import ERROR_RENDERER, LOG_FIELDS

log = structlog.get_logger(component="dipc.http")


class _HttpError(DipcError):
    """aiohttp's own refusals (unknown route, wrong method) in our error shape."""

    def __init__(self, exc: web.HTTPException) -> None:
        super().__init__(exc.reason)
        self.http_status = exc.status
        self.code = exc.reason.upper().replace(" ", "_")


def render_json_error(request: web.Request, error: DipcError) -> web.StreamResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.http_status == 401 else None
    return json_response({"error": error.to_dict()}, status=error.http_status, headers=headers)


def _render_failure(request: web.Request, failure: Exception) -> web.StreamResponse:
    """The response for an exception a handler raised: its own shape for ours, JSON for the rest."""
    if isinstance(failure, web.HTTPException):
        response = render_json_error(request, _HttpError(failure))
        if failure.status == 405 and "Allow" in failure.headers:
            response.headers["Allow"] = failure.headers["Allow"]
        return response
    render = request.get(ERROR_RENDERER, render_json_error)
    if isinstance(failure, DipcError):
        return render(request, failure)
    log.error("http.unhandled", method=request.method, path=request.path, exc_info=failure)
    return render(request, DipcError("internal error; the incident is logged"))


@web.middleware
async def observe(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """Every request: errors become responses (in the route's shape), then one structured log line
    with route, status, latency, DOKU's Request-Id and the fields the handler added."""
    started = time.perf_counter()
    fields: dict[str, object] = {}
    request[LOG_FIELDS] = fields
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _render_failure(request, exc)
    except Exception as failure:
        response = _render_failure(request, failure)
    resource = request.match_info.route.resource
    log.info(
        "http.request",
        method=request.method,
        route=resource.canonical if resource is not None else "unmatched",
        status=response.status,
        ms=round((time.perf_counter() - started) * 1000, 3),
        request_id=(request.headers.get("Request-Id") or "")[:128] or None,
        **fields,
    )
    return response
