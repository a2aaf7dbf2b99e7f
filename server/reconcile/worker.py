"""The reconciler: a background task of every ``dipc serve`` process (unless ``DIPC_RECONCILE=off``).

It claims due invoices (``FOR UPDATE SKIP LOCKED`` and a lease, like the webhook forwarder), asks DOKU's
Check Status about each without holding a transaction, and records the answer through the core. The
calls of all processes together stay within ``DIPC_RECONCILE_RPS`` (a budget shared in PostgreSQL), at
most ``DIPC_RECONCILE_CONCURRENCY`` at once per process, and all of them slow down when DOKU answers
429 or 5xx, or does not answer at all (its name does not resolve, it refuses connections, it hangs): a
dead DOKU gets one call per pause, not one per due invoice, and the invoices keep their place on the
schedule until it answers. A process that dies mid-check forgets nothing: its lease runs out and
another takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from typing import Any

import asyncpg
import structlog

from server.config import Settings
from server.core import reconciliation
from server.core.documents import iso
from server.core.errors import BeingChecked, DokuBackoff, NotFound, Unavailable, error_text
from server.core.outcomes import CheckResult
from server.core.reconciliation import TIMEOUTS_WARNED, CheckReport, invoice_document
from server.core.times import utcnow
from server.doku.checkstatus import CheckAnswer, CheckStatusClient
from server.ops import metrics
from server.store import reconciliation as store
from server.store.pool import UNAVAILABLE_ERRORS, deadline, terminate_held, tracking
from server.store.reconciliation import Claimed, QuotedInvoice

log = structlog.get_logger(component="dipc.reconcile")

IDLE_RECHECK_S = 1.0  # how long an idle reconciler sleeps before it looks for due invoices again
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 300.0
# At a stop, how long the loop may take to notice, and how long a check that was cut short may take to
# hand its invoice back; past them the connections they wait on are terminated (a database that hangs
# must not hold the process's exit: the lease runs out and the invoice is checked again later).
STOP_GRACE_S = 1.0
RELEASE_DEADLINE_S = 1.0
# Answers that tell nothing about the invoice and that waiting will not mend: DOKU refuses our calls
# (401/403: a key or Client-Id it does not hold) or answers what cannot be read or verified. Until a
# person fixes it no invoice is reconciled, so each is a warning (and DipcCheckStatusRefused).
UNUSABLE_ANSWERS = (CheckResult.HTTP_ERROR, CheckResult.BAD_SIGNATURE, CheckResult.UNREADABLE)


def lease_s(settings: Settings) -> float:
    """How long a claimed invoice is ours: the call's timeout and a margin for recording its result."""
    return settings.doku_api_timeout_s + 30.0


def observe(report: CheckReport, previous_state: str) -> None:
    """Count and log one check, wherever it ran (the reconciler, or a check by hand).

    A call DOKU never answered is counted but logged at debug only: through an outage the reconciler
    logs DOKU going away and coming back (:class:`DokuReachability`), not every invoice it could not ask.
    Only an invoice's third timeout in a row is a warning: DOKU may be hanging on that invoice alone.
    """
    answer, invoice = report.answer, report.invoice
    metrics.RECONCILE_CHECKS.labels(answer.result.value).inc()
    if report.recovered:
        assert report.recorded is not None
        assert report.recorded.decision is not None
        kind = report.recorded.decision.kind.value
        reason = report.recorded.decision.reason.value if report.recorded.decision.reason else ""
        metrics.RECONCILE_RECOVERED.labels(kind).inc()
        metrics.PAYMENTS.labels(kind, reason).inc()
    if invoice.state == "gave_up" and previous_state == "pending":
        metrics.RECONCILE_GAVE_UP.inc()
    fields = {
        "payment_code": invoice.payment_code,  # masked by the log's processors
        "invoice_number": invoice.invoice_number,
        "result": answer.result.value,
        "detail": answer.detail,
        "http_status": answer.http_status,
        "state": invoice.state,
        "attempts": invoice.attempts,
    }
    if report.recorded is not None:
        fields["recorded"] = report.recorded.outcome.value
    if report.recovered:
        log.warning("reconcile.recovered", **fields)  # DOKU's notification for it never came
    elif invoice.state == "gave_up" and previous_state == "pending":
        log.warning("reconcile.gave_up", **fields)
    elif answer.result is CheckResult.TIMEOUT and invoice.timeouts_in_a_row == TIMEOUTS_WARNED:
        # Once per run of timeouts: DOKU may be answering the other invoices and hanging on this one.
        log.warning("reconcile.invoice_unanswered", timeouts_in_a_row=invoice.timeouts_in_a_row,
                    next_check_at=iso(invoice.next_check_at), **fields)  # fmt: skip
    elif answer.result.unanswered:
        log.debug("reconcile.unanswered", **fields)
    elif answer.result in UNUSABLE_ANSWERS:
        log.warning("reconcile.checked", **fields)
    else:
        log.info("reconcile.checked", **fields)


