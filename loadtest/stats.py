"""What a worker measures: counters, latency histograms, a per-second series.

Every latency is in integer microseconds from ``time.perf_counter()`` (not
``loop.time()``: uvloop's clock has millisecond resolution). A worker sends
:meth:`Stats.to_json` to the parent at the end; the parent merges the
workers' stats with :meth:`Stats.merge`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .hdr import Histogram

__all__ = ["COUNTERS", "HISTOGRAMS", "PER_SECOND", "Second", "Stats"]

COUNTERS = (
    "sent",  # jobs sent by sessions
    "answered",  # jobs that got accepted or queued first
    "accepted",  # jobs that got at least one accepted
    "queued",  # queued frames
    "redispatched",  # accepted frames with attempt > 1
    "results",  # result frames matched to a job
    "finished",  # results with status finished
    "ok",  # finished results whose echo checked out
    "failed",  # results with status failed
    "refused",  # error frames that refused a job
    "partials",  # partial frames
    "skipped",  # open loop: ticks skipped at max_outstanding
    "abandoned",  # jobs of a session that left on purpose (churn)
    "node_jobs",  # job frames received by nodes
    "node_results",  # result frames sent by nodes
    "node_cancels",  # cancel frames received by nodes
    "node_repeats",  # job frames that repeated an attempt (re-sent after a Redis failure)
    "connects",  # connections opened
    "reconnects",  # connections opened again after churn or a drop
)

HISTOGRAMS = (
    "answer",  # job sent -> first accepted or queued
    "accept",  # job sent -> first accepted (includes time queued)
    "e2e",  # job sent -> result received
    "overhead",  # e2e minus the time the node held the job
    "connect",  # connection opened -> welcome or registered
)

PER_SECOND = ("accept", "e2e")
"""Histograms recorded in each :class:`Second` only: their totals are the sum of
the seconds' (:meth:`Stats.total`), so each job records each latency once."""


class Second:
    """One second of the run: counts and latencies of what completed in it."""

    __slots__ = ("accept", "e2e", "failed", "lag_us", "ok", "refused", "sent")

    def __init__(self) -> None:
        self.lag_us = 0
        """Worst lateness of the worker's event loop in this second (harness stalls)."""
        self.sent = 0
        self.ok = 0
        self.failed = 0
        self.refused = 0
        self.e2e = Histogram()
        self.accept = Histogram()

    def merge(self, other: Second) -> None:
        self.lag_us = max(self.lag_us, other.lag_us)
        self.sent += other.sent
        self.ok += other.ok
        self.failed += other.failed
        self.refused += other.refused
        self.e2e.merge(other.e2e)
        self.accept.merge(other.accept)

    def to_json(self) -> dict[str, Any]:
        return {
            "lag_us": self.lag_us,
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.failed,
            "refused": self.refused,
            "e2e": self.e2e.to_dict(),
            "accept": self.accept.to_dict(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Second:
        s = cls()
        s.lag_us = data["lag_us"]
        s.sent = data["sent"]
        s.ok = data["ok"]
        s.failed = data["failed"]
        s.refused = data["refused"]
        s.e2e = Histogram.from_dict(data["e2e"])
        s.accept = Histogram.from_dict(data["accept"])
        return s


class Stats:
    """Counters, error tallies, histograms and the per-second series of a worker."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        """Error frames that refused a job, by code (QUEUE_FULL, ...)."""
        self.failed: Counter[str] = Counter()
        """Failed results, by error (NO_AVAILABLE_NODE, NODE_LOST, ...)."""
        self.checks: Counter[str] = Counter()
        """Harness checks that failed: wrong echo, duplicate result, no result..."""
        self.node_errors: Counter[str] = Counter()
        """Error frames received by nodes, by code (STALE_ATTEMPT, ...)."""
        self.disconnects: Counter[str] = Counter()
        """Connections the hub closed on us, by ``kind:code``."""
        self.hists = {name: Histogram() for name in HISTOGRAMS if name not in PER_SECOND}
        """Latency histograms by name, but for :data:`PER_SECOND`: :meth:`total` reads all."""
        self.seconds: dict[int, Second] = {}
        self.go = 0.0
        """``perf_counter()`` when the load started."""

    # Recording (hot path)

    def second(self, now: float) -> Second:
        index = int(now - self.go)
        s = self.seconds.get(index)
        if s is None:
            s = self.seconds[index] = Second()
        return s

    # Totals

    def total(self, name: str) -> Histogram:
        """The histogram ``name`` over the whole run."""
        if name not in PER_SECOND:
            return self.hists[name]
        h = Histogram()
        for second in self.seconds.values():
            h.merge(getattr(second, name))
        return h

    def since(self, first: int, end: int) -> Histogram:
        """End-to-end latencies of the results received in seconds ``first`` to ``end - 1``."""
        h = Histogram()
        for i in range(first, end):
            second = self.seconds.get(i)
            if second is not None:
                h.merge(second.e2e)
        return h

    def errors(self) -> int:
        """Everything that went wrong, for the status line."""
        return (
            sum(self.checks.values())
            + sum(self.refused.values())
            + sum(self.failed.values())
            + sum(self.disconnects.values())
        )

    # Transport

    def to_json(self) -> dict[str, Any]:
        return {
            "counters": dict(self.counters),
            "refused": dict(self.refused),
            "failed": dict(self.failed),
            "checks": dict(self.checks),
            "node_errors": dict(self.node_errors),
            "disconnects": dict(self.disconnects),
            "hists": {name: self.total(name).to_dict() for name in (*self.hists, *PER_SECOND)},
            "seconds": {str(i): s.to_json() for i, s in self.seconds.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stats:
        st = cls()
        st.counters.update(data["counters"])
        st.refused.update(data["refused"])
        st.failed.update(data["failed"])
        st.checks.update(data["checks"])
        st.node_errors.update(data["node_errors"])
        st.disconnects.update(data["disconnects"])
        st.hists = {
            name: Histogram.from_dict(h)
            for name, h in data["hists"].items()
            if name not in PER_SECOND  # the sum of the seconds' histograms
        }
        st.seconds = {int(i): Second.from_json(s) for i, s in data["seconds"].items()}
        return st

    def merge(self, other: Stats) -> None:
        self.counters.update(other.counters)
        self.refused.update(other.refused)
        self.failed.update(other.failed)
        self.checks.update(other.checks)
        self.node_errors.update(other.node_errors)
        self.disconnects.update(other.disconnects)
        for name, h in other.hists.items():
            self.hists.setdefault(name, Histogram()).merge(h)
        for i, s in other.seconds.items():
            mine = self.seconds.get(i)
            if mine is None:
                self.seconds[i] = mine = Second()
            mine.merge(s)
