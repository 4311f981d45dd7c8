"""Prometheus metrics of one hub (``/metrics``), in a registry of its own."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .errors import ErrorNames

__all__ = ["HUB_LABEL", "Metrics", "Snapshot", "merge_expositions"]

HUB_LABEL = "hub"
"""The label naming the worker of each sample in a merged ``/metrics``."""

_MAX_CACHED_CHILDREN = 256
"""Most labelled children cached per counter (node error texts are open-ended)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """A hub's gauges at one moment, read when ``/metrics`` is scraped."""

    nodes: int
    sessions: int
    ready: bool
    script_calls: int
    pipelines: int


class Metrics:
    """Counters and gauges of a hub. A registry per hub, so several hubs share a process."""

    def __init__(self, hub_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.dispatched = Counter(
            "hub_jobs_dispatched", "Job attempts started on a node", registry=r
        )
        self.queued = Counter("hub_jobs_queued", "Jobs that waited for a slot", registry=r)
        self.spilled = Counter(
            "hub_jobs_spilled", "Jobs another cell than their session's took (--spill)", registry=r
        )
        self.ended = Counter(
            "hub_jobs_ended",
            "Jobs that ended, by status and error code",
            ["status", "error"],
            registry=r,
        )
        self.refused = Counter(
            "hub_jobs_refused", "Jobs or connections refused, by code", ["code"], registry=r
        )
        self.bad_frames = Counter(
            "hub_bad_frames", "Frames answered with an error", ["peer", "code"], registry=r
        )
        self.dropped = Counter(
            "hub_frames_dropped",
            "Frames for a peer not connected here (node, session)",
            ["peer"],
            registry=r,
        )
        self.slow_closed = Counter(
            "hub_slow_connections_closed",
            "Connections closed because their send buffer was full",
            registry=r,
        )
        self.results_held = Counter(
            "hub_results_held",
            "Times a node's result waited for Redis to record it",
            registry=r,
        )
        self.reconciled = Counter(
            "hub_redis_reconciled",
            "What the hub did after Redis came back (hub/reconcile.py)",
            ["what"],
            registry=r,
        )
        self.http_requests = Counter(
            "hub_http_requests",
            "Requests of the HTTP job API, by method and status",
            ["method", "status"],
            registry=r,
        )
        self.rtt = Histogram(
            "hub_node_ping_rtt_seconds",
            "Ping round trip to nodes",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
            registry=r,
        )
        self.nodes = Gauge("hub_nodes_connected", "Nodes connected to this hub", registry=r)
        self.sessions = Gauge(
            "hub_sessions_connected", "Sessions connected to this hub", registry=r
        )
        self.ready = Gauge("hub_ready", "1 while Redis answers and scripts are loaded", registry=r)
        self.script_calls = Gauge("hub_script_calls", "Script calls sent to Redis", registry=r)
        self.pipelines = Gauge("hub_pipelines", "Pipelines sent to Redis", registry=r)
        self.hub_id = hub_id
        self._ended: dict[tuple[str, str], Counter] = {}
        self._error_names = ErrorNames()
        self._refused: dict[str, Counter] = {}

    def job_ended(self, status: str, error: str) -> None:
        """Count a job that ended (``hub_jobs_ended``), by status and error code.

        Called once per job: the labelled child is cached, so the hot path
        skips ``labels()`` (label validation, a lock, a dict lookup).
        """
        key = (status, self._error_names(error) if error else error)
        child = self._ended.get(key)
        if child is None:
            child = self.ended.labels(*key)
            if len(self._ended) < _MAX_CACHED_CHILDREN:
                self._ended[key] = child
        child.inc()

    def job_refused(self, code: str) -> None:
        """Count a refused job or connection (``hub_jobs_refused``), by code.

        Cached like :meth:`job_ended`: an overloaded hub refuses many jobs.
        """
        child = self._refused.get(code)
        if child is None:
            child = self.refused.labels(code)
            if len(self._refused) < _MAX_CACHED_CHILDREN:
                self._refused[code] = child
        child.inc()

    def render(self, snapshot: Snapshot) -> tuple[bytes, str]:
        """The text exposition format, with the gauges of ``snapshot``."""
        self.nodes.set(snapshot.nodes)
        self.sessions.set(snapshot.sessions)
        self.ready.set(1 if snapshot.ready else 0)
        self.script_calls.set(snapshot.script_calls)
        self.pipelines.set(snapshot.pipelines)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def snapshot(self) -> dict[str, Any]:
        """Counter totals for ``/v1/status``."""
        out: dict[str, Any] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    label = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    name = sample.name + (f"{{{label}}}" if label else "")
                    out[name] = sample.value
        return out


def merge_expositions(parts: Sequence[tuple[str, bytes]]) -> bytes:
    """One text exposition of several hubs' ``/metrics``, each sample labelled by its hub.

    The workers of one ``hub serve --workers`` answer ``/metrics`` with this
    (hub/siblings.py): a family appears once, with one series per worker,
    ``hub="<worker id>"``. Sums over the label give the server's totals.

    Args:
        parts: (hub id, that hub's ``/metrics`` text), in the order to list them.

    Returns:
        The merged text, in the format of :data:`CONTENT_TYPE_LATEST`.
    """
    families: dict[str, Metric] = {}
    for hub_id, text in parts:
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                Sample(s.name, {HUB_LABEL: hub_id, **s.labels}, s.value, s.timestamp)
                for s in family.samples
            )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    """A collector of metric families already built (the merged ones)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
