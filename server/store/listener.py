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
    """One read and the callers that share it; begun as soon as the event loop runs its task."""

    __slots__ = ("callers", "detached", "result", "task")

    def __init__(self, read: Callable[[], Awaitable[T]], begun: Callable[[], None]) -> None:
        # Apart from its callers' deadlines: the first caller's expiry must not end it under the others.
        # It is bounded by theirs all the same: once the last of them has gone, it is ended.
        self.detached = Detached()
        loop = asyncio.get_running_loop()
        self.result: asyncio.Future[T] = loop.create_future()
        self.callers = 0
        self.task = loop.create_task(self._run(read, begun), context=self.detached.context)
        self.task.add_done_callback(self._ended)

    async def _run(self, read: Callable[[], Awaitable[T]], begun: Callable[[], None]) -> T:
        begun()  # from here on its query may have begun: nobody joins it any more
        return await read()

    def _ended(self, task: asyncio.Task[T]) -> None:
        if task.cancelled():
            self.result.cancel()
        elif (error := task.exception()) is not None:
            self.result.set_exception(error)
            self.result.exception()  # retrieved here: its callers may all have gone meanwhile
        else:
            self.result.set_result(task.result())

    def end(self) -> None:
        self.detached.end()  # its connection, at once: a cancellation may wait on a server that hangs
        self.task.cancel()


class SharedReads:
    """The same read, asked for by many callers at once, made once for them all.

    An event wakes every long-poll of the feed at once, and most of them then read the same page (the
    same cursor and limit). A caller shares a read only until that read has begun, never one already
    running: so every read a caller gets sees whatever was committed before the caller asked (a change
    the caller saw answered, an event whose notice woke it). The waiters one event wakes all ask before
    the first one's read begins, and share it; a caller that comes later has a read of its own (which
    the callers after it may share), so a slow or stuck read holds back only those that share it.

    A read runs apart from its callers' deadlines (:class:`~server.store.pool.Detached`), so that the
    first caller's expiry does not end it under the others, and ends once the last of them has stopped
    waiting (their deadlines passed, the process stops): its connection is terminated then, at once.
    """

    def __init__(self) -> None:
        self._pending: dict[Hashable, _Read[Any]] = {}  # made, and not begun yet

    async def read(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        shared = self._pending.get(key)
        if shared is None:
            shared = self._pending[key] = _Read(read, lambda: self._forget(key, shared))
        shared.callers += 1
        try:
            return await asyncio.shield(shared.result)
        finally:
            shared.callers -= 1
            if not shared.callers and not shared.result.done():
                self._forget(key, shared)  # nobody joins a read its callers have left
                shared.end()

    def _forget(self, key: Hashable, shared: _Read[Any]) -> None:
        if self._pending.get(key) is shared:
            del self._pending[key]
