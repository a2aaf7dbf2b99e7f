"""LISTEN for new events on a connection of its own, so waiters wake the moment an event commits.

Waiters remember :attr:`EventListener.generation` before they read, and wait for it to change. A lost
connection also bumps the generation (notifications may have been missed meanwhile), and the listener
reconnects with backoff. Nobody polls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Generic, TypeVar

import asyncpg
import structlog

from server.core.errors import error_text
from server.store.outbox import CHANNEL
from server.store.pool import UNAVAILABLE_ERRORS, Detached

log = structlog.get_logger(component="dipc.listener")
T = TypeVar("T")


class EventListener:
    def __init__(self, dsn: str, *, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.generation = 0
        self.connected = asyncio.Event()
        self._changed = asyncio.Event()  # set, and replaced, at every bump
        self._task: asyncio.Task[None] | None = None
        self._releasing = False
        self.reads = SharedReads()  # the feed's reads, which every event asks for at once

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dipc-event-listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def releasing(self) -> bool:
        return self._releasing

    async def release_waiters(self) -> None:
        """Wake every waiter now and let no one wait again (the process is shutting down)."""
        self._releasing = True
        self._bump()

    async def wait_for_change(self, seen: int, seconds: float) -> bool:
        """Wait until the generation differs from ``seen`` or ``seconds`` pass; True if it changed."""
        if self.generation != seen or seconds <= 0 or self._releasing:
            return self.generation != seen
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
        return self.generation != seen

    def _bump(self) -> None:
        self.generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _on_notify(self, *_args: object) -> None:
        self._bump()

    async def _run(self) -> None:
        delay = 0.2
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
            except Exception as error:  # whatever it is, keep trying: the feed falls back to its timeouts
                log.warning("listener.connect_failed", error=error_text(error), retry=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                async with asyncio.timeout(self.connect_timeout):  # LISTEN, on a server that may hang
                    await conn.add_listener(CHANNEL, self._on_notify)
                self.connected.set()
                delay = 0.2
                self._bump()  # anything committed while we were not listening is read now
                await lost.wait()
                log.warning("listener.connection_lost")
            except UNAVAILABLE_ERRORS as error:
                log.warning("listener.failed", error=error_text(error))
            except Exception:
                log.exception("listener.error")  # keep going: waiters fall back to their timeouts meanwhile
            finally:
                self.connected.clear()
                if not conn.is_closed():
                    conn.terminate()
            self._bump()
            await asyncio.sleep(delay)


class _Read(Generic[T]):
    __slots__ = ("begun", "callers", "detached", "read", "result", "task")

    def __init__(self, read: Callable[[], Awaitable[T]]) -> None:
        self.read = read
        # Apart from its callers' deadlines: the first caller's expiry must not end it under the others.
        # It is bounded by theirs all the same: once the last of them has gone, it is ended.
        self.detached = Detached()
        self.result: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[Any] | None = None
        self.begun = False  # its task has run: the query may have begun
        self.callers = 0

    async def run(self) -> T:
        self.begun = True
        return await self.read()


class SharedReads:
    """The same read, asked for by many callers at once, made once for them all.

    An event wakes every long-poll of the feed at once; most then read the same page (the same cursor and
    limit), and their answers bring the same clients straight back. Each caller shares a read begun
    after it asked, never one already running: so the read sees whatever was committed before the
    caller asked (a change the caller saw answered, an event whose notice woke it). Callers that ask
    while a read runs share the next one, begun when it ends; those woken by one event all ask before
    the first one's read has run, and share it.

    A read runs apart from its callers' deadlines (:class:`~server.store.pool.Detached`), so that the
    first caller's expiry does not end it under the others, and ends once the last of them has stopped
    waiting (their deadlines passed, the process stops): its connection is terminated then, at once.
    """

    def __init__(self) -> None:
        self._running: dict[Hashable, _Read[Any]] = {}
        self._next: dict[Hashable, _Read[Any]] = {}

    async def read(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        shared = self._next.get(key)
        if shared is None:
            running = self._running.get(key)
            if running is not None and not running.begun and running.callers:
                shared = running  # made but not run yet: its query begins after this caller asked
            else:
                shared = _Read(read)
                if running is not None:
                    self._next[key] = shared  # the running read may have begun before this caller asked
                else:
                    self._begin(key, shared)
        shared.callers += 1
        try:
            return await asyncio.shield(shared.result)
        finally:
            shared.callers -= 1
            if not shared.callers and not shared.result.done():
                self._abandon(key, shared)

    def _begin(self, key: Hashable, shared: _Read[Any]) -> None:
        self._running[key] = shared
        shared.task = asyncio.get_running_loop().create_task(shared.run(), context=shared.detached.context)
        shared.task.add_done_callback(lambda task: self._ended(key, shared, task))

    def _ended(self, key: Hashable, shared: _Read[Any], task: asyncio.Task[Any]) -> None:
        del self._running[key]
        if task.cancelled():
            shared.result.cancel()
        elif (error := task.exception()) is not None:
            shared.result.set_exception(error)
            shared.result.exception()  # retrieved here: its callers may all have gone meanwhile
        else:
            shared.result.set_result(task.result())
        following = self._next.pop(key, None)
        if following is not None:
            self._begin(key, following)

    def _abandon(self, key: Hashable, shared: _Read[Any]) -> None:
        if shared.task is None:  # not begun yet: it never will be
            del self._next[key]
            shared.result.cancel()
        else:
            shared.detached.end()  # its connection, at once: a cancellation may wait on a server that hangs
            shared.task.cancel()  # _ended follows, and begins the next read
