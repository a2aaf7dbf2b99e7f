"""``/v1/exceptions`` (finance closes conflicts and anomalies) and the audit trail ``/v1/inquiries``,
``/v1/notifications``: admin routes, behind the admin API's Bearer token."""

from __future__ import annotations

from aiohttp import web

from server.core import audit, casework
from server.core.errors import NotFound
from server.core.text import whole_number
from server.core.times import utcnow
from server.http.admin import _listed, _query_int, _query_limit, _query_time, _timeout
from server.http.bodies import json_response, read_json_object
from server.http.keys import POOL, SETTINGS
from server.ops import metrics
from server.store.pool import deadline

routes = web.RouteTableDef()


def _filter(request: web.Request, name: str) -> str | None:
    return request.query.get(name) or None


@routes.get("/exceptions")
async def list_exceptions(request: web.Request) -> web.Response:
    return await _listed(
        request,
        "admin.list_exceptions",
        casework.list_cases,
        casework.Case.document,
        state=_filter(request, "state"),
        kind=_filter(request, "kind"),
        reason=_filter(request, "reason"),
        after=_query_int(request, "after"),
        limit=_query_limit(request),
    )


@routes.get(r"/exceptions/{payment_id:[0-9]+}")  # ASCII: \d is any script's digits
async def get_exception(request: web.Request) -> web.Response:
    payment_id = _payment_id(request)
    async with deadline(_timeout(request), "admin.get_exception"):
        case = await casework.get_case(request.config_dict[POOL], payment_id)
    return json_response(case.document())


@routes.post(r"/exceptions/{payment_id:[0-9]+}/resolve")
async def resolve_exception(request: web.Request) -> web.Response:
    payment_id = _payment_id(request)
    raw = await read_json_object(request, request.config_dict[SETTINGS].max_body_bytes)
    resolution = casework.parse_resolution(raw)
    async with deadline(_timeout(request), "admin.resolve_exception"):
        result = await casework.resolve(request.config_dict[POOL], payment_id, resolution, now=utcnow())
    if result.created:
        metrics.EXCEPTION_RESOLUTIONS.labels(resolution.resolution.value).inc()
    return json_response(result.case.document())


def _payment_id(request: web.Request) -> int:
    written = request.match_info["payment_id"]
    try:
        payment_id = whole_number(written, maximum=casework.MAX_PAYMENT_ID)
    except ValueError:
        payment_id = 0
    if payment_id == 0:
        raise NotFound(f"payment {written if len(written) <= 20 else written[:20] + '…'} is not an exception")
    return payment_id


@routes.get("/inquiries")
async def list_inquiries(request: web.Request) -> web.Response:
    return await _listed(
        request,
        "admin.list_inquiries",
        audit.list_inquiries,
        audit.inquiry_document,
        payment_code=_filter(request, "payment_code"),
        since=_query_time(request, "since"),
        after=_filter(request, "after"),
        limit=_query_limit(request),
    )


@routes.get("/notifications")
async def list_notifications(request: web.Request) -> web.Response:
    return await _listed(
        request,
        "admin.list_notifications",
        audit.list_notifications,
        audit.notification_document,
        payment_code=_filter(request, "payment_code"),
        outcome=_filter(request, "outcome"),
        after=_query_int(request, "after"),
        limit=_query_limit(request),
    )
