"""Who is calling: the four DOKU headers, the Client-Id's keys, the signature and the timestamp window.

Also signs our responses (spec §6): same Request-Id and target, ``Response-Timestamp``, newest key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from server.core.errors import AuthenticationFailed
from server.core.times import iso_second, parse_timestamp
from server.doku import signature

CLIENT_ID = "Client-Id"
REQUEST_ID = "Request-Id"
REQUEST_TIMESTAMP = "Request-Timestamp"
RESPONSE_TIMESTAMP = "Response-Timestamp"
SIGNATURE = "Signature"
REQUIRED_HEADERS = (CLIENT_ID, REQUEST_ID, REQUEST_TIMESTAMP, SIGNATURE)
# Every reason an AuthenticationFailed raised below carries (metrics create their series up front).
SIGNATURE_FAILURE_REASONS = (
    "MISSING_HEADER",
    "UNKNOWN_CLIENT",
    "BAD_SIGNATURE",
    "BAD_TIMESTAMP",
    "STALE_TIMESTAMP",
)


@dataclass(frozen=True, slots=True)
class Client:
    """A DOKU merchant account: its Client-Id and secret keys, newest first (responses use the first)."""

    client_id: str
    secret_keys: tuple[bytes, ...]

    def __repr__(self) -> str:  # never print a key
        return f"Client({self.client_id!r}, {len(self.secret_keys)} key(s))"


@dataclass(frozen=True, slots=True)
class Authenticated:
    client: Client
    request_id: str
    timestamp: datetime
    key_index: int  # 0: signed with the newest key; more: DOKU still uses an older one
    body_sha256: bytes  # hashed once for the Digest, kept for telling repeated requests apart


def format_timestamp(moment: datetime) -> str:
    """UTC, ISO 8601, second precision, ``Z``: ``2026-11-25T08:45:42Z``."""
    return iso_second(int(moment.timestamp())) + "Z"


def authenticate(
    headers: Mapping[str, str],
    body: bytes,
    *,
    target: str,
    clients: Mapping[str, Client],
    now: datetime,
    max_age_s: float,
    max_future_s: float,
) -> Authenticated:
    """Verify a DOKU request or raise :class:`AuthenticationFailed` with our finer reason."""
    missing = [name for name in REQUIRED_HEADERS if not headers.get(name)]
    if missing:
        raise AuthenticationFailed("MISSING_HEADER", f"missing header(s): {', '.join(missing)}")
    client_id = headers[CLIENT_ID]
    client = clients.get(client_id)
    if client is None:
        raise AuthenticationFailed("UNKNOWN_CLIENT", "Client-Id is not configured")
    request_id, timestamp_text = headers[REQUEST_ID], headers[REQUEST_TIMESTAMP]
    body_sha256 = hashlib.sha256(body).digest()
    message = signature.components(
        client_id=client_id,
        request_id=request_id,
        timestamp=timestamp_text,
        target=target,
        body=body,
        body_sha256=body_sha256,
    )
    key_index = signature.verify(client.secret_keys, message, headers[SIGNATURE])
    if key_index is None:
        raise AuthenticationFailed("BAD_SIGNATURE", "signature does not verify with any key of the client")
    try:
        timestamp = parse_timestamp(timestamp_text)
    except ValueError:
        raise AuthenticationFailed("BAD_TIMESTAMP", "Request-Timestamp is not ISO 8601") from None
    age = (now - timestamp).total_seconds()
    if age > max_age_s or -age > max_future_s:
        raise AuthenticationFailed("STALE_TIMESTAMP", f"Request-Timestamp is {age:.0f} s away from our clock")
    return Authenticated(
        client=client,
        request_id=request_id,
        timestamp=timestamp,
        key_index=key_index,
        body_sha256=body_sha256,
    )


def signed_headers(
    client: Client, *, request_id: str, target: str, body: bytes, now: datetime, response: bool
) -> dict[str, str]:
    """The four headers of a signed DOKU message.

    ``response=True``: our answer to ``request_id`` (``Response-Timestamp``, signed with the newest key).
    ``response=False``: a request as DOKU sends it (the simulator and the tests sign with this).
    """
    timestamp = format_timestamp(now)
    message = signature.components(
        client_id=client.client_id,
        request_id=request_id,
        timestamp=timestamp,
        target=target,
        body=body,
        response=response,
    )
    return {
        CLIENT_ID: client.client_id,
        REQUEST_ID: request_id,
        RESPONSE_TIMESTAMP if response else REQUEST_TIMESTAMP: timestamp,
        SIGNATURE: signature.sign(client.secret_keys[0], message),
    }
