"""Who is calling: the peer's address, or the client a trusted proxy forwarded for."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import web

from server.ops.masking import escape

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _trusted(address: str, proxies: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def caller_address(request: web.Request, proxies: Sequence[Network]) -> str | None:
    """The caller's address for logs.

    ``X-Forwarded-For`` is believed only when the direct peer is a trusted proxy, and then only as far as
    trusted proxies appended to it: the rightmost address that is not one of them is the caller (anything
    left of it was written by the client and proves nothing).
    """
    peer = request.remote
    if not proxies or peer is None or not _trusted(peer, proxies):
        return peer
    hops = [
        hop.strip() for value in request.headers.getall("X-Forwarded-For", ()) for hop in value.split(",")
    ]
    hops = [hop for hop in hops if hop]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            return escape(hop, 64)
    return escape(hops[0], 64) if hops else peer
