"""What a merchant does with codes, for the admin API and the CLI alike.

Every change is one transaction with its outbox event, so the event feed never tells of a change that
did not happen and never misses one that did.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import AsyncIterable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg
import orjson

from server.core.codes import CodeRules, CodeValues, PaymentCode
from server.core.documents import code_document, iso
from server.core.errors import (
    AlreadyExists,
    NotFound,
    NotModifiable,
    Unavailable,
    ValidationFailed,
    VersionConflict,
)
from server.core.outcomes import CodeStatus
from server.core.payments import Payment
from server.core.registration import new_code_values, parse_changes, parse_new_code, parse_payment_code
from server.core.times import parse_timestamp
from server.store import codes as code_store
from server.store import outbox
from server.store import payments as payment_store
from server.store.pool import UNAVAILABLE_ERRORS, Steps

T = TypeVar("T")

MAX_PAGE = 1000
REJECTIONS_REPORTED = 1000  # an import reports at most this many rejected lines (and counts them all)
IMPORT_BATCH = 5000
IMPORT_STATEMENT_TIMEOUT_S = 600  # per statement: the end-of-import lookup of refused rows can be long


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next: str | None  # the cursor for the following page, None at the end

    @classmethod
    def of(cls, items: list[T], size: int, cursor: Callable[[T], str]) -> Page[T]:
        """The first ``size`` of ``items`` (read one more, to learn whether a page follows), and the
        cursor of the last of them when one does."""
        if len(items) <= size:
            return cls(items=items, next=None)
        return cls(items=items[:size], next=cursor(items[size - 1]))


def key_cursor(moment: datetime, first: str, second: str) -> str:
    """The cursor of a page that ends at this key (a time, then two texts): opaque to clients."""
    return base64.urlsafe_b64encode(orjson.dumps([iso(moment), first, second])).decode().rstrip("=")


def read_key_cursor(cursor: str) -> tuple[datetime, str, str]:
    """The key a :func:`key_cursor` holds, or a 422 naming ``after``. A hostile one is refused here, not
    by PostgreSQL, which cannot compare a text holding NUL."""
    try:
        moment, first, second = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not (isinstance(first, str) and isinstance(second, str)) or "\x00" in first + second:
            raise ValueError(cursor)
        return parse_timestamp(moment), first, second
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise ValidationFailed({"after": "must be a cursor from an earlier page's next"}) from None


def checked_code(payment_code: str) -> str:
    """A payment code from a URL or command line, or a 404 for something that cannot be one."""
    try:
        return parse_payment_code(payment_code)
    except ValueError:
        raise NotFound(f"no payment code {payment_code!r}") from None


def page_limit(limit: int | None) -> int:
    if limit is None:
        return 100
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationFailed({"limit": f"must be between 1 and {MAX_PAGE}"})
    return limit


async def create_code(
    pool: asyncpg.Pool,
    raw: Mapping[str, Any],
    *,
    rules: CodeRules,
    client_ids: Collection[str],
    now: datetime,
) -> PaymentCode:
    new = parse_new_code(raw, rules=rules, client_ids=client_ids, now=now)
    async with outbox.transaction(pool) as conn:
        code = await code_store.insert(conn, new)
        if code is None:
            raise AlreadyExists(f"payment code {new.payment_code} is already registered")
        await outbox.append(conn, "code.created", code.payment_code, code_document(code))
    return code


async def get_code(pool: asyncpg.Pool, payment_code: str) -> PaymentCode:
    code = await code_store.get(pool, checked_code(payment_code))
    if code is None:
        raise NotFound(f"no payment code {payment_code}")
    return code


async def update_code(
    pool: asyncpg.Pool, payment_code: str, raw: Mapping[str, Any], *, now: datetime
) -> PaymentCode:
    payment_code = checked_code(payment_code)
    changes = parse_changes(raw, now=now)
    async with outbox.transaction(pool) as conn:
        code = await code_store.update(conn, payment_code, dict(changes.values), changes.expected_version)
        if code is None:
            current = await code_store.get(conn, payment_code)
            if current is None:
                raise NotFound(f"no payment code {payment_code}")
            if current.status is not CodeStatus.ACTIVE:
                raise NotModifiable(
                    f"payment code {payment_code} is {current.status}; only active codes change"
                )
            raise VersionConflict(
                f"payment code {payment_code} is at version {current.version}, not {changes.expected_version}"
            )
        document = code_document(code) | {"changed": sorted(changes.values)}
        await outbox.append(conn, "code.updated", code.payment_code, document)
    return code


async def cancel_code(pool: asyncpg.Pool, payment_code: str) -> PaymentCode:
    """Cancel an active code. Cancelling a cancelled code answers it unchanged; a paid code refuses."""
    payment_code = checked_code(payment_code)
    async with outbox.transaction(pool) as conn:
        code = await code_store.cancel(conn, payment_code)
        if code is None:
            current = await code_store.get(conn, payment_code)
            if current is None:
                raise NotFound(f"no payment code {payment_code}")
            if current.status is CodeStatus.CANCELLED:
                outbox.replayed()  # answered as the first cancel was: once its event is in the feed
                return current
            raise NotModifiable(f"payment code {payment_code} is {current.status} and cannot be cancelled")
        await outbox.append(conn, "code.cancelled", code.payment_code, code_document(code))
    return code


EXPIRED = "expired"  # not stored: an active code whose expires_at has passed


def shown_status(code: PaymentCode, now: datetime) -> str:
    """The status a person reads: ``expired`` for an active code past its expiry (inquiries refuse it)."""
    if code.status is CodeStatus.ACTIVE and code.expires_at is not None and code.expires_at <= now:
        return EXPIRED
    return code.status.value


async def list_codes(
    pool: asyncpg.Pool,
    *,
    status: str | None = None,
    client_id: str | None = None,
    after: str | None = None,
    limit: int | None = None,
    derived_at: datetime | None = None,
) -> Page[PaymentCode]:
    """Codes by stored status; with ``derived_at``, ``active`` and ``expired`` are told apart at that time."""
    allowed = {member.value for member in CodeStatus} | ({EXPIRED} if derived_at else set())
    if status is not None and status not in allowed:
        raise ValidationFailed({"status": f"must be one of {', '.join(sorted(allowed))}"})
    expired = None
    if derived_at is not None and status in (CodeStatus.ACTIVE.value, EXPIRED):
        expired = status == EXPIRED
        status = CodeStatus.ACTIVE.value
    size = page_limit(limit)
    items = await code_store.list_page(
        pool,
        status=status,
        client_id=client_id,
        after=after,
        limit=size + 1,
        expired_at=derived_at,
        expired=expired,
    )
    return Page.of(items, size, lambda code: code.payment_code)


PAYMENT_KINDS = ("normal", "conflict", "anomaly")


async def list_payments(
    pool: asyncpg.Pool,
    *,
    payment_code: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    after: int | None = None,
    limit: int | None = None,
) -> Page[Payment]:
    if kind is not None and kind not in PAYMENT_KINDS:
        raise ValidationFailed({"kind": f"must be one of {', '.join(PAYMENT_KINDS)}"})
    size = page_limit(limit)
    items = await payment_store.list_page(
        pool, payment_code=payment_code, kind=kind, since=since, after=after, limit=size + 1
    )
    return Page.of(items, size, lambda payment: str(payment.id))


# --- bulk import ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejection:
    line: int
    error: str


@dataclass
class ImportResult:
    imported: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    rejected_count: int = 0
    seconds: float = 0.0
    valid: int = 0  # rows that passed every check (imported unless the import was discarded)
    saved: bool = True  # False: ``keep`` declined, nothing was registered

    def document(self) -> dict[str, Any]:
        return {
            "imported": self.imported,
            "rejected": [{"line": r.line, "error": r.error} for r in self.rejected],
            "rejected_count": self.rejected_count,
            "seconds": round(self.seconds, 3),
        }

    def reject(self, line: int, error: str) -> None:
        self.rejected_count += 1
        if len(self.rejected) < REJECTIONS_REPORTED:
            self.rejected.append(Rejection(line, error))


# A parsed input row: (line number, the row's fields, whether values are text as in CSV), or
# (line number, the reason the line could not be read).
ImportRow = tuple[int, Mapping[str, Any], bool] | tuple[int, str]


async def import_codes(
    pool: asyncpg.Pool,
    rows: AsyncIterable[ImportRow],
    *,
    rules: CodeRules,
    client_ids: Collection[str],
    now: datetime,
    step_timeout_s: float,
    progress: Callable[[int], None] | None = None,
    keep: Callable[[ImportResult], bool] | None = None,
    batch_size: int = IMPORT_BATCH,
) -> ImportResult:
    """Validate every row, COPY the valid ones in batches, and register them in one transaction.

    Codes registered before the import, and repeats within the file, are rejected by line number.
    ``keep``, asked once every row was checked, may discard the whole import (a dry run, or
    all-or-nothing): then nothing is registered and ``saved`` is False. Each database step may take
    ``step_timeout_s`` (:class:`~server.store.pool.Steps`); a database that does not answer within it
    fails the import with Unavailable, and nothing is registered.
    """
    started = time.perf_counter()
    result = ImportResult()
    try:
        await _import(
            pool,
            rows,
            result,
            rules=rules,
            client_ids=client_ids,
            now=now,
            step_timeout_s=step_timeout_s,
            progress=progress,
            keep=keep,
            batch_size=batch_size,
        )
    except _Discarded:
        result.saved = False
        result.imported = 0
    if progress:
        progress(result.valid)
    result.rejected.sort(key=lambda rejection: rejection.line)
    result.seconds = time.perf_counter() - started
    return result


class _Discarded(Exception):
    """Raised inside the import's transaction to roll it back."""


