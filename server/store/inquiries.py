"""The ``inquiries`` table: every authenticated inquiry and the exact bytes we answered it with.

Deciding, minting and recording an inquiry is one call of the server-side function ``dipc_inquire``
(schemas/migrations/0005_inquire.sql), where the rules and the answer's bytes live: one round trip.
A worker's inquiries share round trips and commits (:class:`InquiryBatches`, migration 0010).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from server.ops import metrics
from server.store.batches import BATCH_LOCK_WAIT_MS, Batches


@dataclass(frozen=True, slots=True)
class RecordedInquiry:
    """An inquiry's answer as recorded: by this call, or earlier under the same Request-Id (replayed)."""

    replayed: bool
    outcome: str
    http_status: int
    response_body: bytes
    invoice_number: str | None
    body_sha256: bytes  # of the request that was answered


_INQUIRE = """
SELECT replayed, outcome, http_status, response_body, invoice_number, body_sha256
  FROM dipc_inquire($1, $2, $3, $4, $5, $6, $7, $8)
"""


@dataclass(frozen=True, slots=True)
class Inquiry:
    """One inquiry as ``dipc_inquire`` takes it (the first check's delay is the process's)."""

    payment_code: str
    request_id: str
    client_id: str
    channel: str
    body_sha256: bytes
    bin_channels: frozenset[str] | None  # None: no BIN fits the code
    at: datetime


_INQUIRE_EACH = """
SELECT replayed, outcome, http_status, response_body, invoice_number, body_sha256
  FROM dipc_inquire_each($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""


class InquiryBatches(Batches[Inquiry, RecordedInquiry]):
    """One worker's inquiries, recorded in batches (server/store/batches.py): ``dipc_inquire_each`` is one
    statement and one commit, each inquiry still its own call of ``dipc_inquire``, in the order of their
    payment codes and Request-Ids.
    """

    def __init__(self, pool: asyncpg.Pool, *, first_check_s: float, timeout_s: float, lanes: int) -> None:
        super().__init__(
            pool,
            timeout_s=timeout_s,
            lanes=lanes,
            operation="inquiry.batch",
            sizes=metrics.INQUIRY_BATCH_SIZE,
        )
        self._first_check_s = first_check_s

    async def inquire(self, inquiry: Inquiry) -> RecordedInquiry:
        """Answer and record ``inquiry``; its answer exists once it is committed."""
        return await self.submit(inquiry)

    def order(self, item: Inquiry) -> tuple[str, ...]:
        return (item.payment_code, item.request_id)

    async def alone(self, conn: asyncpg.Connection, one: Inquiry) -> RecordedInquiry:
        row = await conn.fetchrow(
            _INQUIRE,
            one.payment_code,
            one.request_id,
            one.client_id,
            one.channel,
            one.body_sha256,
            None if one.bin_channels is None else sorted(one.bin_channels),
            one.at,
            self._first_check_s,
        )
        return RecordedInquiry(*row)

    async def together(self, inquiries: list[Inquiry]) -> list[RecordedInquiry]:
        rows = await self._pool.fetch(
            _INQUIRE_EACH,
            [one.payment_code for one in inquiries],
            [one.request_id for one in inquiries],
            [one.client_id for one in inquiries],
            [one.channel for one in inquiries],
            [one.body_sha256 for one in inquiries],
            [None if one.bin_channels is None else ",".join(sorted(one.bin_channels)) for one in inquiries],
            [one.at for one in inquiries],
            self._first_check_s,
            BATCH_LOCK_WAIT_MS,
        )
        return [RecordedInquiry(*row) for row in rows]
