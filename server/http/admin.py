"""The merchant's admin API under ``/v1`` (Bearer ``DIPC_ADMIN_TOKEN``), described in schemas/openapi.yaml."""

from __future__ import annotations

import contextlib
import functools
import hmac
import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

from aiohttp import web

from server.config import Settings
from server.core import feed, manage, reconciliation
from server.core.documents import code_document, payment_document
from server.core.errors import (
    BadRequest,
    BodyTooLarge,
    Disabled,
    NotConfigured,
    Unauthorized,
    ValidationFailed,
)
from server.core.events import MAX_WAIT_S
from server.core.imports import MEDIA_TYPES, lines_of, read_rows
from server.core.manage import Page
from server.core.text import whole_number
from server.core.times import parse_timestamp, utcnow
from server.http.bodies import Slots, json_response, read_json_object, stream_chunks
from server.http.keys import CHECK_STATUS, LISTENER, POOL, SETTINGS
from server.http.middleware import client_gone
from server.ops import metrics
from server.ops.masking import is_clean_text
from server.reconcile import worker as reconciler
from server.store import reconciliation as reconciliation_store
from server.store.pool import deadline

routes = web.RouteTableDef()
T = TypeVar("T")

# An import streams from the client for as long as the upload takes; statements keep their own timeout.
IMPORT_TIMEOUT_S = 3600.0
# Uploads importing at once in one process: each holds a pool connection for as long as it lasts (up to
# IMPORT_TIMEOUT_S), so more would take the connections DOKU's inquiries and notifications need.
IMPORTS = web.AppKey("imports", Slots)
# Long-polls of the event feed waiting at once in one process (DIPC_FEED_MAX_WAITERS).
FEED_WAITS = web.AppKey("feed_waits", Slots)


