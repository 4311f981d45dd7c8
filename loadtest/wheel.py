"""One timer per process for the simulated peers' many deadlines.

Each session sends a job every interval and each node holds each job for a
service time: thousands of deadlines a second. An event loop timer apiece
costs a handle, a heap entry (uvloop: a libuv timer) and a cancellation; a
:class:`TimerWheel` instead files each deadline in a slot of
``resolution_s`` and keeps one loop timer armed, at the start of the
earliest slot; when it fires it runs every callback of every slot that has
come.

Slots are on the loop's own clock, which counts whole milliseconds under
uvloop: a slot's timer fires exactly when the slot starts, and a callback
runs at most ``resolution_s`` after its deadline (and, that clock being
coarse, up to a millisecond before it), like a loop timer rounded to a
coarser tick. When the loop is awake for a message
at that moment, the slot's callbacks run in the same wake-up, as due loop
timers do.

What the hub sees must not depend on the harness: sends and results are
not moved to ride on the loop's wake-ups for messages (that would send them
in bursts right after the hub's own bursts, and change how the hub batches
its work), only to the next slot. The workers' wheels are offset from each
other (``offset_s``): with K workers and K-millisecond slots, the hub still
gets sends and results every millisecond, as from loop timers, while each
worker wakes for its timer only every K milliseconds.

The harness measures latency from the moment a job is actually sent and the
time a node actually held it, so slots move when things happen, not what is
measured; a session's cadence does not drift (each tick is due one interval
after the previous one was due, not after it ran).
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["RESOLUTION_S", "Batch", "TimerWheel"]

RESOLUTION_S = 0.001
"""Default slot width: one millisecond, the tick of uvloop's clock."""

_TOLERANCE_S = 1e-4
"""A slot counts as come this close to its start (float rounding of the loop's clock)."""


class Batch(Protocol):
    """Brackets a run of callbacks (:class:`loadtest.wsclient.Flusher` is one)."""

    def begin(self) -> None: ...

    def end(self) -> None: ...


class TimerWheel:
    """Deadlines on ``time.perf_counter()``, run from one loop timer.

    Args:
        loop: the running loop.
        resolution_s: slot width; a whole number of milliseconds.
        offset_s: where slots start, modulo ``resolution_s`` (whole milliseconds).
        batch: told when a run of callbacks begins and ends, to write what
            they send at once.
        on_late: told how late each firing of the timer was.

    Callbacks cannot be cancelled: a callback that may have become moot
    checks its own state when it runs (the loop's timers would need a
    handle kept and cancelled for each).
    """

    __slots__ = (
        "_armed",
        "_batch",
        "_handle",
        "_heap",
        "_loop",
        "_offset",
        "_on_late",
        "_resolution",
        "_running",
        "_skew",
        "_slots",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        resolution_s: float = RESOLUTION_S,
        offset_s: float = 0.0,
        *,
        batch: Batch | None = None,
        on_late: Callable[[float, float], None] | None = None,
    ) -> None:
        self._loop = loop
        self._on_late = on_late
        """Called at each firing with ``perf_counter()`` and how late (s) the slot's
        timer fired: the loop's lag, measured every slot for free."""
        self._resolution = resolution_s
        self._offset = offset_s
        self._batch = batch
        self._skew = loop.time() - time.perf_counter()
        """The loop's clock minus ``perf_counter()``: both are the monotonic clock
        (the loop's in whole milliseconds under uvloop), so this is a constant
        to within a millisecond, and deadlines all move by the same amount."""
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
        """Run ``callback(arg)`` once ``time.perf_counter()`` reaches ``when``."""
        # Slot k starts at k * resolution + offset on the loop's clock and holds
        # the deadlines since the start of slot k - 1.
        slot = math.ceil((when + self._skew - self._offset) / self._resolution)
        entries = self._slots.get(slot)
        if entries is None:
            self._slots[slot] = [(callback, arg)]
            heapq.heappush(self._heap, slot)
            if not self._running and (self._handle is None or slot < self._armed):
                self._arm(slot)
        else:
            entries.append((callback, arg))

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
        self._handle = self._loop.call_at(slot * self._resolution + self._offset, self._fire)

    def _fire(self) -> None:
        self._handle = None
        heap = self._heap
        slots = self._slots
        if self._on_late is not None:
            now = time.perf_counter()
            start = self._armed * self._resolution + self._offset - self._skew
            self._on_late(now, now - start)
        last = (self._loop.time() + _TOLERANCE_S - self._offset) // self._resolution
        # While callbacks run, call_at() arms nothing; a slot they add that has
        # come already runs in this loop.
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
        if heap:
            self._arm(heap[0])
