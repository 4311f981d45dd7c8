"""Plain reads of a cell, outside the scheduling scripts.

The status page, the results a reconnected session may still fetch, the
key of resume tokens, and the hubs' own figures for the dashboard: nothing
here changes scheduling state, so these are ordinary commands (one pipeline
each) rather than scripts.
:class:`~hub.scheduler.Scheduler` offers them beside its script calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from .errors import RedisUnavailable
from .events import Dispatch, JobEnded, as_text
from .keys import Keys

__all__ = ["CellReads", "HubView", "JobRecord", "NodeJobs", "RunningJob", "redis_unavailable_as"]

_NODE_FIELDS = (
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
"""The node hash fields :meth:`CellReads.status` shows, in :func:`_node_status`'s order."""


@contextlib.contextmanager
def redis_unavailable_as(operation: str) -> Iterator[None]:
    """Raise :class:`~hub.errors.RedisUnavailable` for Redis being out of reach in the block.

    Args:
        operation: what was being done, for the error.

    Raises:
        RedisUnavailable: a connection error, a timeout or an OSError in the block.
    """
    try:
        yield
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        raise RedisUnavailable(operation) from exc


_JOB_FIELDS = (
    "status",
    "node",
    "attempt",
    "session",
    "src",
    "tgt",
    "deadline",
    "payload",
    "audio",
    "shub",
    "ref",
    "error",
)
"""The job hash fields :meth:`CellReads.node_jobs` reads, in :class:`RunningJob`'s order."""


@dataclasses.dataclass(frozen=True, slots=True)
class RunningJob:
    """A job asked about in :meth:`CellReads.node_jobs`, as its hash reads."""

    status: str
    """Empty when Redis has no record of the job."""
    error: str
    attempt: Dispatch
    """Its current attempt, as the dispatch event that started it (``node_hub`` empty)."""

    @property
    def node_id(self) -> str:
        return self.attempt.node_id


@dataclasses.dataclass(frozen=True, slots=True)
class NodeJobs:
    """A node's registration and the jobs Redis says it runs."""

    node_id: str
    epoch: int
    """0 when Redis has no registration of the node (or only a lost one)."""
    hub: str
    jobs: dict[str, RunningJob]
    """Jobs of the node's set whose hash says they run on the node, by id."""
    others: dict[str, RunningJob]
    """Jobs asked about (``also``) that Redis has elsewhere or not at all, by id."""


@dataclasses.dataclass(frozen=True, slots=True)
class JobRecord:
    """A job as its hash reads (:meth:`CellReads.job`), while the record lives."""

    job_id: str
    session_id: str
    status: str
    """``queued``, ``running``, ``finished`` or ``failed``."""
    src_lang: str
    tgt_lang: str
    node_id: str
    """The node of the current attempt; empty while queued."""
    attempt: int
    deadline_ms: int
    result: bytes
    """The result as the node encoded it (``b"null"`` until the job ends)."""
    error: str | None

    @property
    def ended(self) -> bool:
        return self.status in ("finished", "failed")


_RECORD_FIELDS = (
    "session", "status", "src", "tgt", "node", "attempt", "deadline", "result", "error"
)  # fmt: skip
"""The job hash fields :meth:`CellReads.job` reads, in :class:`JobRecord`'s order."""


@dataclasses.dataclass(frozen=True, slots=True)
class HubView:
    """What :meth:`CellReads.hub_view` reads: the hubs' figures and Redis's health."""

    time_ms: int
    """Redis's clock (``TIME``)."""
    records: dict[str, bytes]
    """Each live hub's published figures, by hub id."""
    info: dict[str, Any]
    """Redis ``INFO`` (its default sections)."""
    rtt_ms: float
    """The round trip of the pipeline that read these."""


def _running_job(job_id: str, f: list[Any], hubs: dict[str, Any]) -> RunningJob:
    """One job of :meth:`CellReads.node_jobs`, from its :data:`_JOB_FIELDS`."""
    session = as_text(f[3] or b"")
    shub = as_text(f[9] or b"")
    attempt = Dispatch(
        "",
        as_text(f[1] or b""),
        job_id,
        int(f[2] or 0),
        session,
        as_text(f[4] or b""),
        as_text(f[5] or b""),
        int(f[6] or 0),
        bytes(f[7] or b"{}"),
        shub if f[8] == b"1" else "",
        as_text(hubs.get(session) or b"") or shub,
        as_text(f[10] or b""),
    )
    return RunningJob(as_text(f[0] or b""), as_text(f[11] or b""), attempt)