class DokuReachability:
    """Whether DOKU's API answers this process's calls: one log line and a gauge per change, not per call.

    DOKU is *unreachable* from the first call that got no answer (DNS, refused, reset, TLS, timeout)
    until the next call that got any HTTP answer.
    """

    def __init__(self) -> None:
        self.since: float | None = None  # loop time of the first unanswered call; None while reachable
        self.unanswered = 0  # calls without an answer since then
        metrics.RECONCILE_DOKU_UNREACHABLE.set(0)

    @property
    def reachable(self) -> bool:
        return self.since is None

    def no_answer(self, result: str, detail: str, now: float, *, retry_s: float) -> None:
        self.unanswered += 1
        if self.since is None:
            self.since = now
            metrics.RECONCILE_DOKU_UNREACHABLE.set(1)
            log.warning(
                "reconcile.doku_unreachable", result=result, detail=detail, retry_in_s=retry_s,
            )  # fmt: skip

    def answered(self, now: float) -> None:
        if self.since is None:
            return
        log.info(
            "reconcile.doku_reachable",
            unreachable_s=round(now - self.since, 1),
            unanswered_calls=self.unanswered,
        )
        self.since, self.unanswered = None, 0
        metrics.RECONCILE_DOKU_UNREACHABLE.set(0)


