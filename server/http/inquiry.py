"""``POST /doku/inquiry``: DOKU asks for the bill behind a payment code (spec §3)."""

from __future__ import annotations

from aiohttp import web

from server.core.inquiries import InquiryRequest, inquire
from server.core.times import utcnow
from server.doku import messages
from server.http.doku import DokuEndpoint
from server.http.keys import INQUIRY_BATCHES, LOG_FIELDS, SETTINGS
from server.ops import metrics
from server.store.pool import deadline

INQUIRY_ENDPOINT = web.AppKey("inquiry_endpoint", DokuEndpoint)


def endpoint_for(app: web.Application) -> DokuEndpoint:
    settings = app[SETTINGS]
    return DokuEndpoint(
        settings=settings,
        target=settings.inquiry_path,
        max_age_s=settings.max_skew_s,
        max_future_s=settings.max_skew_s,
        render_error=messages.render_inquiry_error,
    )


async def handle_inquiry(request: web.Request) -> web.Response:
    endpoint = request.app[INQUIRY_ENDPOINT]
    settings = request.app[SETTINGS]
    auth, body = await endpoint.receive(request)
    endpoint.check_request(request, auth)
    message = messages.parse_inquiry(body)
    log_fields = request[LOG_FIELDS]
    log_fields.update(payment_code=message.payment_code, channel=message.channel)
    async with deadline(settings.doku_db_timeout_s, "inquiry"):
        answer = await inquire(
            request.app[INQUIRY_BATCHES],
            InquiryRequest(
                client_id=auth.client.client_id,
                request_id=auth.request_id,
                payment_code=message.payment_code,
                channel=message.channel,
                body_sha256=auth.body_sha256,
            ),
            rules=settings.bins,
            now=utcnow(),
        )
    log_fields.update(outcome=answer.outcome, replayed=answer.replayed)
    metrics.INQUIRIES_SERIES(answer.outcome, message.channel, "true" if answer.replayed else "false").inc()
    return endpoint.respond(request, answer.http_status, answer.response_body)
