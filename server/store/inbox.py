"""The ``notifications`` inbox: every verified notification, raw, in the transaction of its effect.

Headers are kept losslessly in a jsonb array, one entry per header in the order received:
``[name, value]`` when both are UTF-8 text without NUL (every header DOKU sends), otherwise
``[name, value, {"name_base64": …, "value_base64": …}]``: the first two escaped for reading
(``M\\xfcnchen``), the object holding the exact bytes of whichever of the two is not (jsonb, like
PostgreSQL text, holds neither NUL nor bytes that are not UTF-8). A ``Request-Id`` that is not storable
text is stored escaped the same way; its exact bytes are in the headers.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import asyncpg

from server.core.payments import NotificationOutcome
from server.ops.masking import escape, is_clean_text


def _exact(text: str) -> str:
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives the bytes back.
    return base64.b64encode(text.encode("utf-8", "surrogateescape")).decode("ascii")


def storable_text(text: str) -> str:
    """``text`` itself, or escaped (``\\xNN``) when PostgreSQL text cannot hold it as it is."""
    return text if is_clean_text(text) else escape(text, limit=len(text) * 6)


def stored_headers(headers: Sequence[tuple[str, str]]) -> list[list[Any]]:
    stored: list[list[Any]] = []
    for name, value in headers:
        if is_clean_text(name) and is_clean_text(value):
            stored.append([name, value])
            continue
        exact = {
            f"{part}_base64": _exact(text)
            for part, text in (("name", name), ("value", value))
            if not is_clean_text(text)
        }
        stored.append([storable_text(name), storable_text(value), exact])
    return stored


# The inbox row of one notification: its columns, in the order of ``values``.
COLUMNS = "payment_code, client_id, request_id, headers, body, transaction_status, outcome, source"
INSERT = f"INSERT INTO notifications ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id"  # noqa: S608


def values(
    *,
    payment_code: str,
    client_id: str,
    request_id: str,
    headers: Sequence[tuple[str, str]],
    body: bytes,
    transaction_status: str | None,
    outcome: NotificationOutcome,
    source: str = "notification",
) -> tuple[Any, ...]:
    """The parameters of :data:`INSERT`: one notification exactly as received."""
    return (
        payment_code,
        client_id,
        storable_text(request_id),
        stored_headers(headers),
        body,
        transaction_status,
        outcome.value,
        source,
    )


async def insert(conn: asyncpg.Connection | asyncpg.Pool, notification: tuple[Any, ...]) -> int:
    """Store one notification (its :func:`values`) exactly as received; return its id."""
    notification_id: int = await conn.fetchval(INSERT, *notification)
    return notification_id
