"""``DIPC_ADMIN_PORT``: the admin API and ``/metrics`` on a port of their own.

DOKU needs only its two paths, from the internet; the admin API and the metrics belong inside. A
firewall or a Kubernetes NetworkPolicy works on ports, not paths, so with an admin port DOKU's paths are
served on ``DIPC_PORT`` only, ``/v1/…`` and ``/metrics`` on ``DIPC_ADMIN_PORT`` only, and the probes
(``/healthz``, ``/readyz``) on both. What is asked on the wrong port is a 404, as if it did not exist.
The port a request came in on is the listening socket's, never anything the client says (Host).
"""

from __future__ import annotations

from aiohttp import web

from server.config import ADMIN_PREFIX, METRICS_PATH, Settings


def _is_admin(path: str) -> bool:
    return path in (METRICS_PATH, ADMIN_PREFIX) or path.startswith(ADMIN_PREFIX + "/")


def split_by_port(settings: Settings) -> web.Middleware:
    assert settings.admin_port is not None
    admin_port = settings.admin_port
    doku_paths = frozenset((settings.inquiry_path, settings.notification_path))

    @web.middleware
    async def split(request: web.Request, handler: web.Handler) -> web.StreamResponse:
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport is not None else None
        on_admin = isinstance(sockname, tuple) and len(sockname) >= 2 and sockname[1] == admin_port
        wrong = request.path in doku_paths if on_admin else _is_admin(request.path)
        if wrong:
            raise web.HTTPNotFound()
        return await handler(request)

    return split
