"""The Scheduler and its batcher against a real Redis: concurrency, batching, NOSCRIPT recovery.

Each script is tested on its own in ``tests/lua/``. Here several hubs
(several :class:`Scheduler` instances, each with its own connections) run
the scripts at once, and the scheduling invariants must hold: a node
never runs more than ``max_jobs``, its ``running`` count matches its jobs,
every job ends exactly once, and every slot comes back.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hub.config import Settings
from hub.errors import ErrorCode, RedisUnavailable, SchedulingError, ScriptError
from hub.events import Accepted, Beat, CancelAttempt, Dispatch, Event, JobEnded, Queued
from hub.keys import Keys
from hub.node_scripts import pool_id
from hub.redisconn import client_from_url
from hub.scheduler import Scheduler
from loadtest.procs import RedisProcess
from tests.helpers import MS, wait_for

T0 = 1_000_000
SERVICES = ("asr", "nmt")

SETTINGS = Settings(
    queue_wait_ms=2_000,
    queue_max=10_000,
    job_timeout_ms=5_000,
    max_attempts=3,
    job_ttl_ms=600_000,
    node_lease_ms=10_000,
    sweep_batch=10_000,
    max_queued_per_session=1_000,
)


def client_for(url: str) -> Redis:
    """A client with no retries: a retried script could run twice."""
    return Redis.from_url(url, socket_timeout=5, retry=Retry(NoBackoff(), 0))


@pytest.fixture
async def hubs(redis_server: RedisProcess, keys: Keys) -> AsyncIterator[list[Scheduler]]:
    """Four hubs on one cell, each with its own client (its own connections)."""
    clients = [client_for(redis_server.url) for _ in range(4)]
    schedulers = [
        Scheduler(client, SETTINGS, hub_id=f"h{i}", keys=keys) for i, client in enumerate(clients)
    ]
    for scheduler in schedulers:
        await scheduler.load_scripts()
    try:
        yield schedulers
    finally:
        for scheduler in schedulers:
            await scheduler.close()
        for client in clients:
            await client.aclose()


def text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


# The fleet: what the hubs were told, and the checks against Redis.


class Fleet:
    """Ten nodes on four hubs, and a record of every event the scripts returned."""

    def __init__(self, hubs: list[Scheduler], redis: Redis, keys: Keys, seed: int):
        self.hubs = hubs
        self.redis = redis
        self.keys = keys
        self.rng = random.Random(seed)
        self.now = T0
        self.nodes: dict[str, dict[str, Any]] = {}
        self.created: set[str] = set()
        self.ends: collections.Counter[str] = collections.Counter()
        self.ended_as: dict[str, JobEnded] = {}
        self.completed: set[tuple[str, str, int]] = set()
        # What the hubs believe runs where: a hint that may be stale (replies
        # of different connections are read in any order), never an oracle.
        self.attempts: dict[str, tuple[str, int]] = {}
        self.max_running_seen = 0
        self.losses = 0

    def hub_of(self, node_id: str) -> Scheduler:
        return self.hubs[self.nodes[node_id]["hub"]]

    def tick(self, ms: int = 1) -> int:
        self.now += ms
        return self.now

    def record(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, Dispatch):
                self.attempts[event.job_id] = (event.node_id, event.attempt)
            elif isinstance(event, CancelAttempt):
                if self.attempts.get(event.job_id) == (event.node_id, event.attempt):
                    del self.attempts[event.job_id]
            elif isinstance(event, JobEnded):
                self.ends[event.job_id] += 1
                self.ended_as[event.job_id] = event
                self.attempts.pop(event.job_id, None)

    # Actions

    async def register(self, node_id: str, index: int, resume: tuple[str, ...] = ()) -> None:
        pairs = [("en", "fr")] + ([("de", "en")] if index % 2 == 0 else [])
        pools = ("default",) if index < 6 else ("premium",)
        spec = self.nodes.setdefault(
            node_id, {"hub": index % len(self.hubs), "max_jobs": 1 + index % 3}
        )
        spec.update(pairs=pairs, pools=pools)
        reg = await self.hub_of(node_id).register_node(
            node_id,
            services=SERVICES,
            lang_pairs=pairs,
            max_jobs=spec["max_jobs"],
            pools=pools,
            resume=resume,
            now_ms=self.tick(),
        )
        spec["epoch"] = reg.epoch
        spec["live"] = True
        self.record(reg.events)

    async def dispatch(self, session_id: str) -> None:
        src, tgt = self.rng.choice([("en", "fr"), ("en", "fr"), ("de", "en")])
        timeout_ms = self.rng.choice([5_000, 5_000, 5_000, 30])
        hub = self.rng.choice(self.hubs)
        try:
            reply = await hub.dispatch_task(
                session_id, src, tgt, b"{}", timeout_ms=timeout_ms, now_ms=self.tick()
            )
        except SchedulingError as exc:
            # Every node of the pair may be lost for a moment.
            assert exc.error_code is ErrorCode.EMPTY_POOL
            return
        self.created.add(reply.job_id)
        if isinstance(reply, Accepted):
            self.attempts[reply.job_id] = (reply.node_id, reply.attempt)

    async def complete(self, node_id: str) -> None:
        mine = [(j, a) for j, (n, a) in self.attempts.items() if n == node_id]
        if not mine:
            return
        job_id, attempt = self.rng.choice(mine)
        hub = self.hub_of(node_id)
        kind = self.rng.choice(["right", "right", "right", "twice", "stale", "wrong"])
        if kind == "stale":
            await self.expect_refusal(hub, job_id, node_id, attempt - 1)
            return
        if kind == "wrong":
            other = self.rng.choice([n for n in self.nodes if n != node_id])
            await self.expect_refusal(hub, job_id, other, attempt)
            return
        status = self.rng.choice(["finished", "failed"])
        try:
            done = await hub.complete_task(job_id, node_id, attempt, status, now_ms=self.tick())
        except SchedulingError as exc:
            # The hint was stale: the attempt was lost, cancelled or timed out.
            assert exc.error_code in (ErrorCode.STALE_ATTEMPT, ErrorCode.UNKNOWN_JOB)
            self.attempts.pop(job_id, None)
            return
        assert (job_id, node_id, attempt) not in self.completed, "completed twice"
        self.completed.add((job_id, node_id, attempt))
        self.record([done.ended, *done.events])
        if kind == "twice":
            await self.expect_refusal(hub, job_id, node_id, attempt)

    async def expect_refusal(self, hub: Scheduler, job_id: str, node_id: str, attempt: int) -> None:
        with pytest.raises(SchedulingError) as caught:
            await hub.complete_task(job_id, node_id, attempt, "finished", now_ms=self.tick())
        assert caught.value.error_code in (
            ErrorCode.STALE_ATTEMPT,
            ErrorCode.NODE_MISMATCH,
            ErrorCode.UNKNOWN_JOB,
        )

    async def lose(self, node_id: str) -> None:
        spec = self.nodes[node_id]
        if not spec["live"]:
            return
        events = await self.hub_of(node_id).node_lost(
            node_id, epoch=spec["epoch"], now_ms=self.tick()
        )
        spec["live"] = False
        self.losses += 1
        self.record(events)

    async def heartbeat_all(self) -> None:
        for hub_index, hub in enumerate(self.hubs):
            beats = [
                Beat(n, s["epoch"])
                for n, s in self.nodes.items()
                if s["live"] and s["hub"] == hub_index
            ]
            codes = await hub.heartbeat(beats, now_ms=self.now)
            assert set(codes) <= {1}, codes
            self.record(codes.events)

    async def sweep(self, hub: Scheduler) -> None:
        report = await hub.sweep(now_ms=self.now, lease_ms=0)
        self.record(report.events)

    # Checks against Redis

    async def sample_running(self) -> None:
        """Each node's running count, read atomically per node, is within bounds."""
        for node_id in list(self.nodes):
            running, max_jobs = await self.redis.hmget(
                self.keys.node(node_id), "running", "max_jobs"
            )
            if running is None:
                continue
            assert 0 <= int(running) <= int(max_jobs), (node_id, running, max_jobs)
            self.max_running_seen = max(self.max_running_seen, int(running))

    async def check_consistent(self) -> None:
        """At rest: Redis agrees with itself, and with the events the hubs got."""
        k = self.keys
        jobs: dict[str, dict[bytes, bytes]] = {}
        for job_id in self.created:
            jobs[job_id] = await self.redis.hgetall(k.job(job_id))
            assert jobs[job_id], f"record of {job_id} vanished"
        running_on: dict[str, set[str]] = collections.defaultdict(set)
        queued_in: collections.Counter[str] = collections.Counter()
        for job_id, job in jobs.items():
            status = job[b"status"].decode()
            if status == "running":
                running_on[job[b"node"].decode()].add(job_id)
            elif status == "queued":
                queued_in[f"{job[b'src'].decode()}:{job[b'tgt'].decode()}"] += 1
            assert (status in ("finished", "failed")) == (self.ends[job_id] == 1), (
                job_id,
                status,
                self.ends[job_id],
            )
            assert self.ends[job_id] <= 1, f"{job_id} ended {self.ends[job_id]} times"
            if self.ends[job_id]:
                ended = self.ended_as[job_id]
                assert (ended.status, ended.error or "") == (status, text(job[b"error"]))
                assert b"payload" not in job
        pools: set[str] = set()
        live_for: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
        for node_id, spec in self.nodes.items():
            node = await self.redis.hgetall(k.node(node_id))
            state = text(node.get(b"state"))
            for pair in spec["pairs"]:
                if state == "live":
                    live_for[(pair[0], pair[1])].add(node_id)
                else:
                    live_for.setdefault((pair[0], pair[1]), set())
            node_pools = [pool_id(p, SERVICES, spec["pairs"]) for p in spec["pools"]]
            pools.update(node_pools)
            members = {m.decode() for m in await self.redis.smembers(k.node_jobs(node_id))}
            if state == "lost" or not spec["live"]:
                assert state == "lost"
                assert running_on[node_id] == set()
                assert members == set()
                continue
            running = int(node[b"running"])
            max_jobs = int(node[b"max_jobs"])
            assert running == len(running_on[node_id]) <= max_jobs, node_id
            assert members == running_on[node_id], node_id
            for pool in node_pools:
                score = await self.redis.zscore(k.free(pool), node_id)
                if state == "live" and running < max_jobs:
                    # The load level (in 2**20ths) times 2**31 plus a tie-break below 2**31.
                    assert score is not None, node_id
                    assert int(score) // 2**31 == running * 2**20 // max_jobs, node_id
                else:
                    assert score is None, node_id
        for (src, tgt), live in live_for.items():
            members = {m.decode() for m in await self.redis.smembers(k.live(src, tgt))}
            assert members == live, (src, tgt)
        depths = {p.decode(): int(d) for p, d in (await self.redis.hgetall(k.queue_depth)).items()}
        assert depths == {pair: n for pair, n in queued_in.items() if n}
        for pool in pools:
            for node_id in await self.redis.zrange(k.free(pool), 0, -1):
                assert self.nodes[node_id.decode()]["live"]


