"""A graceful stop that answers what it has received.

aiohttp's own stop marks every connection as closing at once: bytes that had already arrived on a
keep-alive connection (a request DOKU sent just before the signal, or one queued behind a request in
progress) are then dropped, and the client sees its request go unanswered; so is the rest of the body
of a request in progress. Before handing over to aiohttp's stop, ``answer_received`` stops listening,
waits (within the shutdown timeout) until every request already received has started and has its
whole body, and closes each idle keep-alive connection as soon as nothing is waiting on it. While the
server stops, a response says ``Connection: close`` unless another request is already queued behind
it, so clients do not send more on a connection about to close.
"""

from __future__ import annotations

import asyncio
import fcntl
import struct
import termios
from dataclasses import dataclass

import structlog
from aiohttp import web

log = structlog.get_logger(component="dipc.http")

POLL_S = 0.02


@dataclass
class Stopping:
    """Whether this process is stopping; shared by the stop sequence and every response."""

    now: bool = False


STOPPING = web.AppKey("stopping", Stopping)


def install(app: web.Application) -> None:
    stopping = app[STOPPING] = Stopping()

    async def close_after_response(request: web.Request, response: web.StreamResponse) -> None:
        # Runs for every response: the flag is read from the closure, not looked up per request.
        if stopping.now and not _has_waiting_request(request.protocol):
            response.force_close()

    app.on_response_prepare.append(close_after_response)


async def answer_received(runner: web.AppRunner, app: web.Application, timeout_s: float) -> None:
    """Stop listening; answer what was received; close idle connections cleanly. Then aiohttp stops."""
    log.info("server.stopping", answering_for_up_to_s=timeout_s)
    app[STOPPING].now = True
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    if server is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        waiting = 0
        arriving: list[web.RequestHandler] = []
        for connection in server.connections:
            if _closing(connection):
                continue
            if _body_arriving(connection):
                # Started, its body still on the way, which aiohttp drops once its stop begins: an upload,
                # or the body of a client that sent Expect: 100-continue and was told to go on.
                arriving.append(connection)
                waiting += 1
            elif _has_waiting_request(connection):
                waiting += 1  # received, not started yet (maybe queued behind one in progress): it will be
            elif not connection._request_in_progress:
                connection.close()  # idle: nothing received, nothing lost
            # else: only an answer in progress, which aiohttp's stop waits for
        if not waiting:
            return
        if loop.time() >= deadline:
            # A body not in by now is cut off: aiohttp would drop the rest anyway, and then wait as long
            # again for the handler still reading it (a client trickling a body held the stop for twice
            # the timeout). Its handler sees the connection gone and ends at once.
            for connection in arriving:
                connection.force_close()
            log.warning(
                "server.drain_timeout",
                unanswered_connections=waiting,
                bodies_cut=len(arriving),
                seconds=timeout_s,
            )
            return
        await asyncio.sleep(POLL_S)


def _closing(connection: web.RequestHandler) -> bool:
    return connection.transport is None or connection._close or connection._force_close


def _body_arriving(connection: web.RequestHandler) -> bool:
    """A request in progress whose body has not all arrived."""
    request = getattr(connection, "_current_request", None)
    return request is not None and not request.content.is_eof()


def _has_waiting_request(connection: web.RequestHandler) -> bool:
    """Bytes of a request are queued in aiohttp, or wait unread in the socket."""
    if getattr(connection, "_messages", None):
        return True
    transport = connection.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    try:
        unread = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return False
    return struct.unpack("i", unread)[0] > 0
