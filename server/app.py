"""The aiohttp application: routes, middlewares, and the database pool as a cleanup context."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from server.config import ADMIN_PREFIX, Settings
from server.core.errors import error_text
from server.doku.checkstatus import CheckStatusClient
from server.http import admin, casework, inquiry, notification, ops
from server.http.bodies import BODY_READS, Slots
from server.http.keys import CHECK_STATUS, HEALTH, INQUIRY_BATCHES, LISTENER, PAYMENT_BATCHES, POOL, SETTINGS
from server.http.middleware import DOKU_ROUTE_LABELS, observe
from server.http.ports import split_by_port
from server.http.protocol import EdgeApplication
from server.ops import metrics
from server.ops.health import HealthChecker
from server.ops.sampler import DatabaseSampler
from server.reconcile.worker import Reconciler
from server.store import outbox
from server.store.inquiries import InquiryBatches
from server.store.listener import EventListener
from server.store.payments import PaymentBatches
from server.store.pool import UNAVAILABLE_ERRORS, close_pool, create_pool
from server.webhooks.forwarder import WebhookForwarder

log = structlog.get_logger(component="dipc.app")


def make_app(settings: Settings, dsn: str) -> web.Application:
    """The whole service for ``settings``, talking to the database at ``dsn``."""
    # EdgeApplication: aiohttp's, with the header-read timeout and our answer to unparseable requests.
    middlewares = [observe] if settings.admin_port is None else [observe, split_by_port(settings)]
    app = EdgeApplication(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    metrics.preinitialise(doku_routes=DOKU_ROUTE_LABELS.values(), client_ids=settings.client_ids)
    app[BODY_READS] = Slots(settings.max_body_reads, "requests sending their bodies")
    app[admin.IMPORTS] = Slots(
        admin.import_slots(settings), "imports, each holding a database connection for its whole upload"
    )
    app[admin.FEED_WAITS] = Slots(settings.feed_max_waiters, "event-feed long-polls waiting")

    async def pool_context(app: web.Application) -> AsyncIterator[None]:
        try:
            app[POOL] = await create_pool(
                dsn,
                min_size=settings.db_pool_min,
                max_size=settings.db_pool_max,
                connect_timeout=settings.db_connect_timeout_s,
                statement_cache_size=settings.db_statement_cache_size,
            )
        except UNAVAILABLE_ERRORS as error:
            # `dipc serve` has checked the database before it got here (and refuses to start without
            # one); if it went away since (a worker restarted while the embedded database restarts),
            # serve 503s until it is back rather than exit: an exit would stop every worker.
            log.warning("db.unavailable_at_start", error=error_text(error))
            app[POOL] = await create_pool(
                dsn,
                min_size=0,
                max_size=settings.db_pool_max,
                connect_timeout=settings.db_connect_timeout_s,
                statement_cache_size=settings.db_statement_cache_size,
            )
        app[INQUIRY_BATCHES] = InquiryBatches(
            app[POOL],
            first_check_s=settings.reconcile_schedule[0],
            timeout_s=settings.doku_db_timeout_s,
            lanes=settings.inquiry_batches,
        )
        app[PAYMENT_BATCHES] = PaymentBatches(app[POOL], timeout_s=settings.notification_db_timeout_s)
        yield
        await app[INQUIRY_BATCHES].close()
        await app[PAYMENT_BATCHES].close()
        await close_pool(app[POOL])

    async def health_context(app: web.Application) -> AsyncIterator[None]:
        app[HEALTH] = HealthChecker(dsn, statement_cache_size=settings.db_statement_cache_size)
        tasks = [
            asyncio.create_task(_sample_pool_forever(app), name="dipc-pool-sampler"),
            asyncio.create_task(
                DatabaseSampler(app[HEALTH], every_s=settings.metrics_sample_s).run(), name="dipc-db-sampler"
            ),
            # Events whose writer died between its commit and their sequencing reach the feed within SWEEP_S.
            asyncio.create_task(outbox.sweep_forever(app[POOL]), name="dipc-event-sweep"),
            asyncio.create_task(outbox.floor_forever(app[POOL]), name="dipc-event-floor"),
        ]
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await app[HEALTH].close()

    async def listener_context(app: web.Application) -> AsyncIterator[None]:
        # LISTEN holds a session: never through a transaction-pooling pgbouncer (DIPC_LISTEN_DATABASE_URL).
        listener = EventListener(
            settings.listen_database_url or dsn, connect_timeout=settings.db_connect_timeout_s
        )
        await listener.start()
        app[LISTENER] = listener
        yield
        await listener.close()

    async def forwarder_context(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            forwarder = WebhookForwarder(app[POOL], app[LISTENER], settings, session)
            task = asyncio.create_task(forwarder.run(), name="dipc-webhook-forwarder")
            yield
            # The loop ends after its current round (the listener released its waiters at shutdown):
            # deliveries in flight finish. Past the HTTP timeout it is cancelled and hands leases back.
            try:
                await asyncio.wait_for(asyncio.shield(task), settings.webhook_timeout_s + 5)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def reconcile_context(app: web.Application) -> AsyncIterator[None]:
        """DOKU's Check Status: for checks by hand, and for the reconciler unless DIPC_RECONCILE=off."""
        assert settings.doku_api_url is not None
        async with aiohttp.ClientSession() as session:
            api = CheckStatusClient(session, settings.doku_api_url, timeout_s=settings.doku_api_timeout_s)
            app[CHECK_STATUS] = api
            if not settings.reconcile:
                yield
                return
            reconciler = Reconciler(app[POOL], settings, api)
            task = asyncio.create_task(reconciler.run(), name="dipc-reconciler")
            yield
            # Checks in flight finish (they are bounded by the call's timeout, and the stop by half the
            # shutdown timeout: a database that hangs must not hold the exit); the rest is next time's.
            await reconciler.stop(min(settings.doku_api_timeout_s + 5, settings.shutdown_timeout_s / 2))
            await task

    async def release_long_polls(app: web.Application) -> None:
        # Runs after the listening socket closed and before in-flight requests are awaited: parked
        # long-polls answer now, so they do not hold the drain for their whole wait.
        await app[LISTENER].release_waiters()

    app.cleanup_ctx.append(pool_context)
    app.cleanup_ctx.append(health_context)
    app.cleanup_ctx.append(listener_context)
    app.on_shutdown.append(release_long_polls)
    if settings.webhook_url:
        app.cleanup_ctx.append(forwarder_context)
    if settings.doku_api_url:
        app.cleanup_ctx.append(reconcile_context)
    app[inquiry.INQUIRY_ENDPOINT] = inquiry.endpoint_for(app)
    app[notification.NOTIFICATION_ENDPOINT] = notification.endpoint_for(app)
    for name, endpoint, handle in (
        ("inquiry", app[inquiry.INQUIRY_ENDPOINT], inquiry.handle_inquiry),
        ("notification", app[notification.NOTIFICATION_ENDPOINT], notification.handle_notification),
    ):
        app.router.add_post(endpoint.target, handle, name=name)
        app.router.add_route("*", endpoint.target, endpoint.refuse_method, name=name)  # one resource
    app.add_routes(ops.routes)
    app.add_subapp(ADMIN_PREFIX, admin.admin_app(casework.routes))
    return app


async def _sample_pool_forever(app: web.Application, every_s: float = 5.0) -> None:
    """Keep this process's pool gauges fresh, whichever process answers the scrapes."""
    while True:
        ops.sample_pool(app)
        await asyncio.sleep(every_s)
