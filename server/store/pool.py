"""The connection pool, and the one place that decides which failures mean "the database is down"."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import math
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import orjson
import structlog

from server.core.errors import Unavailable, error_text
from server.ops import metrics
from server.ops.logging import REQUEST_ID

log = structlog.get_logger(component="dipc.store")

# Failures that say nothing about the request and everything about the database or the way to it.
# The caller gets 503 UNAVAILABLE and retries; DOKU retries notifications on its own schedule.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # shutdown, crash recovery, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.InterfaceError,  # connection closed under us, pool closing
    # asyncpg's protocol state machine, when the server goes away in the middle of a statement (fast
    # shutdown, crash): "cannot switch to state …; another operation is in progress". Its other members
    # (ProtocolError, OutdatedSchemaCacheError) also describe the connection, never the request, and
    # a retry on another connection is the cure for all of them.
    asyncpg.exceptions.InternalClientError,
    # A database that takes no writes: a standby after a failover, default_transaction_read_only. The
    # request is sound and /readyz says why (server/ops/health.py); another database is the cure.
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    # A login refused while serving (credentials rotated under a running dipc, its role locked, its
    # database renamed): every new connection fails, as in an outage, and the fix is the database's, after
    # which dipc is back by itself. At start, `dipc serve` and the CLI say which it is in one line and exit
    # 2 (cli/common.py, database_failure).
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
)

# What PostgreSQL answers when it gave a transaction up for another's: a lock cycle (40P01), a lock wait
# past a lock_timeout (55P03), a serialization failure (40001). Nothing of it was written, and the same
# request again is the cure: the HTTP routes answer 503 UNAVAILABLE, the CLI says to run it again. (A
# batch refused so is made write by write instead: store/batches.py.)
CONTENDED_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.SerializationError,
    # Not the rest of class 40: "statement completion unknown" (40003) may have written.
)


def contended(error: BaseException) -> Unavailable:
    """The :class:`Unavailable` for one of CONTENDED_ERRORS (its detail, with the server's process and
    transaction ids, is for the log, not for the caller)."""
    return Unavailable(
        f"the database gave this transaction up for another's ({type(error).__name__});"
        " nothing of it was written: try again"
    )


# Cleaning up a connection whose statement was cancelled (ROLLBACK, asyncpg's reset) is a round trip to
# the server, and asyncpg first waits for the server to acknowledge the cancellation. A server that hangs
# (SIGSTOP, a stalled disk, a network partition) never does, and the request would wait with it: past
# its deadline the connections it holds are terminated instead (see ``deadline``).
_HELD_CONNECTIONS: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "dipc_held_connections", default=None
)
# Inside a Deadline, the loop time its innermost scope expires at; its expiry terminates what the scope
# holds, so a release there needs no timeout of its own. None outside every deadline.
_DEADLINE_AT: contextvars.ContextVar[float | None] = contextvars.ContextVar("dipc_deadline_at", default=None)
# Outside a deadline (background work), a release gives up after this long and terminates the connection.
RELEASE_TIMEOUT_S = 5.0


# How often PostgreSQL checks that the client of a running statement is still there. A deadline closes
# dipc's side of a connection, but a backend that waits for a lock does not notice: it waited on until the
# statement timeout (30 s), and under load a lock held past the requests' deadlines left one such backend
# per request, until max_connections was reached and every request got 503.
CLIENT_CHECK_INTERVAL_MS = 1000
_client_check_unavailable = False


async def _init_connection(conn: asyncpg.Connection, *, timeout_s: float) -> None:
    """Ready a new connection, within ``timeout_s``, or terminate it.

    Behind pgbouncer the login completes without a server, so a database that hangs shows here first.
    No deadline can reach this connection (no request holds it yet), and asyncpg closes one whose init
    failed or was cancelled gracefully, waiting for the server's goodbye: the request that needed it
    waited for as long as the database hung. Terminated here, that close returns at once.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await conn.set_type_codec(
                "jsonb",
                schema="pg_catalog",
                encoder=lambda value: orjson.dumps(value).decode(),
                decoder=orjson.loads,
                format="text",
            )
            await _check_client(conn)
    except BaseException:
        conn.terminate()
        raise


