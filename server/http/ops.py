"""For orchestrators and monitoring: ``/healthz`` (the process answers), ``/readyz`` (it can serve),
``/metrics`` (Prometheus). None of them waits on the request pool."""

from __future__ import annotations

import os

from aiohttp import web

from server.config import HEALTH_PATH, METRICS_PATH, READY_PATH
from server.http.bodies import json_response
from server.http.keys import HEALTH, INQUIRY_BATCHES, PAYMENT_BATCHES, POOL
from server.ops import metrics

routes = web.RouteTableDef()


@routes.get(HEALTH_PATH)
async def healthz(request: web.Request) -> web.Response:
    worker = os.environ.get("DIPC_WORKER_INDEX", "0")
    return json_response({"status": "ok", "pid": os.getpid(), "worker": worker})


@routes.get(READY_PATH)
async def readyz(request: web.Request) -> web.Response:
    readiness = await request.app[HEALTH].readiness()
    return json_response(readiness.document(), status=200 if readiness.ready else 503)


@routes.get(METRICS_PATH)
async def prometheus(request: web.Request) -> web.Response:
    # Database-derived gauges come from the background sampler (server/ops/sampler.py): a scrape
    # never waits on the database.
    sample_pool(request.app)
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
    metrics.INQUIRIES_QUEUED.set(app[INQUIRY_BATCHES].waiting)
    metrics.PAYMENTS_QUEUED.set(app[PAYMENT_BATCHES].waiting)