class Reconciler:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, api: CheckStatusClient) -> None:
        self.pool = pool
        self.settings = settings
        self.api = api
        self.lease_s = lease_s(settings)
        self._stopping = asyncio.Event()
        self._checks: set[asyncio.Task[None]] = set()
        self._held: dict[asyncio.Task[None], list[Any]] = {}  # per check: the connections it holds
        self._step_held: list[Any] = []  # the loop's current step: the connections it holds
        self._run_task: asyncio.Task[Any] | None = None
        # Consecutive rounds of 429/5xx or unanswered calls: how long everyone backs off. A round is the
        # calls started before the pause that their first failure began: the others in flight then fail
        # for the same reason, and do not lengthen the pause again.
        self._failures = 0
        self._paused_at = -math.inf  # loop time the current pause began
        self._paused_until = -math.inf  # ...and ends: this process claims nothing before (the shared
        # budget holds back the others, and this one if the pause could not be written to it)
        self.doku = DokuReachability()

    async def run(self) -> None:
        log.info(
            "reconcile.started",
            doku_api=self.api.base_url,
            schedule=list(self.settings.reconcile_schedule),
            rps=self.settings.reconcile_rps,
        )
        self._run_task = asyncio.current_task()
        while not self._stopping.is_set():
            try:
                with tracking([]) as self._step_held:
                    pause = await self.step()
            except UNAVAILABLE_ERRORS as error:
                log.warning("reconcile.database_unavailable", error=error_text(error))
                pause = IDLE_RECHECK_S
            except Exception:
                log.exception("reconcile.error")  # never die quietly: pause, then carry on
                pause = 5.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), pause)

    async def step(self) -> float:
        """Start the checks that are due and allowed now; return how long to wait before the next step."""
        free = self.settings.reconcile_concurrency - len(self._checks)
        if free <= 0:
            return 0.05
        paused = self._paused_until - asyncio.get_running_loop().time()
        if paused > 0:
            return paused
        if not self.doku.reachable:
            # DOKU gave no answer lately: one call at a time finds out whether it is back (a hanging
            # DOKU would otherwise hold a whole concurrency's worth of calls per pause).
            free = 1 - len(self._checks)
            if free <= 0:
                return 0.05
        due = await store.next_due(self.pool)
        now = utcnow()
        if due is None or due > now:
            if not self.doku.reachable and not self._checks:
                # DOKU gave no answer lately and nothing is due: only a call finds it back. Without one,
                # dipc_reconciliation_doku_unreachable would stay 1 until some quote falls due.
                return await self._probe()
            return IDLE_RECHECK_S if due is None else min(IDLE_RECHECK_S, (due - now).total_seconds())
        claimed = await store.claim_due(
            self.pool, limit=free, lease_s=self.lease_s, rps=self.settings.reconcile_rps
        )
        for item in claimed:
            held: list[Any] = []
            with tracking(held):  # the task copies the context: its connections are recorded in held
                task = asyncio.create_task(self._check(item), name="dipc-reconcile-check")
            self._checks.add(task)
            self._held[task] = held
            task.add_done_callback(self._forget)
        # Nothing granted: the shared budget is spent (or DOKU asked us to back off); try after one token.
        return 0.0 if claimed else _one_token_s(self.settings.reconcile_rps)

    async def _probe(self) -> float:
        """Ask DOKU about an invoice that does not exist (as `dipc doctor` does), from the shared budget:
        one call per pause, which an answer of any kind ends. Counted in no check's metrics."""
        client = next((client for client in self.settings.clients.values() if client.secret_keys), None)
        if client is None:
            return IDLE_RECHECK_S
        if not await _take_one_call(self.pool, self.settings.reconcile_rps):
            return _one_token_s(self.settings.reconcile_rps)

        async def call() -> None:
            started = asyncio.get_running_loop().time()
            invoice = f"DIPC-PROBE-{uuid.uuid4().hex[:12]}"
            answer = await self.api.check(client, payment_code="", invoice_number=invoice, now=utcnow())
            await self._heard(answer, started)

        task = asyncio.create_task(call(), name="dipc-reconcile-probe")
        self._checks.add(task)
        task.add_done_callback(self._forget)
        return 0.05

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._checks.discard(task)
        self._held.pop(task, None)

    async def stop(self, timeout_s: float) -> None:
        """Start nothing new; let checks in flight finish within ``timeout_s``, then cut them short.

        Whatever still waits on the database then (a database that hangs) has its connections
        terminated, so the stop is bounded however the database behaves.
        """
        self._stopping.set()
        if self._checks:
            _, pending = await asyncio.wait(set(self._checks), timeout=timeout_s)
            for task in pending:
                terminate_held(self._held.get(task, []))
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=RELEASE_DEADLINE_S + STOP_GRACE_S)
        run_task = self._run_task
        if run_task is not None and run_task is not asyncio.current_task() and not run_task.done():
            _, stuck = await asyncio.wait({run_task}, timeout=STOP_GRACE_S)
            if stuck:
                terminate_held(self._step_held)

    def retry_s(self) -> float:
        return min(BACKOFF_BASE_S * 2**self._failures, BACKOFF_CAP_S)

    async def _check(self, claimed: Claimed) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            report = await check_claimed(self.pool, self.api, self.settings, claimed, retry_s=self.retry_s())
        except asyncio.CancelledError:
            # Stopping mid-check: hand the invoice back so a live process checks it now, not after the lease.
            # Within a deadline: on a database that hangs the lease runs out instead.
            with contextlib.suppress(Exception):
                async with deadline(RELEASE_DEADLINE_S, "reconcile_release"):
                    await asyncio.shield(store.release(self.pool, claimed))
            raise
        except UNAVAILABLE_ERRORS as error:
            log.warning("reconcile.database_unavailable", error=error_text(error))
            return  # the lease runs out and the invoice is checked again
        except Unavailable as error:  # the answer could not be recorded now (notification.undecidable)
            invoice = claimed.invoice.invoice_number
            log.warning("reconcile.not_recorded", invoice_number=invoice, error=error_text(error))
            return  # likewise
        except Exception:
            log.exception("reconcile.check_failed", invoice_number=claimed.invoice.invoice_number)
            return
        await self._heard(report.answer, started)

    async def _heard(self, answer: CheckAnswer, started: float) -> None:
        """What a call says about DOKU (:meth:`_after_call`), and a pause it began shared with everyone."""
        pause = self._after_call(answer, started)
        if pause:  # every process holds back: the shared budget is emptied for the pause
            with contextlib.suppress(*UNAVAILABLE_ERRORS):
                await store.slow_down(self.pool, rps=self.settings.reconcile_rps, seconds=pause)

    def _after_call(self, answer: CheckAnswer, started: float) -> float:
        """What a call says about DOKU: back off as a whole on 429, 5xx or no answer; resume on answers.

        Returns the pause that began with this call (0 when none did). Synchronous, so that no other
        check or step sees the state between the answer and the pause.
        """
        now = asyncio.get_running_loop().time()
        result = answer.result
        if answer.http_status is not None:
            self.doku.answered(now)
        if not (result.backs_off or result.unanswered):
            if answer.http_status is not None:
                self._failures = 0
            return 0.0
        pause = 0.0
        if started >= self._paused_at:  # the first failure of a round: pause (longer each round)
            self._failures += 1
            pause = self.retry_s()
            self._paused_at, self._paused_until = now, now + pause
            if result.backs_off:
                log.warning("reconcile.backing_off", result=result.value, seconds=pause)
        if result.unanswered:  # logged once per outage, not per call
            self.doku.no_answer(result.value, answer.detail, now, retry_s=self._paused_until - now)
        return pause


