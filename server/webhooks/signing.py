"""The webhook signature, for dipc to sign with and for the merchant's backend to verify.

``Dipc-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``, one ``v1`` per
configured secret while a rotation is under way. A receiver recomputes the HMAC over the raw body bytes
with its secret, compares in constant time against any ``v1``, and refuses a ``t`` far from its clock
(the default tolerance is five minutes), which makes a captured request useless later.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

SIGNATURE_HEADER = "Dipc-Signature"
EVENT_ID_HEADER = "Dipc-Event-Id"
EVENT_TYPE_HEADER = "Dipc-Event-Type"
TOLERANCE_S = 300


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secrets: Sequence[bytes], body: bytes, timestamp: int) -> str:
    return ",".join([f"t={timestamp}", *(f"v1={_mac(secret, timestamp, body)}" for secret in secrets)])


def verify(secret: bytes, body: bytes, header: str, now: float, tolerance_s: int = TOLERANCE_S) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` at a time within ``tolerance_s`` of ``now``."""
    timestamp = None
    candidates = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit() and len(value) <= 12:  # int() reads "²"
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or abs(now - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body).encode()
    return any(hmac.compare_digest(expected, candidate.encode()) for candidate in candidates)
