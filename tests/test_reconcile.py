"""Reconciling after a Redis failure (hub/reconcile.py, protocol.md §8).

1. A ``job`` frame published to a node on another hub at the moment the bus
   fails is lost; once the bus subscribes again, the node's hub re-sends it
   and the job finishes once (it used to end ``JOB_TIMEOUT``).
2. A node never runs a repeated attempt twice, and a hub re-sends nothing
   its node's socket already carried.
3. Redis SIGKILLed under load and restarted from an append-only file
   without its last second: the hubs notice (``run_id``) and reconcile.

The publish is lost deterministically by revoking the channel permissions of
Redis's default user (``ACL SETUSER default resetchannels``): Redis drops the
hubs' subscriptions and refuses their publishes (NOPERM) while scripts run
as usual, until the permissions come back.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from hub.app import Hub
from hub.client import Backoff, Job, NodeClient, SessionClient
from hub.keys import Keys
from loadtest.chaos import ChaosConfig, format_report, run_chaos
from loadtest.procs import Processes, RedisProcess
from tests.helpers import MS, client_for, wait_for

MakeHub = Callable[..., Awaitable[Hub]]

PROCESS_HUB_SETTINGS: dict[str, Any] = {
    "heartbeat_interval_ms": 200,
    "sweep_interval_ms": 50,
    "node_lease_ms": 60_000,
    "session_rate_per_s": None,
    "shutdown_grace_s": 0.5,
    "redis_timeout_s": 1.0,
}
"""Settings of the ``hub serve`` processes (a long lease: no node is lost by accident)."""

FAST = Backoff(min_s=20 * MS, max_s=200 * MS)

LOST_JOB_TIMEOUT_MS = 6000
"""The budget of the job whose frame is lost: without the re-send it ends JOB_TIMEOUT then."""


@pytest.fixture
async def admin(
    spawn_redis: Callable[..., RedisProcess],
) -> AsyncIterator[tuple[RedisProcess, Redis]]:
    server = spawn_redis()
    client = client_for(server.url)
    try:
        yield server, client
    finally:
        await client.aclose()


async def job_ids(redis: Redis, keys: Keys) -> set[str]:
    prefix = keys.job("")
    return {k.decode()[len(prefix) :] async for k in redis.scan_iter(match=prefix + "*")}


# 1. A job frame lost on the bus


@pytest.mark.parametrize("audio", [None, bytes(range(256))], ids=["text", "audio"])
async def test_job_frame_lost_on_the_bus_is_sent_again_and_runs_once(
    admin: tuple[RedisProcess, Redis], processes: Processes, keys: Keys, audio: bytes | None
) -> None:
    server, redis = admin
    a = await processes.hub("hub-a", redis_url=server.url)
    b = await processes.hub("hub-b", redis_url=server.url)
    node = await processes.node("n1", [b.url], max_jobs=2, service_ms=(50, 50))
    async with SessionClient(a.url, backoff=FAST) as session:
        first = await session.submit("en", "fr", {"text": "warm"}, audio=audio)
        assert first.ok and first.node_id == "n1"

        # No channel: the bus of both hubs is down, A's publish to B fails.
        await redis.execute_command("ACL", "SETUSER", "default", "resetchannels")
        known = await job_ids(redis, keys)
        lost = asyncio.create_task(
            session.submit(
                "en", "fr", {"text": "lost"}, audio=audio, timeout_ms=LOST_JOB_TIMEOUT_MS
            )
        )
        await wait_for(
            lambda: _running(redis, keys, known), timeout=3000 * MS, what="the job dispatched"
        )
        (job_id,) = await job_ids(redis, keys) - known
        await asyncio.sleep(300 * MS)
        assert (job_id, 1) not in node.starts  # the frame was lost

        started = time.monotonic()
        await redis.execute_command("ACL", "SETUSER", "default", "allchannels")
        async with asyncio.timeout(LOST_JOB_TIMEOUT_MS / 1000 - 1):
            result = await lost
        assert time.monotonic() - started < 3.0
    # The node worker reports the length of an audio job's audio.
    echoed = {"audio_bytes": len(audio)} if audio else {}
    assert (result.status, result.result) == (
        "finished",
        {"text": "LOST", "node": "n1", "attempt": 1, **echoed},
    )
    assert node.starts == collections.Counter({(first.job_id, 1): 1, (job_id, 1): 1})
    status, hist = await redis.hmget(keys.job(job_id), "status", "hist")
    assert (status, hist) == (b"finished", b",n1@1,")
    assert int(await redis.hget(keys.node("n1"), "running") or 0) == 0


async def _running(redis: Redis, keys: Keys, known: set[str]) -> bool:
    new = await job_ids(redis, keys) - known
    return len(new) == 1 and await redis.hget(keys.job(new.pop()), "status") == b"running"


# 2. Repeats


async def test_node_ignores_a_repeated_attempt_and_the_hub_resends_nothing_carried(
    make_hub: MakeHub, keys: Keys, redis: Redis
) -> None:
    hub = await make_hub()
    runs: list[tuple[str, int]] = []
    release = asyncio.Event()

    async def handler(job: Job) -> dict[str, Any]:
        runs.append((job.job_id, job.attempt))
        await release.wait()
        return {"text": "done"}

    async with NodeClient(
        f"ws://127.0.0.1:{hub.port}", node_id="n1", languages=["en", "fr"], handler=handler,
        backoff=FAST,
    ) as node, SessionClient(f"ws://127.0.0.1:{hub.port}", backoff=FAST) as session:  # fmt: skip
        node.start()
        await node.wait_registered()
        submitted = asyncio.create_task(session.submit("en", "fr", {"text": "x"}))
        await wait_for(lambda: runs, timeout=2000 * MS, what="the job running")
        link = hub.registry.nodes["n1"]

        # The socket carried it: nothing is sent again.
        await hub.reconciler.reconcile()
        assert hub.reconciler.resent == 0

        # As if the frame had been lost: the hub sends it again, the node ignores it.
        link.jobs.clear()
        await hub.reconciler.reconcile()
        assert hub.reconciler.resent == 1
        await wait_for(lambda: node.repeats == 1, timeout=2000 * MS, what="the repeat seen")
        release.set()
        result = await asyncio.wait_for(submitted, 2000 * MS)
    assert result.ok and runs == [(result.job_id, 1)]
    assert int(await redis.hget(keys.node("n1"), "running") or 0) == 0


# 3. Redis SIGKILLed under load, its last second of writes lost


@pytest.mark.slow
async def test_redis_killed_under_load_without_its_last_second_leaves_a_clean_ledger(
    tmp_path: Path,
) -> None:
    # Two hub processes, six node processes and twelve sessions on an embedded
    # Redis (appendonly yes, appendfsync everysec). Under load Redis is
    # SIGKILLed and its append-only file cut back by the last second of writes
    # (what an operating system crash loses with everysec), then it starts
    # again on the same directory. The ledger (loadtest/chaos.py) checks every
    # invariant: one outcome per job in its session and in Redis, no duplicate,
    # no attempt run twice, every node's running equal to what its process
    # runs (zero at rest), no key or slot leaked.
    config = ChaosConfig(
        duration_s=16.0,
        hubs=2,
        nodes=6,
        sessions=12,
        seed=7,
        service_ms=(200.0, 600.0),
        job_interval_s=0.2,
        node_kill_every_s=0,
        hub_kills=0,
        redis_restart=False,
        redis_kills=1,
        settle_s=20.0,
        out_dir=tmp_path,
        quiet=True,
    )
    report = await run_chaos(config)
    text = format_report(report)
    print(text)
    assert report["clean"], text
    assert report["faults"] == {"redis-kill": 1}
    assert report["duplicates"] == report["leaks"] == report["mismatches"] == 0
    assert report["double_runs"] == report["wire_duplicates_within_a_connection"] == 0
    # Writes were lost, and every hub noticed and reconciled within seconds.
    assert report["redis_aof_bytes_cut"][0] > 0
    assert report["finished"] > 100
    failover = report["failover"]["redis_kill_to_hubs_reconciled_s"]
    assert failover is not None and failover["max"] < 10.0
    # Outcomes: finished, refused while Redis was away, or JOB_LOST for jobs
    # whose record went with the lost second.
    assert set(report["failed"]) <= {"JOB_LOST"}, report["failed"]
    assert set(report["refused"]) <= {"UNAVAILABLE"}, report["refused"]


async def test_job_redis_lost_in_a_restart_ends_job_lost_once_and_stops_on_its_node(
    make_hub: MakeHub, spawn_redis: Callable[..., RedisProcess], keys: Keys
) -> None:
    # Redis comes back without the dispatch of a running job (its record, its
    # place in the node's and the session's sets): as a restart that lost its
    # last writes leaves it, made exact here by deleting them before a restart.
    server = spawn_redis(appendonly=True)
    hub = await make_hub(redis_url=server.url, node_lease_ms=60_000)
    url = f"ws://127.0.0.1:{hub.port}"
    cancelled = asyncio.Event()

    async def handler(job: Job) -> dict[str, Any]:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    redis = client_for(server.url)
    try:
        async with (
            NodeClient(url, node_id="n1", languages=["en", "fr"], handler=handler, backoff=FAST)
            as node,
            SessionClient(url, backoff=FAST) as session,
        ):  # fmt: skip
            node.start()
            await node.wait_registered()
            submitted = asyncio.create_task(session.submit("en", "fr", {"text": "x"}))
            await wait_for(lambda: node.running == 1, timeout=2000 * MS, what="the job running")
            (job_id,) = hub.registry.nodes["n1"].jobs
            sid = (await redis.hget(keys.job(job_id), "session") or b"").decode()
            await redis.delete(keys.job(job_id))
            await redis.srem(keys.node_jobs("n1"), job_id)
            await redis.srem(keys.session_jobs(sid), job_id)
            await redis.hincrby(keys.node("n1"), "running", -1)
            await redis.zrem(keys.deadlines, job_id)

            await asyncio.to_thread(server.restart)
            result = await asyncio.wait_for(submitted, 5000 * MS)
            await asyncio.wait_for(cancelled.wait(), 2000 * MS)
            assert hub.reconciler.restarts == 1 and hub.reconciler.lost == 1
            assert node.connections == 1  # its registration survived: no reconnection
        assert (result.status, result.error) == ("failed", "JOB_LOST")
        await redis.aclose()
        redis = client_for(server.url)
        status, error = await redis.hmget(keys.job(job_id), "status", "error")
        assert (status, error) == (b"failed", b"JOB_LOST")
    finally:
        await redis.aclose()
