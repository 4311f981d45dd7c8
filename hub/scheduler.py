"""The scheduling core: one async method per Lua script.

Every scheduling transition is exactly one script call (see ``lua/``). The
methods build KEYS and ARGV in the order each script's header lists them and
turn replies into typed results; expected refusals raise
:class:`~hub.errors.SchedulingError`.

Concurrent calls are batched: calls issued in one event-loop iteration travel
together in one pipeline (EVALSHA, no MULTI), which costs Redis and the client
a fraction of one round trip each. Scripts are loaded once; a ``NOSCRIPT``
reply (after a Redis restart or failover) reloads them and re-sends only the
calls that did not run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import random
import re
import secrets
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeAlias

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from .config import Settings
from .errors import RedisUnavailable, ScriptError, error_for_code
from .keys import Keys

__all__ = [
    "Accepted",
    "CancelAttempt",
    "Cancellation",
    "Completion",
    "Dispatch",
    "Event",
    "JobEnded",
    "NodeLost",
    "NodeReplaced",
    "Queued",
    "Registration",
    "Scheduler",
    "SweepReport",
    "load_script_sources",
    "pool_id",
]

logger = logging.getLogger("hub.scheduler")

SCRIPT_NAMES = (
    "register_node",
    "heartbeat",
    "dispatch_task",
    "complete_task",
    "cancel_task",
    "node_lost",
    "drain_node",
    "sweep",
    "session_closed",
    "resume_session",
    "ack_results",
)

_INCLUDE = re.compile(r'^--- @include "([\w/.-]+)"\s*$', re.MULTILINE)


# Script loading


def _lua_dir() -> Path | None:
    """The checkout's ``lua/`` directory when running from source."""
    here = Path(__file__).resolve().parent.parent / "lua"
    return here if (here / "dispatch_task.lua").is_file() else None