def import_slots(settings: Settings) -> int:
    """A quarter of the pool, at least one."""
    return max(1, settings.db_pool_max // 4)


@web.middleware
async def bearer_auth(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    tokens = request.config_dict[SETTINGS].admin_tokens
    if not tokens:
        raise Disabled("the admin API is disabled: set DIPC_ADMIN_TOKEN to enable it")
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # Header values are str decoded with surrogateescape: encode back to the bytes that were sent.
    presented_bytes = presented.strip().encode("utf-8", "surrogateescape")
    # Compare against every token (rotation) without stopping early, in constant time each.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(presented_bytes, token.encode())
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized("a valid 'Authorization: Bearer <DIPC_ADMIN_TOKEN>' header is required")
    return await handler(request)


MAX_ID = feed.MAX_ID


def _typed(request: web.Request, name: str, parse: Callable[[str], T], problem: str | None) -> T | None:
    """A typed query parameter: absent is None; present but empty or malformed is a 422 saying
    ``problem``, or (None) what the parser said."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return parse(raw)
    except ValueError as error:
        raise ValidationFailed({name: problem or str(error)}) from None


def _query_int(request: web.Request, name: str) -> int | None:
    parse = functools.partial(whole_number, maximum=MAX_ID)
    return _typed(request, name, parse, f"must be an integer from 0 to {MAX_ID}, in the digits 0-9")


def _query_limit(request: web.Request) -> int | None:
    """A page's size, refused in the words manage.page_limit refuses 0 in."""
    parse = functools.partial(whole_number, maximum=manage.MAX_PAGE)
    return _typed(request, "limit", parse, f"must be between 1 and {manage.MAX_PAGE}")


# Seconds as a decimal in ASCII: float() also reads "1_0", " 1 " and other scripts' digits.
_SECONDS = re.compile(r"[0-9]+(\.[0-9]+)?")


def _query_seconds(request: web.Request, name: str, default: float, maximum: float) -> float:
    def parse(raw: str) -> float:
        if not _SECONDS.fullmatch(raw):
            raise ValueError(raw)
        value = float(raw)
        if not math.isfinite(value) or not 0 <= value <= maximum:
            raise ValueError(raw)
        return value

    value = _typed(request, name, parse, f"must be a number of seconds from 0 to {maximum:g}")
    return default if value is None else value


def _query_text(
    request: web.Request, name: str, *, digits: bool = False, max_length: int = 128
) -> str | None:
    """A free-text filter: absent or empty is None; one the database could not even compare is a 422."""
    raw = request.query.get(name) or None
    if raw is None:
        return None
    if digits and not (raw.isascii() and raw.isdigit() and len(raw) <= max_length):
        raise ValidationFailed({name: f"must be at most {max_length} digits"})
    if not is_clean_text(raw) or len(raw) > max_length:
        raise ValidationFailed({name: f"must be UTF-8 text of at most {max_length} characters, without NUL"})
    return raw


def _query_time(request: web.Request, name: str) -> datetime | None:
    return _typed(request, name, parse_timestamp, None)  # its words: a + the URL made a space, say


def _page(page: Page, render) -> dict:
    return {"items": [render(item) for item in page.items], "next": page.next}


def _timeout(request: web.Request) -> float:
    return request.config_dict[SETTINGS].admin_db_timeout_s


async def _listed(request: web.Request, name: str, lister, render, **filters) -> web.Response:
    """One page of a listing: ``lister(pool, **filters)`` within the admin deadline, each item rendered."""
    async with deadline(_timeout(request), name):
        page = await lister(request.config_dict[POOL], **filters)
    return json_response(_page(page, render))


@routes.post("/payment-codes")
async def create_code(request: web.Request) -> web.Response:
    settings = request.config_dict[SETTINGS]
    raw = await read_json_object(request, settings.max_body_bytes)
    async with deadline(_timeout(request), "admin.create_code"):
        code = await manage.create_code(
            request.config_dict[POOL], raw, rules=settings.bins, client_ids=settings.client_ids, now=utcnow()
        )
    location = f"{request.path.rstrip('/')}/{code.payment_code}"
    return json_response(code_document(code), status=201, headers={"Location": location})


@routes.get("/payment-codes")
async def list_codes(request: web.Request) -> web.Response:
    return await _listed(
        request,
        "admin.list_codes",
        manage.list_codes,
        code_document,
        status=_query_text(request, "status"),
        client_id=_query_text(request, "client_id"),
        after=_query_text(request, "after", digits=True),
        limit=_query_limit(request),
    )


@routes.post("/payment-codes/import")
async def import_codes(request: web.Request) -> web.Response:
    settings = request.config_dict[SETTINGS]
    fmt = request.query.get("format") or MEDIA_TYPES.get(request.content_type)
    if fmt is None:
        raise BadRequest(
            "send CSV (Content-Type: text/csv) or NDJSON (Content-Type: application/x-ndjson), "
            "or name the format with ?format=csv|ndjson"
        )
    limit = settings.import_max_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"the import is {request.content_length} bytes; the limit is {limit}")
    with request.config_dict[IMPORTS].slot():
        async with deadline(IMPORT_TIMEOUT_S, "admin.import_codes"):
            result = await manage.import_codes(
                request.config_dict[POOL],
                read_rows(lines_of(stream_chunks(request, limit)), fmt),
                rules=settings.bins,
                client_ids=settings.client_ids,
                now=utcnow(),
                step_timeout_s=settings.admin_db_timeout_s,
            )
    return json_response(result.document())


@routes.get(r"/payment-codes/{code:\d+}")
async def get_code(request: web.Request) -> web.Response:
    async with deadline(_timeout(request), "admin.get_code"):
        code = await manage.get_code(request.config_dict[POOL], request.match_info["code"])
    return json_response(code_document(code))


@routes.patch(r"/payment-codes/{code:\d+}")
async def update_code(request: web.Request) -> web.Response:
    raw = await read_json_object(request, request.config_dict[SETTINGS].max_body_bytes)
    async with deadline(_timeout(request), "admin.update_code"):
        code = await manage.update_code(
            request.config_dict[POOL], request.match_info["code"], raw, now=utcnow()
        )
    return json_response(code_document(code))


@routes.post(r"/payment-codes/{code:\d+}/cancel")
async def cancel_code(request: web.Request) -> web.Response:
    async with deadline(_timeout(request), "admin.cancel_code"):
        code = await manage.cancel_code(request.config_dict[POOL], request.match_info["code"])
    return json_response(code_document(code))


@routes.get("/payments")
async def list_payments(request: web.Request) -> web.Response:
    return await _listed(
        request,
        "admin.list_payments",
        manage.list_payments,
        payment_document,
        payment_code=_query_text(request, "payment_code", digits=True),
        kind=_query_text(request, "kind"),
        since=_query_time(request, "since"),
        after=_query_int(request, "after"),
        limit=_query_limit(request),
    )


@routes.get("/events")
async def read_events(request: web.Request) -> web.Response:
    """The event feed: events after the cursor ``after``, long-polling up to ``wait`` seconds."""
    wait = _query_seconds(request, "wait", 0.0, MAX_WAIT_S)
    waiting = request.config_dict[FEED_WAITS].slot() if wait > 0 else contextlib.nullcontext()
    with waiting:
        metrics.FEED_WAITERS.inc()
        try:
            async with deadline(_timeout(request) + wait, "admin.events"):
                events, cursor = await feed.read_feed(
                    request.config_dict[POOL],
                    request.config_dict[LISTENER],
                    after=_query_int(request, "after") or 0,
                    limit=_query_limit(request),
                    wait=wait,
                    gone=lambda: client_gone(request),
                )
        finally:
            metrics.FEED_WAITERS.dec()
    return json_response({"items": [event.document() for event in events], "next": cursor})


@routes.get("/webhook-deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    return await _listed(
        request,
        "admin.webhook_deliveries",
        feed.list_deliveries,
        feed.delivery_document,
        status=_query_text(request, "status"),
        after=_query_int(request, "after"),
        limit=_query_limit(request),
    )


@routes.post("/webhook-deliveries/redeliver")
async def redeliver(request: web.Request) -> web.Response:
    """Retry failed deliveries and hurry pending ones: ``{"event_ids": [...]}``, ``{"all_failed": true}``
    or ``{"all_pending": true}``."""
    raw = await read_json_object(request, request.config_dict[SETTINGS].max_body_bytes)
    wanted = feed.parse_redelivery(raw)
    async with deadline(_timeout(request), "admin.redeliver"):
        result = await feed.redeliver(request.config_dict[POOL], wanted)
    return json_response(result.document())


@routes.get("/reconciliation")
async def list_reconciliation(request: web.Request) -> web.Response:
    """Quoted invoices and where their reconciliation with DOKU's Check Status stands (spec §8)."""
    return await _listed(
        request,
        "admin.reconciliation",
        reconciliation.list_invoices,
        reconciliation.invoice_document,
        state=request.query.get("state") or None,
        after=request.query.get("after") or None,
        limit=_query_limit(request),
    )


@routes.post("/reconciliation/check")
async def check_reconciliation(request: web.Request) -> web.Response:
    """Ask DOKU now: ``{"invoice_number": …}`` answers what it said; ``{"since": …}`` schedules every
    unsettled invoice quoted since then for the reconcilers (202)."""
    settings = request.config_dict[SETTINGS]
    wanted = reconciliation.parse_check_request(await read_json_object(request, settings.max_body_bytes))
    pool = request.config_dict[POOL]
    if wanted.since is not None:
        async with deadline(_timeout(request), "admin.reconciliation_schedule"):
            scheduled = await reconciliation_store.check_soon(pool, wanted.since)
        return json_response({"scheduled": scheduled, "reconciler": settings.reconciling}, status=202)
    api = request.config_dict.get(CHECK_STATUS)
    if api is None:
        raise NotConfigured("DOKU's API is not configured: set DIPC_DOKU_API_URL (under --demo, a stand-in)")
    assert wanted.invoice_number is not None
    # The call to DOKU has its own timeout; the database work around it keeps the admin budget.
    async with deadline(_timeout(request) + settings.doku_api_timeout_s, "admin.reconciliation_check"):
        items = await reconciler.check_invoice_number(pool, api, settings, wanted.invoice_number)
    return json_response({"items": items})


def admin_app(*more: web.RouteTableDef) -> web.Application:
    app = web.Application(middlewares=[bearer_auth])
    app.add_routes(routes)
    for table in more:
        app.add_routes(table)
    return app
