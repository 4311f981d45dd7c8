"""The scripts of a node's life: register, heartbeat, drain, loss.

:class:`~hub.scheduler.Scheduler` inherits these wrappers; like its own, each
is one async method per Lua script, named after it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

import orjson

from .config import Settings
from .errors import ScriptError
from .events import Beat, Event, Heartbeats, Registration, as_text, parse_events, raise_refusal
from .reads import CellReads

__all__ = ["NodeScripts", "pool_id"]


def pool_id(pool: str, services: Iterable[str], pairs: Iterable[tuple[str, str]]) -> str:
    """The scheduling pool of a node: its operator pool split by capability.

    Nodes with the same operator pool, services and language pairs share a
    pool, so the least-loaded node of a pool always serves the job's pair.

    Args:
        pool: the operator pool.
        services: what the node runs.
        pairs: the (source, target) language pairs it serves, lower case.

    Returns:
        ``<pool>~<12 hex digits of the capability signature>``.
    """
    signature = orjson.dumps([sorted(set(services)), sorted({f"{s}:{t}" for s, t in pairs})])
    return f"{pool}~{hashlib.sha1(signature).hexdigest()[:12]}"


class NodeScripts(CellReads):
    """Wrappers of the node scripts, for :class:`~hub.scheduler.Scheduler`.

    The subclass provides the settings, the hub id and the script calls.
    """

    settings: Settings
    hub_id: str

    def _call(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, urgent: bool = False
    ) -> Coroutine[Any, Any, Any]:
        raise NotImplementedError

    def _seed(self) -> int:
        raise NotImplementedError

    def _count(self, name: str, n: int = 1, *, flush: bool = True) -> None:
        raise NotImplementedError

    def _count_events(self, events: Iterable[Event]) -> None:
        raise NotImplementedError

    async def register_node(
        self,
        node_id: str,
        *,
        services: Sequence[str],
        lang_pairs: Sequence[tuple[str, str]],
        max_jobs: int,
        pools: Sequence[str] = ("default",),
        resume: Sequence[str] = (),
        hub_id: str | None = None,
        now_ms: int = 0,
    ) -> Registration:
        """Register a node, or re-register it on a new connection (register_node.lua).

        KEYS: node hash, node's jobs, seen, pools. ARGV: prefix, node id, hub id,
        max_jobs, services, pairs, pool ids, pair keys, resume, now, max attempts,
        job TTL, seed, operator pools.

        Jobs the node had and does not name in ``resume`` are re-dispatched or
        failed (``NODE_LOST``), as if the node had been lost.
        """
        k = self.keys
        pairs = sorted({(s.lower(), t.lower()) for s, t in lang_pairs})
        opools = list(dict.fromkeys(pools)) or ["default"]
        pool_ids = [pool_id(p, services, pairs) for p in opools]
        reply = await self._call(
            "register_node",
            [k.node(node_id), k.node_jobs(node_id), k.seen, k.pools],
            [
                k.prefix,
                node_id,
                hub_id or self.hub_id,
                max_jobs,
                orjson.dumps(sorted(set(services))),
                orjson.dumps(pairs),
                ",".join(pool_ids),
                ",".join(f"{s}:{t}" for s, t in pairs),
                ",".join(resume),
                now_ms,
                self.settings.max_attempts,
                self.settings.job_ttl_ms,
                self._seed(),
                orjson.dumps(opools),
            ],
        )
        try:
            epoch, resumed, dropped, events = reply
            registration = Registration(
                int(epoch),
                tuple(as_text(j) for j in resumed),
                tuple(as_text(j) for j in dropped),
                parse_events(events, "register_node"),
            )
        except (TypeError, ValueError) as exc:
            raise ScriptError("register_node", reply) from exc
        self._count("registrations")
        self._count_events(registration.events)
        return registration

    async def heartbeat(self, beats: Sequence[Beat], *, now_ms: int = 0) -> Heartbeats:
        """Record heartbeats of many nodes in one call (heartbeat.lua).

        KEYS: seen. ARGV: prefix, now, seed, then per node: id, epoch, online,
        load, rtt; last the job TTL.

        Returns:
            One code per beat: 1 recorded, 0 recorded as offline, -8 unknown
            node, -9 stale epoch (the node re-registered elsewhere); its
            ``events`` start queued jobs on nodes that came back online (and
            end those found past their deadline).
        """
        if not beats:
            return Heartbeats((), ())
        args: list[Any] = [self.keys.prefix, now_ms, self._seed()]
        for b in beats:
            args += [
                b.node_id,
                b.epoch,
                "1" if b.online else "0",
                b.load if b.load is not None else "",
                "" if b.rtt_ms is None else f"{b.rtt_ms:.3f}",
            ]
        args.append(self.settings.job_ttl_ms)
        reply = await self._call("heartbeat", [self.keys.seen], args, urgent=True)
        events = parse_events(reply[1], "heartbeat")
        self._count_events(events)
        return Heartbeats((int(r) for r in reply[0]), events)

    async def node_lost(
        self, node_id: str, *, epoch: int | None = None, now_ms: int = 0
    ) -> tuple[Event, ...]:
        """Take a node out and settle its jobs (node_lost.lua).

        KEYS: node, node's jobs, seen. ARGV: prefix, node id, epoch, now,
        max attempts, job TTL, seed.

        Raises:
            SchedulingError: UNKNOWN_NODE (already lost), STALE_EPOCH (the node
                registered again on a newer connection).
        """
        k = self.keys
        reply = await self._call(
            "node_lost",
            [k.node(node_id), k.node_jobs(node_id), k.seen],
            [
                k.prefix,
                node_id,
                "" if epoch is None else epoch,
                now_ms,
                self.settings.max_attempts,
                self.settings.job_ttl_ms,
                self._seed(),
            ],
        )
        raise_refusal(reply)
        events = parse_events(reply[1], "node_lost")
        self._count_events(events)
        return events

    async def drain_node(self, node_id: str, *, epoch: int) -> int:
        """Stop giving a node new jobs (drain_node.lua).

        KEYS: node. ARGV: prefix, node id, epoch.

        Returns:
            How many jobs the node still runs (0: it may leave now).

        Raises:
            SchedulingError: UNKNOWN_NODE, STALE_EPOCH.
        """
        k = self.keys
        reply = await self._call("drain_node", [k.node(node_id)], [k.prefix, node_id, epoch])
        raise_refusal(reply)
        return int(reply[1])
