"""The live view of the deployment: ``/v1/watch`` snapshots (protocol.md §12).

Every ``watch_interval_s`` each hub:

1. publishes to Redis what only it knows (sessions and nodes connected to
   it, its watchers, whether it is ready, its latency buckets), in a record
   that expires after five intervals unless renewed, so a killed hub drops
   out of every dashboard on its own;
2. if anyone watches it: reads the cell once (nodes, queue depths and
   counters with :meth:`~hub.scheduler.Scheduler.status`; every hub's
   record, Redis's ``INFO`` and clock with
   :meth:`~hub.reads.CellReads.hub_view`), builds one snapshot, encodes it
   once and writes the same bytes to every watcher (websockets'
   ``broadcast``; a watcher whose send buffer is full is closed 4005, as any
   connection, :meth:`~hub.outbox.Outbox.blocked`).

So the cost of watching is one snapshot per tick per watched hub, whatever
the number of watchers (at most ``max_watchers``), and nothing but one small
write per tick when no one watches. Every figure is the deployment's: nodes,
pools and queues from Redis, job rates from the cell's counters (which every
hub adds to, :mod:`hub.scheduler`), latencies from every hub's buckets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import orjson
from websockets.asyncio.server import ServerConnection, broadcast

from .config import Settings
from .errors import Code, RedisUnavailable
from .health import Health
from .latency import Latencies, merge, percentile_ms
from .outbox import Outbox
from .protocol import CloseCode
from .reads import HubView
from .registry import Registry
from .scheduler import Scheduler

__all__ = ["SNAPSHOT_VERSION", "Watch"]

logger = logging.getLogger("hub.watch")

SNAPSHOT_VERSION = 1
"""The ``v`` of snapshot frames; a change that breaks readers bumps it."""

_RECORD_TTL_INTERVALS = 5
"""A hub's record expires after this many intervals without renewal."""

_LOST_SHOWN_INTERVALS = 10
"""A node gone from Redis stays in the table, marked lost, this many intervals."""

_MAX_GONE = 1000
"""Most lost nodes remembered for the table."""


