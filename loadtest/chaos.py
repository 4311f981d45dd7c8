"""Chaos run: steady load over several hubs while nodes, hubs and Redis die.

Usage::

    python -m loadtest.chaos [--duration 120] [--hubs 3] [--nodes 20]
        [--sessions 50] [--seed N] [--out DIR]

It starts an embedded Redis (append-only file on, in a temporary directory),
``--hubs`` hub processes on one cell (``python -m hub serve``, fixed loopback
ports outside the ephemeral range, so a killed hub comes back on its own
address), ``--nodes`` node processes (this module's ``node-worker``: one
:class:`~hub.client.NodeClient` each, given every hub's URL: it moves to the
next when its hub dies) and ``--sessions`` :class:`~hub.client.SessionClient`\\ s
in this process, given every hub's URL too and spread over the hubs
(:func:`hubs_from`), each submitting jobs at a steady pace.

On a schedule drawn from ``--seed`` it SIGKILLs random nodes and hubs and
starts them again, stops and restarts Redis once (SIGTERM, then the same
data directory), and SIGKILLs Redis ``--redis-kills`` times (default 1)
under load, cutting its append-only file back by the last
``redis_lost_s`` (1 s) of writes, as an operating system crash with
``appendfsync everysec`` would (:func:`loadtest.procs.cut_aof`), then starts
it again on the same directory: the hubs must notice and reconcile
(:mod:`hub.reconcile`). Then it stops the load, waits (bounded) for every job to end
and the fleet to be idle, and checks the ledger:

- every job submitted got exactly one outcome in its session: a result
  (finished, or failed with a documented code) or a refusal (error frame);
  no result reached the application twice; the outcome agrees with the job's
  record in Redis and a finished result is the one computed for its payload;
- no node ran the same attempt of a job twice;
- every node's ``running`` in Redis equals its jobs set and the jobs its
  process really runs (zero once idle);
- every key of the cell either has a TTL or is one of the persistent
  structures listed in :data:`PERSISTENT_KEYS`.

With ``--redis-cluster N`` the cell lives on a Redis Cluster of ``N``
masters and ``N`` replicas (:class:`loadtest.cluster.RedisCluster`) instead:
there is no restart of one Redis; each of the ``--redis-kills`` SIGKILLs the
master that owns the cell's slot under load, its replica is promoted
(replication is asynchronous: the last writes may be lost), the hubs find
the new master and reconcile, and the killed node comes back as a replica.

It prints the tally and the failover times, and exits 0 only when the ledger
is clean (1 otherwise, 2 when the run could not start). Every wait is
bounded, everything listens on loopback, and only processes it started are
killed, by pid.

Its processes are :class:`loadtest.procs.HubProcess` and
:class:`loadtest.procs.NodeProcess` (whose worker, ``node-worker``, lives
here); the fault tests (``tests/test_reliability.py``) use both.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hub.client import (
    Backoff,
    ClientClosed,
    ConnectionRejected,
    JobRefused,
    NodeClient,
    ResultTimeout,
    SessionClient,
    SessionLost,
)
from hub.client.node import Job
from hub.cluster import ClusterLinks, cell_slot
from hub.config import Settings
from hub.embedded import EmbeddedRedis, find_redis_server
from hub.keys import Keys
from hub.protocol import (
    Accepted,
    Queued,
    SessionResult,
    ToSessionFrame,
)

from .cluster import RedisCluster
from .procs import HubProcess, NodeProcess, aof_mark, cut_aof, http_get

__all__ = [
    "PERSISTENT_KEYS",
    "ChaosConfig",
    "Ledger",
    "audit_redis",
    "hubs_from",
    "main",
    "run_chaos",
]

DOCUMENTED_FAILURES = frozenset(
    {"JOB_TIMEOUT", "NODE_LOST", "CANCELLED", "NO_AVAILABLE_NODE", "INTERNAL", "JOB_LOST"}
)
"""protocol.md §4.8: the codes a failed ``result`` may carry."""

DOCUMENTED_REFUSALS = frozenset(
    {
        "NO_POOL_FOR_LANG_PAIR",
        "EMPTY_POOL",
        "NO_AVAILABLE_NODE",
        "QUEUE_FULL",
        "UNAVAILABLE",
        "TOO_MANY_JOBS",
        "RATE_LIMITED",
        "OVERLOADED",
    }
)
"""protocol.md §6: error codes a session's ``job`` may be refused with."""

PERSISTENT_KEYS: dict[str, str] = {
    "node:<id>": "a live (or draining/offline) node's hash, until it is lost",
    "free:<pool>": "zset of a pool's live nodes with a free slot",
    "pool:<pool>:nodes": "set of a pool's live nodes",
    "lang:<src>:<tgt>": "set of the pools serving a pair (bounded by pools x pairs)",
    "live:<src>:<tgt>": "set of the live nodes serving a pair",
    "pools": "set of every pool id registered in the cell",
    "seen": "zset of live nodes -> last heartbeat (the lease)",
    "stats": "hash of cell-wide counters",
    "qdepth": "hash of language pair -> queued jobs (no entry once idle)",
    "secret": "the resume-token key shared by the hubs of the cell",
}
"""Keys of a cell that may live without a TTL, and why (everything else must expire)."""

_PERSISTENT_PATTERNS = (
    re.compile(r"node:[^:]+"),
    re.compile(r"free:[^:]+"),
    re.compile(r"pool:[^:]+:nodes"),
    re.compile(r"(lang|live):[^:]+:[^:]+"),
    re.compile(r"pools|seen|stats|qdepth|secret"),
)


def _now() -> float:
    """Wall clock, shared by every process of the run (one machine)."""
    return time.time()


# Clients that try several hubs


def hubs_from(urls: Sequence[str], start_index: int) -> list[str]:
    """``urls`` rotated to start at ``start_index``: the order a client tries them.

    The run gives its clients these orders (``spread=False``) rather than
    the SDK's own spreading, so that every hub holds nodes and sessions when
    one is killed, whatever the seed: the failover times measure each kill.
    """
    if not urls:
        raise ValueError("give at least one hub URL")
    k = start_index % len(urls)
    return [*urls[k:], *urls[:k]]


# The node worker (child process)


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(event).decode() + "\n")
    sys.stdout.flush()