async def _import(
    pool: asyncpg.Pool,
    rows: AsyncIterable[ImportRow],
    result: ImportResult,
    *,
    rules: CodeRules,
    client_ids: Collection[str],
    now: datetime,
    step_timeout_s: float,
    progress: Callable[[int], None] | None,
    keep: Callable[[ImportResult], bool] | None,
    batch_size: int,
) -> None:
    async with outbox.connection(pool) as conn:
        steps = Steps(conn, step_timeout_s, "import")
        try:
            transaction = conn.transaction()
            with steps.step("begin"):
                await transaction.start()
                await code_store.begin_import(conn, timeout_s=IMPORT_STATEMENT_TIMEOUT_S)
            try:
                await _import_rows(conn, steps, rows, result, rules=rules, client_ids=client_ids, now=now,
                                   progress=progress, keep=keep, batch_size=batch_size)  # fmt: skip
            except BaseException:
                if not steps.terminated and not conn.is_closed():
                    with steps.step("rollback"):
                        await transaction.rollback()
                raise
            with steps.step("commit"):
                await transaction.commit()
        except (asyncio.CancelledError, *UNAVAILABLE_ERRORS) as error:
            if not steps.ended(error):
                raise
            raise Unavailable(
                f"the database did not answer the import ({steps.expired}) within {step_timeout_s:g} s"
            ) from None