async def test_concurrent_hubs_keep_every_invariant(hubs, redis, keys):
    await exercise_fleet(hubs, redis, keys, seed=20240607)


async def exercise_fleet(hubs: list[Scheduler], redis: Redis, keys: Keys, *, seed: int) -> None:
    """Four hubs' sessions, nodes, losses and sweeps on one cell; every invariant checked.

    Also run on each cell of a Redis Cluster (``tests/test_cluster.py``).
    """
    fleet = Fleet(hubs, redis, keys, seed=seed)
    node_ids = [f"n{i}" for i in range(10)]
    for index, node_id in enumerate(node_ids):
        await fleet.register(node_id, index)
    stop = asyncio.Event()

    async def session(number: int) -> None:
        for _ in range(6):
            await fleet.dispatch(f"s{number}")
            await asyncio.sleep(0)

    async def node(node_id: str) -> None:
        while not stop.is_set():
            await fleet.complete(node_id)
            await asyncio.sleep(0)

    async def chaos() -> None:
        step = 0
        while not stop.is_set():
            step += 1
            fleet.tick(10)
            await fleet.heartbeat_all()
            await fleet.sweep(fleet.rng.choice(hubs))
            if step % 3 == 0:
                victim = fleet.rng.choice(node_ids)
                await fleet.lose(victim)
                await fleet.register(victim, node_ids.index(victim))
            elif step % 5 == 0:
                # A reconnection that keeps half of its jobs.
                victim = fleet.rng.choice(node_ids)
                mine = sorted(j for j, (n, _) in fleet.attempts.items() if n == victim)
                await fleet.register(victim, node_ids.index(victim), resume=tuple(mine[::2]))
            await asyncio.sleep(0)

    async def monitor() -> None:
        while not stop.is_set():
            await fleet.sample_running()
            await asyncio.sleep(0)

    workers = [asyncio.create_task(node(n)) for n in node_ids]
    workers += [asyncio.create_task(chaos()), asyncio.create_task(monitor())]
    try:
        await asyncio.gather(*(session(i) for i in range(50)))
        # Let the nodes work through the queue (the sweep ends what they miss).
        for _ in range(5_000):
            if len(fleet.ends) == len(fleet.created):
                break
            await asyncio.sleep(0)
    finally:
        stop.set()
        await asyncio.gather(*workers)

    assert len(fleet.created) > 200
    # The run did what it says: real load, and nodes lost under it.
    assert fleet.max_running_seen >= 2
    assert fleet.losses >= 1
    await fleet.check_consistent()

    # Settle everything: nodes stay alive, every job runs out of time.
    fleet.tick(3_600_000)
    await fleet.heartbeat_all()
    for _ in range(3):
        await fleet.sweep(hubs[0])
    await fleet.check_consistent()

    assert set(fleet.ends) == fleet.created
    assert set(fleet.ends.values()) == {1}, "a job ended more than once"
    for node_id, spec in fleet.nodes.items():
        if spec["live"]:
            node = await redis.hgetall(keys.node(node_id))
            assert node[b"running"] == b"0", f"{node_id} leaked a slot"
    # Many concurrent calls travelled together.
    assert sum(h.batches for h in hubs) < sum(h.calls for h in hubs)
    # Each hub counted what its replies reported: every job ended once in the cell's counters.
    for hub in hubs:
        await hub.flush_stats()
    counters = {k.decode(): int(v) for k, v in (await redis.hgetall(keys.stats)).items()}
    assert counters["finished"] + counters["failed"] == len(fleet.created)
    assert counters["registrations"] >= len(fleet.nodes)


