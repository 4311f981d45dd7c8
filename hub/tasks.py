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


async def _counted(link: Counted, coro: Coroutine[Any, Any, None]) -> None:
    try:
        await coro
    finally:
        link.pending -= 1
