"""Reliability: kill anything, lose nothing.

Each test starts real processes (``python -m hub serve`` hubs and node
workers of :mod:`loadtest.procs`, killed with real signals) or real Redis
servers (stopped, killed, restarted), next to in-process hubs and clients
whose insides the test reads. Every wait is bounded and a multiple of
:data:`tests.helpers.MS`; every process a test starts is killed at teardown
(the ``processes`` fixture).

Faults, numbered as the sections below:

1. a node process SIGKILLed mid-job;
2. a node that stops answering pings but keeps its socket open;
3. a hub SIGKILLed while its nodes run jobs for sessions on another hub;
4. a hub SIGKILLed while its sessions have jobs in flight;
5. Redis restarted with its append-only file (and its script cache flushed);
6. Redis unreachable for 10 s while sessions keep submitting;
7. a session that never reads;
8. a node that never reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from hub.app import Hub
from hub.client import Backoff, Job, JobRefused, NodeClient, SessionClient
from hub.keys import Keys
from hub.protocol import Accepted, SessionResult, ToSessionFrame
from loadtest.procs import HubProcess, NodeProcess, Processes, RedisProcess, rss_kb
from tests.helpers import MS, wait_for
from tests.hubtools import (
    Connect,
    Frame,
    RawNode,
    attempts,
    check_invariants,
    collect_results,
    expect,
    expect_silence,
    http_get,
    job_record,
    node_hash,
    open_session,
    receive,
    register,
    result,
    submit,
    wait_running,
)

MakeHub = Callable[..., Awaitable[Hub]]

LEASE_MS = 600
"""Node lease of the hubs of these tests: three 200 ms heartbeats."""

PROCESS_HUB_SETTINGS: dict[str, Any] = {
    "heartbeat_interval_ms": 200,
    "sweep_interval_ms": 50,
    "session_rate_per_s": None,
    "shutdown_grace_s": 0.5,
    "redis_timeout_s": 1.0,
}
"""Settings of the ``hub serve`` processes of the ``processes`` fixture (the lease
is set per test)."""

FAST = Backoff(min_s=20 * MS, max_s=200 * MS)
"""Reconnection delays of in-process clients."""


def url_of(hub: Hub | HubProcess) -> str:
    return hub.url if isinstance(hub, HubProcess) else f"ws://127.0.0.1:{hub.port}"


NodeProcessOnHub = Callable[..., Awaitable[tuple[Hub, NodeProcess, ClientConnection]]]


@pytest.fixture
def node_process_on_hub(
    make_hub: MakeHub, processes: Processes, connect: Connect
) -> NodeProcessOnHub:
    """Factory: ``hub, node, session = await node_process_on_hub("n1", max_jobs=2)``.

    An in-process hub with 200 ms heartbeats and a :data:`LEASE_MS` lease, a
    node worker process registered with it and a session connected to it.
    """

    async def make(node_id: str, *, max_jobs: int) -> tuple[Hub, NodeProcess, ClientConnection]:
        hub = await make_hub(heartbeat_interval_ms=200, node_lease_ms=LEASE_MS)
        node = await processes.node(node_id, [url_of(hub)], max_jobs=max_jobs)
        return hub, node, await open_session(connect, hub)

    return make


class Recorder:
    """A job handler for in-process nodes: records each (job, attempt) it runs."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.runs: list[tuple[str, int]] = []

    async def __call__(self, job: Job) -> dict[str, Any]:
        self.runs.append((job.job_id, job.attempt))
        await asyncio.sleep(self.delay_s)
        return {"text": str(job.payload.get("text", "")).upper(), "attempt": job.attempt}


def node_client(hub: Hub | HubProcess, node_id: str, handler: Any, **kwargs: Any) -> NodeClient:
    kwargs.setdefault("languages", ["en", "fr"])
    kwargs.setdefault("backoff", FAST)
    return NodeClient(url_of(hub), node_id=node_id, handler=handler, **kwargs)


# 1. A node process killed with SIGKILL mid-job