# The cell's counters


async def counters(redis: Redis, keys: Keys) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await redis.hgetall(keys.stats)).items()}


async def test_counts_reach_the_stats_hash_in_the_background(redis, keys):
    scheduler = Scheduler(redis, SETTINGS, hub_id="h1", keys=keys, stats_interval_s=0.2)
    await scheduler.load_scripts()
    await scheduler.register_node(
        "n1", services=SERVICES, lang_pairs=[("en", "fr")], max_jobs=1, now_ms=T0
    )
    # After a quiet spell, at once.
    await wait_for(lambda: _has(redis, keys, "registrations"), timeout=100 * MS)
    accepted = await scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=T0)
    assert isinstance(accepted, Accepted)
    await scheduler.dispatch_task("s2", "en", "fr", b"{}", now_ms=T0)  # queued
    await scheduler.complete_task(
        accepted.job_id, "n1", 1, "failed", error="MODEL_ERROR", now_ms=T0 + 1
    )  # the queued job starts
    # Then at most every stats_interval_s: not yet...
    assert "dispatched" not in await counters(redis, keys)
    # ...but soon, all in one go.
    await wait_for(lambda: _has(redis, keys, "error:MODEL_ERROR"), timeout=2_000 * MS)
    assert await counters(redis, keys) == {
        "registrations": 1,
        "dispatched": 2,
        "queued": 1,
        "failed": 1,
        "error:MODEL_ERROR": 1,
    }
    await scheduler.close()