async def _node_worker(config: dict[str, Any]) -> int:
    # Connections, registrations and resumes go to the worker's log (stderr).
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    node_id = str(config["node_id"])
    low, high = (float(x) for x in config["service_ms"])
    rng = random.Random()

    async def handle(job: Job) -> dict[str, Any]:
        _emit({"e": "start", "job": job.job_id, "a": job.attempt, "t": _now()})
        ms = job.payload.get("ms")
        delay_s = (float(ms) if isinstance(ms, int | float) else rng.uniform(low, high)) / 1000
        text = str(job.payload.get("text", ""))
        try:
            await asyncio.sleep(delay_s / 2)
            await job.partial({"text": text[: len(text) // 2].upper()})
            await asyncio.sleep(delay_s / 2)
        except asyncio.CancelledError:
            _emit({"e": "cancel", "job": job.job_id, "a": job.attempt, "t": _now()})
            raise
        _emit({"e": "end", "job": job.job_id, "a": job.attempt, "t": _now()})
        result = {"text": text.upper(), "node": node_id, "attempt": job.attempt}
        if job.audio is not None:
            result["audio_bytes"] = len(job.audio)  # checked by the ledger
        return result

    def registered(node: NodeClient) -> None:
        _emit(
            {
                "e": "reg",
                "node": node_id,
                "hub": node.hub_id,
                "n": node.connections,
                "running": node.running,
                "t": _now(),
            }
        )

    node = NodeClient(
        urls=hubs_from(list(config["urls"]), int(config.get("start_index", 0))),
        spread=False,
        on_connected=registered,
        node_id=node_id,
        languages=list(config.get("languages", ["en", "fr"])),
        max_jobs=int(config.get("max_jobs", 4)),
        handler=handle,
        backoff=Backoff(min_s=0.05, max_s=1.0),
        open_timeout_s=3.0,
        register_timeout_s=3.0,
    )
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def commands() -> None:
        while True:
            line = await stdin.readline()
            if not line:
                stop.set()  # the parent closed the pipe, or died
                return
            if line.strip() == b"status":
                _emit(
                    {
                        "e": "status",
                        "running": node.running,
                        "unsent": len(node._unsent),
                        "registered": node.registered,
                    }
                )

    reader = loop.create_task(commands())
    node.start()
    runner = loop.create_task(node.wait_closed())
    stopper = loop.create_task(stop.wait())
    try:
        await asyncio.wait((runner, stopper), return_when=asyncio.FIRST_COMPLETED)
        if not runner.done():
            with contextlib.suppress(TimeoutError, ConnectionRejected):
                await node.drain(timeout_s=5.0)
    finally:
        reader.cancel()
        stopper.cancel()
        await node.close()
    _emit({"e": "exit", "t": _now()})
    return 0


# Redis audit


@dataclasses.dataclass
class Audit:
    """What :func:`audit_redis` found in a cell."""

    keys: int = 0
    persistent: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    expiring: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    leaks: list[str] = dataclasses.field(default_factory=list)
    """Keys that will never expire and are not expected to persist, or residue at idle."""
    mismatches: list[str] = dataclasses.field(default_factory=list)
    """Nodes whose ``running`` differs from their jobs (in Redis or in their process)."""
    live_nodes: dict[str, int] = dataclasses.field(default_factory=dict)
    """Live node id -> ``running`` in Redis."""


def _key_kind(rest: str) -> str:
    first = rest.split(":", 1)[0]
    if first in ("node", "session", "queue", "pool", "lang", "live"):
        parts = rest.split(":")
        if first == "node":
            return "node:<id>" if len(parts) == 2 else "node:<id>:" + ":".join(parts[2:])
        if first == "session":
            return "session:<id>" if len(parts) == 2 else "session:<id>:" + parts[-1]
        if first == "queue":
            return "queue:<src>:<tgt>" if len(parts) == 3 else "queue:<src>:<tgt>:s:<session>"
        if first == "pool":
            return "pool:<pool>:nodes"
        return f"{first}:<src>:<tgt>"
    if first in ("job", "free"):
        return f"{first}:<id>"
    return first


async def audit_redis(
    redis: Redis, keys: Keys, *, real_running: dict[str, int] | None = None
) -> Audit:
    """Check a cell at rest: TTLs, residue and every node's ``running``.

    Args:
        redis: a client on the cell's Redis (bytes replies).
        keys: the cell.
        real_running: node id -> jobs its process really runs, when known.
    """
    audit = Audit()
    prefix = keys.prefix
    pattern = "".join("\\" + c if c in "\\*?[]" else c for c in prefix) + "*"
    names: list[bytes] = []
    async for name in redis.scan_iter(match=pattern, count=1000):
        names.append(name)
    audit.keys = len(names)
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.pttl(name)
        pipe.type(name)
    replies = await pipe.execute()
    for i, name in enumerate(names):
        ttl, kind_b = int(replies[2 * i]), replies[2 * i + 1]
        rest = name.decode()[len(prefix) :]
        kind = _key_kind(rest)
        if ttl == -2:
            continue  # expired meanwhile
        if ttl >= 0:
            audit.expiring[kind] += 1
            if kind == "node:<id>":
                state = await redis.hget(name, "state")
                if state != b"lost":
                    audit.leaks.append(f"{rest}: a {state!r} node hash with a TTL")
            continue
        audit.persistent[kind] += 1
        if not any(p.fullmatch(rest) for p in _PERSISTENT_PATTERNS):
            audit.leaks.append(f"{rest} ({kind_b.decode()}) has no TTL")
            continue
        if kind == "node:<id>":
            state = await redis.hget(name, "state")
            if state == b"lost":
                audit.leaks.append(f"{rest}: a lost node's tombstone without a TTL")
    # Residue at rest: nothing running, queued or waiting for a deadline.
    for name, what in (
        (keys.deadlines, "jobs waiting for their deadline"),
        (keys.queued, "jobs waiting in a queue"),
    ):
        n = await redis.zcard(name)
        if n:
            audit.leaks.append(f"{name[len(prefix) :]}: {n} {what} at rest")
    for pair, depth in (await redis.hgetall(keys.queue_depth)).items():
        if int(depth) != 0:
            audit.leaks.append(f"qdepth[{pair.decode()}] = {int(depth)} at rest")
    # Each node: running = jobs set = jobs its process runs.
    node_ids = sorted(
        {
            n.decode()[len(prefix) + 5 :]
            for n in names
            if _key_kind(n.decode()[len(prefix) :]) == "node:<id>"
        }
    )
    seen = {m.decode() for m in await redis.zrange(keys.seen, 0, -1)}
    for nid in node_ids:
        f = await redis.hmget(keys.node(nid), "state", "running", "max_jobs")
        if f[0] is None or f[0] == b"lost":
            if nid in seen:
                audit.mismatches.append(f"node {nid}: lost but still in the lease zset")
            continue
        running = int(f[1] or 0)
        jobs = {j.decode() for j in await redis.smembers(keys.node_jobs(nid))}
        audit.live_nodes[nid] = running
        if running != len(jobs):
            audit.mismatches.append(
                f"node {nid}: running={running} but {len(jobs)} jobs in its set"
            )
        if not 0 <= running <= int(f[2] or 0):
            audit.mismatches.append(f"node {nid}: running={running} out of 0..{f[2]!r}")
        for jid in jobs:
            status, on = await redis.hmget(keys.job(jid), "status", "node")
            if status != b"running" or on != nid.encode():
                audit.mismatches.append(f"node {nid}: job {jid} in its set is {status!r} on {on!r}")
        if real_running is not None and nid in real_running and real_running[nid] != running:
            audit.mismatches.append(
                f"node {nid}: running={running} in Redis, {real_running[nid]} in its process"
            )
    return audit


# The chaos run


@dataclasses.dataclass
class ChaosConfig:
    """Everything the chaos run varies. Times in seconds unless the name says otherwise."""

    duration_s: float = 120.0
    hubs: int = 3
    nodes: int = 20
    sessions: int = 50
    seed: int | None = None
    max_jobs: int = 4
    service_ms: tuple[float, float] = (100.0, 500.0)
    job_interval_s: float = 1.0
    """Mean pause of each session between the result of a job and the next job."""
    job_timeout_ms: int = 10000
    result_grace_s: float = 30.0
    heartbeat_interval_ms: int = 500
    node_kill_every_s: float = 7.0
    node_down_s: float = 3.0
    hub_kills: int | None = None
    """How many hub kills; ``None``: one per 40 s of load (at least one)."""
    hub_down_s: float = 5.0
    workers: int = 1
    """Workers per hub process (``hub serve --workers``); above 1 a hub fault
    SIGKILLs one worker, which its supervisor restarts (:meth:`ChaosRun._kill_worker`)."""
    redis_restart: bool = True
    redis_down_s: float = 2.0
    redis_kills: int = 1
    """SIGKILLs of Redis that lose its last writes (:meth:`ChaosRun._kill_redis`)."""
    redis_lost_s: float = 1.0
    """Writes of this last stretch before each SIGKILL are cut from the append-only file."""
    settle_s: float = 60.0
    redis_cluster: int = 0
    """Masters of a Redis Cluster for the cell (each with a replica); 0: one Redis."""
    audio_bytes: int = 0
    """Audio sent with each job (binary frames); 0 sends text-only jobs."""
    hub_settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    """More ``--set`` settings for the hubs (they override the run's own)."""
    out_dir: Path | None = None
    quiet: bool = False


@dataclasses.dataclass
class JobRecord:
    """One submit of a session, as the application saw it."""

    session: int
    text: str
    submitted: float
    ref: str | None = None
    job_id: str | None = None
    outcome: str | None = None
    """``finished``, ``failed:<code>``, ``refused:<code>`` or ``lost:<exception>``."""
    result: dict[str, Any] | None = None
    ended: float | None = None


class Ledger:
    """What every session submitted and received, on the wire and in the application."""

    def __init__(self) -> None:
        self.jobs: list[JobRecord] = []
        self.accepted: dict[str, list[tuple[float, str, int]]] = collections.defaultdict(list)
        """job id -> (time, node, attempt) of each ``accepted`` frame."""
        self.refs: dict[tuple[int, str], str] = {}
        """(session, ref) -> job id, from ``accepted``/``queued`` frames."""
        self.wire_results: collections.Counter[tuple[int, int, str]] = collections.Counter()
        """(session, connection, job id) -> ``result`` frames received."""
        self.app_results: collections.Counter[str] = collections.Counter()
        """job id -> results handed to the application."""

    def forget(self, jobs: Sequence[JobRecord], job_ids: set[str]) -> None:
        """Drop checked jobs (``jobs``, whose ids are ``job_ids``) from every record.

        Re-dispatched jobs keep their ``accepted`` events: the failover
        times are computed from them at the end.
        """
        gone = {id(j) for j in jobs}
        self.jobs = [j for j in self.jobs if id(j) not in gone]
        for key in [k for k, v in self.refs.items() if v in job_ids]:
            del self.refs[key]
        for job_id in job_ids:
            events = self.accepted.get(job_id)
            if events is not None and len(events) < 2:
                del self.accepted[job_id]
            self.app_results.pop(job_id, None)
        for wire in [k for k in self.wire_results if k[2] in job_ids]:
            del self.wire_results[wire]

    def on_frame(self, index: int, client: SessionClient, frame: ToSessionFrame) -> None:
        if isinstance(frame, Accepted | Queued):
            self.refs[(index, frame.ref)] = frame.job_id
            if isinstance(frame, Accepted):
                self.accepted[frame.job_id].append((_now(), frame.node_id, frame.attempt))
        elif isinstance(frame, SessionResult):
            self.wire_results[(index, client.connections, frame.job_id)] += 1


@dataclasses.dataclass
class JobChecks:
    """What the ledger's checks found over some ended jobs; a long run adds them up."""

    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    problems: list[str] = dataclasses.field(default_factory=list)
    app_duplicates: int = 0
    wire_duplicates: int = 0
    double_runs: list[str] = dataclasses.field(default_factory=list)
    reruns: int = 0
    """Jobs run on several attempts (re-dispatched after a node was lost)."""
    failed_jobs: list[str] = dataclasses.field(default_factory=list)

    def merge(self, other: JobChecks) -> None:
        self.outcomes.update(other.outcomes)
        self.problems += other.problems
        self.app_duplicates += other.app_duplicates
        self.wire_duplicates += other.wire_duplicates
        self.double_runs += other.double_runs
        self.reruns += other.reruns
        self.failed_jobs += other.failed_jobs


@dataclasses.dataclass
class Fault:
    at: float
    kind: str
    target: str
    back_at: float | None = None
    up_at: float | None = None
    """Redis faults: when the server answered again (``back_at``: every hub ready)."""


class ChaosRun:
    """One chaos run: see the module docstring."""

    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.seed = config.seed if config.seed is not None else random.randrange(1, 10**6)
        self.rng = random.Random(self.seed)
        self.cell = "chaos-" + uuid.uuid4().hex[:8]
        self.keys = Keys(self.cell)
        self.out_dir = config.out_dir
        self.tmp: str | None = None
        self.redis_server: EmbeddedRedis | None = None
        self.redis: Redis | None = None
        self.cluster: RedisCluster | None = None
        self.links: ClusterLinks | None = None
        self.hubs: list[HubProcess] = []
        self.nodes: list[NodeProcess] = []
        self.sessions: list[SessionClient] = []
        self.ledger = Ledger()
        self.checked = JobChecks()
        """Jobs already checked and dropped from the ledger (:meth:`check_ended_jobs`)."""
        self.faults: list[Fault] = []
        self.reg_events: list[tuple[float, str, str]] = []
        """(time, node, hub) of every node registration."""
        self.rereg_events: list[tuple[float, str, str]] = []
        """The same, for reconnections only (not a restarted process's first one)."""
        self.resumes: list[tuple[float, int, str | None]] = []
        """(time, session, hub) of every session (re)connection."""
        self.redis_kill_samples: list[float] = []
        """Seconds from each SIGKILL of Redis until every hub was ready and reconciled."""
        self.aof_cut: list[int] = []
        """Bytes cut from the append-only file at each SIGKILL of Redis (the writes lost)."""
        self._load_on = False
        self.load_started = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self.started_at = 0.0

    def log(self, text: str) -> None:
        if not self.config.quiet:
            print(f"[{time.monotonic() - self.started_at:7.2f}s] {text}", flush=True)

    # Setup and teardown

    async def start(self) -> None:
        c = self.config
        self.started_at = time.monotonic()
        if self.out_dir is None:
            self.tmp = tempfile.mkdtemp(prefix="chaos-")
            self.out_dir = Path(self.tmp)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A short path of its own: unix socket paths are limited to 107 bytes.
        self.redis_dir = tempfile.mkdtemp(prefix="chaos-redis-")
        settings: dict[str, Any] = {}
        if c.redis_cluster:
            self.cluster = RedisCluster(
                find_redis_server(), Path(self.redis_dir), masters=c.redis_cluster
            )
            self.cluster.start()  # blocks a few seconds; in the main thread (PDEATHSIG)
            url = self.cluster.url
            self.links = ClusterLinks(url, Settings(redis_timeout_s=5))
            await self.links.locate()
            self.redis = self.links.client(self.cell)
            settings["redis_cluster"] = True
        else:
            self.redis_server = EmbeddedRedis(self.redis_dir, appendonly=True)
            self.redis_server.start()
            url = self.redis_server.url
            self.redis = Redis.from_url(
                url, socket_timeout=5, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
            )
        settings |= {
            "heartbeat_interval_ms": c.heartbeat_interval_ms,
            "session_rate_per_s": None,
            "max_connections_per_ip": None,
            "shutdown_grace_s": 2,
            "redis_timeout_s": 1,
            **({"workers": c.workers, "watch_interval_s": 0.5} if c.workers > 1 else {}),
            **c.hub_settings,
        }
        self.hubs = [
            HubProcess(f"h{i + 1}", redis_url=url, cell=self.cell, log_dir=self.out_dir,
                       settings=settings)
            for i in range(c.hubs)
        ]  # fmt: skip
        await asyncio.gather(*(h.start() for h in self.hubs))
        await asyncio.gather(*(h.wait_ready() for h in self.hubs))
        urls = [h.url for h in self.hubs]
        self.log(f"redis {url}; hubs {', '.join(f'{h.hub_id}={h.url}' for h in self.hubs)}")
        self.nodes = [
            NodeProcess(
                f"n{i + 1:02d}",
                urls,
                log_dir=self.out_dir,
                max_jobs=c.max_jobs,
                service_ms=c.service_ms,
                start_index=i,
                on_event=self._on_node_event,
            )
            for i in range(c.nodes)
        ]
        await asyncio.gather(*(n.start() for n in self.nodes))
        await asyncio.gather(*(n.wait_registered(30) for n in self.nodes))
        self.log(f"{len(self.nodes)} nodes registered")
        for i in range(c.sessions):
            session = SessionClient(
                urls=hubs_from(urls, i),
                spread=False,
                on_frame=lambda client, frame, i=i: self.ledger.on_frame(i, client, frame),
                on_connected=lambda client, i=i: self.resumes.append((_now(), i, client.hub_id)),
                backoff=Backoff(min_s=0.05, max_s=1.0),
                default_timeout_s=c.job_timeout_ms / 1000,
                result_grace_s=c.result_grace_s,
                open_timeout_s=3.0,
            )
            await session.connect()
            self.sessions.append(session)
        self.log(f"{len(self.sessions)} sessions connected")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for session in self.sessions:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await session.close()
        await asyncio.gather(*(n.stop(10) for n in self.nodes), return_exceptions=True)
        await asyncio.gather(*(h.stop(10) for h in self.hubs), return_exceptions=True)
        if self.links is not None:
            await self.links.aclose()
        elif self.redis is not None:
            await self.redis.aclose()
        if self.cluster is not None:
            self.cluster.stop()
        if self.redis_server is not None:
            self.redis_server.stop()
            if self.out_dir is not None:
                with contextlib.suppress(OSError):
                    shutil.copyfile(self.redis_server.log_path, self.out_dir / "redis.log")
        shutil.rmtree(self.redis_dir, ignore_errors=True)

    # Events

    def _on_node_event(self, node: NodeProcess, event: dict[str, Any]) -> None:
        if event.get("e") == "reg":
            entry = (float(event["t"]), node.node_id, str(event.get("hub")))
            self.reg_events.append(entry)
            if int(event.get("n") or 1) > 1:
                self.rereg_events.append(entry)

    # Load

    async def _session_loop(self, index: int, session: SessionClient) -> None:
        c = self.config
        rng = random.Random(self.rng.random())
        audio = rng.randbytes(c.audio_bytes) if c.audio_bytes else None
        n = 0
        await asyncio.sleep(rng.uniform(0, c.job_interval_s))
        while self._load_on:
            n += 1
            text = f"s{index}-j{n}-{rng.randrange(10**6)}"
            record = JobRecord(index, text, _now())
            self.ledger.jobs.append(record)
            try:
                result = await session.submit(
                    "en", "fr", {"text": text}, audio=audio, timeout_ms=c.job_timeout_ms
                )
            except JobRefused as exc:
                record.ref, record.outcome = exc.ref, f"refused:{exc.code}"
            except ResultTimeout as exc:
                record.ref, record.outcome = exc.ref, "lost:ResultTimeout"
            except (SessionLost, ClientClosed, ConnectionRejected) as exc:
                record.outcome = f"lost:{type(exc).__name__}"
            else:
                record.ref, record.job_id = result.ref, result.job_id
                record.result = result.result
                record.outcome = "finished" if result.ok else f"failed:{result.error}"
                self.ledger.app_results[result.job_id] += 1
            record.ended = _now()
            if record.job_id is None and record.ref is not None:
                record.job_id = self.ledger.refs.get((index, record.ref))
            await asyncio.sleep(rng.expovariate(1 / c.job_interval_s))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Faults

    def schedule(self) -> list[tuple[float, str]]:
        """When each fault happens, seconds from the start of the load."""
        c = self.config
        d = c.duration_s
        events: list[tuple[float, str]] = []
        hub_kills = c.hub_kills if c.hub_kills is not None else max(1, int(d // 40))
        last_fault = d - max(c.hub_down_s, c.node_down_s, c.redis_down_s + c.redis_lost_s) - 3
        if hub_kills == 1:
            events.append((d * 0.25, "hub"))  # back before Redis stops at d / 2
        for k in range(hub_kills if hub_kills > 1 else 0):
            events.append((d * (k + 1) / (hub_kills + 1) * 0.9, "hub"))
        if c.redis_restart and not c.redis_cluster:
            events.append((d * 0.5, "redis"))
        kill = "master-kill" if c.redis_cluster else "redis-kill"
        for k in range(c.redis_kills):
            # Away from the hub kills and the restart, with load on both sides.
            at = d * (0.65 + 0.25 * k / max(c.redis_kills, 1))
            events.append((min(at, last_fault - k), kill))
        t = min(3.0, d / 6)
        while c.node_kill_every_s > 0 and t < last_fault:
            events.append((t, "node"))
            t += c.node_kill_every_s * self.rng.uniform(0.7, 1.3)
        return sorted(e for e in events if e[0] <= last_fault)

    async def _kill_node(self, at: float) -> None:
        live = [n for n in self.nodes if n.alive and n.registered]
        if not live:
            return
        # A busy node when there is one: its jobs must move.
        node = self.rng.choice([n for n in live if n.inflight] or live)
        fault = Fault(_now(), "node", node.node_id)
        self.faults.append(fault)
        node.kill()
        await node.wait()
        self.log(f"killed node {node.node_id} (pid {node.pid})")
        await asyncio.sleep(self.config.node_down_s)
        await node.start()
        fault.back_at = _now()

    async def _kill_hub(self, at: float) -> None:
        if self.config.workers > 1:
            await self._kill_worker(self.rng.choice([h for h in self.hubs if h.alive]))
            return
        live = [h for h in self.hubs if h.alive]
        if len(live) < 2:
            return  # keep one hub up: the sessions need somewhere to go
        hub = self._hub_to_kill(live)
        fault = Fault(_now(), "hub", hub.hub_id)
        self.faults.append(fault)
        hub.kill()
        await hub.wait()
        self.log(f"killed hub {hub.hub_id} (pid {hub.pid})")
        await asyncio.sleep(self.config.hub_down_s)
        await hub.start()
        await hub.wait_ready()
        fault.back_at = _now()
        self.log(f"hub {hub.hub_id} is back")

    async def _kill_worker(self, hub: HubProcess) -> None:
        """SIGKILL one worker of ``hub``; wait (bounded) until its supervisor brought it back.

        Back means: a new worker process under the same supervisor, listed
        with the killed worker's id, its new pid, and ready in ``/v1/status``.
        """
        workers: dict[int, str] = {}
        for _ in range(100):  # bounded: 10 s for every worker to be listed ready
            workers = await _live_workers(hub)
            if len(workers) == self.config.workers:
                break
            await asyncio.sleep(0.1)
        if not workers:
            self.log(f"no worker of hub {hub.hub_id} is ready: none killed")
            return
        pid = self.rng.choice(sorted(workers))
        target = workers[pid]
        fault = Fault(_now(), "hub", target)
        self.faults.append(fault)
        os.kill(pid, signal.SIGKILL)
        self.log(f"killed worker {target} of hub {hub.hub_id} (pid {pid})")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = await _live_workers(hub)
            if any(p != pid and w == target for p, w in now.items()):
                fault.back_at = _now()
                self.log(f"worker {target} is back")
                return
            await asyncio.sleep(0.1)
        self.log(f"worker {target} did not come back")

    def _hub_to_kill(self, live: list[HubProcess]) -> HubProcess:
        """Which of the live hubs a hub fault kills."""
        return self.rng.choice(live)

    async def _restart_redis(self, at: float) -> None:
        server = self.redis_server
        assert server is not None
        fault = Fault(_now(), "redis", "redis")
        self.faults.append(fault)
        # Blocking, on purpose in this thread: the server must be our child
        # from the main thread (PR_SET_PDEATHSIG). Stopping takes a few ms.
        server.stop()
        self.log("stopped redis")
        await asyncio.sleep(self.config.redis_down_s)
        server.start()
        up = _now()
        self.log("redis is back")
        await asyncio.gather(*(h.wait_ready(30) for h in self.hubs if h.alive))
        fault.back_at, fault.up_at = _now(), up
        self.log(f"every hub ready again {fault.back_at - up:.2f} s after redis came back")

    async def _kill_redis(self, at: float) -> None:
        """SIGKILL Redis under load, cut its last writes, start it again; wait for the hubs.

        The failover time is from the kill until every live hub is ready and
        has reconciled the restart (its ``hub_redis_reconciled_total`` of
        restarts went up).
        """
        server = self.redis_server
        assert server is not None and server.pid is not None
        hubs = [h for h in self.hubs if h.alive]
        before = {h.hub_id: await _restarts_reconciled(h) for h in hubs}
        mark = aof_mark(server.data_dir)
        await asyncio.sleep(self.config.redis_lost_s)
        fault = Fault(_now(), "redis-kill", "redis")
        self.faults.append(fault)
        os.kill(server.pid, signal.SIGKILL)
        server.stop()  # reaps it
        cut = cut_aof(mark)
        self.aof_cut.append(cut)
        self.log(f"killed redis; cut the last {cut} bytes of its append-only file")
        await asyncio.sleep(min(self.config.redis_down_s, 0.5))
        server.start()
        deadline = time.monotonic() + 30
        for h in hubs:
            while h.alive and time.monotonic() < deadline:
                if await _restarts_reconciled(h) > before[h.hub_id]:
                    break
                await asyncio.sleep(0.02)
        fault.back_at = _now()
        self.redis_kill_samples.append(fault.back_at - fault.at)
        self.log(f"every hub reconciled {fault.back_at - fault.at:.2f} s after the kill")

    async def _kill_master(self, at: float) -> None:
        """SIGKILL the master of the cell's slot under load; wait for the hubs to follow.

        Its replica is promoted after ``cluster-node-timeout`` (asynchronous
        replication: the last writes may be lost). The failover time is from
        the kill until every live hub is ready on the new master and has
        reconciled (its ``hub_redis_reconciled_total`` of restarts went up).
        The killed node then starts again on its directory: it rejoins as a
        replica of the new master.
        """
        cluster = self.cluster
        assert cluster is not None
        slot = cell_slot(self.cell)
        hubs = [h for h in self.hubs if h.alive]
        before = {h.hub_id: await _restarts_reconciled(h) for h in hubs}
        master = await asyncio.to_thread(cluster.master_of, slot)
        fault = Fault(_now(), "master-kill", f"redis:{master.port}")
        self.faults.append(fault)
        master.kill()
        self.log(f"killed the cell's master (port {master.port})")
        promoted = await asyncio.to_thread(cluster.wait_owner_changed, slot, master.port, 60)
        fault.up_at = fault.at + promoted
        self.log(f"replica promoted {promoted:.2f} s after the kill")
        deadline = time.monotonic() + 30
        for h in hubs:
            while h.alive and time.monotonic() < deadline:
                if await _restarts_reconciled(h) > before[h.hub_id]:
                    break
                await asyncio.sleep(0.02)
        fault.back_at = _now()
        self.redis_kill_samples.append(fault.back_at - fault.at)
        self.log(f"every hub reconciled {fault.back_at - fault.at:.2f} s after the kill")
        if self.links is not None:
            await self.links.locate()
        await asyncio.sleep(self.config.redis_down_s)
        master.start()
        self.log(f"the old master (port {master.port}) is back as a replica")

    async def _chaos(self) -> None:
        begin = time.monotonic()
        actions = {
            "node": self._kill_node,
            "hub": self._kill_hub,
            "redis": self._restart_redis,
            "redis-kill": self._kill_redis,
            "master-kill": self._kill_master,
        }
        running: list[asyncio.Task[None]] = []
        for at, kind in self.schedule():
            delay = begin + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            running.append(self._spawn(actions[kind](at)))
        if running:
            await asyncio.gather(*running)

    # The run

    async def run(self) -> dict[str, Any]:
        c = self.config
        self._load_on = True
        self.load_started = _now()
        loops = [self._spawn(self._session_loop(i, s)) for i, s in enumerate(self.sessions)]
        self.log(f"load on for {c.duration_s:g} s (seed {self.seed})")
        chaos = self._spawn(self._chaos())
        await asyncio.sleep(c.duration_s)
        self._load_on = False
        self.log("load off; waiting for the last results")
        # Bounded: a submit ends by its result or by ResultTimeout.
        async with asyncio.timeout(c.job_timeout_ms / 1000 + c.result_grace_s + 30):
            await chaos
            await asyncio.gather(*loops)
        # Every process back and registered before the audit.
        for node in self.nodes:
            if node.alive:
                await node.wait_registered(30)
        report = await self._settle_and_audit()
        return report

    async def _settle_and_audit(self) -> dict[str, Any]:
        c = self.config
        assert self.redis is not None
        deadline = time.monotonic() + c.settle_s
        audit = Audit()
        real: dict[str, int] = {}
        # Bounded poll: the fleet is idle once Redis and every process agree.
        while True:
            real = {}
            for node in self.nodes:
                status = await node.status()
                if status is not None:
                    real[node.node_id] = int(status["running"])
            try:
                audit = await audit_redis(self.redis, self.keys, real_running=real)
            except (redis_errors.RedisError, OSError) as exc:
                audit = Audit(leaks=[f"redis unreachable: {exc}"])
            idle = all(v == 0 for v in real.values()) and all(
                v == 0 for v in audit.live_nodes.values()
            )
            if (idle and not audit.leaks and not audit.mismatches) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        stats = {k.decode(): int(v) for k, v in (await self.redis.hgetall(self.keys.stats)).items()}
        return await self._report(audit, real, stats)

    async def _check_jobs(self, jobs: Sequence[JobRecord], *, final: bool) -> JobChecks:
        """Check ended jobs against the ledger, Redis and the nodes' own records.

        Args:
            jobs: the records to check.
            final: whether these are the last records of the run; then every
                ``accepted`` without a result and every run on a node counts,
                not only those of ``jobs``.
        """
        assert self.redis is not None
        ledger = self.ledger
        checks = JobChecks()
        problems = checks.problems
        ids = {j.job_id for j in jobs if j.job_id}
        for job in jobs:
            checks.outcomes[job.outcome or "none"] += 1
            if job.outcome is None:
                problems.append(f"session {job.session} {job.text}: no outcome")
            elif job.outcome.startswith("lost:"):
                problems.append(
                    f"session {job.session} {job.text} ({job.ref}, job {job.job_id}): {job.outcome}"
                )
            elif job.outcome.startswith("failed:"):
                code = job.outcome.split(":", 1)[1]
                if code not in DOCUMENTED_FAILURES:
                    problems.append(f"job {job.job_id}: failed with undocumented {code!r}")
            elif job.outcome.startswith("refused:"):
                code = job.outcome.split(":", 1)[1]
                if code not in DOCUMENTED_REFUSALS:
                    problems.append(f"{job.text}: refused with unexpected {code!r}")
            elif job.outcome == "finished":
                expected: dict[str, Any] = {"text": job.text.upper()}
                if self.config.audio_bytes:
                    expected["audio_bytes"] = self.config.audio_bytes
                got = {k: (job.result or {}).get(k) for k in expected}
                if got != expected:
                    problems.append(f"job {job.job_id}: result {job.result!r} is not {expected!r}")
        # Exactly once to the application; once per connection on the wire.
        checks.app_duplicates = sum(
            n - 1 for j, n in ledger.app_results.items() if n > 1 and (final or j in ids)
        )
        checks.wire_duplicates = sum(
            n - 1 for k, n in ledger.wire_results.items() if n > 1 and (final or k[2] in ids)
        )
        if final:
            # Jobs the hub accepted but whose submit saw no result.
            answered = {j.job_id for j in jobs if j.outcome and j.outcome[:8] != "refused:"}
            for (index, ref), job_id in ledger.refs.items():
                if job_id not in answered:
                    problems.append(f"session {index} {ref}: job {job_id} accepted, no result")
        # Outcomes agree with Redis (job records live for job_ttl_ms).
        pipe = self.redis.pipeline(transaction=False)
        checked = [j for j in jobs if j.job_id and j.outcome and j.outcome[:8] != "refused:"]
        for job in checked:
            pipe.hmget(self.keys.job(job.job_id or ""), "status", "error")
        for job, (status, error) in zip(checked, await pipe.execute(), strict=True):
            if status is None:
                continue  # expired (a run longer than job_ttl_ms)
            redis_outcome = (
                "finished"
                if status == b"finished"
                else f"{status.decode()}:{(error or b'').decode()}"
            )
            if redis_outcome != job.outcome:
                problems.append(
                    f"job {job.job_id}: session saw {job.outcome}, Redis has {redis_outcome}"
                )
        # Why each failed job failed: its attempts in Redis, and where it ran.
        ran_on: dict[str, list[str]] = collections.defaultdict(list)
        for node in self.nodes:
            for job_id, attempt in node.starts:
                if final or job_id in ids:
                    ran_on[job_id].append(f"{node.node_id}@{attempt}")
        for job in jobs:
            if job.outcome and job.outcome.startswith("failed:") and job.job_id:
                hist = await self.redis.hget(self.keys.job(job.job_id), "hist")
                begin = job.submitted - self.load_started
                end = (job.ended or 0) - self.load_started
                checks.failed_jobs.append(
                    f"{job.job_id} {job.outcome}: dispatched {(hist or b'').decode().strip(',')}"
                    f", ran {','.join(sorted(ran_on[job.job_id])) or 'nowhere'}"
                    f", from {begin:.1f} s to {end:.1f} s of the load"
                )
        # A node never runs the same attempt twice.
        attempts_by_job: dict[str, set[tuple[str, int]]] = collections.defaultdict(set)
        for node in self.nodes:
            for (job_id, attempt), n in node.starts.items():
                if not (final or job_id in ids):
                    continue
                attempts_by_job[job_id].add((node.node_id, attempt))
                if n > 1:
                    checks.double_runs.append(
                        f"{node.node_id} ran {job_id} attempt {attempt} {n} times"
                    )
        checks.reruns = sum(1 for v in attempts_by_job.values() if len(v) > 1)
        return checks

    async def check_ended_jobs(self, before: float) -> int:
        """Check the jobs that ended before ``before`` now, and drop them from the ledger.

        A long run calls this every so often, so that the ledger, and the
        nodes' records of what they ran, stay bounded. The checks add up in
        :attr:`checked`; the final report includes them. A duplicate result
        for a dropped job would no longer be seen, so ``before`` should leave
        results time to arrive (tens of seconds).

        Args:
            before: Unix time; jobs that ended earlier are checked.

        Returns:
            How many jobs were checked.
        """
        ledger = self.ledger
        done = [j for j in ledger.jobs if j.ended is not None and j.ended < before]
        if not done:
            return 0
        self.checked.merge(await self._check_jobs(done, final=False))
        ids = {j.job_id for j in done if j.job_id}
        ledger.forget(done, ids)
        for node in self.nodes:
            for key in [k for k in node.starts if k[0] in ids]:
                del node.starts[key]
        return len(done)

    async def _report(
        self, audit: Audit, real: dict[str, int], stats: dict[str, int]
    ) -> dict[str, Any]:
        checks = await self._check_jobs(self.ledger.jobs, final=True)
        checks.merge(self.checked)
        outcomes, problems = checks.outcomes, checks.problems
        app_duplicates, wire_duplicates = checks.app_duplicates, checks.wire_duplicates
        double_runs, reruns, failed_jobs = checks.double_runs, checks.reruns, checks.failed_jobs
        failovers = self._failovers()
        leaks = len(audit.leaks)
        clean = not (
            problems
            or app_duplicates
            or wire_duplicates
            or double_runs
            or leaks
            or audit.mismatches
        )
        report = {
            "seed": self.seed,
            "cell": self.cell,
            "submitted": sum(outcomes.values()),
            "outcomes": dict(sorted(outcomes.items())),
            "finished": outcomes.get("finished", 0),
            "failed": {k[7:]: v for k, v in outcomes.items() if k.startswith("failed:")},
            "refused": {k[8:]: v for k, v in outcomes.items() if k.startswith("refused:")},
            "redispatched": stats.get("redispatched", 0),
            "nodes_lost": stats.get("nodes_lost", 0),
            "jobs_run_on_several_attempts": reruns,
            "duplicates": app_duplicates,
            "wire_duplicates_within_a_connection": wire_duplicates,
            "double_runs": len(double_runs),
            "leaks": leaks,
            "mismatches": len(audit.mismatches),
            "problems": len(problems),
            "faults": collections.Counter(f.kind for f in self.faults),
            "redis_aof_bytes_cut": self.aof_cut,
            "failover": failovers,
            "redis_keys": {
                "total": audit.keys,
                "persistent": dict(audit.persistent),
                "expiring": dict(audit.expiring),
            },
            "real_running": real,
            "stats": stats,
            "details": {
                "problems": problems[:20],
                "leaks": audit.leaks[:20],
                "mismatches": audit.mismatches[:20],
                "double_runs": double_runs[:20],
                "failed_jobs": failed_jobs[:20],
            },
            "clean": clean,
        }
        report["faults"] = dict(report["faults"])
        if self.out_dir is not None:
            (self.out_dir / "chaos.json").write_text(json.dumps(report, indent=2, default=str))
        return report

    def _failovers(self) -> dict[str, Any]:
        ledger = self.ledger
        node_samples: list[float] = []
        during_outage: list[float] = []
        node_kills_with_jobs = 0
        outages = [
            (f.at, f.back_at or f.at)
            for f in self.faults
            if f.kind in ("redis", "redis-kill", "master-kill")
        ]
        node_faults = [f for f in self.faults if f.kind == "node"]
        for fault in node_faults:
            # First job of the killed node that another node took (attempt >= 2),
            # before the same node's next kill (a long run kills each node often).
            until = min((f.at for f in node_faults if f.target == fault.target and f.at > fault.at),
                        default=float("inf"))  # fmt: skip
            first: float | None = None
            for events in ledger.accepted.values():
                for (_, prev_node, _), (t, _, attempt) in itertools.pairwise(events):
                    if prev_node == fault.target and attempt >= 2 and fault.at <= t < until:
                        first = t if first is None else min(first, t)
            if first is not None:
                node_kills_with_jobs += 1
                # With Redis down, node_lost waits for Redis (then the sweep): apart.
                if any(down - 1 <= fault.at <= up for down, up in outages):
                    during_outage.append(first - fault.at)
                else:
                    node_samples.append(first - fault.at)
        hub_nodes: list[float] = []
        hub_sessions: list[float] = []
        for fault in (f for f in self.faults if f.kind == "hub"):
            # Nodes on the dead hub at the kill: when each registered elsewhere.
            last_hub: dict[str, str] = {}
            for t, node_id, hub_id in sorted(self.reg_events):
                if t < fault.at:
                    last_hub[node_id] = hub_id
            for node_id, hub_id in last_hub.items():
                if hub_id != fault.target:
                    continue
                # The same process reconnecting (a node killed meanwhile does not count).
                later = [t for t, n, _ in self.rereg_events if n == node_id and t >= fault.at]
                if later:
                    hub_nodes.append(min(later) - fault.at)
            # Sessions on the dead hub at the kill: when each resumed elsewhere.
            session_hub: dict[int, str | None] = {}
            for t, index, hub_id in sorted(self.resumes):
                if t < fault.at:
                    session_hub[index] = hub_id
            for index, hub_id in session_hub.items():
                if hub_id != fault.target:
                    continue
                later = [t for t, i, _ in self.resumes if i == index and t >= fault.at]
                if later:
                    hub_sessions.append(min(later) - fault.at)
        return {
            "node_kill_to_first_redispatch_s": _summary(node_samples),
            "node_kill_during_redis_outage_to_first_redispatch_s": _summary(during_outage),
            "node_kills": sum(1 for f in self.faults if f.kind == "node"),
            "node_kills_with_running_jobs": node_kills_with_jobs,
            "hub_kill_to_node_reregistered_s": _summary(hub_nodes),
            "hub_kill_to_session_resumed_s": _summary(hub_sessions),
            "redis_kill_to_hubs_reconciled_s": _summary(self.redis_kill_samples),
            "master_kill_to_replica_promoted_s": _summary(
                [f.up_at - f.at for f in self.faults if f.kind == "master-kill" and f.up_at]
            ),
            "redis_restart_to_hubs_ready_s": _summary(
                [
                    f.back_at - f.up_at
                    for f in self.faults
                    if f.kind == "redis" and f.back_at is not None and f.up_at is not None
                ]
            ),
        }


async def _live_workers(hub: HubProcess) -> dict[int, str]:
    """pid -> id of each worker of ``hub`` that runs and is ready in ``/v1/status``."""
    pids = set(hub.worker_pids())
    status, body = await http_get(hub.port, "/v1/status")
    if status != 200:
        return {}
    return {
        h["pid"]: h["hub_id"]
        for h in orjson.loads(body).get("hubs", [])
        if h["pid"] in pids and h["ready"]
    }


async def _restarts_reconciled(hub: HubProcess) -> int:
    """How many Redis restarts the hub reconciled (``/v1/status``); -1 when it does not answer."""
    status, body = await http_get(hub.port, "/v1/status")
    if status != 200:
        return -1
    counters = orjson.loads(body).get("hub_counters", {})
    return int(counters.get("hub_redis_reconciled_total{what=restarts}", 0))


def _summary(samples: list[float]) -> dict[str, Any] | None:
    if not samples:
        return None
    return {
        "n": len(samples),
        "p50": round(statistics.median(samples), 3),
        "max": round(max(samples), 3),
    }


async def run_chaos(config: ChaosConfig) -> dict[str, Any]:
    """Run the chaos scenario and return its report (``report["clean"]`` is the verdict)."""
    run = ChaosRun(config)
    try:
        await run.start()
        return await run.run()
    finally:
        await run.close()


def format_report(report: dict[str, Any]) -> str:
    """The tally and the failover times, for people."""
    f = report["failover"]

    def timing(value: dict[str, Any] | None) -> str:
        if not value:
            return "n/a"
        return (
            f"p50 {value['p50'] * 1000:.0f} ms, max {value['max'] * 1000:.0f} ms (n={value['n']})"
        )

    lines = [
        f"chaos run, seed {report['seed']}: {'CLEAN' if report['clean'] else 'NOT CLEAN'}",
        f"  faults:                {report['faults']}",
        f"  submitted:             {report['submitted']}",
        f"  finished:              {report['finished']}",
        f"  failed by code:        {report['failed'] or '{}'}",
        f"  refused by code:       {report['refused'] or '{}'}",
        f"  re-dispatched:         {report['redispatched']} (stats hash), "
        f"nodes lost: {report['nodes_lost']}, jobs run on several attempts: "
        f"{report['jobs_run_on_several_attempts']}",
        f"  duplicates:            {report['duplicates']} to the application, "
        f"{report['wire_duplicates_within_a_connection']} on one connection's wire, "
        f"{report['double_runs']} attempts run twice",
        f"  leaks:                 {report['leaks']} (keys: {report['redis_keys']['total']}, "
        f"persistent {report['redis_keys']['persistent']})",
        f"  running mismatches:    {report['mismatches']}",
        f"  ledger problems:       {report['problems']}",
        "  failover:",
        f"    node kill -> first re-dispatched job: "
        f"{timing(f['node_kill_to_first_redispatch_s'])} "
        f"({f['node_kills_with_running_jobs']} of {f['node_kills']} kills hit running jobs)",
        f"    node kill while redis was down -> first re-dispatched job: "
        f"{timing(f['node_kill_during_redis_outage_to_first_redispatch_s'])}",
        f"    hub kill -> its nodes registered on another hub: "
        f"{timing(f['hub_kill_to_node_reregistered_s'])}",
        f"    hub kill -> its sessions resumed on another hub: "
        f"{timing(f['hub_kill_to_session_resumed_s'])}",
        f"    redis (or cluster master) SIGKILL -> every hub ready and reconciled: "
        f"{timing(f['redis_kill_to_hubs_reconciled_s'])}",
        f"    redis back -> every hub ready: {timing(f['redis_restart_to_hubs_ready_s'])}",
        f"    cluster master SIGKILL -> replica promoted: "
        f"{timing(f['master_kill_to_replica_promoted_s'])}",
    ]
    details = report["details"]
    for name in ("problems", "leaks", "mismatches", "double_runs", "failed_jobs"):
        for item in details[name]:
            lines.append(f"  ! {name}: {item}")
    return "\n".join(lines)


# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.chaos",
        description="Kill nodes, hubs and Redis under steady load; check the ledger.",
    )
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    p.add_argument("--hubs", type=int, default=3, help="hub processes (default 3)")
    p.add_argument("--nodes", type=int, default=20, help="node processes (default 20)")
    p.add_argument("--sessions", type=int, default=50, help="sessions (default 50)")
    p.add_argument("--seed", type=int, default=None, help="seed of the fault schedule")
    p.add_argument("--max-jobs", type=int, default=4, help="slots per node (default 4)")
    p.add_argument(
        "--job-interval-s",
        type=float,
        default=1.0,
        help="mean pause of a session between jobs (default 1)",
    )
    p.add_argument("--node-kill-every-s", type=float, default=7.0, help="default 7")
    p.add_argument("--hub-kills", type=int, default=None, help="default: one per 40 s")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="workers per hub (hub serve --workers); above 1 a hub fault kills one worker",
    )
    p.add_argument("--no-redis-restart", action="store_true", help="no SIGTERM restart of Redis")
    p.add_argument(
        "--redis-kills",
        type=int,
        default=1,
        help="SIGKILLs of Redis losing its last second of writes (default 1)",
    )
    p.add_argument(
        "--redis-cluster",
        type=int,
        default=0,
        metavar="MASTERS",
        help="run the cell on a Redis Cluster of MASTERS masters, one replica each; "
        "--redis-kills then SIGKILL the cell's master (default 0: one Redis)",
    )
    p.add_argument("--out", type=Path, default=None, help="logs and chaos.json (default: temp)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["node-worker"]:
        return asyncio.run(_node_worker(json.loads(args[1])))
    ns = build_parser().parse_args(args)
    if ns.hubs < 2 and ns.workers < 2:
        print("chaos: error: --hubs must be at least 2 (one stays up)", file=sys.stderr)
        return 2
    config = ChaosConfig(
        duration_s=ns.duration,
        hubs=ns.hubs,
        nodes=ns.nodes,
        sessions=ns.sessions,
        seed=ns.seed,
        max_jobs=ns.max_jobs,
        job_interval_s=ns.job_interval_s,
        node_kill_every_s=ns.node_kill_every_s,
        hub_kills=ns.hub_kills,
        workers=ns.workers,
        redis_restart=not ns.no_redis_restart,
        redis_kills=ns.redis_kills,
        redis_cluster=ns.redis_cluster,
        out_dir=ns.out,
    )
    try:
        report = asyncio.run(run_chaos(config))
    except (RuntimeError, OSError) as exc:
        print(f"chaos: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if ns.json else format_report(report))
    return 0 if report["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