async def test_killed_node_jobs_are_redispatched_to_another_node_at_once(
    node_process_on_hub: NodeProcessOnHub, redis: Redis, keys: Keys
) -> None:
    hub, doomed, session = await node_process_on_hub("doomed", max_jobs=2)
    refs = {"c-1", "c-2"}
    for ref in sorted(refs):
        await submit(session, ref, payload={"text": ref, "ms": 60_000})
    first = [await expect(session, "accepted", node_id="doomed", attempt=1) for _ in refs]
    job_ids = {f["ref"]: f["job_id"] for f in first}
    await wait_for(lambda: len(doomed.starts) == 2, timeout=5000 * MS, what="both jobs running")
    recorder = Recorder()
    async with node_client(hub, "backup", recorder, max_jobs=2) as backup:
        backup.start()
        await backup.wait_registered()
        killed_at = time.monotonic()
        doomed.kill()
        await doomed.wait()
        frames = await collect_results(session, refs)
        taken_s = time.monotonic() - killed_at
        await expect_silence(session, 300 * MS)
    # The socket closed with the process: the hub re-dispatched at once, not
    # after the lease, and each job ended once, finished by the backup.
    assert taken_s < LEASE_MS / 1000
    for ref, job_frames in frames.items():
        assert attempts(job_frames) == [("backup", 2)]
        end = job_frames[-1]
        assert (end["status"], end["result"]) == ("finished", {"text": ref.upper(), "attempt": 2})
    assert sorted(recorder.runs) == sorted((job_ids[r], 2) for r in refs)
    assert sorted(doomed.starts) == sorted((job_ids[r], 1) for r in refs)
    assert (await node_hash(redis, keys, "doomed"))["state"] == "lost"
    await check_invariants(redis, keys, ["backup"])


async def test_killed_node_jobs_fail_with_node_lost_when_no_node_can_take_them(
    node_process_on_hub: NodeProcessOnHub, redis: Redis, keys: Keys
) -> None:
    _, doomed, session = await node_process_on_hub("doomed", max_jobs=2)
    await submit(session, "c-1", payload={"text": "a", "ms": 60_000})
    await submit(session, "c-2", payload={"text": "b", "ms": 60_000}, timeout_ms=60_000)
    for _ in range(2):
        await expect(session, "accepted", node_id="doomed", attempt=1)
    await wait_for(lambda: len(doomed.starts) == 2, timeout=5000 * MS, what="both jobs running")
    doomed.kill()
    await doomed.wait()
    frames = await collect_results(session, {"c-1", "c-2"}, within=LEASE_MS * 2 * MS)
    await expect_silence(session, 300 * MS)
    for job_frames in frames.values():
        assert job_frames[-1]["status"] == "failed"
        assert job_frames[-1]["error"] == "NODE_LOST"
        assert attempts(job_frames) == []
    stats = await redis.hgetall(keys.stats)
    assert int(stats[b"error:NODE_LOST"]) == 2
    assert b"redispatched" not in stats


# 2. A node that stops answering pings but keeps its socket open