async def check_claimed(
    pool: asyncpg.Pool, api: CheckStatusClient, settings: Settings, claimed: Claimed, *, retry_s: float
) -> CheckReport:
    """Check one claimed invoice now, and count and log it."""
    report = await reconciliation.check(
        pool,
        api,
        settings.clients,
        claimed,
        schedule=settings.reconcile_schedule,
        retry_s=retry_s,
        now_fn=utcnow,
    )
    observe(report, claimed.invoice.state)
    return report


async def _take_one_call(pool: asyncpg.Pool, rps: float) -> bool:
    """Whether one call's worth of the rate budget all reconcilers share was granted."""
    async with pool.acquire() as conn, conn.transaction():
        return bool(await store.take_rate_budget(conn, rps=rps, want=1))


def _one_token_s(rps: float) -> float:
    """How long the shared budget takes to refill by one call (at least 50 ms): a wait for the next."""
    return max(1.0 / rps, 0.05)


async def _take_budget(pool: asyncpg.Pool, rps: float, *, wait_s: float) -> None:
    """Wait up to ``wait_s`` for one call's worth of the rate budget all reconcilers share.

    The budget is spent for long only when DOKU answered 429 or 5xx or did not answer (every reconciler
    backs off, up to 5 minutes): a check by hand then says so, rather than wait out the backoff and its
    caller's deadline.
    """
    waited_until = asyncio.get_running_loop().time() + wait_s
    while not await _take_one_call(pool, rps):
        pause = _one_token_s(rps)
        if asyncio.get_running_loop().time() + pause > waited_until:
            raise DokuBackoff(
                "DOKU answered 429 or 5xx, or did not answer, lately, so every dipc process holds back its "
                "Check Status calls for a while (up to 5 minutes); ask again later"
            )
        await asyncio.sleep(pause)


async def check_invoice(
    pool: asyncpg.Pool, api: CheckStatusClient, settings: Settings, invoice: QuotedInvoice
) -> dict[str, Any]:
    """Check one invoice now, by hand, whatever its schedule (a paid one is not asked about again)."""
    if invoice.state == "paid":
        return invoice_document(invoice) | {"check": None}
    claimed = await store.claim(pool, invoice.payment_code, invoice.invoice_number, lease_s=lease_s(settings))
    if claimed is None:
        current = await store.get(pool, invoice.payment_code, invoice.invoice_number) or invoice
        if current.state == "paid":
            return invoice_document(current) | {"check": None}
        raise BeingChecked(
            f"invoice {invoice.invoice_number} is being checked right now (by a reconciler, or by another "
            "check by hand); ask again soon"
        )
    try:
        await _take_budget(pool, settings.reconcile_rps, wait_s=settings.doku_api_timeout_s)
        report = await check_claimed(pool, api, settings, claimed, retry_s=BACKOFF_BASE_S)
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.shield(store.release(pool, claimed))
        raise
    return report.document()


async def check_invoice_number(
    pool: asyncpg.Pool, api: CheckStatusClient, settings: Settings, invoice_number: str
) -> list[dict[str, Any]]:
    """Check every quoted invoice with this number now (DOKU's Check Status knows invoices by number)."""
    invoices = await store.find_invoice(pool, invoice_number)
    if not invoices:
        raise NotFound(f"no quoted invoice {invoice_number}: only invoices an inquiry quoted are reconciled")
    return [await check_invoice(pool, api, settings, invoice) for invoice in invoices]