class Watch:
    """Publishes this hub's figures, and streams snapshots to ``/v1/watch`` connections.

    Args:
        hub_id: this hub's id.
        settings: the interval, watcher and node limits.
        scheduler: the cell's state and counters; the hubs' records.
        registry: the connections here (counted in this hub's record).
        outbox: queues snapshots on watchers; closes slow ones.
        latencies: this hub's latency buckets.
        health: whether the hub is ready.
        group: the ``hub serve --workers`` this hub is a worker of (its own
            id for a hub of its own), in its record.
    """

    def __init__(
        self,
        hub_id: str,
        settings: Settings,
        scheduler: Scheduler,
        registry: Registry,
        outbox: Outbox,
        latencies: Latencies,
        health: Health,
        *,
        group: str | None = None,
    ) -> None:
        self.hub_id = hub_id
        self.group = group or hub_id
        self._settings = settings
        self._scheduler = scheduler
        self._registry = registry
        self._outbox = outbox
        self._latencies = latencies
        self._health = health
        self.watchers: set[ServerConnection] = set()
        """Open ``/v1/watch`` connections."""
        self.last: str | None = None
        """The latest snapshot sent, for a watcher that connects between ticks
        (forgotten at the first tick without watchers)."""
        self.snapshots = 0
        """Snapshots built so far (one per tick while anyone watches)."""
        self._counters: tuple[float, dict[str, int]] | None = None
        self._rows: dict[str, dict[str, Any]] = {}
        self._gone: dict[str, tuple[float, dict[str, Any]]] = {}
        self._cell: dict[str, Any] | None = None

    # Public methods

    def full(self) -> bool:
        """Whether another watcher would go over ``max_watchers``."""
        cap = self._settings.max_watchers
        return cap is not None and len(self.watchers) >= cap

    async def serve(self, ws: ServerConnection) -> None:
        """Stream snapshots to a watcher until it closes; a message from it closes it 1008."""
        self.watchers.add(ws)
        try:
            if self.last is not None:
                self._outbox.push(ws, self.last)
            async for _ in ws:
                # protocol.md §12: the stream is read-only.
                await self._outbox.close(
                    ws, CloseCode.POLICY_VIOLATION, "the watch stream is read-only"
                )
                return
        finally:
            self.watchers.discard(ws)
            self._outbox.forget(ws)

    async def run(self) -> None:
        """Tick every ``watch_interval_s`` until cancelled (owned by the hub)."""
        interval = self._settings.watch_interval_s
        while True:
            started = time.monotonic()
            try:
                await self.tick()
            except Exception:
                # A bug: log it, and tick again (once per interval, so bounded).
                logger.error("! watch tick failed", exc_info=True)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def tick(self) -> None:
        """Publish this hub's record; if anyone watches, send them one snapshot."""
        s = self._settings
        ttl_ms = int(s.watch_interval_s * 1000 * _RECORD_TTL_INTERVALS)
        # When Redis is down, the snapshot below says so.
        with contextlib.suppress(RedisUnavailable):
            await self._scheduler.publish_hub(self.hub_id, self._record(), ttl_ms)
        if not self.watchers:
            self._counters = None  # a rate needs two reads in a row
            self.last = None  # nor does a watcher coming later get an old snapshot
            return
        frame = orjson.dumps(await self.snapshot()).decode()
        self.last = frame
        self.snapshots += 1
        # One text frame encoded once for all (websockets' broadcast); a
        # watcher too slow for it is closed instead.
        blocked = self._outbox.blocked
        broadcast([ws for ws in self.watchers if not blocked(ws)], frame)

    async def snapshot(self) -> dict[str, Any]:
        """The deployment now, as a snapshot frame (protocol.md §12)."""
        s = self._settings
        out: dict[str, Any] = {
            "type": "snapshot",
            "v": SNAPSHOT_VERSION,
            "hub_id": self.hub_id,
            "interval_s": s.watch_interval_s,
        }
        try:
            status = await self._scheduler.status(max_nodes=s.watch_max_nodes)
            view = await self._scheduler.hub_view()
        except RedisUnavailable:
            out["at_ms"] = int(time.time() * 1000)
            out["redis"] = {"ok": False, "error": Code.UNAVAILABLE}
            out.update(self._cell or _empty_cell())
            out["stale"] = True
            return out
        out["at_ms"] = view.time_ms
        out["redis"] = _redis_health(view)
        cell = self._cell = self._cell_view(status, view)
        out.update(cell)
        out["stale"] = False
        return out

    # Private methods

    def _record(self) -> bytes:
        """This hub's figures for every dashboard (its record in Redis)."""
        lat = self._latencies
        return orjson.dumps(
            {
                "sessions": len(self._registry.sessions),
                "nodes": len(self._registry.nodes),
                "watchers": len(self.watchers),
                "ready": self._health.ready,
                "pid": os.getpid(),
                "group": self.group,
                "accepted": sorted(lat.accepted.counts().items()),
                "ended": sorted(lat.ended.counts().items()),
            }
        )

    def _cell_view(self, status: dict[str, Any], view: HubView) -> dict[str, Any]:
        now = time.monotonic()
        queues: dict[str, int] = status["queues"]
        nodes = self._nodes(status["nodes"], view.time_ms, now)
        hubs: list[dict[str, Any]] = []
        accepted: dict[int, int] = {}
        ended: dict[int, int] = {}
        for hub_id, raw in sorted(view.records.items()):
            try:
                record = orjson.loads(raw)
                merge(accepted, ((int(b), int(n)) for b, n in record.get("accepted", ())))
                merge(ended, ((int(b), int(n)) for b, n in record.get("ended", ())))
                hubs.append(
                    {
                        "hub_id": hub_id,
                        "sessions": int(record.get("sessions", 0)),
                        "nodes": int(record.get("nodes", 0)),
                        "watchers": int(record.get("watchers", 0)),
                        "ready": bool(record.get("ready", False)),
                    }
                )
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
                logger.warning("! skipped the malformed record of hub %s", hub_id)
        return {
            "jobs": self._jobs(status["counters"], now),
            "latency": {
                "window_s": self._settings.latency_window_s,
                "accepted": _percentiles(accepted),
                "end_to_end": _percentiles(ended),
            },
            "nodes": nodes,
            "pools": _pools(nodes, queues),
            "queues": queues,
            "hubs": hubs,
        }

    def _jobs(self, counters: dict[str, int], now: float) -> dict[str, Any]:
        """Jobs per second from two reads of the cell's counters, and the totals."""
        previous, self._counters = self._counters, (now, counters)
        per_s: dict[str, float] = {}
        if previous is not None and now > previous[0]:
            elapsed = now - previous[0]
            for name, value in counters.items():
                # A counter below its last value: Redis lost it (a restart).
                per_s[name] = round(max(0, value - previous[1].get(name, 0)) / elapsed, 3)
        failed = {n[6:]: r for n, r in per_s.items() if n.startswith("error:")}
        refused = {n[8:]: r for n, r in per_s.items() if n.startswith("refused:")}
        return {
            "per_s": {
                "finished": per_s.get("finished", 0.0),
                "failed": per_s.get("failed", 0.0),
                "refused": round(sum(refused.values()), 3),
                "dispatched": per_s.get("dispatched", 0.0),
                "queued": per_s.get("queued", 0.0),
            },
            "failed_per_s": failed,
            "refused_per_s": refused,
            "totals": counters,
        }

    def _nodes(self, rows: list[dict[str, Any]], time_ms: int, now: float) -> list[dict[str, Any]]:
        """The node table: Redis's nodes, then those gone lately, marked lost."""
        current: dict[str, dict[str, Any]] = {}
        for row in rows:
            row = dict(row)
            seen = row.pop("last_seen_ms", 0)
            row["seen_ago_ms"] = max(0, time_ms - seen) if seen else None
            current[row["node_id"]] = row
        for node_id, row in self._rows.items():
            if node_id not in current and len(self._gone) < _MAX_GONE:
                self._gone[node_id] = (now, {**row, "state": "lost", "draining": False})
        self._rows = current
        keep_s = _LOST_SHOWN_INTERVALS * self._settings.watch_interval_s
        for node_id, (since, _) in list(self._gone.items()):
            if node_id in current or now - since > keep_s:
                del self._gone[node_id]
        table = list(current.values()) + [row for _, row in self._gone.values()]
        table.sort(key=lambda r: str(r["node_id"]))
        return table