async def test_silent_node_is_lost_after_the_lease_and_its_late_result_is_stale(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(heartbeat_interval_ms=100, node_lease_ms=500)
    # A raw client: it reads the job, then never reads again (no pongs).
    silent = await RawNode.open(hub.port, "/v1/node")
    try:
        await silent.send_json(
            type="register", node_id="silent", services=["asr"], languages=["en", "fr"], max_jobs=1
        )
        session = await open_session(connect, hub)
        await submit(session, "c-1", payload={"text": "hello"})
        accepted = await expect(session, "accepted", node_id="silent", attempt=1)
        while True:  # registered, pings, then the job
            opcode, data = await silent.recv_frame()
            if opcode == 0x1 and orjson.loads(data)["type"] == "job":
                job = orjson.loads(data)
                break
        taken_at = time.monotonic()
        recorder = Recorder()
        async with node_client(hub, "backup", recorder) as backup:
            backup.start()
            await backup.wait_registered()
            frames = await collect_results(session, {"c-1"}, within=3000 * MS)
            lost_after_s = time.monotonic() - taken_at
            assert attempts(frames["c-1"]) == [("backup", 2)]
            end = frames["c-1"][-1]
            assert end["result"] == {"text": "HELLO", "attempt": 2}
            # Lost by the lease (from its last heartbeat: up to 100 ms earlier), not before.
            assert lost_after_s >= (500 - 100) * MS
            assert recorder.runs == [(accepted["job_id"], 2)]
            # It wakes up and sends the result of attempt 1 on its old socket
            # (which the hub is closing with 4004): refused, the session hears nothing.
            await silent.send_json(
                type="result", job_id=job["job_id"], attempt=1, status="finished", result={}
            )
            await expect_silence(session, 300 * MS)
            record = await job_record(redis, keys, job["job_id"])
            assert (record["status"], record["node"], record["attempt"]) == (
                "finished",
                "backup",
                "2",
            )
            # On a new connection, without resume, the old attempt is STALE_ATTEMPT.
            again = await connect(hub, "/v1/node")
            await register(again, node_id="silent", languages=["en", "fr"], max_jobs=1)
            await result(again, job, result={"late": True})
            await expect(again, "error", ref=job["job_id"], code="STALE_ATTEMPT")
            await expect_silence(session, 200 * MS)
            assert (await job_record(redis, keys, job["job_id"]))["result"] == (
                '{"text":"HELLO","attempt":2}'
            )
            await check_invariants(redis, keys, ["silent", "backup"])
    finally:
        silent.abort()


async def test_stopped_node_process_is_lost_and_resumes_cleanly_when_continued(
    node_process_on_hub: NodeProcessOnHub, redis: Redis, keys: Keys
) -> None:
    hub, frozen, session = await node_process_on_hub("frozen", max_jobs=1)
    await submit(session, "c-1", payload={"text": "hi", "ms": 1500})
    accepted = await expect(session, "accepted", node_id="frozen", attempt=1)
    job_id = accepted["job_id"]
    await wait_for(lambda: frozen.starts, timeout=5000 * MS, what="the job running")
    recorder = Recorder()
    async with node_client(hub, "backup", recorder) as backup:
        backup.start()
        await backup.wait_registered()
        frozen.freeze()  # the socket stays open; nobody answers pings
        stopped_at = time.monotonic()
        frames = await collect_results(session, {"c-1"}, within=5000 * MS)
        # The lease runs from its last heartbeat, up to one interval before the stop.
        assert time.monotonic() - stopped_at >= (LEASE_MS - 200) * MS
        assert attempts(frames["c-1"]) == [("backup", 2)]
        assert frames["c-1"][-1]["result"] == {"text": "HI", "attempt": 2}
        # Past the hub's close timeout (2 s), the old connection is gone.
        await asyncio.sleep(2500 * MS)
        frozen.thaw()
        # It finishes attempt 1, reconnects, resumes it and is told to drop it.
        await wait_for(lambda: frozen.registrations == 2, timeout=5000 * MS, what="re-registration")
        await expect_silence(session, 500 * MS)
        status = await frozen.status()
        assert status is not None and status["running"] == 0 and status["unsent"] == 0
    assert recorder.runs == [(job_id, 2)]
    assert frozen.starts == {(job_id, 1): 1}
    record = await job_record(redis, keys, job_id)
    assert (record["status"], record["node"], record["attempt"]) == ("finished", "backup", "2")
    await check_invariants(redis, keys, ["frozen", "backup"])
    assert (await node_hash(redis, keys, "frozen"))["running"] == "0"


# 3. A hub killed while its nodes run jobs for sessions on another hub


async def test_nodes_of_a_killed_hub_resume_their_jobs_on_a_surviving_hub(
    processes: Processes, redis: Redis, keys: Keys
) -> None:
    # Both hubs are processes with the same lease, long enough that the nodes
    # come back before it runs out: nothing has to run twice.
    a = await processes.hub("hub-a", node_lease_ms=3000)
    b = await processes.hub("hub-b", node_lease_ms=3000)
    nodes = [
        await processes.node(f"n{i}", [a.url, b.url], max_jobs=2, start_index=0) for i in (1, 2)
    ]
    assert {n.hub_id for n in nodes} == {"hub-a"}
    accepted: list[Accepted] = []
    session = SessionClient(
        b.url,
        on_frame=lambda _, f: accepted.append(f) if isinstance(f, Accepted) else None,
        backoff=FAST,
    )
    async with session:
        tasks = [
            asyncio.create_task(session.submit("en", "fr", {"text": f"t{i}", "ms": 1500}))
            for i in range(4)
        ]
        await wait_for(
            lambda: sum(len(n.starts) for n in nodes) == 4, timeout=5000 * MS, what="4 jobs"
        )
        a.kill()
        await a.wait()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10_000 * MS)
    for n in nodes:
        assert n.registrations == 2 and n.hub_id == "hub-b"
    assert [(r.status, r.result) for r in results] == [
        ("finished", {"text": f"T{i}", "node": r.node_id, "attempt": 1})
        for i, r in enumerate(results)
    ]
    # Every job ran once, as attempt 1: resumed, not re-dispatched.
    runs = [key for n in nodes for key, count in n.starts.items() for _ in range(count)]
    assert sorted(runs) == sorted((r.job_id, 1) for r in results)
    assert accepted and all(f.attempt == 1 for f in accepted)
    stats = await redis.hgetall(keys.stats)
    assert b"redispatched" not in stats and b"nodes_lost" not in stats
    await check_invariants(redis, keys, ["n1", "n2"])
    for n in nodes:
        await wait_running(redis, keys, n.node_id, 0)


