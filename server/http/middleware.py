"""Cross-cutting concerns: one log line per request, and the one place errors become responses."""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from server.core.errors import AuthenticationFailed, DipcError
from server.http.bodies import json_response
from server.http.keys import ERROR_RENDERER, LOG_FIELDS, SETTINGS
from server.ops import metrics

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
    fields = request[LOG_FIELDS]
    if isinstance(failure, web.HTTPException):
        error = _HttpError(failure)
        fields.setdefault("outcome", error.code)
        response = render_json_error(request, error)
        if failure.status == 405 and "Allow" in failure.headers:
            response.headers["Allow"] = failure.headers["Allow"]
        return response
    render = request.get(ERROR_RENDERER, render_json_error)
    if isinstance(failure, DipcError):
        fields.setdefault("outcome", failure.code)
        if isinstance(failure, AuthenticationFailed):
            _count_signature_failure(request, failure)
        return render(request, failure)
    fields.setdefault("outcome", "INTERNAL")
    log.error("http.unhandled", method=request.method, path=request.path, exc_info=failure)
    return render(request, DipcError("internal error; the incident is logged"))


def _count_signature_failure(request: web.Request, failure: AuthenticationFailed) -> None:
    request[LOG_FIELDS].update(reason=failure.reason, detail=failure.detail)
    client_id = request.headers.get("Client-Id", "")
    # Only configured Client-Ids become label values: anything else could grow the series without end.
    known = client_id in request.app[SETTINGS].clients
    route = request.match_info.route.resource
    metrics.SIGNATURE_FAILURES.labels(
        route=route.canonical if route is not None else "unmatched",
        client_id=client_id if known else "unknown",
        reason=failure.reason,
    ).inc()


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
    elapsed = time.perf_counter() - started
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    outcome = str(fields.get("outcome", "ok"))
    metrics.HTTP_REQUESTS.labels(route, request.method, str(response.status), outcome).inc()
    metrics.HTTP_DURATION.labels(route, outcome).observe(elapsed)
    log.info(
        "http.request",
        method=request.method,
        route=route,
        status=response.status,
        ms=round(elapsed * 1000, 3),
        request_id=(request.headers.get("Request-Id") or "")[:128] or None,
        **fields,
    )
    return response
