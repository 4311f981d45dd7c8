"""Partitions, as opposed to process deaths (issue 12, section 7).

Every link goes through :class:`tests.netproxy.NetProxy`, which can hold
a link's traffic (a partition: no FIN, no RST; what was sent arrives when it
heals, as TCP retransmits it), drop it, or delay it. The cases:

1. one hub cut from Redis while another hub still reaches it;
2. a node half-open to its hub;
3. a session half-open to its hub, or slowed down.

Each case ends as protocol.md §8 documents: ``/readyz``, re-dispatch after
the lease, session resume; nothing runs twice that did not have to, every
job ends once, no slot leaks, and the time from the fault to the recovery is
within the documented window (plus a margin for a busy two-core machine:
:data:`MARGIN_S`). Hubs run in this process, with short heartbeats, leases
and timeouts, so each case takes a few seconds.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import connect as ws_connect

from hub.app import Hub
from hub.client import Backoff, Job, NodeClient, SessionClient
from hub.keys import Keys
from loadtest.procs import RedisProcess
from tests.helpers import MS, wait_for
from tests.hubtools import (
    Connect,
    attempts,
    check_invariants,
    collect_results,
    expect,
    expect_silence,
    http_get,
    job_record,
    node_hash,
    open_session,
    register,
    result,
    submit,
)
from tests.netproxy import NetProxy

MakeHub = Callable[..., Awaitable[Hub]]

HEARTBEAT_MS = 100
LEASE_MS = 800
SWEEP_MS = 50
REDIS_TIMEOUT_S = 0.5
"""``redis_timeout_s`` of the hubs: one Redis command, and one ping of the Redis watch."""

HUB_SETTINGS: dict[str, Any] = {
    "heartbeat_interval_ms": HEARTBEAT_MS,
    "node_lease_ms": LEASE_MS,
    "sweep_interval_ms": SWEEP_MS,
    "redis_timeout_s": REDIS_TIMEOUT_S,
    "redis_reply_timeout_s": 1.0,
}

MARGIN_S = 1500 * MS
"""Added to each documented window: a busy two-core machine runs the test, the
hubs, Redis and the proxy."""

FAST = Backoff(min_s=20 * MS, max_s=200 * MS)

CLOSE_TIMEOUT_S = 2.0
"""The hub's (and the SDK's) WebSocket close timeout: a close nobody answers
ends with the socket dropped after it."""


class Worker:
    """A node handler: sleeps ``payload["ms"]`` (unless ``fast``) and records
    each (job, attempt) it runs and finishes."""

    def __init__(self, *, fast: bool = False) -> None:
        self.fast = fast
        self.runs: list[tuple[str, int]] = []
        self.finished: list[tuple[str, int]] = []

    async def __call__(self, job: Job) -> dict[str, Any]:
        self.runs.append((job.job_id, job.attempt))
        await asyncio.sleep(0 if self.fast else job.payload.get("ms", 0) / 1000)
        self.finished.append((job.job_id, job.attempt))
        return {"text": job.payload.get("text", ""), "attempt": job.attempt}


def node_client(port: int, node_id: str, worker: Worker, **kwargs: Any) -> NodeClient:
    kwargs.setdefault("languages", ["en", "fr"])
    kwargs.setdefault("max_jobs", 2)
    return NodeClient(
        f"ws://127.0.0.1:{port}", node_id=node_id, handler=worker, backoff=FAST, **kwargs
    )


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[[int], Awaitable[NetProxy]]]:
    """Factory of started proxies to a port; each is closed at teardown."""
    started: list[NetProxy] = []

    async def make(port: int) -> NetProxy:
        proxy = NetProxy(port)
        await proxy.start()
        started.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in reversed(started):
            await proxy.close()


Proxies = Callable[[int], Awaitable[NetProxy]]


# 1. One hub cut from Redis while another hub still reaches it

READY_WINDOW_S = 0.5 + 3 * REDIS_TIMEOUT_S
"""protocol.md §8: a hub whose Redis goes silent answers ``/readyz`` 503 within
one watch interval (0.5 s) and three ``redis_timeout_s`` pings."""


BUS_SILENCE_WINDOW_S = 1.0 + HUB_SETTINGS["redis_reply_timeout_s"] + 1.0
"""protocol.md §8: a subscription that hears nothing for a second pings, and is
replaced when nothing answers within ``redis_reply_timeout_s`` (checked once a second)."""


async def readyz(hub: Hub) -> int:
    return (await http_get(hub.port, "/readyz", within=1000 * MS))[0]


async def wait_readyz(hub: Hub, status: int, within: float) -> float:
    """Poll ``/readyz`` until it answers ``status``; return how long that took."""
    started = time.monotonic()
    await wait_for(
        lambda: _is(readyz(hub), status),
        timeout=within,
        interval=25 * MS,
        what=f"/readyz {status}",
    )
    return time.monotonic() - started


async def _is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected


HubBehindProxy = Callable[..., Awaitable[tuple[Hub, NetProxy]]]


@pytest.fixture
def hub_behind_proxy(
    make_hub: MakeHub, proxies: Proxies, redis_server: RedisProcess
) -> HubBehindProxy:
    """Factory: ``hub, redis_proxy = await hub_behind_proxy(**settings)``: a hub
    whose every Redis connection (commands and subscription) goes through a proxy."""

    async def make(**settings: Any) -> tuple[Hub, NetProxy]:
        proxy = await proxies(redis_server.port)
        return await make_hub(redis_url=f"redis://{proxy.url_host}/0", **settings), proxy

    return make


@pytest.mark.parametrize("gap", ["longer-than-the-lease", "shorter-than-the-lease"])
async def test_hub_cut_from_redis_refuses_work_and_everything_converges_when_healed(
    make_hub: MakeHub,
    hub_behind_proxy: HubBehindProxy,
    connect: Connect,
    redis: Redis,
    keys: Keys,
    gap: str,
) -> None:
    longer = gap == "longer-than-the-lease"
    lease_ms = LEASE_MS if longer else 6000
    settings = HUB_SETTINGS | {"node_lease_ms": lease_ms}
    cut, redis_proxy = await hub_behind_proxy(hub_id="hub-cut", **settings)
    well = await make_hub(hub_id="hub-well", **settings)
    cut_worker, well_worker = Worker(), Worker(fast=True)
    async with (
        node_client(cut.port, "n-cut", cut_worker) as n_cut,
        node_client(well.port, "n-well", well_worker) as n_well,
    ):
        n_cut.start()
        await n_cut.wait_registered()
        session = await open_session(connect, well)
        local = await open_session(connect, cut)
        # x ends during the partition (its result is held by the cut hub);
        # y runs past it on n-cut unless the lease gives it to n-well.
        await submit(session, "x", payload={"text": "x", "ms": 300}, timeout_ms=30_000)
        await submit(session, "y", payload={"text": "y", "ms": 60_000}, timeout_ms=30_000)
        firsts = [await expect(session, "accepted", node_id="n-cut", attempt=1) for _ in "xy"]
        job_ids = {f["ref"]: f["job_id"] for f in firsts}
        await wait_for(lambda: len(cut_worker.runs) == 2, timeout=3000 * MS, what="running")
        n_well.start()
        await n_well.wait_registered()

        fault_at = time.monotonic()
        redis_proxy.blackhole()
        unready_s = await wait_readyz(cut, 503, READY_WINDOW_S + MARGIN_S)
        assert (await readyz(well)) == 200
        # The cut hub refuses new jobs at once, with a code that says so.
        started = time.monotonic()
        await submit(local, "z", payload={"text": "z"})
        await expect(local, "error", ref="z", code="UNAVAILABLE", within=1000 * MS)
        assert time.monotonic() - started < 1000 * MS
        await wait_for(lambda: cut_worker.finished, timeout=3000 * MS, what="x done on n-cut")
        if longer:
            # The healthy hub's sweep finds n-cut's lease expired: both jobs
            # run again on n-well, and the session (on the healthy hub) gets them.
            frames = await collect_results(session, {"x", "y"}, within=lease_ms * MS + 5.0)
            redispatched_s = time.monotonic() - fault_at
            assert redispatched_s <= (lease_ms + SWEEP_MS) / 1000 + MARGIN_S
            for ref in "xy":
                assert attempts(frames[ref]) == [("n-well", 2)]
                assert frames[ref][-1]["result"] == {"text": ref, "attempt": 2}
        else:
            await asyncio.sleep(max(0.0, fault_at + 2.5 - time.monotonic()))
            await expect_silence(session, 10 * MS)
        # x's result waits in the cut hub, which tries again with backoff.
        assert cut.metrics.results_held._value.get() > 0

        healed_at = time.monotonic()
        redis_proxy.heal()
        ready_s = await wait_readyz(cut, 200, 0.5 + REDIS_TIMEOUT_S + MARGIN_S)
        if longer:
            # n-cut is told 4004 and registers again; y, no longer its own, is dropped.
            await wait_for(
                lambda: n_cut.connections == 2 and n_cut.registered,
                timeout=2000 * MS + MARGIN_S,
                what="n-cut registered again",
            )
            await wait_for(lambda: n_cut.running == 0, timeout=2000 * MS, what="y dropped")
        else:
            # Held, then recorded: x ends once, from its only attempt.
            frames = await collect_results(session, {"x"}, within=3000 * MS)
            assert attempts(frames["x"]) == []
            assert frames["x"][-1]["result"] == {"text": "x", "attempt": 1}
            assert n_cut.connections == 1
        converged_s = time.monotonic() - healed_at
        await expect_silence(session, 500 * MS)

        x = await job_record(redis, keys, job_ids["x"])
        stats = await redis.hgetall(keys.stats)
        if longer:
            # The held result of attempt 1 was refused (stale); nothing counted twice.
            assert (x["status"], x["node"], x["attempt"]) == ("finished", "n-well", "2")
            assert x["result"] == '{"text":"x","attempt":2}'
            assert int(stats[b"redispatched"]) == 2
            assert sorted(well_worker.runs) == sorted((job_ids[r], 2) for r in "xy")
        else:
            assert (x["status"], x["node"], x["attempt"]) == ("finished", "n-cut", "1")
            assert b"redispatched" not in stats
            assert well_worker.runs == []
            # y runs on, undisturbed, and ends normally.
            assert (await job_record(redis, keys, job_ids["y"]))["status"] == "running"
        await check_invariants(redis, keys, ["n-cut", "n-well"])
        print(
            f"\n{gap}: /readyz 503 after {unready_s:.2f} s, ready {ready_s:.2f} s "
            f"after healing, converged in {converged_s:.2f} s"
        )


async def test_subscription_left_half_open_by_a_partition_is_replaced(
    make_hub: MakeHub,
    hub_behind_proxy: HubBehindProxy,
    connect: Connect,
    redis: Redis,
    keys: Keys,
) -> None:
    # During a long partition Redis closes the hub's connections (its TCP
    # keepalive, a client timeout); the FINs are lost with the partition.
    # After it heals the hub's subscription, which only reads, would be
    # deaf for ever: every cross-hub frame to this hub lost.
    cut, redis_proxy = await hub_behind_proxy(**HUB_SETTINGS)
    well = await make_hub(**HUB_SETTINGS)
    async with node_client(well.port, "n-well", Worker()) as node:
        node.start()
        await node.wait_registered()
        session = await open_session(connect, cut)
        await submit(session, "before", payload={"text": "before"})
        await expect(session, "accepted", ref="before", node_id="n-well")
        await expect(session, "result", ref="before", status="finished")

        redis_proxy.blackhole(drop=True)
        for conn in redis_proxy.connections:
            conn.lose_target()
        await wait_readyz(cut, 503, READY_WINDOW_S + MARGIN_S)
        healed_at = time.monotonic()
        redis_proxy.heal()
        await wait_readyz(cut, 200, 0.5 + REDIS_TIMEOUT_S + MARGIN_S)
        # The node's result comes back over the cut hub's channel, or from
        # Redis once the hub subscribed again.
        await submit(session, "after", payload={"text": "after"})
        await expect(session, "accepted", ref="after", node_id="n-well")
        end = await expect(session, "result", ref="after", within=BUS_SILENCE_WINDOW_S + MARGIN_S)
        recovered_s = time.monotonic() - healed_at
        assert (end["status"], end["result"]) == ("finished", {"text": "after", "attempt": 1})
        assert recovered_s <= BUS_SILENCE_WINDOW_S + MARGIN_S
        assert cut.bus.subscriptions >= 2
        await expect_silence(session, 300 * MS)
        await check_invariants(redis, keys, ["n-well"])


async def test_idle_subscription_that_answers_its_pings_is_kept(make_hub: MakeHub) -> None:
    hub = await make_hub(**HUB_SETTINGS)
    await asyncio.sleep(3 * (hub.bus.ping_interval_s + hub.bus.ping_timeout_s))
    assert hub.bus.subscriptions == 1 and hub.bus.subscribed.is_set()


# 2. A node half-open to its hub: no FIN, no RST, nothing passes either way


@pytest.mark.parametrize("drop", [False, True], ids=["held", "dropped"])
async def test_half_open_node_is_lost_after_the_lease_and_its_late_result_is_stale(
    make_hub: MakeHub, connect: Connect, proxies: Proxies, redis: Redis, keys: Keys, drop: bool
) -> None:
    hub = await make_hub(**HUB_SETTINGS)
    proxy = await proxies(hub.port)
    # A WebSocket client through the proxy: it answers pings until the link dies.
    far = await ws_connect(f"ws://{proxy.url_host}/v1/node", ping_interval=None, close_timeout=0.5)
    try:
        await register(far, node_id="far", max_jobs=1)
        session = await open_session(connect, hub)
        await submit(session, "c-1", payload={"text": "hello"}, timeout_ms=20_000)
        accepted = await expect(session, "accepted", node_id="far", attempt=1)
        job = await expect(far, "job", job_id=accepted["job_id"])
        worker = Worker()
        async with node_client(hub.port, "backup", worker) as backup:
            backup.start()
            await backup.wait_registered()
            fault_at = time.monotonic()
            proxy.blackhole(drop=drop)
            frames = await collect_results(session, {"c-1"}, within=LEASE_MS * MS + 5.0)
            recovered_s = time.monotonic() - fault_at
            # protocol.md §8: re-dispatched between lease - heartbeat and
            # lease + sweep interval after the link went silent; on a loaded
            # machine the last ping may have gone out late, so its pong (where
            # the lease starts) may be older than one heartbeat.
            assert recovered_s >= (LEASE_MS - 3 * HEARTBEAT_MS) / 1000
            assert recovered_s <= (LEASE_MS + SWEEP_MS) / 1000 + MARGIN_S
            assert attempts(frames["c-1"]) == [("backup", 2)]
            end = frames["c-1"][-1]
            assert (end["status"], end["result"]) == (
                "finished",
                {"text": "hello", "attempt": 2},
            )
            assert worker.runs == [(job["job_id"], 2)]
            # The old node finishes attempt 1 meanwhile; its result goes into the hole.
            await result(far, job, result={"late": True})
            # The hub closed the silent connection with 4004; with nobody
            # answering, it drops the socket after its close timeout.
            await wait_for(
                lambda: "far" not in hub.registry.nodes,
                timeout=CLOSE_TIMEOUT_S + MARGIN_S,
                what="the hub to drop the half-open connection",
            )
            proxy.heal()
            # The old link learns it is dead when it sends again (the hub's
            # kernel answers with an RST), or from the held reset.
            await far.send('{"type": "load", "load": {}}')
            await wait_for(lambda: far.close_code is not None, timeout=2000 * MS, what="closed")
            # The node reconnects and names the job it ran: it is told to drop
            # it, and a late result of attempt 1 is refused.
            again = await connect(hub, "/v1/node")
            registered = await register(again, node_id="far", max_jobs=1, resume=[job["job_id"]])
            assert (registered["resumed"], registered["dropped"]) == ([], [job["job_id"]])
            await result(again, job, result={"late": True})
            await expect(again, "error", ref=job["job_id"], code="STALE_ATTEMPT")
            await expect_silence(session, 300 * MS)
            record = await job_record(redis, keys, job["job_id"])
            assert (record["status"], record["node"], record["attempt"]) == (
                "finished",
                "backup",
                "2",
            )
            assert record["result"] == '{"text":"hello","attempt":2}'
            stats = await redis.hgetall(keys.stats)
            assert int(stats.get(b"redispatched", 0)) == 1
            await check_invariants(redis, keys, ["far", "backup"])
            assert (await node_hash(redis, keys, "far"))["running"] == "0"
    finally:
        far.transport.abort()


# 3. A session half-open to its hub, or slowed down

PING_INTERVAL_S = 0.2
PING_TIMEOUT_S = 0.4


def session_client(proxy: NetProxy, **kwargs: Any) -> SessionClient:
    kwargs.setdefault("ping_interval_s", PING_INTERVAL_S)
    kwargs.setdefault("ping_timeout_s", PING_TIMEOUT_S)
    return SessionClient(f"ws://{proxy.url_host}", backoff=FAST, **kwargs)


@pytest.mark.parametrize("where", ["same-hub", "other-hub"])
async def test_half_open_session_reconnects_resumes_and_gets_each_result_once(
    make_hub: MakeHub, proxies: Proxies, redis: Redis, keys: Keys, where: str
) -> None:
    a = await make_hub(**HUB_SETTINGS)
    b = await make_hub(**HUB_SETTINGS) if where == "other-hub" else a
    proxy = await proxies(a.port)
    worker = Worker()
    async with node_client(a.port, "gpu-1", worker, max_jobs=8) as node:
        node.start()
        await node.wait_registered()
        async with session_client(proxy) as session:
            assert session.hub_id == a.hub_id

            async def job(text: str, ms: int) -> tuple[str, Any]:
                done = await session.submit("en", "fr", {"text": text, "ms": ms})
                return done.status, done.result

            # Four jobs running when the link dies; they end during the fault.
            before = [asyncio.create_task(job(f"before-{i}", 400)) for i in range(4)]
            await wait_for(lambda: len(worker.runs) == 4, timeout=3000 * MS, what="running")
            fault_at = time.monotonic()
            proxy.connections[0].blackhole()  # this connection only: new ones pass
            proxy.target = ("127.0.0.1", b.port)  # where a load balancer sends it next
            # Two more, sent into the dead link before the session notices.
            during = [asyncio.create_task(job(f"during-{i}", 0)) for i in range(2)]
            await wait_for(
                lambda: session.connections == 2,
                timeout=PING_INTERVAL_S + PING_TIMEOUT_S + CLOSE_TIMEOUT_S + MARGIN_S,
                interval=10 * MS,
                what="the session to reconnect",
            )
            reconnected_s = time.monotonic() - fault_at
            outcomes = await asyncio.wait_for(asyncio.gather(*before, *during), 10_000 * MS)
            recovered_s = time.monotonic() - fault_at
            assert session.hub_id == b.hub_id
            assert outcomes == [
                ("finished", {"text": f"before-{i}", "attempt": 1}) for i in range(4)
            ] + [("finished", {"text": f"during-{i}", "attempt": 1}) for i in range(2)]
            # Each job ran once: no job was submitted twice or re-dispatched.
            job_ids = [jid for jid, _ in worker.runs]
            assert len(job_ids) == len(set(job_ids)) == 6
            assert all(attempt == 1 for _, attempt in worker.runs)
            # The SDK's liveness: ping interval + ping timeout + close timeout.
            window_s = PING_INTERVAL_S + PING_TIMEOUT_S + CLOSE_TIMEOUT_S + FAST.max_s
            assert reconnected_s <= window_s + MARGIN_S
            assert recovered_s <= window_s + MARGIN_S
            session_id = session.session_id
            assert session_id is not None
            holder = await redis.hget(keys.session(session_id), "hub")
            assert holder == b.hub_id.encode()
            assert await redis.scard(keys.session_jobs(session_id)) == 0
        await check_invariants(redis, keys, ["gpu-1"])
        assert (await node_hash(redis, keys, "gpu-1"))["running"] == "0"


async def test_delayed_session_link_only_adds_latency(
    make_hub: MakeHub, proxies: Proxies, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(**HUB_SETTINGS)
    proxy = await proxies(hub.port)
    worker = Worker()
    delay_ms = 100  # each way; far below the ping timeout and every hub timeout

    async def latencies(session: SessionClient, n: int) -> list[float]:
        taken = []
        for i in range(n):
            started = time.monotonic()
            done = await session.submit("en", "fr", {"text": str(i)})
            taken.append(time.monotonic() - started)
            assert done.status == "finished"
        return taken

    async with node_client(hub.port, "gpu-1", worker) as node:
        node.start()
        await node.wait_registered()
        async with session_client(proxy, ping_timeout_s=1.0) as session:
            fast = await latencies(session, 5)
            proxy.delay(delay_ms)
            slow = await latencies(session, 5)
            proxy.heal()
            again = await latencies(session, 5)
            assert session.connections == 1
        await check_invariants(redis, keys, ["gpu-1"])
    # Every job through the slow link takes the delay both ways; the median
    # job on either side of it takes less (one may wait for a busy machine).
    assert statistics.median(fast) < 2 * delay_ms / 1000 <= min(slow)
    assert statistics.median(again) < 2 * delay_ms / 1000
    assert len(worker.runs) == len({jid for jid, _ in worker.runs}) == 15