# 4. A hub killed while its sessions have jobs in flight


async def test_sessions_of_a_killed_hub_resume_elsewhere_and_get_each_result_once(
    processes: Processes, redis: Redis, keys: Keys
) -> None:
    a = await processes.hub("hub-a", node_lease_ms=3000)
    b = await processes.hub("hub-b", node_lease_ms=3000)
    await processes.node("n1", [b.url], max_jobs=8)
    wire: list[tuple[int, int, str]] = []  # (session, connection, job id) of result frames

    def record(index: int) -> Callable[[SessionClient, ToSessionFrame], None]:
        def on_frame(client: SessionClient, frame: ToSessionFrame) -> None:
            if isinstance(frame, SessionResult):
                wire.append((index, client.connections, frame.job_id))

        return on_frame

    # They stay away for a second: jobs end meanwhile and wait in Redis.
    away = Backoff(min_s=1000 * MS, max_s=1000 * MS, jitter=False)
    sessions = [
        SessionClient(urls=[a.url, b.url], spread=False, on_frame=record(i), backoff=away)
        for i in range(3)
    ]
    async with contextlib.AsyncExitStack() as stack:
        for s in sessions:
            await stack.enter_async_context(s)
        ids = [s.session_id for s in sessions]
        assert {s.hub_id for s in sessions} == {"hub-a"}
        service_ms = (200, 500, 2500)  # two end while the sessions are away, one after
        tasks = [
            asyncio.create_task(s.submit("en", "fr", {"text": f"s{i}j{k}", "ms": ms}))
            for i, s in enumerate(sessions)
            for k, ms in enumerate(service_ms)
        ]
        await wait_for(
            lambda: all(p.job_id for s in sessions for p in s._pending.values()),
            timeout=3000 * MS,
            what="every job accepted",
        )
        a.kill()
        await a.wait()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10_000 * MS)
        for s, sid in zip(sessions, ids, strict=True):
            assert (s.session_id, s.connections, s.hub_id) == (sid, 2, "hub-b")
    assert [r.result for r in results] == [
        {"text": f"S{i}J{k}", "node": "n1", "attempt": 1} for i in range(3) for k in range(3)
    ]
    # On the wire: each result once; the early ones came with the resume.
    assert sorted((i, j) for i, _, j in wire) == sorted(
        (i, r.job_id) for i in range(3) for r in results[3 * i : 3 * i + 3]
    )
    assert all(connection == 2 for _, connection, _ in wire)


async def test_resume_on_the_wire_sends_each_unacknowledged_result_once_per_resume(
    make_hub: MakeHub,
    processes: Processes,
    connect: Connect,
    redis: Redis,
    keys: Keys,
) -> None:
    a = await processes.hub("hub-a", node_lease_ms=LEASE_MS)
    b = await make_hub(hub_id="hub-b", resume_window_s=60.0, node_lease_ms=LEASE_MS)
    node = await connect(b, "/v1/node")
    await register(node, node_id="gpu-1", languages=["en", "fr"], max_jobs=4)
    options = {"open_timeout": 2000 * MS, "close_timeout": 500 * MS}
    async with ws_connect(f"{a.url}/v1/session", **options) as first:
        welcome = await expect(first, "welcome", hub_id="hub-a")
        for ref in ("c-1", "c-2", "c-3"):
            await submit(first, ref, payload={"ref": ref})
        jobs = {}
        for _ in range(3):
            job = await expect(node, "job")
            jobs[job["payload"]["ref"]] = job
        for _ in range(3):
            await expect(first, "accepted")
        a.kill()
        await a.wait()
    for job in jobs.values():  # they end while the session has no hub
        await result(node, job, result={"done": job["payload"]["ref"]})
    done_key = keys.session_done(welcome["session_id"])
    await wait_for(lambda: redis.zcard(done_key), what="the results stored")
    query = f"session_id={welcome['session_id']}&resume_token={welcome['resume_token']}"

    async def resume() -> dict[str, Frame]:
        ws = await connect(b, f"/v1/session?{query}")
        await expect(ws, "welcome", session_id=welcome["session_id"], hub_id="hub-b")
        got: dict[str, Frame] = {}
        with contextlib.suppress(AssertionError):
            while True:
                frame = await receive(ws, 300 * MS)
                assert frame["type"] == "result", frame
                assert frame["ref"] not in got, f"sent twice in one resume: {frame!r}"
                got[frame["ref"]] = frame
        await ws.close()
        return got

    for _ in range(2):  # not acknowledged: each resume sends each once
        got = await resume()
        assert {ref: f["result"] for ref, f in got.items()} == {ref: {"done": ref} for ref in jobs}
    ws = await connect(b, f"/v1/session?{query}")
    await expect(ws, "welcome")
    for _ in range(3):
        await receive(ws)
    await ws.send(
        orjson.dumps(
            {"type": "ack", "job_ids": [jobs[r]["job_id"] for r in ("c-1", "c-2")]}
        ).decode()
    )
    await wait_for(lambda: _zcard_is(redis, done_key, 1), what="the ack stored")
    await ws.close()
    got = await resume()
    assert list(got) == ["c-3"]


