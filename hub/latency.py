"""Job latencies seen by sessions, in bounded histograms over a sliding window.

Two spans are measured on the hub a session is connected to, from the
moment its ``job`` frame is handled: until the ``accepted`` frame goes out
(time to accepted, queue wait included) and until the ``result`` frame
goes out (end to end). Each goes into a :class:`LatencyWindow`: log-scaled
buckets (eight per power of two, so a percentile is within 9 % of the true
value) in a ring of time slots, so memory is fixed whatever the job rate and
old slots fall out of the window on their own.

Each hub publishes its bucket counts through Redis (:mod:`hub.watch`) and
the dashboard adds every hub's counts before reading percentiles, so the
figures are the deployment's, not one hub's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping

__all__ = ["BUCKETS", "Latencies", "LatencyWindow", "bucket_of", "merge", "percentile_ms"]

BUCKETS = 256
"""Buckets per histogram: bucket ``i`` holds spans up to ``2 ** ((i + 1) / 8)`` µs."""

_PER_OCTAVE = 8


def bucket_of(seconds: float) -> int:
    """The bucket of a span (below 1 µs: bucket 0; above 2^32 µs: the last)."""
    micros = seconds * 1e6
    if micros <= 1:
        return 0
    return min(BUCKETS - 1, int(math.log2(micros) * _PER_OCTAVE))


def _bucket_ms(index: int) -> float:
    """A bucket's representative value: its geometric middle, in milliseconds."""
    return float(2 ** ((index + 0.5) / _PER_OCTAVE) / 1000)


def merge(into: MutableMapping[int, int], counts: Iterable[tuple[int, int]]) -> None:
    """Add (bucket, count) pairs to ``into``; out-of-range buckets and counts are ignored."""
    for index, n in counts:
        if 0 <= index < BUCKETS and n > 0:
            into[index] = into.get(index, 0) + n


def percentile_ms(counts: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram in milliseconds; None when it is empty."""
    total = sum(counts.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(counts):
        seen += counts[index]
        if seen >= rank:
            return round(_bucket_ms(index), 3)
    return round(_bucket_ms(max(counts)), 3)  # pragma: no cover - rank <= total


class LatencyWindow:
    """A histogram of the spans recorded in the last ``window_s`` seconds.

    The window is a ring of ``slots`` slots of ``window_s / slots`` seconds;
    recording into a new slot clears it first. At most ``slots * BUCKETS``
    counts are kept.

    Args:
        window_s: the span of the window, seconds.
        slots: how finely the window slides.
        clock: monotonic seconds (tests pass another).
    """

    def __init__(
        self, window_s: float, *, slots: int = 30, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self._slot_s = window_s / slots
        self._slots: list[dict[int, int]] = [{} for _ in range(slots)]
        self._epochs = [-1] * slots
        self._clock = clock

    def record(self, seconds: float) -> None:
        """Count one span."""
        epoch = int(self._clock() / self._slot_s)
        i = epoch % len(self._slots)
        slot = self._slots[i]
        if self._epochs[i] != epoch:
            slot.clear()
            self._epochs[i] = epoch
        index = bucket_of(seconds)
        slot[index] = slot.get(index, 0) + 1

    def counts(self) -> dict[int, int]:
        """Bucket -> count over the window now."""
        now = int(self._clock() / self._slot_s)
        oldest = now - len(self._slots) + 1
        out: dict[int, int] = {}
        for epoch, slot in zip(self._epochs, self._slots, strict=True):
            if oldest <= epoch <= now:
                merge(out, slot.items())
        return out


class Latencies:
    """Time to accepted and end to end of the jobs of the sessions on this hub.

    The submit times live in each session link (``SessionLink.started``,
    bounded by its in-flight limit); this part turns the frames sent about
    those jobs into spans.

    Args:
        window_s: the span of both windows, seconds.
        clock: monotonic seconds.
    """

    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.accepted = LatencyWindow(window_s, clock=clock)
        """Submit to ``accepted``."""
        self.ended = LatencyWindow(window_s, clock=clock)
        """Submit to ``result``."""
        self._clock = clock

    def now(self) -> float:
        """The clock the submit times are read on."""
        return self._clock()

    def sent(self, started: dict[str, float], job_id: str, *, ended: bool) -> None:
        """Record an ``accepted`` or ``result`` frame going to a job's session.

        Args:
            started: the session's submit times by job id; an accepted job's
                entry is negated so that only its first ``accepted`` counts
                (a re-dispatch announces another).
            job_id: the job.
            ended: whether the frame is the job's result.
        """
        t = started.get(job_id)
        if t is None:
            return  # submitted on another hub, or on a connection before a resume
        now = self._clock()
        if ended:
            del started[job_id]
            # A job that ended without being accepted (its queue wait ran out)
            # counts end to end only.
            self.ended.record(now - abs(t))
        elif t > 0:
            started[job_id] = -t
            self.accepted.record(now - t)
