"""Cross-cutting concerns: one log line per request, and the one place errors become responses."""

from __future__ import annotations

import asyncio
import time

import structlog
from aiohttp import hdrs, web

from server.core.errors import AuthenticationFailed, ClientAborted, DipcError, error_text
from server.http.bodies import json_response
from server.http.callers import caller_address
from server.http.keys import ERROR_RENDERER, LOG_FIELDS, SETTINGS
from server.ops import metrics
from server.ops.logging import REQUEST_ID
from server.ops.masking import for_log
from server.store.pool import CONTENDED_ERRORS, contended

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
    render = request.get(ERROR_RENDERER, render_json_error)
    if isinstance(failure, web.HTTPException):
        error = _HttpError(failure)
        fields.setdefault("outcome", error.code)
        response = render(request, error)
        if failure.status == 405 and "Allow" in failure.headers:
            response.headers["Allow"] = failure.headers["Allow"]
        return response
    if isinstance(failure, CONTENDED_ERRORS):
        log.warning("db.contended", path=for_log(request.path), error=error_text(failure))
        failure = contended(failure)
    if isinstance(failure, DipcError):
        fields.setdefault("outcome", failure.code)
        if isinstance(failure, AuthenticationFailed):
            _count_signature_failure(request, failure)
        return render(request, failure)
    if isinstance(failure, ConnectionError) and client_gone(request):
        # The client went away (mid-body, say): its doing. Counted apart, one line, no traceback.
        aborted = ClientAborted(f"the client closed the connection: {type(failure).__name__}")
        fields.setdefault("outcome", aborted.code)
        return render_json_error(request, aborted)
    fields.setdefault("outcome", "INTERNAL")
    log.error("http.unhandled", method=request.method, path=for_log(request.path), exc_info=failure)
    return render(request, DipcError("internal error; the incident is logged"))


def client_gone(request: web.Request) -> bool:
    """Whether the client has closed its connection (or it broke)."""
    transport = request.transport
    return transport is None or transport.is_closing()


# DOKU's two endpoints are labelled by their default paths whatever path serves them (DIPC_INQUIRY_PATH,
# DIPC_NOTIFICATION_PATH): the alert rules and the dashboard name them so (deploy/prometheus).
DOKU_ROUTE_LABELS = {"inquiry": "/doku/inquiry", "notification": "/doku/notification"}


def route_label(request: web.Request) -> str:
    """The route of ``request`` as metrics and the log name it: "unmatched" where none of our handlers
    serves it (aiohttp's 404 and 405, and DOKU's paths' 405 for another method than POST)."""
    route = request.match_info.route
    resource = route.resource
    if resource is None or route.method == hdrs.METH_ANY:
        return "unmatched"
    return DOKU_ROUTE_LABELS.get(resource.name or "", resource.canonical)


# Presented Client-Ids that are not configured are logged escaped and cut to this length.
CLIENT_ID_LOG_LIMIT = 64


def _count_signature_failure(request: web.Request, failure: AuthenticationFailed) -> None:
    client_id = request.headers.get("Client-Id", "")
    # Only configured Client-Ids become label values: anything else could grow the series without end.
    known = client_id in request.config_dict[SETTINGS].clients
    request[LOG_FIELDS].update(
        reason=failure.reason,
        detail=failure.detail,
        client_id=client_id if known else for_log(client_id, CLIENT_ID_LOG_LIMIT),
    )
    metrics.SIGNATURE_FAILURES.labels(
        route=route_label(request),
        client_id=client_id if known else "unknown",
        reason=failure.reason,
    ).inc()


@web.middleware
async def observe(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """Every request: errors become responses (in the route's shape), then one structured log line
    with route, status, latency, DOKU's Request-Id, the caller and the fields the handler added."""
    started = time.perf_counter()
    fields: dict[str, object] = {}
    request[LOG_FIELDS] = fields
    request_id = REQUEST_ID.set(for_log(request.headers.get("Request-Id") or None, 128))
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _render_failure(request, exc)
        except asyncio.CancelledError:
            # A server that cancels handlers when the client goes away (aiohttp's handler_cancellation):
            # still one line for the abort, then let the cancellation run its course.
            if client_gone(request):
                fields.setdefault("outcome", ClientAborted.code)
                _observe(request, ClientAborted.http_status, started)
            raise
        except Exception as failure:
            response = _render_failure(request, failure)
        _observe(request, response.status, started)
        return response
    finally:
        REQUEST_ID.reset(request_id)


# Methods that may become a metric label; aiohttp's pure-Python parser accepts any token as a method,
# and a label per invented method would grow the metrics without end.
LABELLED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _observe(request: web.Request, status: int, started: float) -> None:
    elapsed = time.perf_counter() - started
    fields = request[LOG_FIELDS]
    route = route_label(request)
    outcome = str(fields.get("outcome", "ok"))
    labelled = request.method in LABELLED_METHODS
    metrics.HTTP_REQUESTS_SERIES(route, request.method if labelled else "other", str(status), outcome).inc()
    metrics.HTTP_DURATION_SERIES(route, outcome).observe(elapsed)
    path = request.path
    log.info(
        "http.request",
        method=request.method if labelled else for_log(request.method, 32),
        route=route,
        # A path that is a route's own (constant) text needs no masking or escaping.
        path=path if path == route else for_log(path),
        status=status,
        ms=round(elapsed * 1000, 3),
        request_id=REQUEST_ID.get(),
        # The application's own settings (config_dict would build a view over every application).
        remote=caller_address(request, request.app[SETTINGS].trusted_proxies),
        **fields,
    )