async def _zcard_is(redis: Redis, key: str, n: int) -> bool:
    return bool(await redis.zcard(key) == n)


# 5. Redis restarted (append-only file) while the hub runs


@pytest.mark.parametrize("lease", ["longer-than-the-gap", "shorter-than-the-gap"])
async def test_redis_restart_hub_reconnects_refuses_meanwhile_and_keeps_state(
    make_hub: MakeHub,
    spawn_redis: Callable[..., RedisProcess],
    connect: Connect,
    keys: Keys,
    lease: str,
) -> None:
    server = spawn_redis(appendonly=True)
    lease_ms = 60_000 if lease == "longer-than-the-gap" else 300
    hub = await make_hub(redis_url=server.url, heartbeat_interval_ms=100, node_lease_ms=lease_ms)
    redis = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)
    recorder = Recorder()
    try:
        async with node_client(hub, "gpu-1", recorder) as node:
            node.start()
            await node.wait_registered()
            session = await open_session(connect, hub)
            await submit(session, "c-1", payload={"text": "before"})
            before = await expect(session, "accepted", node_id="gpu-1")
            await expect(session, "result", ref="c-1", status="finished")
            epoch = (await node_hash(redis, keys, "gpu-1"))["epoch"]
            assert (await http_get(hub.port, "/readyz"))[0] == 200

            await asyncio.to_thread(server.stop)
            await wait_for(lambda: not hub.ready, timeout=3000 * MS, what="not ready")
            assert (await http_get(hub.port, "/readyz"))[0] == 503
            # A job in the gap gets a clear answer at once, not a hang.
            started = time.monotonic()
            await submit(session, "c-2", payload={"text": "gap"})
            await expect(session, "error", ref="c-2", code="UNAVAILABLE", within=1000 * MS)
            assert time.monotonic() - started < 1000 * MS
            await asyncio.sleep(500 * MS)  # the gap lasts longer than the short lease

            await asyncio.to_thread(server.start)
            await wait_for(lambda: hub.ready, timeout=5000 * MS, what="ready again")
            assert (await http_get(hub.port, "/readyz"))[0] == 200
            await redis.aclose()  # its connection died with the server
            redis = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)
            if lease == "shorter-than-the-gap" and node.connections == 2:
                # The sweep ran before the first heartbeat after the gap: the
                # lease had expired, 4004, and the SDK registered again.
                assert int((await node_hash(redis, keys, "gpu-1"))["epoch"]) > int(epoch)
            else:
                # The first heartbeat after the gap came first (heartbeats
                # reload the scripts themselves; the sweep waits for ready).
                assert (await node_hash(redis, keys, "gpu-1"))["epoch"] == epoch
                assert node.connections == 1
            # What was written before the restart is still there.
            assert (await job_record(redis, keys, before["job_id"]))["status"] == "finished"
            await submit(session, "c-3", payload={"text": "after"})
            await expect(session, "accepted", ref="c-3", node_id="gpu-1")
            end = await expect(session, "result", ref="c-3", status="finished")
            assert end["result"] == {"text": "AFTER", "attempt": 1}
            await check_invariants(redis, keys, ["gpu-1"])
    finally:
        await redis.aclose()