async def _has(redis: Redis, keys: Keys, name: str) -> bool:
    return bool(await redis.hexists(keys.stats, name))


async def test_counts_wait_while_redis_is_away_and_close_flushes_them(spawn_redis):
    server = spawn_redis()
    client = client_for(server.url)
    keys = Keys("away")
    scheduler = Scheduler(client, SETTINGS, hub_id="h1", keys=keys, stats_interval_s=3600)
    await scheduler.load_scripts()
    await scheduler.register_node(
        "n1", services=SERVICES, lang_pairs=[("en", "fr")], max_jobs=1, now_ms=T0
    )
    await scheduler.flush_stats()
    await scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=T0)
    server.stop()

    with pytest.raises(RedisUnavailable):
        await scheduler.flush_stats()

    server.start()  # empty: no persistence
    await scheduler.close()  # flushes what it still holds
    assert await counters(client, keys) == {"dispatched": 1}
    await client.aclose()


# Batching


async def test_concurrent_calls_share_pipelines(redis, keys):
    scheduler = Scheduler(redis, SETTINGS, hub_id="h1", keys=keys, max_batch=16)
    await scheduler.load_scripts()
    await scheduler.register_node(
        "n1", services=SERVICES, lang_pairs=[("en", "fr")], max_jobs=200, now_ms=T0
    )
    batches, calls = scheduler.batches, scheduler.calls

    replies = await asyncio.gather(
        *(scheduler.dispatch_task(f"s{i}", "en", "fr", b"{}", now_ms=T0) for i in range(100))
    )

    assert all(isinstance(r, Accepted) for r in replies)
    assert scheduler.calls - calls == 100
    # At most max_batch calls per pipeline, and far fewer pipelines than calls.
    assert 100 / 16 <= scheduler.batches - batches < 100 / 4
    assert await redis.hget(keys.node("n1"), "running") == b"100"
    await scheduler.close()


