"""Several hubs share one Redis: a session on hub A, a node on hub B.

Frames between hubs travel through each hub's Redis channel (hub/bus.py).
The first tests run two :class:`~hub.app.Hub` objects in this process;
the last one runs two real ``python -m hub serve`` processes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from hub.app import Hub
from hub.keys import Keys
from hub.scheduler import Scheduler
from loadtest.procs import Processes
from tests.helpers import MS
from tests.hubtools import (
    ALL_BYTES,
    Connect,
    Frame,
    RawNode,
    check_invariants,
    expect,
    expect_closed,
    expect_silence,
    http_get,
    node_hash,
    open_node,
    open_session,
    partial,
    register,
    result,
    round_trip,
    submit,
    wait_running,
)

MakeHub = Callable[..., Awaitable[Hub]]


@pytest.fixture
async def hubs(make_hub: MakeHub) -> tuple[Hub, Hub]:
    """Hub A and hub B on the same cell."""
    return await make_hub(hub_id="hub-a"), await make_hub(hub_id="hub-b")


async def job_across_hubs(
    hubs: tuple[Hub, Hub], connect: Connect
) -> tuple[ClientConnection, ClientConnection, Frame]:
    """A session on hub A whose job ``c-1`` runs on node ``gpu-1`` of hub B.

    Returns:
        The session, the node and the node's ``job`` frame.
    """
    a, b = hubs
    node = await open_node(connect, b, "gpu-1")
    session = await open_session(connect, a)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    return session, node, await expect(node, "job")


# Two hubs in one process


async def test_session_on_hub_a_gets_its_job_run_by_a_node_on_hub_b(
    hubs: tuple[Hub, Hub], connect: Connect, redis: Redis, keys: Keys
) -> None:
    a, b = hubs
    node = await open_node(connect, b, "gpu-1")
    assert (await node_hash(redis, keys, "gpu-1"))["hub"] == "hub-b"
    session = await open_session(connect, a)
    await submit(session, "c-1", payload={"text": "hello"})
    accepted = await expect(session, "accepted", ref="c-1", node_id="gpu-1", attempt=1)
    job = await expect(node, "job", job_id=accepted["job_id"], payload={"text": "hello"})
    for text in ("b", "bon"):
        await partial(node, job, {"text": text})
    for text in ("b", "bon"):
        await expect(session, "partial", ref="c-1", job_id=job["job_id"], result={"text": text})
    await result(node, job, result={"text": "bonjour"})
    await expect(
        session,
        "result",
        ref="c-1",
        job_id=job["job_id"],
        status="finished",
        result={"text": "bonjour"},
        error=None,
    )
    await expect_silence(session, 50 * MS)
    await wait_running(redis, keys, "gpu-1", 0)


async def test_binary_audio_crosses_hubs_byte_exact(
    hubs: tuple[Hub, Hub], connect: Connect
) -> None:
    a, b = hubs
    node = await open_node(connect, b, "gpu-1")
    session = await open_session(connect, a)
    audio = ALL_BYTES * 400  # ~100 KB
    await submit(session, "c-1", payload={"codec": "pcm16"}, audio=audio)
    await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job", payload={"codec": "pcm16"})
    assert job["audio"] == audio
    await result(node, job, result={"n": len(job["audio"])})
    await expect(session, "result", ref="c-1", result={"n": len(audio)})


async def test_cancel_on_hub_a_reaches_the_node_on_hub_b(
    hubs: tuple[Hub, Hub], connect: Connect, redis: Redis, keys: Keys
) -> None:
    session, node, job = await job_across_hubs(hubs, connect)
    await session.send('{"type": "cancel", "ref": "c-1"}')
    await expect(session, "result", ref="c-1", status="failed", error="CANCELLED")
    await expect(node, "cancel", job_id=job["job_id"], attempt=1, reason="CANCELLED")
    await wait_running(redis, keys, "gpu-1", 0)
    # Its late result is refused on hub B, and hub A's session hears nothing.
    await result(node, job, result={})
    await expect(node, "error", ref=job["job_id"], code="STALE_ATTEMPT")
    await expect_silence(session, 50 * MS)


async def test_session_leaving_hub_a_cancels_its_job_on_hub_b(
    hubs: tuple[Hub, Hub], connect: Connect, redis: Redis, keys: Keys
) -> None:
    session, node, job = await job_across_hubs(hubs, connect)
    await session.close()
    await expect(node, "cancel", job_id=job["job_id"], reason="CANCELLED")
    await wait_running(redis, keys, "gpu-1", 0)
    await check_invariants(redis, keys, ["gpu-1"])


async def test_node_lost_on_hub_b_is_redispatched_to_a_node_on_hub_a(
    hubs: tuple[Hub, Hub], connect: Connect, redis: Redis, keys: Keys
) -> None:
    a, b = hubs
    nodes = {"gpu-a": await open_node(connect, a, "gpu-a", max_jobs=1)}
    session = await open_session(connect, a)
    # Fill gpu-a so that the job goes to gpu-b, then free it.
    await submit(session, "fill")
    fill = await expect(session, "accepted", ref="fill", node_id="gpu-a")
    fill_job = await expect(nodes["gpu-a"], "job", job_id=fill["job_id"])
    nodes["gpu-b"] = await open_node(connect, b, "gpu-b", max_jobs=1)
    await submit(session, "c-1", audio=ALL_BYTES)
    first = await expect(session, "accepted", ref="c-1", node_id="gpu-b", attempt=1)
    await expect(nodes["gpu-b"], "job", job_id=first["job_id"])
    await result(nodes["gpu-a"], fill_job, result={})
    await expect(session, "result", ref="fill")
    await wait_running(redis, keys, "gpu-a", 0)

    assert nodes["gpu-b"].transport is not None
    nodes["gpu-b"].transport.abort()
    await expect(session, "accepted", ref="c-1", job_id=first["job_id"], node_id="gpu-a", attempt=2)
    job = await expect(nodes["gpu-a"], "job", job_id=first["job_id"], attempt=2)
    assert job["audio"] == ALL_BYTES
    await result(nodes["gpu-a"], job, result={"on": "a"})
    await expect(session, "result", ref="c-1", status="finished", result={"on": "a"})
    await expect_silence(session, 50 * MS)
    await check_invariants(redis, keys, ["gpu-a", "gpu-b"])


async def test_node_registering_on_hub_b_replaces_its_connection_on_hub_a_with_4002(
    hubs: tuple[Hub, Hub], connect: Connect, redis: Redis, keys: Keys
) -> None:
    a, b = hubs
    old = await open_node(connect, a, "gpu-1")
    new = await connect(b, "/v1/node")
    await register(new, node_id="gpu-1")
    await expect_closed(old, 4002)
    assert (await node_hash(redis, keys, "gpu-1"))["hub"] == "hub-b"
    session = await open_session(connect, a)
    await round_trip(session, new, "c-1")


async def test_replaced_node_is_closed_with_4002_by_its_heartbeat_when_the_bus_message_is_lost(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    old = await open_node(connect, hub, "gpu-1")
    # A hub that vanished right after registering gpu-1 anew: nobody tells
    # this hub through the bus; the next heartbeat finds the newer epoch.
    other = Scheduler(redis, hub.settings, hub_id="hub-gone", keys=keys)
    await other.load_scripts()
    await other.register_node(
        "gpu-1", services=["asr"], lang_pairs=[("en", "fr")], max_jobs=1, hub_id="hub-gone"
    )
    await other.close()
    await expect_closed(old, 4002, within=2000 * MS)
    assert (await node_hash(redis, keys, "gpu-1"))["hub"] == "hub-gone"


async def test_silent_node_on_hub_b_is_closed_with_4004_when_hub_a_sweeps(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    a = await make_hub(hub_id="hub-a", node_lease_ms=300)
    # Hub B pings but never sweeps: hub A finds the lease expired.
    b = await make_hub(hub_id="hub-b", node_lease_ms=300, sweep_interval_ms=600_000)
    node = await RawNode.open(b.port, "/v1/node")
    try:
        await node.send_json(
            type="register", node_id="gpu-1", services=["asr"], languages=["en", "fr"], max_jobs=1
        )
        opcode, payload = await node.recv_frame()
        assert opcode == 0x1 and orjson.loads(payload)["type"] == "registered"
        session = await open_session(connect, a)
        await submit(session, "c-1")
        await expect(session, "accepted", ref="c-1", node_id="gpu-1")
        await expect(
            session, "result", ref="c-1", status="failed", error="NODE_LOST", within=2000 * MS
        )
        code, frames = await node.recv_until_close(within=2000 * MS)
        assert code == 4004
        assert [f["type"] for f in frames] == ["job", "cancel"]
    finally:
        node.abort()


async def test_status_of_either_hub_shows_the_whole_fleet(
    hubs: tuple[Hub, Hub], connect: Connect
) -> None:
    a, b = hubs
    await open_node(connect, a, "gpu-a")
    await open_node(connect, b, "gpu-b")
    for hub in (a, b):
        status, _, body = await http_get(hub.port, "/v1/status")
        assert status == 200
        data = orjson.loads(body)
        assert data["hub_id"] == hub.hub_id
        assert {(n["node_id"], n["hub_id"]) for n in data["nodes"]} == {
            ("gpu-a", "hub-a"),
            ("gpu-b", "hub-b"),
        }


# Two hub processes


PROCESS_HUB_SETTINGS = {"heartbeat_interval_ms": 200, "resume_window_s": 0}
"""Settings of the hub processes of the ``processes`` fixture."""


async def test_two_hub_processes_share_one_redis(
    processes: Processes, redis: Redis, keys: Keys
) -> None:
    a = await processes.hub("proc-a", timeout_s=15_000 * MS)
    b = await processes.hub("proc-b", timeout_s=15_000 * MS)
    options = {"open_timeout": 2000 * MS, "close_timeout": 500 * MS}
    async with (
        ws_connect(f"ws://127.0.0.1:{b.port}/v1/node", **options) as node,
        ws_connect(f"ws://127.0.0.1:{a.port}/v1/session", **options) as session,
    ):
        registered = await register(node, node_id="gpu-1")
        assert registered["hub_id"] == "proc-b"
        await expect(session, "welcome", hub_id="proc-a")
        await round_trip(session, node, "c-1")
        await submit(session, "c-2", audio=ALL_BYTES)
        await expect(session, "accepted", ref="c-2", node_id="gpu-1")
        job = await expect(node, "job")
        assert job["audio"] == ALL_BYTES
        await result(node, job, result={"n": 256})
        await expect(session, "result", ref="c-2", result={"n": 256})

        # SIGTERM to hub B: its node is told to go (1001) and released in Redis.
        assert await b.stop(10_000 * MS) == 0
        await expect_closed(node, 1001)
        assert (await node_hash(redis, keys, "gpu-1"))["state"] == "lost"
        # Hub A lives on: the pair now has no live node.
        await submit(session, "c-3")
        await expect(session, "error", ref="c-3", code="EMPTY_POOL")
    assert await a.stop(10_000 * MS) == 0