async def test_scripts_are_reloaded_after_noscript(
    make_hub: MakeHub,
    spawn_redis: Callable[..., RedisProcess],
    connect: Connect,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = spawn_redis()
    hub = await make_hub(redis_url=server.url)
    redis = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        async with node_client(hub, "gpu-1", Recorder()) as node:
            node.start()
            await node.wait_registered()
            session = await open_session(connect, hub)
            # As after a failover to a replica: the data is there, the scripts are not.
            await redis.script_flush()
            caplog.set_level(logging.WARNING, logger="hub.scheduler")
            await submit(session, "c-1", payload={"text": "x"})
            await expect(session, "accepted", ref="c-1")
            end = await expect(session, "result", ref="c-1", status="finished")
            assert end["result"] == {"text": "X", "attempt": 1}
            assert "scripts missing in Redis" in caplog.text
            assert all(await redis.script_exists(*hub.scheduler.shas.values()))
            await check_invariants(redis, keys, ["gpu-1"])
    finally:
        await redis.aclose()


async def test_result_that_ends_while_the_session_hub_resubscribes_still_reaches_it(
    make_hub: MakeHub,
    spawn_redis: Callable[..., RedisProcess],
    connect: Connect,
    keys: Keys,
) -> None:
    # Session on hub A, node on hub B. Redis restarts; the node's result
    # counts as soon as Redis is back, while A's subscription is still
    # coming back: the bus loses B's message, A sends the result from Redis.
    server = spawn_redis(appendonly=True)
    a = await make_hub(redis_url=server.url, hub_id="hub-a", node_lease_ms=60_000)
    b = await make_hub(redis_url=server.url, hub_id="hub-b", node_lease_ms=60_000)
    node = await connect(b, "/v1/node")
    await register(node, node_id="gpu-1", languages=["en", "fr"], max_jobs=1)
    session = await open_session(connect, a)
    await submit(session, "c-1", payload={"text": "x"})
    await expect(session, "accepted", ref="c-1", node_id="gpu-1")
    job = await expect(node, "job")
    await asyncio.to_thread(server.stop)
    await wait_for(lambda: not a.bus.subscribed.is_set(), timeout=3000 * MS, what="A unsubscribed")
    await asyncio.sleep(1000 * MS)  # A's subscriber backs off meanwhile
    await asyncio.to_thread(server.start)
    for _ in range(50):  # as the node SDK does: again after each UNAVAILABLE
        await result(node, job, result={"text": "X"})
        with contextlib.suppress(AssertionError):
            if (await receive(node, 200 * MS)).get("code") == "UNAVAILABLE":
                continue
        break
    redis = Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        assert (await job_record(redis, keys, job["job_id"]))["status"] == "finished"
    finally:
        await redis.aclose()
    await expect(session, "result", ref="c-1", status="finished", result={"text": "X"})
    await expect_silence(session, 500 * MS)


# 6. Redis unreachable for 10 s


async def test_redis_down_10s_sessions_get_unavailable_and_hub_memory_stays_bounded(
    make_hub: MakeHub,
    spawn_redis: Callable[..., RedisProcess],
    processes: Processes,
    keys: Keys,
) -> None:
    server = spawn_redis(appendonly=True)
    # One hub in this process (its queues are read directly), one as a
    # process of its own (its RSS is read from /proc).
    inner = await make_hub(
        redis_url=server.url, heartbeat_interval_ms=200, node_lease_ms=30_000, hub_id="inner"
    )
    outer = await processes.hub("outer", redis_url=server.url, node_lease_ms=30_000)
    n_outer = await processes.node("n-outer", [outer.url], max_jobs=4, service_ms=(20, 50))
    recorder = Recorder(delay_s=20 * MS)
    refusals: list[tuple[str, float]] = []
    outcomes: list[str] = []
    timed_out: list[str] = []
    load_on = True

    async def one(session: SessionClient, n: int) -> None:
        started = time.monotonic()
        try:
            r = await session.submit("en", "fr", {"text": f"j{n}"}, timeout_ms=20_000)
        except JobRefused as exc:
            refusals.append((exc.code, time.monotonic() - started))
            outcomes.append(f"refused:{exc.code}")
        else:
            outcomes.append(r.status if r.ok else f"failed:{r.error}")
            if r.error == "JOB_TIMEOUT":
                timed_out.append(r.job_id)

    async def load(session: SessionClient) -> None:
        # A job every 20 ms, whether the previous ones ended or not (at most 16 open).
        running: set[asyncio.Task[None]] = set()
        n = 0
        while load_on:
            n += 1
            if len(running) < 16:
                task = asyncio.create_task(one(session, n))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.sleep(20 * MS)
        await asyncio.gather(*running)

    async with contextlib.AsyncExitStack() as stack:
        node = await stack.enter_async_context(node_client(inner, "n-inner", recorder, max_jobs=4))
        node.start()
        await node.wait_registered()
        sessions = [
            await stack.enter_async_context(SessionClient(url, backoff=FAST))
            for url in (url_of(inner), url_of(inner), outer.url, outer.url)
        ]
        loops = [asyncio.create_task(load(s)) for s in sessions]
        await asyncio.sleep(1000 * MS)  # warm up
        assert outcomes and all(o == "finished" for o in outcomes)
        rss_before = rss_kb(outer.pid)
        assert rss_before is not None

        await asyncio.to_thread(server.kill)
        killed_at = time.monotonic()
        samples: list[tuple[int, int, int, int]] = []
        while time.monotonic() - killed_at < 10_000 * MS:
            await asyncio.sleep(250 * MS)
            samples.append(
                (
                    inner.scheduler.pending,
                    len(inner.bus._outbox),
                    len(inner.tasks),
                    rss_kb(outer.pid) or 0,
                )
            )
        gap_outcomes = len(outcomes)
        await asyncio.to_thread(server.start)
        await wait_for(lambda: inner.ready, timeout=5000 * MS, what="inner ready")
        await outer.wait_ready(timeout_s=5000 * MS)
        resumed_at = len(outcomes)
        await wait_for(
            lambda: outcomes[resumed_at:].count("finished") >= 8,
            timeout=5000 * MS,
            what="jobs finishing again",
        )
        load_on = False
        # Bounded by the jobs' deadline (20 s): see JOB_TIMEOUT below.
        await asyncio.wait_for(asyncio.gather(*loops), 25_000 * MS)
    # The sessions kept submitting, and each job of the gap was refused at once.
    in_gap = [(code, s) for code, s in refusals]
    assert len(in_gap) > 400, f"only {len(in_gap)} refusals"
    assert {code for code, _ in in_gap} == {"UNAVAILABLE"}
    assert max(s for _, s in in_gap) < 1000 * MS
    assert gap_outcomes > 40
    # Nothing piles up meanwhile.
    assert max(s[0] for s in samples) <= 16, samples
    assert max(s[1] for s in samples) <= 16, samples
    assert max(s[2] for s in samples) <= 64, samples
    rss_growth_kb = max(s[3] for s in samples) - rss_before
    assert rss_growth_kb < 20 * 1024, (rss_before, samples)
    # Every job that was not refused finished, even those running when Redis
    # went away: their nodes sent their results again until Redis was back.
    # Except a job accepted in the instant before Redis died whose frame to
    # the node on the other hub was lost with Redis (the bus is at most once;
    # protocol.md §8): no node ever ran it, and it timed out at its deadline.
    # And a job that waited in a queue when Redis died: its queue wait
    # (queue_wait_ms, 2 s) ran out during the gap, so it ends NO_AVAILABLE_NODE
    # as any queued job does (the load keeps the two nodes' eight slots full).
    assert set(outcomes) <= {
        "finished",
        "refused:UNAVAILABLE",
        "failed:JOB_TIMEOUT",
        "failed:NO_AVAILABLE_NODE",
    }, outcomes
    assert outcomes.count("failed:NO_AVAILABLE_NODE") <= 4 * 16  # the jobs open at the kill
    ran = {job_id for job_id, _ in recorder.runs} | {job_id for job_id, _ in n_outer.starts}
    assert len(timed_out) <= 16 and not ran & set(timed_out)


# 7. A session that never reads


async def test_slow_session_is_closed_with_4005_and_others_are_unaffected(
    make_hub: MakeHub,
) -> None:
    hub = await make_hub(send_buffer_bytes=64 * 1024)
    chunk = {"text": "x" * 200_000}

    async def handler(job: Job) -> dict[str, Any]:
        flood = job.payload.get("flood")
        if flood:  # 200 KB partials for ~2 s: far more than the slow session reads
            for _ in range(int(flood)):
                await job.partial(chunk)
                await asyncio.sleep(10 * MS)
        return {"text": str(job.payload.get("text", "")).upper()}

    async def latencies(session: SessionClient, n: int) -> list[float]:
        out = []
        for i in range(n):
            started = time.monotonic()
            r = await session.submit("en", "fr", {"text": f"t{i}"})
            assert r.ok
            out.append(time.monotonic() - started)
        return out

    async with contextlib.AsyncExitStack() as stack:
        node = await stack.enter_async_context(node_client(hub, "gpu-1", handler, max_jobs=8))
        node.start()
        await node.wait_registered()
        others = [
            await stack.enter_async_context(SessionClient(url_of(hub), backoff=FAST))
            for _ in range(3)
        ]
        before = [t for ts in await asyncio.gather(*(latencies(s, 20) for s in others)) for t in ts]
        slow = await RawNode.open(hub.port, "/v1/session", rcvbuf=4096)
        try:
            _, data = await slow.recv_frame()
            assert orjson.loads(data)["type"] == "welcome"
            await slow.send_json(
                type="job", ref="flood", src_lang="en", tgt_lang="fr", payload={"flood": 200}
            )
            # It never reads from now on. Others go on meanwhile.
            measuring = [asyncio.create_task(latencies(s, 20)) for s in others]
            await wait_for(
                lambda: hub.metrics.slow_closed._value.get() == 1,
                timeout=10_000 * MS,
                what="the slow session closed",
            )
            during = [t for ts in await asyncio.gather(*measuring) for t in ts]
            # Reading now, it finds the frames the hub had buffered, then the close.
            code, _ = await slow.recv_until_close(within=5000 * MS)
            assert code == 4005
        finally:
            slow.abort()
        # Still correct for everyone else.
        after = await latencies(others[0], 5)
        assert len(hub.registry.sessions) == 3
    p50_before, p50_during = statistics.median(before), statistics.median(during)
    assert p50_during < max(10 * p50_before, 200 * MS), (p50_before, p50_during)
    assert len(after) == 5


# 8. A node that never reads


@pytest.mark.parametrize("policy", ["lease-expires", "too-slow", "deadline-passes"])
async def test_slow_node_that_never_reads_loses_its_jobs_once(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, policy: str
) -> None:
    # lease-expires: it answers no ping: lost after the lease, its jobs move.
    # too-slow: big jobs fill its send buffer: closed with 4005, its jobs move.
    # deadline-passes: a long lease and short jobs: they time out first.
    if policy == "lease-expires":
        hub = await make_hub(heartbeat_interval_ms=100, node_lease_ms=1000)
    elif policy == "too-slow":
        hub = await make_hub(send_buffer_bytes=1024 * 1024, node_lease_ms=60_000)
    else:
        hub = await make_hub(heartbeat_interval_ms=100, node_lease_ms=60_000)
    slow = await RawNode.open(hub.port, "/v1/node", rcvbuf=4096)
    try:
        await slow.send_json(
            type="register", node_id="slow", services=["asr"], languages=["en", "fr"], max_jobs=8
        )
        _, data = await slow.recv_frame()
        assert orjson.loads(data)["type"] == "registered"
        session = await open_session(connect, hub)
        refs = {f"c-{i}" for i in range(8)}
        # 8 MB for too-slow: more than the kernel buffers plus send_buffer_bytes.
        audio = os.urandom(1000 * 1024) if policy == "too-slow" else None
        timeout_ms = 500 if policy == "deadline-passes" else 30_000
        for ref in sorted(refs):
            await submit(session, ref, payload={"text": ref}, audio=audio, timeout_ms=timeout_ms)
        for _ in refs:
            await expect(session, "accepted", node_id="slow", attempt=1)
        recorder = Recorder()
        async with contextlib.AsyncExitStack() as stack:
            # One slot each: the moved jobs come one per connection.
            for i in range(8):
                backup = await stack.enter_async_context(
                    node_client(hub, f"backup-{i}", recorder, max_jobs=1)
                )
                backup.start()
                await backup.wait_registered()
            frames = await collect_results(session, refs, within=10_000 * MS)
            await expect_silence(session, 300 * MS)
            if policy == "deadline-passes":
                # Its slots came back with the timeouts; it is still registered.
                await wait_running(redis, keys, "slow", 0)
            await check_invariants(redis, keys, ["slow", *(f"backup-{i}" for i in range(8))])
    finally:
        slow.abort()
    for ref, job_frames in frames.items():
        end = job_frames[-1]
        if policy == "deadline-passes":
            assert attempts(job_frames) == []
            assert (end["status"], end["error"]) == ("failed", "JOB_TIMEOUT")
        else:
            assert [a for _, a in attempts(job_frames)] == [2], job_frames
            assert end["status"] == "finished" and end["result"]["text"] == ref.upper()
    if policy == "deadline-passes":
        assert recorder.runs == []
    else:
        assert len(recorder.runs) == 8 and all(a == 2 for _, a in recorder.runs)
        assert (await node_hash(redis, keys, "slow")).get("state") == "lost"
    assert hub.metrics.slow_closed._value.get() == (1 if policy == "too-slow" else 0)