async def _check_client(conn: asyncpg.Connection) -> None:
    """Have the session check its client every CLIENT_CHECK_INTERVAL_MS. A session setting rather than a
    startup parameter: a pgbouncer that does not list it in ignore_startup_parameters would refuse the
    connection (behind pgbouncer, set it on the role as well, README). Where the platform has no such
    check (PostgreSQL on Windows), sessions go without, as before."""
    global _client_check_unavailable  # said once per process, not once per connection
    if _client_check_unavailable:
        return
    try:
        await conn.execute(f"SET client_connection_check_interval = {CLIENT_CHECK_INTERVAL_MS}")
    except (asyncpg.exceptions.InvalidParameterValueError, asyncpg.exceptions.UndefinedObjectError) as error:
        _client_check_unavailable = True
        log.warning("db.client_check_unavailable", error=str(error))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release a connection to the pool without asyncpg's default reset round trip.

    asyncpg still rolls back an open transaction before calling this. The default reset (RESET ALL,
    UNLISTEN *, advisory unlock, CLOSE ALL) costs a round trip per release, on the inquiry hot path too,
    and there is nothing for it to undo: pooled connections never SET session state (only SET LOCAL,
    and once, when they connect, the client check that RESET ALL would undo),
    never LISTEN (the event feed listens on a connection of its own), and release session advisory
    locks in ``finally`` (migrations).
    """


class FairPool(asyncpg.Pool):
    """asyncpg's pool, served first come, first served.

    asyncpg hands a released connection to whoever asks next; a waiter it had woken for that connection
    finds it gone and queues again at the back. Under load some requests starve: bench/ measured p99
    400 ms at p50 10 ms with 32 concurrent inquiries on 10 connections. A FIFO semaphore with as many
    permits as connections, taken before asyncpg's queue, makes waiting fair (p99 fell to 27 ms).
    asyncpg 0.32 still queues this way (its pool waits on an ``asyncio.LifoQueue``, whose ``get`` lets a
    newcomer take an item ahead of a woken waiter): ``bench/pool_fairness.py`` measures both pools.
    """

    __slots__ = ("__weakref__", "_gate", "_held")  # weakly referenced: outbox keeps a sequencer per pool

    def __init__(self, *args: Any, max_size: int, **kwargs: Any) -> None:
        super().__init__(*args, max_size=max_size, **kwargs)
        self._gate = asyncio.Semaphore(max_size)
        self._held: set[int] = set()  # ids of the proxies handed out through the gate

    async def _acquire(self, timeout: float | None) -> Any:  # noqa: ASYNC109 - asyncpg's signature
        if timeout is not None and self._gate.locked():
            started = time.monotonic()
            async with asyncio.timeout(timeout):
                await self._gate.acquire()
            timeout = max(timeout - (time.monotonic() - started), 0.001)
        else:
            # A free permit is taken at once, and without a timeout there is none to arm (the request's
            # Deadline bounds the wait): asyncio.timeout costs a few µs even when it arms nothing.
            await self._gate.acquire()
        try:
            proxy = await super()._acquire(timeout)
        except BaseException:
            self._gate.release()
            raise
        self._held.add(id(proxy))
        held = _HELD_CONNECTIONS.get()
        if held is not None:
            held.append(proxy)
        return proxy

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Release ``connection``; outside a Deadline, within :data:`RELEASE_TIMEOUT_S`.

        Under a Deadline the release is not timed on its own: the deadline terminates the connection if
        the cleanup hangs, and a timed release arms a timer (asyncpg wraps it in ``asyncio.timeout``)
        that cost the inquiry several µs. (A release cancelled from elsewhere, which only a shutdown
        does here since aiohttp's handler cancellation is off, goes on unbounded, shielded by asyncpg;
        closing the pool ends it.)
        """
        if timeout is None and _DEADLINE_AT.get() is None:
            timeout = RELEASE_TIMEOUT_S
        try:
            await super().release(connection, timeout=timeout)
        finally:
            if id(connection) in self._held:  # a second release of one proxy frees nothing twice
                self._held.discard(id(connection))
                self._gate.release()


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    connect_timeout: float = 5.0,
    statement_timeout_ms: int = 30_000,
    statement_cache_size: int = 100,
) -> asyncpg.Pool:
    """A pool whose connections speak orjson for jsonb and give up on statements that hang.

    ``statement_cache_size=0`` behind a transaction-pooling pgbouncer older than 1.21
    (DIPC_DB_STATEMENT_CACHE_SIZE).
    """
    return await FairPool(
        dsn,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        loop=None,
        max_queries=50_000,
        statement_cache_size=statement_cache_size,
        min_size=min_size,
        max_size=max_size,
        timeout=connect_timeout,
        init=functools.partial(_init_connection, timeout_s=connect_timeout),
        reset=_keep_session,
        # Connections to a dead server are dropped quickly, so the pool recovers when it returns.
        max_inactive_connection_lifetime=60.0,
        server_settings={
            "application_name": "dipc",
            "jit": "off",
            "statement_timeout": str(statement_timeout_ms),
            "idle_in_transaction_session_timeout": "60000",
        },
    )


