"""Health for orchestrators: ``/healthz`` (the process answers) and ``/readyz`` (it can serve)."""

from __future__ import annotations

from aiohttp import web

from server.core.errors import Unavailable
from server.http.bodies import json_response
from server.http.keys import POOL
from server.store import migrate
from server.store.pool import deadline

READY_TIMEOUT_S = 1.0

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    try:
        async with deadline(READY_TIMEOUT_S, "readyz"), request.app[POOL].acquire() as conn:
            state = await migrate.state(conn)
    except Unavailable as error:
        return json_response({"status": "unavailable", "reason": error.message}, status=503)
    if not state.current:
        return json_response(
            {
                "status": "unavailable",
                "reason": "migrations not current",
                "pending": state.pending,
                "changed": state.changed,
            },
            status=503,
        )
    return json_response({"status": "ready"})
