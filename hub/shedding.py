"""Load shedding: refuse new jobs at the edge while the hub is behind.

A hub that takes more jobs than it can carry builds a backlog in itself:
frames wait to be read, script calls wait for a pipeline, results wait
behind dispatches, slots stay held, and latency grows for every job. Instead,
while any sign below says the hub is behind, :meth:`Shedder.reason` names
it and the session refuses the job ``OVERLOADED`` (with ``retry_after_ms``)
at once, with no Redis call. Jobs already accepted go on at full speed.

The signs:
- event-loop lag: how late a 50 ms timer fires (``shed_loop_lag_ms``), twice
  in a row: one late tick is a pause (a garbage collection, another process
  on the core), two are a backlog;
- script calls waiting for a pipeline or in flight (``shed_script_calls``);
- how long ``dispatch_task`` takes from the submit to its reply, a moving
  average, above the fastest dispatch of the last 30 seconds
  (``shed_dispatch_ms``): the queue in this hub and in Redis together, not
  the round trip to Redis, which a remote Redis makes longer for every job;
- bytes waiting in all connections' write buffers (``shed_send_bytes``);
- the audio budget (:class:`~hub.audio.AudioStore`) cannot take the job.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from .audio import AudioStore
from .batcher import Batcher
from .config import Settings
from .health import Health
from .registry import Registry

__all__ = ["Shedder"]

_TICK_S = 0.05
"""How often the loop lag is measured."""

_SEND_EVERY = 5
"""Ticks between two sums of the write buffers (they cost one call per connection)."""

_EWMA = 0.05
"""Weight of each new dispatch time in the moving average."""

_HOLD_S = 0.25
"""How long a sign of being behind keeps the hub shedding after it was last seen."""

_FLOOR_TICKS = 600
"""Ticks over which the fastest dispatch is the floor of the dispatch times (30 s)."""


class Shedder:
    """Tells, in O(1), whether a new job must be refused ``OVERLOADED``.

    Args:
        settings: the ``shed_*`` thresholds.
        batcher: script calls in flight.
        registry: the connections whose write buffers count.
        audio: the audio budget.
        health: ends :meth:`watch` when the hub stops.
    """

    def __init__(
        self,
        settings: Settings,
        batcher: Batcher,
        registry: Registry,
        audio: AudioStore,
        health: Health,
    ) -> None:
        self._batcher = batcher
        self._registry = registry
        self._audio = audio
        self._health = health
        self._max_lag_s = settings.shed_loop_lag_ms / 1000
        self._max_calls = settings.shed_script_calls
        self._max_send = settings.shed_send_bytes
        self._max_dispatch_s = settings.shed_dispatch_ms / 1000
        self.dispatch_s = 0.0
        """Moving average of the time from a submit to its dispatch reply."""
        self.floor_s = 0.0
        """The fastest dispatch of the last 30 seconds: the round trip without a queue."""
        self._dispatches = 0
        self._tick_min = float("inf")
        self._minima: deque[float] = deque(maxlen=_FLOOR_TICKS)
        self.retry_after_ms = settings.shed_retry_after_ms
        """Sent with each ``OVERLOADED`` refusal."""
        self.lag_s = 0.0
        """The loop lag last measured."""
        self.send_bytes = 0
        """Bytes in all write buffers, last summed."""
        self._behind = ""
        self._behind_until = 0.0

    def reason(self, audio_bytes: int) -> str:
        """Why a new job with ``audio_bytes`` of audio must be refused; empty: take it."""
        if self._behind and time.monotonic() < self._behind_until:
            return self._behind
        if self._batcher.in_flight >= self._max_calls:
            return "too many script calls in flight"
        if self.dispatch_s - self.floor_s > self._max_dispatch_s:
            return "jobs wait too long for their dispatch"
        if audio_bytes and self._audio.full(audio_bytes):
            return "the audio budget is full"
        return ""

    def dispatched(self, seconds: float) -> None:
        """Record how long one submit waited for its dispatch reply."""
        self.dispatch_s += (seconds - self.dispatch_s) * _EWMA
        self._dispatches += 1
        if seconds < self._tick_min:
            self._tick_min = seconds

    async def watch(self) -> None:
        """Measure the loop lag and the write buffers until the hub stops."""
        loop = asyncio.get_running_loop()
        tick = 0
        late = 0.0
        while not self._health.stopping:
            start = loop.time()
            await asyncio.sleep(_TICK_S)
            self.lag_s, previous = max(0.0, loop.time() - start - _TICK_S), late
            late = self.lag_s
            tick += 1
            if tick % _SEND_EVERY == 0:
                self.send_bytes = self._sum_send_buffers()
            if self._dispatches:
                self._minima.append(self._tick_min)
                self.floor_s = min(self._minima)
            else:
                # No submit got through (all shed, or none came): the average fades.
                self.dispatch_s *= 0.5
            self._dispatches = 0
            self._tick_min = float("inf")
            if min(late, previous) > self._max_lag_s:
                self._shed("the event loop is behind")
            elif self.send_bytes > self._max_send:
                self._shed("too many bytes wait to be sent")
            if tick % 200 == 0:
                self._audio.purge()

    def _shed(self, why: str) -> None:
        self._behind = why
        self._behind_until = time.monotonic() + _HOLD_S

    def _sum_send_buffers(self) -> int:
        total = 0
        for links in (self._registry.nodes, self._registry.sessions):
            for link in links.values():
                transport = link.ws.transport
                if transport is not None:
                    total += transport.get_write_buffer_size()
        return total