POOL_CLOSE_TIMEOUT_S = 5.0


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close gracefully, but a database that hangs does not hold the process's exit: terminate. At once
    when the closing task is being cancelled (Ctrl+C of a command): nobody waits for a graceful close."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        pool.terminate()
        return
    try:
        await asyncio.wait_for(pool.close(), POOL_CLOSE_TIMEOUT_S)
    except TimeoutError:
        pool.terminate()  # asyncpg has already terminated what close() left; this is idempotent


# How often one event loop's open deadlines are checked: a deadline fires up to this much late.
DEADLINE_TICK_S = 0.05


def deadline(seconds: float, what: str) -> Deadline:
    """Run database work under a deadline; turn every "database is down" failure into Unavailable.

    ``async with deadline(0.8, "inquiry"): ...``. See :class:`Deadline`.
    """
    return Deadline(seconds, what)


def end_database_work_within(seconds: float) -> None:
    """The process is stopping: every :class:`Deadline` of this event loop, open now or opened later,
    expires within ``seconds``.

    A request whose database hangs would otherwise hold the stop for as long as its own deadline: a
    long-poll of the event feed for its whole wait, up to about 90 s. aiohttp waits for a request
    in progress for the shutdown timeout, then for as long again before it gives up on it, so it alone
    took twice DIPC_SHUTDOWN_TIMEOUT_S, and a service manager would have killed the process first.
    Healthy work that needs longer (a large import) is ended too: it would not finish in time anyway.
    """
    loop = asyncio.get_running_loop()
    _Watchdog.of(loop).end_by(loop.time() + seconds)


def time_left() -> float | None:
    """Seconds until the innermost open :class:`Deadline` of this task expires; None outside any."""
    expiry = _DEADLINE_AT.get()
    return None if expiry is None else expiry - asyncio.get_running_loop().time()