async def _import_rows(
    conn: asyncpg.Connection,
    steps: Steps,
    rows: AsyncIterable[ImportRow],
    result: ImportResult,
    *,
    rules: CodeRules,
    client_ids: Collection[str],
    now: datetime,
    progress: Callable[[int], None] | None,
    keep: Callable[[ImportResult], bool] | None,
    batch_size: int,
) -> None:
    writer = _BatchWriter(conn, steps, progress)
    batch: list[tuple[int, CodeValues]] = []
    try:
        async for row in rows:
            if len(row) == 2:
                result.reject(row[0], row[1])
                continue
            line, raw, text = row
            try:
                batch.append(
                    (line, new_code_values(raw, rules=rules, client_ids=client_ids, now=now, text=text))
                )
            except ValidationFailed as invalid:
                result.reject(line, invalid.message)
            if len(batch) >= batch_size:
                await writer.send(batch)
                batch = []
        if batch:
            await writer.send(batch)
        await writer.wait()
    finally:
        await writer.abandon()
    if writer.refused:
        # Only those it can report are read; the others are counted.
        with steps.step("refused_rows"):
            listed = await code_store.refused_rows(
                conn, limit=max(REJECTIONS_REPORTED - len(result.rejected), 0)
            )
        for line, payment_code, first_line in listed:
            if first_line is None:
                result.reject(line, f"payment_code: {payment_code} is already registered")
            else:
                result.reject(line, f"payment_code: {payment_code} repeats line {first_line}")
        result.rejected_count += writer.refused - len(listed)
    result.imported = result.valid = writer.sent - writer.refused
    if keep is not None and not keep(result):
        raise _Discarded
    if result.imported:
        with steps.step("event"):
            await outbox.append(
                conn, "codes.imported", None, {"imported": result.imported, "rejected": result.rejected_count}
            )


class _BatchWriter:
    """Registers one batch while the next is read and checked, so PostgreSQL (on one core) and the
    checks in Python (on another) work at once. One batch is in flight at a time: the connection
    runs one statement at a time, and memory holds two batches at most."""

    def __init__(
        self, conn: asyncpg.Connection, steps: Steps, progress: Callable[[int], None] | None
    ) -> None:
        self.conn = conn
        self.steps = steps
        self.progress = progress
        self.sent = 0
        self.refused = 0
        self._refused_last = False  # the last batch had refused rows
        self._in_flight: asyncio.Task[int] | None = None

    async def send(self, batch: list[tuple[int, CodeValues]]) -> None:
        await self.wait()
        self._in_flight = asyncio.create_task(
            code_store.import_batch(self.conn, batch, refusals_expected=self._refused_last)
        )
        # Bounded from its start, while the next batch is read and checked as well as while it is waited for.
        done = self.steps.start("batch")
        self._in_flight.add_done_callback(lambda task: done(None if task.cancelled() else task.exception()))
        self.sent += len(batch)

    async def wait(self) -> None:
        """Until the batch in flight is registered; its error, if any, is raised here."""
        if self._in_flight is not None:
            task, self._in_flight = self._in_flight, None
            refused = await task
            self.refused += refused
            self._refused_last = refused > 0
            if self.progress:
                self.progress(self.sent)

    async def abandon(self) -> None:
        """After an error: end the batch in flight, if any.

        One still at the database closes the connection, and with it the import's transaction: a ROLLBACK
        would first wait for the database to finish the batch, and the database may be what hangs (an
        upload that stalls meanwhile would then be answered only after the rollback's own step).
        PostgreSQL rolls back a transaction whose connection is gone, and the pool opens another. With no
        batch out, the import rolls back as usual."""
        if self._in_flight is not None:
            task, self._in_flight = self._in_flight, None
            if not task.done():
                self.steps.terminate()
            task.cancel()
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # the error being raised already says what went wrong
