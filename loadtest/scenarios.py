"""Scenarios: what the simulated peers do, as one plain dataclass.

The parent builds a :class:`Plan` from the command line and gives it, as
JSON, to every worker process. A scenario only changes a few fields:

``steady``
    Each session sends one job every ``job_interval_ms`` with a random phase,
    so the load is smooth. Expect no error at all.
``burst``
    Every session sends at the same instants (no phase), every
    ``job_interval_ms``: the hub gets ``sessions`` jobs at once. The harness
    raises the hub's ``queue_max`` to ``sessions`` so the burst queues rather
    than being refused; expect ``queued`` frames and no error.
``overload``
    The per-session interval is shortened so that the offered rate is
    ``overload_factor`` times what the nodes can run (nodes x max_jobs /
    mean service time). Expect ``queued`` frames, ``QUEUE_FULL`` errors and
    ``NO_AVAILABLE_NODE`` results (protocol.md §4.6, §6), while the latency
    of accepted jobs stays bounded by ``queue_wait_ms`` plus the service time.
``churn``
    Like steady, and each second a fraction ``churn_per_s`` of the nodes and
    of the sessions disconnect and reconnect. Sessions may see re-dispatched
    jobs (a second ``accepted``) and ``NODE_LOST`` results; they are counted,
    not failed. Jobs of a session that left are abandoned, not errors.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hub.client.demo import ServiceTime

__all__ = ["SCENARIOS", "Plan", "ServiceTime"]

SCENARIOS = ("steady", "burst", "overload", "churn")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a worker needs to know to run its share of the load."""

    scenario: str = "steady"
    sessions: int = 1000
    nodes: int = 40
    duration_s: float = 30.0
    service_time: str = "50..300"
    """Service time distribution (:class:`ServiceTime` syntax)."""
    job_interval_ms: float = 1000.0
    """Per-session interval between jobs; 0 is closed loop (next job on each result)."""
    inflight: int = 1
    """Closed loop: jobs each session keeps in flight."""
    max_outstanding: int = 16
    """Open loop: a session at this many unfinished jobs skips its tick (counted)."""
    audio_bytes: int = 16000
    """Audio per job (binary frames); 0 sends text frames without audio."""
    max_jobs: int = 8
    """Slots per node."""
    src_lang: str = "en"
    tgt_lang: str = "zh"
    pool: str = "bench"
    """The operator pool the simulated nodes register in (protocol.md §3.1)."""
    node_prefix: str = "lt-n"
    """Simulated node ids are this prefix and the node's index."""
    echo_checked: bool = True
    """Whether results must echo the job (our simulated nodes do; a real fleet's do not)."""
    churn_per_s: float = 0.05
    """churn: fraction of nodes and of sessions that reconnect each second."""
    drain_s: float = 10.0
    """After the load stops, how long to wait for the last results."""
    connect_timeout_s: float = 60.0
    """Most time for a worker to open all its connections."""
    connect_concurrency: int = 32
    """Connections a worker opens at once (the hub's listen backlog is 100)."""
    seed: int = 0
    """Seed of the random phases and service times (0: random)."""
    worker_uvloop: bool = True
    """Run the workers on uvloop when it is installed."""
    hold: bool = False
    """Only connect and hold idle connections until told to close (bench_memory)."""

    @property
    def open_loop(self) -> bool:
        """Whether sessions send at a cadence (not on each result)."""
        return self.job_interval_ms > 0

    @property
    def burst(self) -> bool:
        return self.scenario == "burst"

    @property
    def churn(self) -> bool:
        return self.scenario == "churn"

    def capacity_per_s(self) -> float | None:
        """Jobs per second the nodes can run (``None`` for instant nodes)."""
        mean_ms = ServiceTime.parse(self.service_time).mean_ms
        if mean_ms <= 0:
            return None
        return self.nodes * self.max_jobs * 1000 / mean_ms

    def offered_per_s(self) -> float | None:
        """Jobs per second the sessions send (``None`` in closed loop)."""
        if not self.open_loop:
            return None
        return self.sessions * 1000 / self.job_interval_ms

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(**data)


def overload_interval_ms(plan: Plan, factor: float) -> float:
    """The per-session interval that offers ``factor`` times the nodes' capacity."""
    capacity = plan.capacity_per_s()
    if capacity is None:
        raise ValueError("overload needs a non-zero service time")
    return plan.sessions * 1000 / (factor * capacity)