class Deadline:
    """Database work under a deadline, and the one place "the database is down" becomes Unavailable.

    At the deadline the work is cancelled and every pooled connection it still holds is terminated, so
    the caller has its answer within ``seconds`` (plus at most :data:`DEADLINE_TICK_S`) whatever the
    database does: a server that hangs would otherwise hold the cleanup (ROLLBACK, the release to the
    pool) for as long as it hangs. The pool opens a new connection for the next request.

    The cancellation follows ``asyncio.timeout``: a cancellation that is ours becomes a timeout; one
    from elsewhere (the client left, the server stops) goes on. What differs is the clock: rather than
    two timers per scope (``asyncio.timeout``'s and the one that terminates connections), one
    :class:`_Watchdog` per event loop checks every open scope each tick. A timer costs about 3 µs on
    uvloop (a libuv handle made, started and closed), and this class replaced about 15 µs of the
    inquiry's 210 µs of CPU.

    Also the one place the duration of a request's database work is measured (``what`` names it).
    """

    __slots__ = ("_bounded", "_cancelling", "_expired", "_held", "_seconds", "_started", "_task", "_token",
                 "_watchdog", "_what")  # fmt: skip

    def __init__(self, seconds: float, what: str) -> None:
        self._seconds = seconds
        self._what = what
        self._expired = False

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a task to cancel")
        self._task = task
        self._cancelling = task.cancelling()
        self._started = time.perf_counter()
        self._held: list[Any] = []
        self._token = _HELD_CONNECTIONS.set(self._held)
        loop = asyncio.get_running_loop()
        enclosing = _DEADLINE_AT.get()
        expiry = loop.time() + self._seconds
        self._bounded = _DEADLINE_AT.set(expiry if enclosing is None else min(expiry, enclosing))
        self._watchdog = _Watchdog.of(loop)
        self._watchdog.watch(self, expiry)

    def expire(self) -> None:
        """The deadline passed (called by the watchdog): free what the work waits on, then cancel it."""
        self._expired = True
        _terminate_held(self._held)
        self._task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, error: BaseException | None, _traceback: Any
    ) -> None:
        self._watchdog.unwatch(self)
        _HELD_CONNECTIONS.reset(self._token)
        _DEADLINE_AT.reset(self._bounded)
        # Our cancellation, and nobody else's since: it (or the termination that preceded it, seen by
        # the work first as a closed connection) is the timeout.
        ours = self._expired and self._task.uncancel() <= self._cancelling
        result = "ok" if exc_type is None else "error"
        try:
            if exc_type is None:
                return
            if ours and issubclass(exc_type, (asyncio.CancelledError, *UNAVAILABLE_ERRORS)):
                result = "timeout"
                if self._watchdog.stopping:  # its deadline was brought forward (end_database_work_within)
                    log.warning("db.ended_by_stop", what=self._what, request_id=REQUEST_ID.get())
                    raise Unavailable("the server is stopping, and this did not finish in time") from None
                log.warning(
                    "db.deadline_exceeded",
                    what=self._what,
                    seconds=self._seconds,
                    request_id=REQUEST_ID.get(),
                )
                raise Unavailable(f"the database did not answer within {self._seconds:g} s") from None
            if issubclass(exc_type, UNAVAILABLE_ERRORS):  # a TimeoutError of something else too (a connect)
                result = "timeout" if issubclass(exc_type, TimeoutError) else "unavailable"
                log.warning(
                    "db.unavailable", what=self._what, error=error_text(error), request_id=REQUEST_ID.get()
                )
                raise Unavailable("the database is unavailable") from error
        finally:
            metrics.DB_DURATION_SERIES(self._what, result).observe(time.perf_counter() - self._started)


class Steps:
    """Long database work on one connection that it holds (an import), bounded step by step.

    An import holds one connection in one transaction for as long as its rows take to come and be
    checked, so no one :class:`Deadline` fits it, and a Deadline nested in it could not reach that
    connection: it was acquired outside, and a batch's COPY runs in a task of its own. Each step (a
    statement, a batch, the COMMIT) is bounded from its start instead. A step past its bound terminates
    the connection, so what waits on it fails at once (a database that hangs would otherwise hold the
    work, and its transaction's cleanup, for as long as it hangs), and cancels the task that entered,
    which may be waiting for something else meanwhile (the next rows of an upload or a pipe that
    pauses). :meth:`ended` tells the work that the failure it meets is that expiry. Each step's duration
    is measured as ``<what>.<step>`` in dipc_db_operation_duration_seconds.
    """

    def __init__(self, conn: asyncpg.Connection, seconds: float, what: str) -> None:
        self._conn = conn
        self._seconds = seconds
        self._what = what
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("steps need a task to cancel")
        self._task = task
        self._cancelling = task.cancelling()
        self._request_id = REQUEST_ID.get()  # its expiry is logged from the watchdog's timer
        self.expired: str | None = None  # the step that ran out of time
        self.terminated = False  # closed here (terminate): its transaction is over, nothing to roll back

    def start(self, step: str) -> Callable[[BaseException | None], None]:
        """Bound a step that starts now; call what this returns once it is done, with its error or None."""
        started = time.perf_counter()
        timer = asyncio.get_running_loop().call_later(self._seconds, self._expire, step)

        def done(error: BaseException | None) -> None:
            timer.cancel()
            result = "timeout" if self.expired == step else "ok" if error is None else "error"
            metrics.DB_DURATION_SERIES(f"{self._what}.{step}", result).observe(time.perf_counter() - started)

        return done

    @contextmanager
    def step(self, step: str) -> Iterator[None]:
        done = self.start(step)
        try:
            yield
        except BaseException as error:
            done(error)
            raise
        done(None)

    def ended(self, error: BaseException) -> bool:
        """Whether ``error`` is what a step's expiry made of the work: a cancellation that is ours and
        nobody else's since, or a failure of the connection it terminated."""
        if self.expired is None:
            return False
        if isinstance(error, asyncio.CancelledError):
            return self._task.uncancel() <= self._cancelling
        return True

    def terminate(self) -> None:
        """Close the connection, and with it the work's transaction (PostgreSQL rolls back a transaction
        whose connection is gone), without waiting for the database."""
        self.terminated = True
        self._conn.terminate()

    def _expire(self, step: str) -> None:
        self.terminate()
        if self.expired is None:
            self.expired = step
            log.warning(
                "db.deadline_exceeded",
                what=f"{self._what}.{step}",
                seconds=self._seconds,
                request_id=self._request_id,
            )
            self._task.cancel()


