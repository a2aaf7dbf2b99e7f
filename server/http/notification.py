"""``POST /doku/notification``: DOKU tells us a payment happened (spec §4); 2xx only once on disk."""

from __future__ import annotations

from aiohttp import web

from server.core.errors import DipcError
from server.core.notifications import RawNotification, record_notification, record_rejected
from server.core.payments import PaymentNotice
from server.core.times import utcnow
from server.doku import conventions, messages
from server.http.doku import DokuEndpoint
from server.http.keys import LOG_FIELDS, PAYMENT_BATCHES, POOL, SETTINGS
from server.ops import metrics
from server.store.pool import deadline

NOTIFICATION_ENDPOINT = web.AppKey("notification_endpoint", DokuEndpoint)


def endpoint_for(app: web.Application) -> DokuEndpoint:
    settings = app[SETTINGS]
    return DokuEndpoint(
        settings=settings,
        target=settings.notification_path,
        # DOKU retries for hours and may not re-sign: accept old timestamps (replays record nothing new).
        max_age_s=settings.notification_max_age_s,
        max_future_s=conventions.NOTIFICATION_MAX_FUTURE_S,
        render_error=messages.render_notification_error,
    )


def _payment_code_hint(body: bytes) -> str:
    """The payment code of an unusable body, when it can still be read (for the inbox key)."""
    try:
        return messages.payment_code_of(messages.load_object(body))
    except DipcError:
        return ""


async def handle_notification(request: web.Request) -> web.Response:
    endpoint = request.app[NOTIFICATION_ENDPOINT]
    settings = request.app[SETTINGS]
    pool = request.app[POOL]
    auth, body = await endpoint.receive(request)
    raw = RawNotification(
        client_id=auth.client.client_id,
        request_id=auth.request_id,
        # The bytes as received (aiohttp decodes them as UTF-8 with surrogateescape; the inbox keeps
        # what is not UTF-8 exactly): every header, in order, duplicates included.
        headers=[
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in request.raw_headers
        ],
        body=body,
    )
    log_fields = request[LOG_FIELDS]
    try:
        endpoint.check_request(request, auth)
        message = messages.parse_notification(body)
    except DipcError as error:
        # Signed by DOKU but unusable: keep it (nothing is lost), then answer the protocol error.
        async with deadline(settings.notification_db_timeout_s, "notification.rejected"):
            await record_rejected(pool, raw, _payment_code_hint(body))
        log_fields.update(outcome="rejected", error=error.code)
        metrics.NOTIFICATIONS.labels("rejected").inc()
        raise
    log_fields.update(payment_code=message.payment_code, channel=message.channel)
    notice = PaymentNotice(
        client_id=auth.client.client_id,
        payment_code=message.payment_code,
        invoice_number=message.invoice_number,
        amount=message.amount,
        transaction_ref=message.transaction_reference(auth.request_id),
        channel=message.channel,
        paid=message.transaction_status == conventions.PAID_STATUS,
        transaction_status=message.transaction_status,
        paid_at=message.transaction_date,
        agent_id=message.agent_id,
        agent_store_id=message.agent_store_id,
        agent_trx_id=message.agent_trx_id,
    )
    async with deadline(settings.notification_db_timeout_s, "notification"):
        result = await record_notification(
            pool, raw, notice, now=utcnow(), batches=request.app[PAYMENT_BATCHES]
        )
    log_fields.update(outcome=result.outcome.value, notification_id=result.notification_id)
    metrics.NOTIFICATIONS.labels(result.outcome.value).inc()
    if result.payment is not None and result.decision is not None:
        reason = result.decision.reason.value if result.decision.reason else ""
        metrics.PAYMENTS.labels(result.decision.kind.value, reason).inc()
        if reason:
            log_fields["reason"] = reason
    return endpoint.respond(request, 200, conventions.NOTIFICATION_ACK)