def _percentiles(counts: dict[int, int]) -> dict[str, Any]:
    return {
        "count": sum(counts.values()),
        "p50_ms": percentile_ms(counts, 0.50),
        "p99_ms": percentile_ms(counts, 0.99),
    }


def _pools(nodes: list[dict[str, Any]], queues: dict[str, int]) -> list[dict[str, Any]]:
    """Operator pools: their nodes, slots, pairs, and the jobs waiting for those pairs."""
    pools: dict[str, dict[str, Any]] = {}
    for node in nodes:
        if node["state"] == "lost":
            continue
        live = node["state"] == "live"
        for name in node["pools"]:
            pool = pools.setdefault(
                name,
                {"pool": name, "nodes": 0, "live": 0, "running": 0, "max_jobs": 0, "pairs": set()},
            )
            pool["nodes"] += 1
            pool["running"] += node["running"]
            if live:
                pool["live"] += 1
                pool["max_jobs"] += node["max_jobs"]
            pool["pairs"].update(f"{src}:{tgt}" for src, tgt in node["lang_pairs"])
    out = []
    for name in sorted(pools):
        pool = pools[name]
        pairs = sorted(pool["pairs"])
        pool["pairs"] = pairs
        # A pair's queue is served by every pool of the pair (docs/architecture.md).
        pool["queued"] = sum(queues.get(p, 0) for p in pairs)
        out.append(pool)
    return out


def _redis_health(view: HubView) -> dict[str, Any]:
    info = view.info
    return {
        "ok": True,
        "rtt_ms": round(view.rtt_ms, 3),
        "version": str(info.get("valkey_version") or info.get("redis_version") or ""),
        "role": str(info.get("role", "")),
        "uptime_s": int(info.get("uptime_in_seconds", 0)),
        "used_memory": int(info.get("used_memory", 0)),
        "maxmemory": int(info.get("maxmemory", 0)),
        "connected_clients": int(info.get("connected_clients", 0)),
        "ops_per_s": int(info.get("instantaneous_ops_per_sec", 0)),
        "aof_ok": str(info.get("aof_last_write_status", "ok")) == "ok",
    }


def _empty_cell() -> dict[str, Any]:
    return {
        "jobs": None,
        "latency": None,
        "nodes": [],
        "pools": [],
        "queues": {},
        "hubs": [],
    }