def _node_status(node_id: Any, f: list[Any]) -> dict[str, Any]:
    """One node of the status page, from its :data:`_NODE_FIELDS`."""
    return {
        "node_id": as_text(node_id),
        "hub_id": as_text(f[0]),
        "running": int(f[1] or 0),
        "max_jobs": int(f[2] or 0),
        "pools": orjson.loads(f[3] or b"[]"),
        "lang_pairs": orjson.loads(f[4] or b"[]"),
        "draining": as_text(f[5] or b"") == "draining",
        "state": as_text(f[5] or b""),
        "load": orjson.loads(f[6]) if f[6] else None,
        "services": orjson.loads(f[7] or b"[]"),
        "rtt_ms": float(f[8]) if f[8] else None,
        "last_seen_ms": int(f[9] or 0),
    }


class CellReads:
    """Reads of one cell's state that change nothing.

    Args:
        redis: a client created with ``decode_responses=False``.
        keys: key names of the cell.
    """

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys

    async def status(self, *, max_nodes: int = 10000) -> dict[str, Any]:
        """A snapshot of the cell for ``/v1/status``: nodes, queues, counters.

        Args:
            max_nodes: most nodes listed (the longest silent last).

        Returns:
            ``{"nodes": [...], "queues": {"src:tgt": depth}, "counters": {name: n}}``:
            the queues are the language pairs' with jobs waiting.

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        k = self.keys
        with redis_unavailable_as("status"):
            node_ids = await self.redis.zrange(k.seen, 0, max_nodes - 1)
            pipe = self.redis.pipeline(transaction=False)
            for nid in node_ids:
                pipe.hmget(k.node(as_text(nid)), *_NODE_FIELDS)
            pipe.hgetall(k.queue_depth)
            pipe.hgetall(k.stats)
            replies = await pipe.execute()
        nodes = [
            _node_status(nid, f)
            for nid, f in zip(node_ids, replies[:-2], strict=True)
            if f[0] is not None
        ]
        queues = {as_text(p): int(d) for p, d in replies[-2].items()}
        counters = {as_text(f): int(v) for f, v in replies[-1].items()}
        return {"nodes": nodes, "queues": queues, "counters": counters}

    async def ended_results(
        self, session_id: str, *, max_results: int = 1000
    ) -> tuple[JobEnded, ...]:
        """The session's ended jobs whose results it has not acknowledged, oldest first.

        A read, unlike :meth:`~hub.scheduler.Scheduler.resume_session`: it
        does not move the session to this hub.

        Args:
            session_id: the session.
            max_results: most results returned.

        Returns:
            The results; their ``session_hub`` is empty.

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        k = self.keys
        with redis_unavailable_as("ended results"):
            job_ids = await self.redis.zrange(k.session_done(session_id), 0, max_results - 1)
            pipe = self.redis.pipeline(transaction=False)
            for jid in job_ids:
                pipe.hmget(k.job(as_text(jid)), "status", "ref", "result", "error")
            rows = await pipe.execute()
        return tuple(
            JobEnded(
                session_hub="",
                session_id=session_id,
                job_id=as_text(jid),
                ref=as_text(ref or b""),
                status="finished" if status == b"finished" else "failed",
                result=bytes(result or b"null"),
                error=as_text(error) if error else None,
            )
            for jid, (status, ref, result, error) in zip(job_ids, rows, strict=True)
            if status in (b"finished", b"failed")
        )

    async def job(self, job_id: str) -> JobRecord | None:
        """A job's record: its session, state and, once it ended, its outcome.

        One read (``HMGET``); ``None`` when Redis has no record of the job
        (never submitted, or ended more than ``job_ttl_ms`` ago).

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        with redis_unavailable_as("job"):
            f: list[Any] = await self.redis.hmget(self.keys.job(job_id), *_RECORD_FIELDS)
        if f[0] is None or f[1] is None:
            return None
        return JobRecord(
            job_id,
            as_text(f[0]),
            as_text(f[1]),
            as_text(f[2] or b""),
            as_text(f[3] or b""),
            as_text(f[4] or b""),
            int(f[5] or 0),
            int(f[6] or 0),
            bytes(f[7] or b"null"),
            as_text(f[8]) if f[8] else None,
        )

    async def server_id(self) -> str:
        """The Redis server's ``run_id``: it changes when the server restarts or fails over.

        Either may lose the last writes (an append-only file fsynced every
        second, a replica behind its primary), so a hub that sees it change
        reconciles (:mod:`hub.reconcile`).

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        with redis_unavailable_as("server id"):
            info = await self.redis.info("server")
        return str(info.get("run_id", ""))

    async def node_jobs(
        self, nodes: Sequence[tuple[str, Collection[str]]], *, max_jobs: int = 256
    ) -> list[NodeJobs]:
        """What Redis says each node runs: its registration and the jobs of its set.

        Two pipelines, whatever the number of nodes: the nodes' hashes and
        sets, then the jobs' hashes (with their sessions' hubs). A read: it
        changes nothing.

        Args:
            nodes: (node id, job ids the caller also wants read) pairs.
            max_jobs: most jobs read per node (its set beyond is ignored).

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        k = self.keys
        with redis_unavailable_as("node jobs"):
            pipe = self.redis.pipeline(transaction=False)
            for nid, _ in nodes:
                pipe.hmget(k.node(nid), "epoch", "hub", "state")
                pipe.srandmember(k.node_jobs(nid), max_jobs)
            replies = await pipe.execute()
            wanted: list[list[str]] = []
            pipe = self.redis.pipeline(transaction=False)
            for i, (_, also) in enumerate(nodes):
                ids = list(dict.fromkeys([*(as_text(j) for j in replies[2 * i + 1]), *also]))
                ids = ids[: 2 * max_jobs]
                wanted.append(ids)
                for jid in ids:
                    pipe.hmget(k.job(jid), *_JOB_FIELDS)
            rows = await pipe.execute()
            sessions = sorted({as_text(r[3]) for r in rows if r[3] is not None})
            pipe = self.redis.pipeline(transaction=False)
            for sid in sessions:
                pipe.hget(k.session(sid), "hub")
            hubs = dict(zip(sessions, await pipe.execute(), strict=True))
        out = []
        at = 0
        for i, (nid, _) in enumerate(nodes):
            epoch, hub, state = replies[2 * i]
            registered = epoch is not None and state != b"lost"
            mine: dict[str, RunningJob] = {}
            others: dict[str, RunningJob] = {}
            for jid in wanted[i]:
                job = _running_job(jid, rows[at], hubs)
                at += 1
                running = job.status == "running" and job.node_id == nid
                (mine if running else others)[jid] = job
            out.append(
                NodeJobs(nid, int(epoch) if registered else 0, as_text(hub or b""), mine, others)
            )
        return out

    async def resume_secret(self) -> bytes:
        """The key every hub of the cell signs resume tokens with; made by the first asker.

        Returns:
            The key (64 hex digits).

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        key = self.keys.resume_secret
        with redis_unavailable_as("load secret"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(key, secrets.token_hex(32), nx=True)
            pipe.get(key)
            _, value = await pipe.execute()
        if not isinstance(value, bytes):
            raise RedisUnavailable("load secret")
        return value

    # The hubs' own figures (hub/watch.py)

    async def publish_hub(self, hub_id: str, record: bytes, ttl_ms: int) -> None:
        """Write this hub's figures for the dashboards of every hub; they expire unless renewed.

        Like the ``stats`` counters, they schedule nothing, so the hub writes
        them itself (one pipeline: the record, and its id in ``hubs``). The
        set of ids expires too, renewed by every hub's write: ids of hubs
        that died are dropped by the readers, and when no hub is left
        nothing stays.

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        k = self.keys
        with redis_unavailable_as("publish hub"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(k.hub_record(hub_id), record, px=ttl_ms)
            pipe.zadd(k.hubs, {hub_id: int(time.time() * 1000)})
            pipe.pexpire(k.hubs, ttl_ms)
            await pipe.execute()

    async def hub_view(self, *, max_hubs: int = 256) -> HubView:
        """The live hubs' figures, Redis's health and its clock, in one pipeline.

        A hub whose record expired (it stopped, or lost Redis) leaves ``hubs``
        here.

        Args:
            max_hubs: most hubs read (the most recently published first).

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        k = self.keys
        with redis_unavailable_as("hub view"):
            started = time.perf_counter()
            pipe = self.redis.pipeline(transaction=False)
            pipe.time()
            pipe.info()
            pipe.zrevrange(k.hubs, 0, max_hubs - 1)
            now, info, hub_ids = await pipe.execute()
            rtt_ms = (time.perf_counter() - started) * 1000
            records: dict[str, bytes] = {}
            if hub_ids:
                values = await self.redis.mget([k.hub_record(as_text(h)) for h in hub_ids])
                gone = [h for h, v in zip(hub_ids, values, strict=True) if v is None]
                if gone:
                    await self.redis.zrem(k.hubs, *gone)
                records = {
                    as_text(h): v
                    for h, v in zip(hub_ids, values, strict=True)
                    if isinstance(v, bytes)
                }
        seconds, micros = now
        return HubView(int(seconds) * 1000 + int(micros) // 1000, records, info, rtt_ms)

    async def session_cells(self, session_id: str) -> tuple[str, ...]:
        """The other cells where a session of this cell may have jobs (add_session_cell.lua).

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        with redis_unavailable_as("session cells"):
            members = await self.redis.smembers(self.keys.session_cells(session_id))
        return tuple(sorted(as_text(m) for m in members))