async def test_calls_in_separate_loop_iterations_go_alone(redis, keys):
    scheduler = Scheduler(redis, SETTINGS, hub_id="h1", keys=keys)
    await scheduler.load_scripts()

    for _ in range(3):
        await scheduler.heartbeat([Beat("nobody", 1)], now_ms=T0)

    assert (scheduler.batches, scheduler.calls) == (3, 3)
    await scheduler.close()


# NOSCRIPT recovery


@pytest.fixture
async def own_redis(spawn_redis) -> AsyncIterator[Redis]:
    """A server of this test's own: SCRIPT FLUSH must not disturb other tests."""
    client = client_for(spawn_redis().url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_call_after_script_flush_reloads_the_scripts(own_redis, caplog):
    keys = Keys("noscript")
    scheduler = Scheduler(own_redis, SETTINGS, hub_id="h1", keys=keys)
    await scheduler.load_scripts()
    await scheduler.register_node(
        "n1", services=SERVICES, lang_pairs=[("en", "fr")], max_jobs=50, now_ms=T0
    )
    await own_redis.script_flush()
    assert await own_redis.script_exists(*scheduler.shas.values()) == [False] * len(scheduler.shas)

    with caplog.at_level(logging.WARNING, logger="hub.batcher"):
        replies = await asyncio.gather(
            *(scheduler.dispatch_task(f"s{i}", "en", "fr", b"{}", now_ms=T0) for i in range(20))
        )

    # Each call ran exactly once: 20 jobs, 20 slots taken.
    assert all(isinstance(r, Accepted) for r in replies)
    assert len({r.job_id for r in replies}) == 20
    assert await own_redis.hget(keys.node("n1"), "running") == b"20"
    assert all(await own_redis.script_exists(*scheduler.shas.values()))
    assert "scripts missing" in caplog.text
    # And the next call needs no reload.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hub.batcher"):
        queued_or_accepted = await scheduler.dispatch_task("s", "en", "fr", b"{}", now_ms=T0)
    assert isinstance(queued_or_accepted, Accepted | Queued)
    assert caplog.text == ""
    await scheduler.close()


async def test_call_after_a_restart_without_persistence_reloads_the_scripts(spawn_redis):
    server = spawn_redis()
    client = client_for(server.url)
    try:
        scheduler = Scheduler(client, SETTINGS, hub_id="h1", keys=Keys("restart"))
        await scheduler.load_scripts()
        await asyncio.to_thread(server.restart)
        # The restart closed the connections; the first call may see that.
        await client.connection_pool.disconnect()

        reg = await scheduler.register_node(
            "n1", services=SERVICES, lang_pairs=[("en", "fr")], max_jobs=1, now_ms=T0
        )

        assert reg.epoch == 1
        await scheduler.close()
    finally:
        await client.aclose()


# The pipeline on the wire (Scheduler._execute)


async def test_error_reply_fails_only_its_call(redis, keys, caplog):
    scheduler = Scheduler(redis, SETTINGS, hub_id="h1", keys=keys)
    await scheduler.load_scripts()
    await scheduler.register_node(
        "n1", services=SERVICES, lang_pairs=[("en", "fr")], max_jobs=2, now_ms=T0
    )
    # A key of the wrong type: drain_node.lua fails with a WRONGTYPE error reply.
    await redis.set(keys.node("broken"), "not a hash")
    batches = scheduler.batches

    with caplog.at_level(logging.ERROR, logger="hub.batcher"):
        drained, dispatched, beat = await asyncio.gather(
            scheduler.drain_node("broken", epoch=1),
            scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=T0),
            scheduler.heartbeat([Beat("n1", 1)], now_ms=T0),
            return_exceptions=True,
        )

    assert scheduler.batches == batches + 1
    assert isinstance(drained, ScriptError)
    assert "WRONGTYPE" in str(drained)
    assert isinstance(dispatched, Accepted)
    assert beat == [1]
    assert "drain_node.lua failed" in caplog.text
    await scheduler.close()


