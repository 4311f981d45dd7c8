"""One timer per process for the simulated peers' many deadlines.

Each session sends a job every interval and each node holds each job for a
service time: thousands of deadlines a second. An event loop timer apiece
costs a handle, a heap entry (uvloop: a libuv timer), often a wake-up of its
own, and a cancellation; a :class:`TimerWheel` instead files each deadline
in a slot of ``resolution_s`` and keeps one loop timer armed for the
earliest slot, and runs what is nearly due whenever a message has woken the
loop anyway (:meth:`TimerWheel.poll`).

A callback runs at most ``early_s`` before its deadline and at most
``resolution_s`` plus a millisecond or two after it. The harness measures
latency from the moment a job is actually sent and the time a node actually
held it, so this moves when things happen, not what is measured; a
session's cadence does not drift (each tick is due one interval after the
previous one was due, not after it ran).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["EARLY_S", "RESOLUTION_S", "Batch", "TimerWheel"]

RESOLUTION_S = 0.002
"""Default slot width: deadlines within 2 ms of each other run in one wake-up."""

EARLY_S = 0.005
"""Default lead: when the loop is awake anyway, what is due this soon runs now."""


class Batch(Protocol):
    """Brackets a run of callbacks (:class:`loadtest.wsclient.Flusher` is one)."""

    def begin(self) -> None: ...

    def end(self) -> None: ...


class TimerWheel:
    """Deadlines on ``time.perf_counter()``, run from one loop timer.

    A callback runs when its slot comes, from the loop timer, or up to
    ``early_s`` sooner from :meth:`poll`, which the peers call whenever a
    message wakes the loop: most deadlines then ride on a wake-up that
    happens anyway, and the process sleeps and wakes far less often. A
    sleeping process is the costliest part of a message here: waking it on
    a shared machine means a context switch and cold caches.

    Callbacks cannot be cancelled: a callback that may have become moot
    checks its own state when it runs (the loop's timers would need a
    handle kept and cancelled for each).
    """

    __slots__ = (
        "_armed",
        "_batch",
        "_early",
        "_handle",
        "_heap",
        "_loop",
        "_resolution",
        "_running",
        "_slots",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        resolution_s: float = RESOLUTION_S,
        early_s: float = EARLY_S,
        *,
        batch: Batch | None = None,
    ) -> None:
        self._loop = loop
        self._batch = batch
        """Told when a run of callbacks begins and ends (to write what they sent at once)."""
        self._resolution = resolution_s
        self._early = early_s
        self._slots: dict[int, list[tuple[Callable[[Any], None], Any]]] = {}
        """Slot number -> callbacks and their argument, in the order they were added."""
        self._heap: list[int] = []
        """The slot numbers in ``_slots``, as a heap."""
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0
        """The slot the loop timer is set for (when ``_handle`` is set)."""
        self._running = False

    def __len__(self) -> int:
        return sum(len(entries) for entries in self._slots.values())

    def call_at(self, when: float, callback: Callable[[Any], None], arg: Any = None) -> None:
        """Run ``callback(arg)`` at ``when`` (a ``perf_counter()``) or up to ``early_s`` sooner."""
        # Slot k holds the deadlines in ((k - 1) * resolution, k * resolution].
        slot = -int(-when // self._resolution)
        entries = self._slots.get(slot)
        if entries is None:
            self._slots[slot] = [(callback, arg)]
            heapq.heappush(self._heap, slot)
            if not self._running and (self._handle is None or slot < self._armed):
                self._arm(slot)
        else:
            entries.append((callback, arg))

    def poll(self, now: float) -> None:
        """Run what is due by ``now + early_s``; ``now`` is ``time.perf_counter()``."""
        heap = self._heap
        if heap and heap[0] <= (now + self._early) // self._resolution and not self._running:
            self._run(now)

    def clear(self) -> None:
        """Drop every pending callback."""
        self._slots.clear()
        self._heap.clear()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, slot: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = slot
        # Loops count time in whole milliseconds (uvloop, libuv) and may wake up
        # to one early: round up and add one, or an early wake-up finds nothing
        # due and the timer spins until the slot starts.
        delay_ms = math.ceil((slot * self._resolution - time.perf_counter()) * 1000)
        self._handle = self._loop.call_later(max(delay_ms, 0) / 1000 + 0.001, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._run(time.perf_counter())

    def _run(self, now: float) -> None:
        heap = self._heap
        slots = self._slots
        last = (now + self._early) // self._resolution
        # While callbacks run, call_at() arms nothing; a slot they add that is
        # due already runs in this loop.
        self._running = True
        batch = self._batch
        if batch is not None:
            batch.begin()
        try:
            while heap and heap[0] <= last:
                for callback, arg in slots.pop(heapq.heappop(heap)):
                    try:
                        callback(arg)
                    except Exception as exc:
                        self._loop.call_exception_handler(
                            {"message": "timer wheel callback failed", "exception": exc}
                        )
        finally:
            self._running = False
            if batch is not None:
                batch.end()
        if not heap:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
        elif self._handle is None or self._armed != heap[0]:
            self._arm(heap[0])
