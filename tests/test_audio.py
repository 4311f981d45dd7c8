"""A job's audio stays in the hub that accepted it, never in Redis (protocol.md §8).

That hub sends every ``job`` frame of the job, whichever hub's script started
the attempt; and a node's result is recorded even when Redis stalls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from hub.app import Hub
from hub.keys import Keys
from loadtest.procs import RedisProcess
from tests.helpers import MS, wait_for
from tests.hubtools import (
    ALL_BYTES,
    Connect,
    check_invariants,
    expect,
    expect_silence,
    open_node,
    open_session,
    result,
    submit,
    wait_running,
)

MakeHub = Callable[..., Awaitable[Hub]]

AUDIO = ALL_BYTES * 64  # 16 KiB, every byte value


@pytest.fixture
async def hubs(make_hub: MakeHub) -> tuple[Hub, Hub]:
    """Hub A (the sessions' hub) and hub B on the same cell."""
    return await make_hub(hub_id="hub-a"), await make_hub(hub_id="hub-b")


async def test_audio_is_kept_by_the_hub_and_never_written_to_redis(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1", payload={"codec": "pcm16"}, audio=AUDIO)
    accepted = await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job", job_id=accepted["job_id"])
    assert job["audio"] == AUDIO

    stored = await redis.hgetall(keys.job(accepted["job_id"]))
    assert stored[b"audio"] == b"1"  # only a mark: this job has audio, kept by its hub
    assert stored[b"shub"] == hub.hub_id.encode()
    assert all(AUDIO[:64] not in value for value in stored.values())
    assert (hub.audio.used, len(hub.audio)) == (len(AUDIO), 1)

    await result(node, job, result={"n": 1})
    await expect(session, "result", ref="c-1", status="finished")
    assert (hub.audio.used, len(hub.audio)) == (0, 0)


async def test_node_lost_on_hub_b_sends_the_next_attempt_from_hub_a_to_another_node_on_b(
    hubs: tuple[Hub, Hub], connect: Connect, redis: Redis, keys: Keys
) -> None:
    a, b = hubs
    first = await open_node(connect, b, "gpu-1", max_jobs=1)
    session = await open_session(connect, a)
    await submit(session, "c-1", audio=AUDIO)
    accepted = await expect(session, "accepted", ref="c-1", node_id="gpu-1", attempt=1)
    await expect(first, "job", job_id=accepted["job_id"])
    second = await open_node(connect, b, "gpu-2", max_jobs=1)

    assert first.transport is not None
    first.transport.abort()  # hub B runs node_lost: the dispatch goes to hub A, the job back to B

    await expect(session, "accepted", ref="c-1", node_id="gpu-2", attempt=2)
    job = await expect(second, "job", job_id=accepted["job_id"], attempt=2)
    assert job["audio"] == AUDIO
    assert len(b.audio) == 0
    await result(second, job, result={"on": "gpu-2"})
    await expect(session, "result", ref="c-1", status="finished", result={"on": "gpu-2"})
    await expect_silence(session, 50 * MS)
    await wait_for(lambda: len(a.audio) == 0, what="hub A to drop the audio")
    await check_invariants(redis, keys, ["gpu-2"])


async def test_queued_job_started_by_hub_b_gets_its_audio_from_hub_a(
    hubs: tuple[Hub, Hub], connect: Connect
) -> None:
    a, b = hubs
    node = await open_node(connect, b, "gpu-1", max_jobs=1)
    session = await open_session(connect, a)
    await submit(session, "first")
    running = await expect(node, "job")
    await expect(session, "accepted", ref="first")
    await submit(session, "queued", audio=AUDIO)
    await expect(session, "queued", ref="queued")

    await result(node, running, result={})  # hub B's complete_task starts the queued job

    await expect(session, "result", ref="first", status="finished")
    await expect(session, "accepted", ref="queued", node_id="gpu-1")
    job = await expect(node, "job")
    assert job["audio"] == AUDIO
    await result(node, job, result={"n": len(job["audio"])})
    await expect(session, "result", ref="queued", result={"n": len(AUDIO)})


async def test_attempt_whose_audio_is_gone_ends_the_job_audio_lost(
    hub: Hub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    node = await open_node(connect, hub, "gpu-1", max_jobs=1)
    session = await open_session(connect, hub)
    await submit(session, "first")
    running = await expect(node, "job")
    await expect(session, "accepted", ref="first")
    await submit(session, "queued", audio=AUDIO)
    queued = await expect(session, "queued", ref="queued")
    hub.audio.drop(queued["job_id"])  # as after a restart of this hub under its id

    await result(node, running, result={})

    await expect(session, "result", ref="first", status="finished")
    await expect(session, "accepted", ref="queued")
    await expect(
        session, "result", ref="queued", job_id=queued["job_id"], status="failed",
        error="AUDIO_LOST",
    )  # fmt: skip
    await expect(node, "cancel", job_id=queued["job_id"], reason="AUDIO_LOST")
    await wait_running(redis, keys, "gpu-1", 0)
    await check_invariants(redis, keys, ["gpu-1"])


@pytest.mark.parametrize(
    ("reply_timeout_s", "held"),
    [(10.0, False), (0.5, True)],
    ids=["stall-shorter-than-the-reply-timeout", "stall-longer-than-the-reply-timeout"],
)
async def test_result_sent_while_redis_is_stopped_reaches_the_session_once(
    make_hub: MakeHub,
    spawn_redis: Callable[..., RedisProcess],
    connect: Connect,
    reply_timeout_s: float,
    held: bool,
) -> None:
    redis = spawn_redis()
    hub = await make_hub(
        redis_url=redis.url,
        redis_timeout_s=0.5,
        redis_reply_timeout_s=reply_timeout_s,
        # A sweep sent before the stall runs after it: a lease longer than the
        # stall, as in production (15 s), so the node is not expired meanwhile.
        node_lease_ms=30_000,
    )
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1", audio=AUDIO)
    accepted = await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job", job_id=accepted["job_id"])

    redis.freeze()
    try:
        await result(node, job, result={"text": "done"})
        await wait_for(lambda: not hub.ready, timeout=3000 * MS, what="the hub to see the stall")
    finally:
        redis.thaw()

    await expect(
        session, "result", ref="c-1", status="finished", result={"text": "done"}, within=10
    )
    await expect_silence(session, 300 * MS)
    await expect_silence(node, 0)  # never told to send the result again
    assert (hub.metrics.results_held._value.get() > 0) is held
    assert len(hub.audio) == 0
