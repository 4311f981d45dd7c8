"""End-to-end tests of the hub (hub/app.py and its parts): real sockets, a real Redis.

Each test starts its own hub on port 0 with the ``make_hub`` / ``hub``
fixtures (tests/conftest.py) on a fresh cell, and talks to it with plain
``websockets`` clients speaking protocol.md through tests/hubtools.py.
Bad input lives in tests/test_server_errors.py, several hubs in
tests/test_two_hubs.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import orjson
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidHandshake

from hub.app import Hub
from hub.bus import encode_envelope
from hub.keys import Keys
from hub.protocol import JobId, NodeId, encode_accepted
from loadtest.procs import RedisProcess
from tests.helpers import MS, wait_for
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
    job_record,
    node_hash,
    open_node,
    open_session,
    partial,
    receive,
    register,
    result,
    submit,
    wait_running,
)

MakeHub = Callable[..., Awaitable[Hub]]


# Registration


async def test_node_registration_is_stored_in_redis(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    ws = await connect(hub, "/v1/node")
    await register(ws, node_id="gpu-1", languages=["zh", "EN"], max_jobs=4, pools=["default"])
    node = await node_hash(redis, keys, "gpu-1")
    assert node["hub"] == hub.hub_id
    assert node["max_jobs"] == "4"
    assert node["running"] == "0"
    assert node["state"] == "live"
    assert orjson.loads(node["pairs"]) == [["en", "zh"], ["zh", "en"]]


async def test_registered_frame_has_every_field(hub: Hub, connect: Connect) -> None:
    ws = await connect(hub, "/v1/node")
    await ws.send(
        orjson.dumps(
            {
                "type": "register",
                "node_id": "gpu-1",
                "services": ["asr"],
                "lang_pairs": [["en", "en"]],
                "max_jobs": 1,
            }
        ).decode()
    )
    frame = await receive(ws)
    assert frame == {
        "type": "registered",
        "node_id": "gpu-1",
        "hub_id": hub.hub_id,
        "heartbeat_interval_ms": 100,
        "resumed": [],
        "dropped": [],
    }


async def test_session_gets_welcome_with_session_id_hub_id_and_resume_token(
    hub: Hub, connect: Connect
) -> None:
    one = await connect(hub, "/v1/session")
    two = await connect(hub, "/v1/session")
    first = await expect(one, "welcome", hub_id=hub.hub_id)
    second = await expect(two, "welcome", hub_id=hub.hub_id)
    assert set(first) == {"type", "session_id", "hub_id", "resume_token"}
    assert first["session_id"] != second["session_id"]
    assert isinstance(first["resume_token"], str) and first["resume_token"]


async def test_node_that_sends_no_register_is_closed_with_4001(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(register_timeout_s=0.2)
    ws = await connect(hub, "/v1/node")
    await expect_closed(ws, 4001, within=1000 * MS)


async def test_register_timeout_still_runs_after_a_bad_frame(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(register_timeout_s=0.2)
    ws = await connect(hub, "/v1/node")
    await ws.send('{"type": "load", "load": {}}')
    await expect(ws, "error", code="NOT_REGISTERED")
    await expect_closed(ws, 4001, within=1000 * MS)


async def test_register_in_time_is_not_closed(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(register_timeout_s=0.2)
    ws = await open_node(connect, hub, "gpu-1")
    await expect_silence(ws, 400 * MS)


# Heartbeat


async def test_hub_pings_node_and_records_seen_and_rtt(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    await open_node(connect, hub, "gpu-1")
    first = await wait_for(
        lambda: _field(redis, keys, "gpu-1", "seen"), timeout=1000 * MS, what="a first heartbeat"
    )
    rtt = await wait_for(lambda: _field(redis, keys, "gpu-1", "rtt_ms"), timeout=1000 * MS)
    assert 0 <= float(rtt) < 1000
    await wait_for(
        lambda: _later(redis, keys, "gpu-1", "seen", first),
        timeout=1000 * MS,
        what="a second heartbeat",
    )
    assert (await node_hash(redis, keys, "gpu-1"))["state"] == "live"


async def test_node_load_is_stored_with_the_next_heartbeat(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    ws = await open_node(connect, hub, "gpu-1")
    await ws.send('{"type": "load", "load": {"gpu_util": 0.5}}')
    load = await wait_for(lambda: _field(redis, keys, "gpu-1", "load"), timeout=1000 * MS)
    assert orjson.loads(load) == {"gpu_util": 0.5}


async def test_node_that_stops_answering_pings_is_lost_after_the_lease(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    # Lease: 3 heartbeat intervals of 100 ms. RawNode reads every frame but
    # never answers pings, like a node whose process hangs.
    hub = await make_hub(node_lease_ms=300)
    node = await RawNode.open(hub.port, "/v1/node")
    try:
        await node.send_json(
            type="register", node_id="gpu-1", services=["asr"], languages=["en", "fr"], max_jobs=1
        )
        opcode, payload = await node.recv_frame()
        assert opcode == 0x1 and orjson.loads(payload)["type"] == "registered"
        session = await open_session(connect, hub)
        await submit(session, "c-1")
        await expect(session, "accepted", ref="c-1", node_id="gpu-1", attempt=1)
        # Its job fails with NODE_LOST (no other node) once the lease runs out.
        await expect(
            session, "result", ref="c-1", status="failed", error="NODE_LOST", within=2000 * MS
        )
        assert (await node_hash(redis, keys, "gpu-1"))["state"] == "lost"
        # protocol.md §3: its connection is closed with 4004.
        code, frames = await node.recv_until_close(within=2000 * MS)
        assert code == 4004
        assert [f["type"] for f in frames] == ["job", "cancel"]
        assert frames[1]["reason"] == "NODE_LOST"
    finally:
        node.abort()
    await check_invariants(redis, keys, ["gpu-1"])


async def test_node_that_answers_pings_is_not_lost(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(node_lease_ms=round(300_000 * MS))
    node = await open_node(connect, hub, "gpu-1")
    await expect_silence(node, 600 * MS)  # two leases; the library answers the pings
    assert (await node_hash(redis, keys, "gpu-1"))["state"] == "live"


# Dispatch


async def test_jobs_go_to_the_least_loaded_node_within_max_jobs(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(queue_wait_ms=2000)
    nodes = {nid: await open_node(connect, hub, nid, max_jobs=2) for nid in ("gpu-1", "gpu-2")}
    # One session per job: a session's own jobs prefer its previous node.
    sessions = [await open_session(connect, hub) for _ in range(5)]
    placed: list[str] = []
    for i, session in enumerate(sessions[:4]):
        await submit(session, f"c-{i}")
        accepted = await expect(session, "accepted", ref=f"c-{i}", attempt=1)
        placed.append(accepted["node_id"])
        job = await expect(nodes[accepted["node_id"]], "job", job_id=accepted["job_id"])
        assert job["attempt"] == 1
    # Least loaded: the second job goes to the idle node, and so on.
    assert placed[0] != placed[1]
    assert placed[2] != placed[3]
    assert sorted(placed) == ["gpu-1", "gpu-1", "gpu-2", "gpu-2"]
    for nid in nodes:
        await wait_running(redis, keys, nid, 2)
    # Every slot taken: the fifth job waits and no node gets a third job.
    await submit(sessions[4], "c-4")
    await expect(sessions[4], "queued", ref="c-4")
    for ws in nodes.values():
        await expect_silence(ws, 50 * MS)
    await check_invariants(redis, keys, nodes)


async def test_queued_job_is_dispatched_when_a_slot_frees(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1", max_jobs=1)
    session = await open_session(connect, hub)
    await submit(session, "c-1", payload={"n": 1})
    first = await expect(session, "accepted", ref="c-1", node_id="gpu-1", attempt=1)
    job1 = await expect(node, "job", job_id=first["job_id"], payload={"n": 1})
    await submit(session, "c-2", payload={"n": 2})
    queued = await expect(session, "queued", ref="c-2")
    await expect_silence(node, 50 * MS)
    await check_invariants(redis, keys, ["gpu-1"])

    await result(node, job1, result={"text": "one"})
    await expect(session, "result", ref="c-1", status="finished", result={"text": "one"})
    second = await expect(session, "accepted", ref="c-2", job_id=queued["job_id"], node_id="gpu-1")
    job2 = await expect(node, "job", job_id=queued["job_id"], payload={"n": 2})
    assert job2["attempt"] == second["attempt"] == 1
    await wait_running(redis, keys, "gpu-1", 1)
    await result(node, job2, result={"text": "two"})
    await expect(session, "result", ref="c-2", status="finished", result={"text": "two"})
    await wait_running(redis, keys, "gpu-1", 0)
    await check_invariants(redis, keys, ["gpu-1"])


async def busy_node(connect: Connect, hub: Hub) -> tuple[ClientConnection, ClientConnection, Frame]:
    """Node gpu-1 with one slot, and a session whose job c-1 takes it: (node, session, job)."""
    node = await open_node(connect, hub, "gpu-1", max_jobs=1)
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    return node, session, await expect(node, "job")


async def test_queued_job_fails_with_no_available_node_when_the_wait_runs_out(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(queue_wait_ms=150)
    node, session, _ = await busy_node(connect, hub)
    await submit(session, "c-2")
    queued = await expect(session, "queued", ref="c-2")
    await expect(
        session,
        "result",
        ref="c-2",
        job_id=queued["job_id"],
        status="failed",
        error="NO_AVAILABLE_NODE",
        within=1500 * MS,
    )
    await expect_silence(node, 50 * MS)  # no job but c-1
    await check_invariants(redis, keys, ["gpu-1"])


async def test_queued_job_starts_on_a_node_of_another_pool_of_its_pair(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    # protocol.md §8, Queues: one queue per language pair, whatever the pools.
    nodes = {
        pool: await open_node(connect, hub, f"gpu-{pool}", max_jobs=1, pools=[pool])
        for pool in ("alpha", "beta")
    }
    session = await open_session(connect, hub)
    jobs = {}
    for ref in ("c-1", "c-2"):
        await submit(session, ref)
        accepted = await expect(session, "accepted", ref=ref)
        jobs[accepted["node_id"]] = await expect(
            nodes[accepted["node_id"][4:]], "job", job_id=accepted["job_id"]
        )
    # A session that ran nowhere yet: its job waits for either pool.
    other = await open_session(connect, hub)
    await submit(other, "c-3")
    queued = await expect(other, "queued", ref="c-3")

    for pool in ("beta", "alpha"):  # whichever frees a slot first takes it
        await result(nodes[pool], jobs[f"gpu-{pool}"])
        await expect(session, "result", status="finished")
        if pool == "beta":
            await expect(other, "accepted", ref="c-3", job_id=queued["job_id"], node_id="gpu-beta")
            await expect(nodes["beta"], "job", job_id=queued["job_id"])
    await expect_silence(nodes["alpha"], 50 * MS)
    await check_invariants(redis, keys, ["gpu-alpha", "gpu-beta"])


async def test_queued_job_past_its_deadline_ends_job_timeout_when_a_slot_frees(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    # The sweep is too slow to see it: the freed slot ends it, and starts the next.
    hub = await make_hub(sweep_interval_ms=60_000)
    node, session, job1 = await busy_node(connect, hub)
    await submit(session, "c-2", timeout_ms=100)
    late = await expect(session, "queued", ref="c-2")
    await submit(session, "c-3")
    await expect(session, "queued", ref="c-3")
    await asyncio.sleep(150 * MS)

    await result(node, job1)
    frames = [await receive(session) for _ in range(3)]
    assert {(f["type"], f["ref"], f.get("error")) for f in frames} == {
        ("result", "c-1", None),
        ("result", "c-2", "JOB_TIMEOUT"),
        ("accepted", "c-3", None),
    }
    assert next(f for f in frames if f["ref"] == "c-2")["job_id"] == late["job_id"]
    job3 = await expect(node, "job")
    assert job3["job_id"] != late["job_id"]
    assert (await job_record(redis, keys, late["job_id"]))["attempt"] == "0"
    await check_invariants(redis, keys, ["gpu-1"])


async def test_job_for_a_pair_whose_only_node_drains_gets_empty_pool(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node, session, _ = await busy_node(connect, hub)
    await node.send('{"type": "drain"}')
    await wait_for(
        lambda: _is(redis, keys, "gpu-1", "state", "draining"),
        timeout=1000 * MS,
        what="gpu-1 draining",
    )

    # protocol.md §6: refused at once, not left waiting for a node that leaves.
    await submit(session, "c-2")
    await expect(session, "error", ref="c-2", code="EMPTY_POOL")
    assert await redis.zcard(keys.queued) == 0


async def test_job_frame_carries_every_field_of_protocol(
    hub: Hub, connect: Connect, redis: Redis
) -> None:
    node = await open_node(connect, hub, "gpu-1", languages=["zh", "en"])
    session = await connect(hub, "/v1/session")
    welcome = await expect(session, "welcome")
    before_ms = int((await redis.time())[0]) * 1000
    await submit(
        session, "c-1", src_lang="ZH", tgt_lang="en", payload={"text": "你好"}, timeout_ms=5000
    )
    accepted = await expect(session, "accepted", ref="c-1", node_id="gpu-1", attempt=1)
    job = await expect(node, "job")
    assert job == {
        "type": "job",
        "job_id": accepted["job_id"],
        "attempt": 1,
        "session_id": welcome["session_id"],
        "src_lang": "zh",
        "tgt_lang": "en",
        "payload": {"text": "你好"},
        "deadline_ms": job["deadline_ms"],
    }
    # Absolute Unix ms on Redis's clock, timeout_ms after acceptance.
    assert before_ms + 4000 <= job["deadline_ms"] <= before_ms + 7000


# Partials and results


async def test_partials_are_relayed_in_order_then_one_result(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1", payload={"text": "hello"})
    accepted = await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    texts = ["b", "bon", "bonjour"]
    for text in texts:
        await partial(node, job, {"text": text, "final": False})
    for text in texts:
        await expect(
            session,
            "partial",
            ref="c-1",
            job_id=accepted["job_id"],
            result={"text": text, "final": False},
        )
    await result(node, job, result={"text": "bonjour", "final": True})
    frame = await expect(session, "result", ref="c-1")
    assert frame == {
        "type": "result",
        "ref": "c-1",
        "job_id": accepted["job_id"],
        "status": "finished",
        "result": {"text": "bonjour", "final": True},
        "error": None,
    }
    await expect_silence(session, 50 * MS)
    await wait_running(redis, keys, "gpu-1", 0)


async def test_node_failure_is_relayed_as_a_failed_result(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    await result(node, job, status="failed", error="CUDA out of memory")
    await expect(
        session, "result", ref="c-1", status="failed", result=None, error="CUDA out of memory"
    )
    await wait_running(redis, keys, "gpu-1", 0)


async def test_ref_can_be_reused_after_its_result(hub: Hub, connect: Connect) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    for n in range(2):
        await submit(session, "same", payload={"n": n})
        await expect(session, "accepted", ref="same")
        job = await expect(node, "job", payload={"n": n})
        await result(node, job, result={"n": n})
        await expect(session, "result", ref="same", result={"n": n})


# Binary audio (protocol.md §2)

AUDIO_100K = random.Random(3).randbytes(100_000)


@pytest.mark.parametrize("audio", [ALL_BYTES, AUDIO_100K], ids=["all-256-bytes", "100KB"])
async def test_binary_audio_reaches_the_node_byte_exact(
    hub: Hub, connect: Connect, audio: bytes
) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1", payload={"codec": "pcm16"}, audio=audio)
    accepted = await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job", job_id=accepted["job_id"], payload={"codec": "pcm16"})
    assert "audio" in job, "a job with audio reaches the node as a binary frame"
    assert job["audio"] == audio
    await result(node, job, result={"bytes": len(job["audio"])})
    await expect(session, "result", ref="c-1", result={"bytes": len(audio)})


async def test_job_without_audio_reaches_the_node_as_text(hub: Hub, connect: Connect) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    message = await node.recv()
    assert isinstance(message, str)
    assert orjson.loads(message)["payload"] == {}


# Node loss


async def test_lost_node_job_is_redispatched_to_another_node(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    nodes = {nid: await open_node(connect, hub, nid, max_jobs=1) for nid in ("gpu-1", "gpu-2")}
    session = await open_session(connect, hub)
    await submit(session, "c-1", payload={"text": "hi"}, audio=ALL_BYTES)
    first = await expect(session, "accepted", ref="c-1", attempt=1)
    lost, other = first["node_id"], ({"gpu-1", "gpu-2"} - {first["node_id"]}).pop()
    await expect(nodes[lost], "job", job_id=first["job_id"], attempt=1)
    await partial(nodes[lost], {"job_id": first["job_id"], "attempt": 1}, {"text": "s"})
    await expect(session, "partial", ref="c-1", result={"text": "s"})

    # Kill the socket mid-job, without a closing handshake.
    assert nodes[lost].transport is not None
    nodes[lost].transport.abort()

    second = await expect(
        session, "accepted", ref="c-1", job_id=first["job_id"], node_id=other, attempt=2
    )
    job = await expect(nodes[other], "job", job_id=first["job_id"], attempt=2)
    assert job["payload"] == {"text": "hi"} and job["audio"] == ALL_BYTES
    assert second["attempt"] == job["attempt"]
    await check_invariants(redis, keys, nodes)
    await result(nodes[other], job, result={"text": "salut"})
    await expect(session, "result", ref="c-1", status="finished", result={"text": "salut"})
    await expect_silence(session, 100 * MS)
    await wait_running(redis, keys, other, 0)
    assert (await node_hash(redis, keys, lost))["state"] == "lost"
    await check_invariants(redis, keys, nodes)


async def test_accepted_of_an_older_attempt_is_not_sent_after_a_newer_one(
    hub: Hub, connect: Connect
) -> None:
    """A dispatch reply handled after the re-dispatch that followed it (its
    node was lost meanwhile) must not announce the older attempt last."""
    nodes = {nid: await open_node(connect, hub, nid, max_jobs=1) for nid in ("gpu-1", "gpu-2")}
    session = await open_session(connect, hub)
    (session_id,) = hub.registry.sessions
    await submit(session, "c-1", payload={"text": "hi"})
    first = await expect(session, "accepted", ref="c-1", attempt=1)
    lost, other = first["node_id"], ({"gpu-1", "gpu-2"} - {first["node_id"]}).pop()
    await expect(nodes[lost], "job", job_id=first["job_id"], attempt=1)
    assert nodes[lost].transport is not None
    nodes[lost].transport.abort()
    await expect(session, "accepted", ref="c-1", node_id=other, attempt=2)
    job = await expect(nodes[other], "job", job_id=first["job_id"], attempt=2)

    stale = encode_accepted("c-1", JobId(first["job_id"]), NodeId(lost), 1)
    hub.outbox.send_session(hub.hub_id, session_id, stale, job_id=first["job_id"], attempt=1)
    meta = {"s": session_id, "j": first["job_id"], "a": 1}
    hub.outbox.receive_bus(encode_envelope(b"S", meta, stale))
    await expect_silence(session, 100 * MS)

    await result(nodes[other], job, result={"text": "salut"})
    await expect(session, "result", ref="c-1", status="finished", result={"text": "salut"})
    assert not hub.registry.sessions[session_id].attempts  # forgotten with the result


async def test_lost_node_job_fails_with_node_lost_when_no_other_node(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    accepted = await expect(session, "accepted", ref="c-1")
    await expect(node, "job")
    await node.close()
    await expect(
        session,
        "result",
        ref="c-1",
        job_id=accepted["job_id"],
        status="failed",
        error="NODE_LOST",
    )
    await expect_silence(session, 100 * MS)
    assert (await node_hash(redis, keys, "gpu-1"))["state"] == "lost"


async def test_node_that_registers_again_replaces_the_old_connection_with_4002(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    old = await open_node(connect, hub, "gpu-1", max_jobs=1)
    new = await connect(hub, "/v1/node")
    await register(new, node_id="gpu-1", max_jobs=3)
    await expect_closed(old, 4002)
    assert (await node_hash(redis, keys, "gpu-1"))["max_jobs"] == "3"
    # The new connection gets the jobs.
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1", node_id="gpu-1")
    job = await expect(new, "job")
    await result(new, job, result={})
    await expect(session, "result", ref="c-1", status="finished")
    await check_invariants(redis, keys, ["gpu-1"])


# Session loss and cancel


async def test_session_that_leaves_gets_its_jobs_cancelled_on_the_node(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    # resume_window_s=0 in the test settings: its jobs are cancelled at once.
    node = await open_node(connect, hub, "gpu-1", max_jobs=2)
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    accepted = await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    await wait_running(redis, keys, "gpu-1", 1)
    await session.close()
    await expect(
        node, "cancel", job_id=accepted["job_id"], attempt=job["attempt"], reason="CANCELLED"
    )
    await wait_running(redis, keys, "gpu-1", 0)
    # The late result does not count.
    await result(node, job, result={})
    await expect(node, "error", code="STALE_ATTEMPT")
    await check_invariants(redis, keys, ["gpu-1"])


async def test_session_cancel_ends_the_job_as_cancelled_and_tells_the_node(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    accepted = await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    await session.send('{"type": "cancel", "ref": "c-1"}')
    await expect(
        session,
        "result",
        ref="c-1",
        job_id=accepted["job_id"],
        status="failed",
        error="CANCELLED",
    )
    await expect(node, "cancel", job_id=job["job_id"], attempt=1, reason="CANCELLED")
    await wait_running(redis, keys, "gpu-1", 0)
    await result(node, job, result={})
    await expect(node, "error", code="STALE_ATTEMPT")
    await expect_silence(session, 50 * MS)
    # The ref is free again.
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")


async def test_session_cancel_of_a_queued_job(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1", max_jobs=1)
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    await submit(session, "c-2")
    queued = await expect(session, "queued", ref="c-2")
    await session.send('{"type": "cancel", "ref": "c-2"}')
    await expect(
        session, "result", ref="c-2", job_id=queued["job_id"], status="failed", error="CANCELLED"
    )
    await result(node, job, result={})
    await expect(session, "result", ref="c-1", status="finished")
    # The cancelled job never reaches the node.
    await expect_silence(node, 100 * MS)
    await wait_running(redis, keys, "gpu-1", 0)


# Timeouts


async def test_job_past_its_timeout_fails_with_job_timeout_and_is_cancelled_on_the_node(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1", timeout_ms=150)
    accepted = await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    await expect(
        session,
        "result",
        ref="c-1",
        job_id=accepted["job_id"],
        status="failed",
        error="JOB_TIMEOUT",
        within=1500 * MS,
    )
    await expect(node, "cancel", job_id=job["job_id"], attempt=1, reason="JOB_TIMEOUT")
    await wait_running(redis, keys, "gpu-1", 0)
    await result(node, job, result={})
    await expect(node, "error", code="STALE_ATTEMPT")
    await check_invariants(redis, keys, ["gpu-1"])


# Drain


async def test_draining_node_gets_no_new_jobs_and_is_closed_with_4003_after_its_last_result(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    draining = await open_node(connect, hub, "gpu-1", max_jobs=4)
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1", node_id="gpu-1")
    job = await expect(draining, "job")
    other = await open_node(connect, hub, "gpu-2", max_jobs=4)
    await draining.send('{"type": "drain"}')
    await wait_for(
        lambda: _is(redis, keys, "gpu-1", "state", "draining"),
        timeout=1000 * MS,
        what="gpu-1 draining",
    )
    # gpu-1 is the session's previous node and has free slots: still not chosen.
    for ref in ("c-2", "c-3"):
        await submit(session, ref)
        await expect(session, "accepted", ref=ref, node_id="gpu-2")
        await expect(other, "job")
    await expect_silence(draining, 50 * MS)
    # Results still count while draining; the last one closes the connection.
    await partial(draining, job, {"text": "p"})
    await expect(session, "partial", ref="c-1")
    await result(draining, job, result={"text": "done"})
    await expect(session, "result", ref="c-1", status="finished", result={"text": "done"})
    await expect_closed(draining, 4003)
    await check_invariants(redis, keys, ["gpu-1", "gpu-2"])


async def test_idle_node_that_drains_is_closed_with_4003_at_once(
    hub: Hub, connect: Connect
) -> None:
    node = await open_node(connect, hub, "gpu-1")
    await node.send('{"type": "drain"}')
    await expect_closed(node, 4003)


# HTTP endpoints


async def test_healthz_answers_200(hub: Hub) -> None:
    status, _, body = await http_get(hub.port, "/healthz")
    assert status == 200, body


async def test_readyz_answers_200_when_ready(hub: Hub) -> None:
    status, _, body = await http_get(hub.port, "/readyz")
    assert status == 200, body


async def test_readyz_answers_503_when_redis_is_unreachable(
    make_hub: MakeHub, spawn_redis: Callable[..., RedisProcess]
) -> None:
    server = spawn_redis()
    hub = await make_hub(redis_url=server.url, redis_timeout_s=0.2)
    assert (await http_get(hub.port, "/readyz"))[0] == 200
    await asyncio.to_thread(server.kill)

    async def not_ready() -> bool:
        return (await http_get(hub.port, "/readyz"))[0] == 503

    await wait_for(not_ready, timeout=3000 * MS, interval=50 * MS, what="/readyz to answer 503")
    # Liveness does not depend on Redis.
    assert (await http_get(hub.port, "/healthz"))[0] == 200


async def test_metrics_are_prometheus_text_with_hub_metrics(hub: Hub, connect: Connect) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    await result(node, job, result={})
    await expect(session, "result", ref="c-1")
    status, headers, body = await http_get(hub.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert "# TYPE hub_jobs_dispatched_total counter" in text or (
        "# TYPE hub_jobs_dispatched counter" in text
    )
    samples = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert float(samples["hub_jobs_dispatched_total"]) == 1
    assert float(samples["hub_nodes_connected"]) == 1
    assert float(samples["hub_sessions_connected"]) == 1
    assert float(samples["hub_ready"]) == 1


async def test_status_lists_nodes_with_load_and_queues(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1", max_jobs=1, pools=["premium"])
    await node.send('{"type": "load", "load": {"gpu_util": 0.25}}')
    await wait_for(lambda: _field(redis, keys, "gpu-1", "load"), timeout=1000 * MS)
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    await submit(session, "c-2")
    await expect(session, "queued", ref="c-2")

    status, headers, body = await http_get(hub.port, "/v1/status")
    assert status == 200
    assert headers["content-type"] == "application/json"
    data = orjson.loads(body)
    assert data["hub_id"] == hub.hub_id
    [entry] = data["nodes"]
    assert {
        k: entry[k]
        for k in ("node_id", "hub_id", "running", "max_jobs", "pools", "draining", "load")
    } == {
        "node_id": "gpu-1",
        "hub_id": hub.hub_id,
        "running": 1,
        "max_jobs": 1,
        "pools": ["premium"],
        "draining": False,
        "load": {"gpu_util": 0.25},
    }
    assert sorted(entry["lang_pairs"]) == [["en", "fr"], ["fr", "en"]]
    assert list(data["queues"].values()) == [1]


async def test_unknown_http_path_is_404(hub: Hub) -> None:
    assert (await http_get(hub.port, "/nope"))[0] == 404


# Slow consumers


async def test_session_that_does_not_read_is_closed_with_4005_and_others_keep_going(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    # A long lease: this test keeps the event loop busy with 200 KB frames.
    hub = await make_hub(send_buffer_bytes=64 * 1024, node_lease_ms=round(10_000_000 * MS))
    node = await open_node(connect, hub, "gpu-1", max_jobs=2)
    slow = await open_session(connect, hub)
    fast = await open_session(connect, hub)
    await submit(slow, "slow")
    slow_job = await expect(node, "job")
    await expect(slow, "accepted", ref="slow")
    assert slow.transport is not None
    slow.transport.pause_reading()

    big = {"text": "x" * 200_000}
    for _ in range(200):  # at most 40 MB, far more than the socket buffers hold
        await partial(node, slow_job, big)
        if _slow_closed(hub):
            break
    assert _slow_closed(hub) == 1, "the slow session was never closed"

    # The hub is not stalled: the other session's job goes through.
    await submit(fast, "fast")
    await expect(fast, "accepted", ref="fast")
    job = await expect(node, "job")
    await partial(node, job, {"text": "f"})
    await expect(fast, "partial", ref="fast")
    await result(node, job, result={"text": "fast"})
    await expect(fast, "result", ref="fast", status="finished")

    slow.transport.resume_reading()
    frames = await expect_closed(slow, 4005, within=5000 * MS)
    assert {f["type"] for f in frames} <= {"partial"}
    # The slow session left: its job is cancelled and the slot comes back.
    await expect(node, "cancel", job_id=slow_job["job_id"], reason="CANCELLED")
    await wait_running(redis, keys, "gpu-1", 0)
    await check_invariants(redis, keys, ["gpu-1"])


# Shutdown


async def test_close_lets_node_jobs_finish_then_closes_sessions_with_1001(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(shutdown_grace_s=2.0)
    node = await open_node(connect, hub, "gpu-1", max_jobs=2)
    session = await open_session(connect, hub)
    idle = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")

    closing = asyncio.create_task(hub.close())
    await asyncio.sleep(100 * MS)
    assert not closing.done(), "close() did not wait for the running job"
    # No new connections while shutting down.
    with pytest.raises((OSError, InvalidHandshake)):
        await connect(hub, "/v1/session")
    # No new jobs for the node while it finishes: a new job waits for a
    # resume on another hub.
    await submit(session, "c-2")
    assert (await receive(session))["type"] in ("queued", "error")
    await expect_silence(node, 50 * MS)

    await result(node, job, result={"text": "done"})
    await expect(session, "result", ref="c-1", status="finished", result={"text": "done"})
    async with asyncio.timeout(2000 * MS):
        await closing
    await expect_closed(session, 1001)
    await expect_closed(idle, 1001)
    await expect_closed(node, 1001)


async def test_close_does_not_wait_past_the_grace(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(shutdown_grace_s=0.3)
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    await expect(node, "job")
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(3000 * MS):
        await hub.close()
    assert loop.time() - started < 2.0
    await expect_closed(session, 1001)
    await expect_closed(node, 1001)
    # The node this hub owned is released in Redis.
    assert (await node_hash(redis, keys, "gpu-1"))["state"] == "lost"


# Helpers


async def _field(redis: Redis, keys: Keys, node_id: str, name: str) -> str | None:
    return (await node_hash(redis, keys, node_id)).get(name)


async def _later(redis: Redis, keys: Keys, node_id: str, name: str, than: str) -> bool:
    value = await _field(redis, keys, node_id, name)
    return value is not None and int(value) > int(than)


async def _is(redis: Redis, keys: Keys, node_id: str, name: str, value: str) -> bool:
    return await _field(redis, keys, node_id, name) == value


def _slow_closed(hub: Hub) -> float:
    return hub.metrics.registry.get_sample_value("hub_slow_connections_closed_total") or 0
