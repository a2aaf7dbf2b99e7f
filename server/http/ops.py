"""For orchestrators and monitoring: ``/healthz`` (the process answers), ``/readyz`` (it can serve),
``/metrics`` (Prometheus). None of them waits on the request pool."""

from __future__ import annotations

import os

import structlog
from aiohttp import web

from server.core.errors import Unavailable
from server.http.bodies import json_response
from server.http.keys import HEALTH, POOL
from server.ops import metrics
from server.store import deliveries, outbox, reconciliation
from server.store.pool import deadline

log = structlog.get_logger(component="dipc.ops")

SCRAPE_DB_TIMEOUT_S = 0.5
routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    worker = os.environ.get("DIPC_WORKER_INDEX", "0")
    return json_response({"status": "ok", "pid": os.getpid(), "worker": worker})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    readiness = await request.app[HEALTH].readiness()
    return json_response(readiness.document(), status=200 if readiness.ready else 503)


@routes.get("/metrics")
async def prometheus(request: web.Request) -> web.Response:
    await _sample_database(request.app)
    body, content_type = metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def sample_pool(app: web.Application) -> None:
    pool = app[POOL]
    size = pool.get_size()
    metrics.DB_POOL.labels("size").set(size)
    metrics.DB_POOL.labels("in_use").set(size - pool.get_idle_size())
    metrics.DB_POOL.labels("max").set(pool.get_max_size())


async def _sample_database(app: web.Application) -> None:
    """Gauges read from the database; skipped (keeping their last values) if it does not answer fast."""
    sample_pool(app)
    try:
        async with deadline(SCRAPE_DB_TIMEOUT_S, "metrics"):
            counts, oldest = await deliveries.stats(app[POOL])
            last_id = await outbox.last_id(app[POOL])
            invoices, lag = await reconciliation.backlog(app[POOL])
    except Unavailable:
        return
    except Exception:  # a scrape must never fail because of a sample
        log.exception("metrics.sample_failed")
        return
    for status in ("pending", "delivered", "failed"):
        metrics.WEBHOOK_DELIVERIES.labels(status).set(counts.get(status, 0))
    metrics.WEBHOOK_OLDEST_PENDING.set(oldest)
    metrics.EVENTS_LAST_ID.set(last_id)
    for state, count in invoices.items():
        metrics.RECONCILE_INVOICES.labels(state).set(count)
    metrics.RECONCILE_LAG.set(lag)