class _Watchdog:
    """Every open :class:`Deadline` of one event loop, checked every :data:`DEADLINE_TICK_S` by one timer
    that runs only while a deadline is open."""

    __slots__ = ("_last", "_loop", "_open", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._open: dict[Deadline, float] = {}  # each open scope and when it expires (loop time)
        self._timer: asyncio.TimerHandle | None = None
        self._last = math.inf  # no scope expires later (loop time): set once the process stops

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Watchdog:
        watchdog = _WATCHDOGS.get(loop)
        if watchdog is None:
            watchdog = _WATCHDOGS[loop] = cls(loop)
        return watchdog

    def watch(self, scope: Deadline, expiry: float) -> None:
        """Expire ``scope`` at loop time ``expiry``, or sooner when the process stops sooner."""
        self._open[scope] = expiry if expiry < self._last else self._last
        if self._timer is None:
            self._timer = self._loop.call_later(DEADLINE_TICK_S, self._tick)

    @property
    def stopping(self) -> bool:
        return self._last != math.inf

    def end_by(self, last: float) -> None:
        """Expire every scope, open now or later, by loop time ``last`` at the latest."""
        self._last = min(self._last, last)
        for scope, expiry in self._open.items():
            self._open[scope] = min(expiry, self._last)

    def unwatch(self, scope: Deadline) -> None:
        self._open.pop(scope, None)

    def _tick(self) -> None:
        now = self._loop.time()
        expired = [scope for scope, expiry in self._open.items() if expiry <= now]
        for scope in expired:
            del self._open[scope]
        # Rearmed before anything else runs: a failure below must not stop every later deadline.
        self._timer = self._loop.call_later(DEADLINE_TICK_S, self._tick) if self._open else None
        for scope in expired:
            scope.expire()


_WATCHDOGS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = weakref.WeakKeyDictionary()


@contextmanager
def tracking(held: list[Any]) -> Iterator[list[Any]]:
    """Record in ``held`` every pooled connection the block (and tasks it starts) acquires, so that
    background work stuck on a database that hangs can be unblocked with :func:`terminate_held`."""
    token = _HELD_CONNECTIONS.set(held)
    try:
        yield held
    finally:
        _HELD_CONNECTIONS.reset(token)


def terminate_held(held: list[Any]) -> None:
    """Terminate the connections in ``held`` still in use: what waits on them fails at once."""
    _terminate_held(held)


class Detached:
    """Database work run apart from the requests that wait for it (a read several of them share): no
    deadline of theirs bounds it, and no caller's expiry terminates its connection under the others.
    Whoever runs it ends it, with :meth:`end`, once nobody waits: its connections are terminated at
    once, whatever the database does (a cancellation alone may wait on a server that hangs).

    Run the work in :attr:`context` (``loop.create_task(work, context=detached.context)``).
    """

    __slots__ = ("_held", "context")

    def __init__(self) -> None:
        self._held: list[Any] = []
        self.context = contextvars.copy_context()
        self.context.run(_DEADLINE_AT.set, None)
        self.context.run(_HELD_CONNECTIONS.set, self._held)
        self.context.run(REQUEST_ID.set, None)  # not one request's: its log lines name none

    def end(self) -> None:
        _terminate_held(self._held)


def _terminate_held(held: list[Any]) -> None:
    for proxy in held:
        connection = proxy._con  # None once released: it may be serving another request by now
        if connection is not None and not connection.is_closed():
            connection.terminate()
