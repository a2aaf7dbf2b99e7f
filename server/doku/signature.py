"""DOKU Non-SNAP signatures (spec §6): HMAC-SHA256 over a five-line component string.

Signatures are computed over the exact body bytes, so callers pass bytes, never parsed JSON.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

PREFIX = "HMACSHA256="


def digest(body: bytes, body_sha256: bytes | None = None) -> str:
    """``base64(sha256(body))``, the value of the ``Digest`` component (from the hash, when known)."""
    return base64.b64encode(body_sha256 or hashlib.sha256(body).digest()).decode("ascii")


def components(
    *,
    client_id: str,
    request_id: str,
    timestamp: str,
    target: str,
    body: bytes,
    response: bool = False,
    body_sha256: bytes | None = None,
) -> bytes:
    """The string to sign: lines joined by ``\\n``, no trailing newline, ``Digest`` only with a body."""
    timestamp_name = "Response-Timestamp" if response else "Request-Timestamp"
    lines = [
        f"Client-Id:{client_id}",
        f"Request-Id:{request_id}",
        f"{timestamp_name}:{timestamp}",
        f"Request-Target:{target}",
    ]
    if body:
        lines.append(f"Digest:{digest(body, body_sha256)}")
    # Header values reach us as str decoded with surrogateescape; encode them back to the bytes sent.
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def sign(key: bytes, message: bytes) -> str:
    """The ``Signature`` header value for ``message`` under ``key``."""
    mac = hmac.new(key, message, hashlib.sha256).digest()
    return PREFIX + base64.b64encode(mac).decode("ascii")


def verify(keys: Sequence[bytes], message: bytes, signature: str) -> int | None:
    """Index of the key in ``keys`` that produced ``signature``, or None.

    Every comparison is constant-time. Keys are tried newest first, so a non-zero index tells the
    caller that DOKU still signs with an older key (useful while a rotation is under way).
    """
    presented = signature.encode("utf-8", "surrogateescape")
    for index, key in enumerate(keys):
        if hmac.compare_digest(sign(key, message).encode("ascii"), presented):
            return index
    return None