def _read_lua(name: str) -> str:
    source_dir = _lua_dir()
    if source_dir is not None:
        return (source_dir / f"{name}.lua").read_text(encoding="utf-8")
    return resources.files("hub.lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _inline(source: str, seen: tuple[str, ...], done: set[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in seen:
            raise ValueError(f"include cycle: {' -> '.join((*seen, name))}")
        if name in done:
            return ""
        done.add(name)
        return _inline(_read_lua(name), (*seen, name), done)

    return _INCLUDE.sub(replace, source)


def load_script_sources() -> dict[str, str]:
    """Read every script, with its ``--- @include`` lines inlined (each once).

    Raises:
        ValueError: on an include cycle.
    """
    return {name: _inline(_read_lua(name), (name,), set()) for name in SCRIPT_NAMES}


def pool_id(pool: str, services: Iterable[str], pairs: Iterable[tuple[str, str]]) -> str:
    """The scheduling pool of a node: its operator pool split by capability.

    Nodes with the same operator pool, services and language pairs share a
    pool, so the least-loaded node of a pool always serves the job's pair.
    """
    signature = orjson.dumps([sorted(set(services)), sorted({f"{s}:{t}" for s, t in pairs})])
    return f"{pool}~{hashlib.sha1(signature).hexdigest()[:12]}"


# Results and events


@dataclasses.dataclass(frozen=True, slots=True)
class Dispatch:
    """A job attempt started on a node: its hub sends the job, the session's hub ``accepted``."""

    node_hub: str
    node_id: str
    job_id: str
    attempt: int
    session_id: str
    src_lang: str
    tgt_lang: str
    deadline_ms: int
    payload: bytes
    audio: bytes | None
    session_hub: str
    ref: str


@dataclasses.dataclass(frozen=True, slots=True)
class JobEnded:
    """A job reached its terminal state: the session's hub sends ``result``."""

    session_hub: str
    session_id: str
    job_id: str
    ref: str
    status: Literal["finished", "failed"]
    result: bytes
    error: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class CancelAttempt:
    """A node must stop an attempt: its hub sends ``cancel``."""

    node_hub: str
    node_id: str
    job_id: str
    attempt: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class NodeReplaced:
    """A node id registered on a newer connection: the old one must close."""

    hub: str
    node_id: str
    epoch: int


@dataclasses.dataclass(frozen=True, slots=True)
class NodeLost:
    """A node was taken out (lease expired, socket closed): its connection must close."""

    hub: str
    node_id: str
    epoch: int


Event: TypeAlias = Dispatch | JobEnded | CancelAttempt | NodeReplaced | NodeLost


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    """dispatch_task took a slot on ``node_id``."""

    job_id: str
    node_id: str
    attempt: int
    node_hub: str
    deadline_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Queued:
    """dispatch_task queued the job in ``pool`` until a slot frees."""

    job_id: str
    pool: str
    deadline_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Registration:
    """register_node's reply."""

    epoch: int
    resumed: tuple[str, ...]
    dropped: tuple[str, ...]
    events: tuple[Event, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """complete_task's reply."""

    ended: JobEnded
    drained: bool
    events: tuple[Event, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Cancellation:
    """cancel_task's reply."""

    ended: JobEnded
    events: tuple[Event, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SweepReport:
    """sweep's reply; ``ran`` is False when another hub held the sweep lease."""

    ran: bool
    timed_out: int
    queue_expired: int
    nodes_lost: int
    events: tuple[Event, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Beat:
    """One node's heartbeat, for :meth:`Scheduler.heartbeat`."""

    node_id: str
    epoch: int
    online: bool = True
    load: bytes | None = None
    rtt_ms: float | None = None


class Heartbeats(list[int]):
    """heartbeat's reply: one code per beat, plus ``events`` (jobs started on
    nodes that came back online)."""

    def __init__(self, codes: Iterable[int], events: tuple[Event, ...]) -> None:
        super().__init__(codes)
        self.events = events


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _parse_event(raw: Sequence[Any], script: str) -> Event:
    kind = _text(raw[0])
    if kind == "dispatch":
        audio = raw[10]
        return Dispatch(
            node_hub=_text(raw[1]),
            node_id=_text(raw[2]),
            job_id=_text(raw[3]),
            attempt=int(raw[4]),
            session_id=_text(raw[5]),
            src_lang=_text(raw[6]),
            tgt_lang=_text(raw[7]),
            deadline_ms=int(raw[8]),
            payload=bytes(raw[9]),
            audio=bytes(audio) if audio else None,
            session_hub=_text(raw[11]),
            ref=_text(raw[12]),
        )
    if kind == "result":
        return _parse_ended(raw, script)
    if kind == "cancel":
        return CancelAttempt(
            _text(raw[1]), _text(raw[2]), _text(raw[3]), int(raw[4]), _text(raw[5])
        )
    if kind == "replaced":
        return NodeReplaced(_text(raw[1]), _text(raw[2]), int(raw[3]))
    if kind == "lost":
        return NodeLost(_text(raw[1]), _text(raw[2]), int(raw[3]))
    raise ScriptError(script, raw)


def _parse_ended(raw: Sequence[Any], script: str) -> JobEnded:
    if _text(raw[0]) != "result":
        raise ScriptError(script, raw)
    status = _text(raw[5])
    if status not in ("finished", "failed"):
        raise ScriptError(script, raw)
    error = _text(raw[7])
    return JobEnded(
        session_hub=_text(raw[1]),
        session_id=_text(raw[2]),
        job_id=_text(raw[3]),
        ref=_text(raw[4]),
        status="finished" if status == "finished" else "failed",
        result=bytes(raw[6]),
        error=error or None,
    )


def _parse_events(raw: Sequence[Any], script: str) -> tuple[Event, ...]:
    return tuple(_parse_event(e, script) for e in raw)


# Batching


class _Ok:
    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class _Call:
    __slots__ = ("args", "future", "keys", "name")

    def __init__(
        self, name: str, keys: Sequence[str], args: Sequence[Any], future: asyncio.Future[Any]
    ):
        self.name = name
        self.keys = keys
        self.args = args
        self.future = future


class Scheduler:
    """The async API over the scheduling scripts of one cell.

    Args:
        redis: a client created with ``decode_responses=False`` (audio is
            binary) and, on purpose, no retries: a retried script could run
            twice.
        settings: limits and timings (queue, attempts, TTLs, leases).
        hub_id: this hub's id, recorded with its nodes and sessions.
        keys: key names of the cell (default: ``Keys(settings.cell)``).
        max_batch: most script calls in one pipeline.
        max_pipelines: most pipelines in flight at once.
        max_pending: most calls waiting for a pipeline (bounded memory).
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        hub_id: str,
        keys: Keys | None = None,
        max_batch: int = 256,
        max_pipelines: int = 4,
        max_pending: int = 20000,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.hub_id = hub_id
        self.keys = keys if keys is not None else Keys(settings.cell)
        self.max_batch = max_batch
        self.max_pipelines = max_pipelines
        self.sources = load_script_sources()
        self.shas = {
            name: hashlib.sha1(src.encode()).hexdigest() for name, src in self.sources.items()
        }
        self._pending: list[_Call] = []
        self._flush_scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_seq = 0
        self._next_settle = 0
        self._settled: dict[int, tuple[list[_Call], list[Any]]] = {}
        self.max_pending = max_pending
        """Most calls waiting for a pipeline; more fail at once with RedisUnavailable."""
        self._random = random.Random()
        self._idle: list[AbstractConnection] = []
        """Connections kept between pipelines (at most ``max_pipelines``): :meth:`_connection`."""
        self.batches = 0
        """Pipelines sent so far (for metrics)."""
        self.calls = 0
        """Script calls sent so far (for metrics)."""

    # Public methods

    async def load_scripts(self) -> None:
        """Load every script into Redis (SCRIPT LOAD); call at startup and after failover.

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        try:
            pipe = self.redis.pipeline(transaction=False)
            for source in self.sources.values():
                pipe.script_load(source)
            await pipe.execute()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise RedisUnavailable("script load") from exc

    async def close(self) -> None:
        """Wait for pipelines in flight (bounded by the Redis timeout); give back connections."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.redis.connection_pool.release(conn)

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
            return Registration(
                int(epoch),
                tuple(_text(j) for j in resumed),
                tuple(_text(j) for j in dropped),
                _parse_events(events, "register_node"),
            )
        except (TypeError, ValueError) as exc:
            raise ScriptError("register_node", reply) from exc

    async def heartbeat(self, beats: Sequence[Beat], *, now_ms: int = 0) -> Heartbeats:
        """Record heartbeats of many nodes in one call (heartbeat.lua).

        KEYS: seen. ARGV: prefix, now, then per node: id, epoch, online, load, rtt.

        Returns:
            One code per beat: 1 recorded, 0 recorded as offline, -8 unknown
            node, -9 stale epoch (the node re-registered elsewhere); its
            ``events`` start queued jobs on nodes that came back online.
        """
        if not beats:
            return Heartbeats((), ())
        args: list[Any] = [self.keys.prefix, now_ms]
        for b in beats:
            args += [
                b.node_id,
                b.epoch,
                "1" if b.online else "0",
                b.load if b.load is not None else "",
                "" if b.rtt_ms is None else f"{b.rtt_ms:.3f}",
            ]
        reply = await self._call("heartbeat", [self.keys.seen], args, urgent=True)
        return Heartbeats((int(r) for r in reply[0]), _parse_events(reply[1], "heartbeat"))

    async def dispatch_task(
        self,
        session_id: str,
        src_lang: str,
        tgt_lang: str,
        payload: bytes,
        *,
        ref: str = "",
        audio: bytes | None = None,
        timeout_ms: int | None = None,
        job_id: str | None = None,
        session_hub: str | None = None,
        now_ms: int = 0,
    ) -> Accepted | Queued:
        """Run a session's job on the least-loaded free node, or queue it (dispatch_task.lua).

        KEYS: pair's pools, session, job, deadlines, session's jobs, queued,
        queue depths. ARGV: prefix, job id, session, src, tgt, payload, audio,
        timeout, queue wait, queue max, seed, session hub, ref, now, max queued
        per session, session TTL.

        Raises:
            SchedulingError: NO_POOL_FOR_LANG_PAIR, EMPTY_POOL, NO_AVAILABLE_NODE,
                QUEUE_FULL.
            RedisUnavailable: Redis did not answer; the job may or may not exist.
        """
        k = self.keys
        src, tgt = src_lang.lower(), tgt_lang.lower()
        jid = job_id or new_job_id()
        s = self.settings
        reply = await self._call(
            "dispatch_task",
            [
                k.lang(src, tgt),
                k.session(session_id),
                k.job(jid),
                k.deadlines,
                k.session_jobs(session_id),
                k.queued,
                k.queue_depth,
            ],
            [
                k.prefix,
                jid,
                session_id,
                src,
                tgt,
                payload,
                audio or b"",
                timeout_ms if timeout_ms is not None else s.job_timeout_ms,
                s.queue_wait_ms,
                s.queue_max,
                self._seed(),
                session_hub or self.hub_id,
                ref,
                now_ms,
                s.max_queued_per_session,
                self._session_ttl_ms(),
            ],
        )
        if isinstance(reply, int):
            raise error_for_code(reply, ref=ref or None)
        if int(reply[0]) == 1:
            return Accepted(jid, _text(reply[1]), int(reply[2]), _text(reply[3]), int(reply[4]))
        return Queued(jid, _text(reply[1]), int(reply[2]))

    async def complete_task(
        self,
        job_id: str,
        node_id: str,
        attempt: int,
        status: Literal["finished", "failed"],
        *,
        result: bytes = b"null",
        error: str | None = None,
        now_ms: int = 0,
    ) -> Completion:
        """End a job on its node's report and free the slot (complete_task.lua).

        KEYS: job, node, node's jobs. ARGV: prefix, job id, node id, attempt,
        status, result, error, now, job TTL.

        Raises:
            SchedulingError: UNKNOWN_JOB, NODE_MISMATCH, STALE_ATTEMPT.
        """
        k = self.keys
        reply = await self._call(
            "complete_task",
            [k.job(job_id), k.node(node_id), k.node_jobs(node_id)],
            [
                k.prefix,
                job_id,
                node_id,
                attempt,
                status,
                result,
                error or "",
                now_ms,
                self.settings.job_ttl_ms,
            ],
        )
        if isinstance(reply, int):
            raise error_for_code(reply)
        return Completion(
            _parse_ended(reply[1], "complete_task"),
            bool(int(reply[2])),
            _parse_events(reply[3], "complete_task"),
        )

    async def cancel_task(
        self, job_id: str, session_id: str, *, reason: str = "CANCELLED", now_ms: int = 0
    ) -> Cancellation:
        """End a session's unfinished job (cancel_task.lua).

        KEYS: job. ARGV: prefix, job id, session id, reason, now, job TTL.

        Raises:
            SchedulingError: UNKNOWN_JOB (also for another session's job),
                STALE_ATTEMPT (already ended).
        """
        k = self.keys
        reply = await self._call(
            "cancel_task",
            [k.job(job_id)],
            [k.prefix, job_id, session_id, reason, now_ms, self.settings.job_ttl_ms],
        )
        if isinstance(reply, int):
            raise error_for_code(reply)
        return Cancellation(
            _parse_ended(reply[1], "cancel_task"), _parse_events(reply[2], "cancel_task")
        )

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
        if isinstance(reply, int):
            raise error_for_code(reply)
        return _parse_events(reply[1], "node_lost")

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
        if isinstance(reply, int):
            raise error_for_code(reply)
        return int(reply[1])

    async def sweep(
        self, *, now_ms: int = 0, lease_ms: int | None = None, expire_nodes: bool = True
    ) -> SweepReport:
        """Expire overdue jobs, expired queue waits and silent nodes (sweep.lua).

        KEYS: deadlines, queued, seen, sweep lease. ARGV: prefix, now, node
        lease, batch, max attempts, job TTL, seed, hub id, sweep lease.

        Args:
            lease_ms: how long this hub keeps the sweep to itself; default
                twice the sweep interval; 0 always runs.
            expire_nodes: False leaves silent nodes alone this time (a node
                lease longer than any clock).
        """
        k = self.keys
        s = self.settings
        if lease_ms is None:
            lease_ms = 2 * s.sweep_interval_ms
        reply = await self._call(
            "sweep",
            [k.deadlines, k.queued, k.seen, k.sweep_lease],
            [
                k.prefix,
                now_ms,
                s.lease_ms if expire_nodes else 10**15,
                s.sweep_batch,
                s.max_attempts,
                s.job_ttl_ms,
                self._seed(),
                self.hub_id,
                lease_ms,
            ],
        )
        return SweepReport(
            bool(int(reply[0])),
            int(reply[1]),
            int(reply[2]),
            int(reply[3]),
            _parse_events(reply[4], "sweep"),
        )

    async def session_closed(
        self, session_id: str, *, reason: str = "CANCELLED", now_ms: int = 0, batch: int = 256
    ) -> tuple[bool, tuple[Event, ...]]:
        """Cancel a gone session's unfinished jobs (session_closed.lua).

        KEYS: session, session's jobs. ARGV: prefix, session id, hub id,
        reason, now, job TTL, batch.

        Returns:
            (done, events); done is False when the session resumed on another hub.
        """
        k = self.keys
        reply = await self._call(
            "session_closed",
            [k.session(session_id), k.session_jobs(session_id)],
            [k.prefix, session_id, self.hub_id, reason, now_ms, self.settings.job_ttl_ms, batch],
        )
        return bool(int(reply[0])), _parse_events(reply[1], "session_closed")

    async def resume_session(
        self, session_id: str, *, max_results: int = 1000
    ) -> tuple[bool, tuple[tuple[str, str, str], ...], tuple[JobEnded, ...]]:
        """Route a reconnected session's results to this hub (resume_session.lua).

        KEYS: session, session's jobs, session's ended jobs. ARGV: prefix,
        session id, hub id, session TTL, max results.

        Returns:
            (known, unfinished jobs as (job id, ref, status), unacknowledged results).
        """
        k = self.keys
        reply = await self._call(
            "resume_session",
            [k.session(session_id), k.session_jobs(session_id), k.session_done(session_id)],
            [k.prefix, session_id, self.hub_id, self._session_ttl_ms(), max_results],
        )
        open_jobs = tuple((_text(j[0]), _text(j[1]), _text(j[2])) for j in reply[1])
        ended = tuple(_parse_ended(e, "resume_session") for e in reply[2])
        return bool(int(reply[0])), open_jobs, ended

    async def ack_results(self, session_id: str, job_ids: Sequence[str]) -> int:
        """Forget acknowledged results of a session (ack_results.lua).

        KEYS: session's ended jobs. ARGV: prefix, job ids.
        """
        if not job_ids:
            return 0
        k = self.keys
        reply = await self._call("ack_results", [k.session_done(session_id)], [k.prefix, *job_ids])
        return int(reply)

    # Reads (status pages; not scheduling transitions)

    async def status(self, *, max_nodes: int = 10000) -> dict[str, Any]:
        """A snapshot of the cell for ``/v1/status``: nodes, queues, counters."""
        k = self.keys
        try:
            node_ids = await self.redis.zrange(k.seen, 0, max_nodes - 1)
            pipe = self.redis.pipeline(transaction=False)
            for nid in node_ids:
                pipe.hmget(
                    k.node(_text(nid)),
                    "hub",
                    "running",
                    "max_jobs",
                    "opools",
                    "pairs",
                    "state",
                    "load",
                    "services",
                    "rtt_ms",
                    "seen",
                )
            pipe.hgetall(k.queue_depth)
            pipe.hgetall(k.stats)
            replies = await pipe.execute()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise RedisUnavailable("status") from exc
        nodes = []
        for nid, f in zip(node_ids, replies[:-2], strict=True):
            if f[0] is None:
                continue
            nodes.append(
                {
                    "node_id": _text(nid),
                    "hub_id": _text(f[0]),
                    "running": int(f[1] or 0),
                    "max_jobs": int(f[2] or 0),
                    "pools": orjson.loads(f[3] or b"[]"),
                    "lang_pairs": orjson.loads(f[4] or b"[]"),
                    "draining": _text(f[5] or b"") == "draining",
                    "state": _text(f[5] or b""),
                    "load": orjson.loads(f[6]) if f[6] else None,
                    "services": orjson.loads(f[7] or b"[]"),
                    "rtt_ms": float(f[8]) if f[8] else None,
                    "last_seen_ms": int(f[9] or 0),
                }
            )
        queues = {_text(p): int(d) for p, d in replies[-2].items()}
        counters = {_text(f): int(v) for f, v in replies[-1].items()}
        return {"nodes": nodes, "queues": queues, "counters": counters}

    async def job(self, job_id: str) -> dict[str, str]:
        """The job's record, minus payload and audio (empty when unknown)."""
        raw = await self.redis.hgetall(self.keys.job(job_id))
        return {_text(f): _text(v) for f, v in raw.items() if f not in (b"payload", b"audio")}

    async def ended_results(
        self, session_id: str, *, max_results: int = 1000
    ) -> tuple[JobEnded, ...]:
        """The session's ended jobs whose results it has not acknowledged, oldest first.

        A read, unlike :meth:`resume_session`: it does not move the session to
        this hub. ``session_hub`` of the results is empty.

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        k = self.keys
        try:
            job_ids = await self.redis.zrange(k.session_done(session_id), 0, max_results - 1)
            pipe = self.redis.pipeline(transaction=False)
            for jid in job_ids:
                pipe.hmget(k.job(_text(jid)), "status", "ref", "result", "error")
            rows = await pipe.execute()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise RedisUnavailable("ended results") from exc
        return tuple(
            JobEnded(
                session_hub="",
                session_id=session_id,
                job_id=_text(jid),
                ref=_text(ref or b""),
                status="finished" if status == b"finished" else "failed",
                result=bytes(result or b"null"),
                error=_text(error) if error else None,
            )
            for jid, (status, ref, result, error) in zip(job_ids, rows, strict=True)
            if status in (b"finished", b"failed")
        )

    # Private methods

    def _session_ttl_ms(self) -> int:
        s = self.settings
        return 2 * max(s.job_ttl_ms, int(s.resume_window_s * 1000), s.max_job_timeout_ms)

    def _seed(self) -> int:
        return self._random.randrange(1, 2147483646)

    async def _call(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, urgent: bool = False
    ) -> Any:
        if len(self._pending) >= self.max_pending and not urgent:
            # Bounded memory when Redis or this process falls behind: refuse now.
            raise RedisUnavailable(name)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        call = _Call(name, keys, args, future)
        if urgent:
            self._pending.insert(0, call)  # liveness first: heartbeats, node loss
        else:
            self._pending.append(call)
        if not self._flush_scheduled and self._inflight < self.max_pipelines:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        while self._pending and self._inflight < self.max_pipelines:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            self._inflight += 1
            seq = self._next_seq
            self._next_seq += 1
            task = asyncio.get_running_loop().create_task(self._send(seq, batch))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        if self._pending and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, seq: int, batch: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(batch)
        outcomes: list[Any] = [RedisUnavailable(call.name) for call in batch]
        try:
            results = await self._execute(batch)
            missing = [
                i for i, r in enumerate(results) if isinstance(r, redis_errors.NoScriptError)
            ]
            if missing:
                # protocol: NOSCRIPT means the call did not run; reload, re-send those.
                logger.warning("! scripts missing in Redis (restart or failover?): reloading")
                await self.load_scripts()
                again = await self._execute([batch[i] for i in missing])
                for i, r in zip(missing, again, strict=True):
                    results[i] = r
            for i, (call, result) in enumerate(zip(batch, results, strict=True)):
                if isinstance(result, redis_errors.ResponseError):
                    logger.error("! %s.lua failed: %s", call.name, result)
                    outcomes[i] = ScriptError(call.name, str(result))
                else:
                    outcomes[i] = _Ok(result)
        except (
            redis_errors.ConnectionError,
            redis_errors.TimeoutError,
            OSError,
            RedisUnavailable,
        ) as exc:
            logger.debug("! pipeline of %d calls failed: %s", len(batch), exc)
        except Exception as exc:  # a bug: fail every caller rather than hang them
            outcomes = [exc] * len(batch)
            raise
        finally:
            self._settle(seq, batch, outcomes)

    def _settle(self, seq: int, batch: list[_Call], outcomes: list[Any]) -> None:
        """Resolve pipelines in the order they were sent, whatever order replies come in.

        Pipelines travel on several connections, so a later one can be read
        first; resolving in order keeps the hubs' view of each job in Redis
        order (a job's ``queued`` before its ``accepted``).
        """
        self._settled[seq] = (batch, outcomes)
        while self._next_settle in self._settled:
            done, results = self._settled.pop(self._next_settle)
            self._next_settle += 1
            for call, outcome in zip(done, results, strict=True):
                if call.future.done():
                    continue
                if isinstance(outcome, _Ok):
                    call.future.set_result(outcome.value)
                else:
                    call.future.set_exception(outcome)

    async def _execute(self, batch: Sequence[_Call]) -> list[Any]:
        """Send a batch as one pipeline of EVALSHA (no MULTI); one reply per call.

        What ``pipeline(transaction=False).execute(raise_on_error=False)`` does,
        without its per-command machinery (command stack, callbacks, one
        Pipeline object per batch): pack every call, write them at once, read
        the replies in order. An error reply (``NOSCRIPT``, a Lua error) is
        returned in its call's place as a ``ResponseError``.

        Raises:
            redis.exceptions.ConnectionError, TimeoutError, OSError: the batch
                may have run in part; the connection is closed, never kept or
                returned to the pool with replies left unread. TimeoutError:
                not every reply came within the client's ``socket_timeout`` of
                the write.
        """
        conn = await self._connection()
        reusable = False
        try:
            shas = self.shas
            packed = conn.pack_commands(
                [("EVALSHA", shas[c.name], len(c.keys), *c.keys, *c.args) for c in batch]
            )
            try:
                await conn.send_packed_command(packed)
                results: list[Any] = []
                # One deadline for all the replies rather than one per reply
                # (math.inf: no timeout of redis-py's own in read_response).
                async with asyncio.timeout(conn.socket_timeout or None):
                    for _ in batch:
                        try:
                            results.append(await conn.read_response(timeout=math.inf))
                        except redis_errors.ResponseError as exc:
                            results.append(exc)
            except BaseException:
                # Replies may be left unread (timeout, cancel): drop the socket.
                await conn.disconnect(nowait=True)
                raise
            reusable = True
        except TimeoutError as exc:  # asyncio's, from the deadline above
            raise redis_errors.TimeoutError(f"no reply within {conn.socket_timeout} s") from exc
        finally:
            await self._release(conn, reusable)
        return results

    async def _connection(self) -> AbstractConnection:
        """A connection for a pipeline: one kept from an earlier pipeline, else the pool's.

        Keeping a few connections (one per pipeline in flight) skips the
        pool's checkout and release on every pipeline (a lock, a check of the
        socket, metrics events), which cost about as much as packing.
        """
        if not self._idle:
            pool = self.redis.connection_pool
            # redis-py leaves get_connection() untyped (a decorator for deprecated args).
            new: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
            return new
        conn = self._idle.pop()
        if not conn.is_connected:
            return conn  # the write connects it
        # The pool's own check: bytes nobody asked for, or EOF (Redis
        # restarted, the server closed an idle client). Then the write
        # reconnects.
        try:
            try:
                stale = await conn.can_read()
            except (redis_errors.ConnectionError, OSError):
                stale = True
            if stale:
                await conn.disconnect(nowait=True)
        except BaseException:
            await self.redis.connection_pool.release(conn)
            raise
        return conn

    async def _release(self, conn: AbstractConnection, reusable: bool) -> None:
        """Keep a connection for the next pipeline, or give it back to the pool.

        Args:
            reusable: every reply was read (else the connection is closed).
        """
        # redis-py leaves should_reconnect() untyped (maintenance notifications).
        renew: bool = conn.should_reconnect()  # type: ignore[no-untyped-call]
        if reusable and not renew and len(self._idle) < self.max_pipelines:
            self._idle.append(conn)
        else:
            await self.redis.connection_pool.release(conn)


def new_job_id() -> str:
    """A random, unguessable job id (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)
