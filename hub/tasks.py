"""Background tasks of a hub: one owner for every task it starts.

Every task the hub creates is kept in a :class:`Tasks` set until it ends, so
shutdown can wait for it, then cancel what is left. :meth:`Tasks.bounded` is
the one place that counts a connection's frames in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from websockets.exceptions import ConnectionClosed

__all__ = ["Counted", "Tasks"]

logger = logging.getLogger("hub.tasks")


class Counted(Protocol):
    """A connection whose frames in flight are counted (see :meth:`Tasks.bounded`)."""

    pending: int


class Paused(Counted, Protocol):
    """A counted connection whose socket reading can be paused (:meth:`Tasks.start`)."""

    @property
    def transport(self) -> asyncio.Transport | None: ...


class Tasks:
    """The set of background tasks a hub owns."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; a failure is logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    async def bounded(self, link: Counted, limit: int, coro: Coroutine[Any, Any, None]) -> None:
        """Handle one frame of ``link`` in the background, at most ``limit`` at a time.

        Frames of many connections then share pipelines; past the limit the
        connection's reader waits (backpressure) instead of piling up tasks.
        ``link.pending`` counts the frames in flight; it is changed here only.
        """
        link.pending += 1
        counted = _counted(link, coro)
        if link.pending > limit:
            await counted
        else:
            self.spawn(counted)

    def start(self, link: Paused, limit: int, coro: Coroutine[Any, Any, None]) -> None:
        """Handle one frame of ``link`` in the background, from a callback.

        Like :meth:`bounded`, without awaiting: past ``limit`` frames in
        flight the connection stops reading its socket (TCP backpressure)
        until half of them are done.
        """
        link.pending += 1
        self.spawn(_counted_then_resume(link, limit, coro))
        if link.pending == limit + 1:
            transport = link.transport
            if transport is not None and not transport.is_closing():
                transport.pause_reading()

    async def close(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the tasks, then cancel the rest."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, ConnectionClosed):
                logger.error("! background task failed", exc_info=exc)


async def _counted_then_resume(link: Paused, limit: int, coro: Coroutine[Any, Any, None]) -> None:
    try:
        await coro
    finally:
        link.pending -= 1
        if link.pending == limit // 2:
            transport = link.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()


async def _counted(link: Counted, coro: Coroutine[Any, Any, None]) -> None:
    try:
        await coro
    finally:
        link.pending -= 1