@pytest.mark.parametrize("make_client", [Redis.from_url, client_from_url])
async def test_reply_timeout_fails_the_batch_and_never_reuses_its_socket(
    spawn_redis: Callable[..., RedisProcess], make_client: Callable[..., Redis]
):
    server = spawn_redis()
    client = make_client(server.url, socket_timeout=200 * MS, retry=Retry(NoBackoff(), 0))
    scheduler = Scheduler(client, SETTINGS, hub_id="h1", keys=Keys("timeout"))
    try:
        await scheduler.load_scripts()
        server.freeze()
        try:
            with pytest.raises(RedisUnavailable):
                await scheduler.register_node(
                    "n1", services=SERVICES, lang_pairs=[("en", "fr")], max_jobs=1, now_ms=T0
                )
        finally:
            server.thaw()
        # The socket was closed: register_node's late reply is never read as
        # the reply to another call. (The script did run once SIGCONT came.)
        assert not any(c.is_connected for c in client.connection_pool._available_connections)
        assert await wait_for(lambda: client.exists(scheduler.keys.node("n1")))
        assert await scheduler.heartbeat([Beat("n1", 1)], now_ms=T0) == [1]
    finally:
        await scheduler.close()
        await client.aclose()


async def test_kept_connection_reconnects_after_a_restart(spawn_redis):
    server = spawn_redis()
    client = client_from_url(server.url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    scheduler = Scheduler(client, SETTINGS, hub_id="h1", keys=Keys("kept"))
    try:
        await scheduler.load_scripts()
        assert await scheduler.heartbeat([Beat("nobody", 1)], now_ms=T0) == [-8]
        # The restart closes the connection the scheduler kept for its next pipeline.
        await asyncio.to_thread(server.restart)

        assert await scheduler.heartbeat([Beat("nobody", 1)], now_ms=T0) == [-8]
    finally:
        await scheduler.close()
        await client.aclose()


async def test_close_gives_the_kept_connections_back_to_the_pool(redis, keys):
    scheduler = Scheduler(redis, SETTINGS, hub_id="h1", keys=keys)
    await scheduler.load_scripts()
    await asyncio.gather(*(scheduler.heartbeat([Beat(f"n{i}", 1)], now_ms=T0) for i in range(3)))
    pool = redis.connection_pool
    assert pool._in_use_connections

    await scheduler.close()

    assert not pool._in_use_connections
