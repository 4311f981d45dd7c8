"""node_lost.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

import pytest

from hub.errors import ErrorCode, SchedulingError
from hub.events import CancelAttempt, JobEnded, NodeLost

from .lua_support import (
    EN_FR,
    T0,
    cancels,
    dispatch_of,
    dispatches,
    ended,
    free,
    job_hash,
    node_hash,
    pool_of,
    register,
    smembers,
    stats,
)

POOL = pool_of()
ALPHA = pool_of("alpha")


async def dispatch(scheduler, session_id, job_id, **kwargs):
    kwargs.setdefault("now_ms", T0)
    return await scheduler.dispatch_task(session_id, "en", "fr", b"{}", job_id=job_id, **kwargs)


async def refused(scheduler, node_id, **kwargs) -> SchedulingError:
    with pytest.raises(SchedulingError) as caught:
        await scheduler.node_lost(node_id, now_ms=T0 + 50, **kwargs)
    return caught.value


# Returns: {1, {events}}


async def test_node_lost_redispatches_its_job_as_a_new_attempt(make_scheduler, redis, keys):
    h1 = await make_scheduler(hub_id="h1")
    h2 = await make_scheduler(hub_id="h2")
    await register(h1, "n1", max_jobs=1)
    await h1.dispatch_task(
        "s1", "en", "fr", b'{"t":"x"}', has_audio=True, ref="r1", job_id="j1", now_ms=T0
    )
    await register(h2, "n2", max_jobs=2)

    events = await h2.node_lost("n1", epoch=1, now_ms=T0 + 100)

    assert events == (
        CancelAttempt("h1", "n1", "j1", 1, "NODE_LOST"),
        dispatch_of("j1", "n2", 2, node_hub="h2", payload=b'{"t":"x"}', audio_hub="h1", ref="r1"),
        NodeLost("h1", "n1", 1),
    )
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["node"], job["attempt"], job["hist"]) == (
        b"running",
        b"n2",
        b"2",
        b",n1@1,n2@2,",
    )
    assert job["audio"] == b"1"
    assert job["deadline"] == str(T0 + 10_000).encode()  # the deadline does not move
    assert (await node_hash(redis, keys, "n2"))["running"] == "1"
    assert await smembers(redis, keys.node_jobs("n2")) == {"j1"}
    assert await free(redis, keys, POOL) == {"n2": 0.5}
    # The lost node is out of everything; a tombstone keeps its epoch.
    assert await node_hash(redis, keys, "n1") == {"state": "lost", "epoch": "1"}
    assert await redis.pttl(keys.node("n1")) > 0
    assert await redis.exists(keys.node_jobs("n1")) == 0
    assert await redis.zscore(keys.seen, "n1") is None
    assert await smembers(redis, keys.pool_nodes(POOL)) == {"n2"}
    assert (await stats(redis, keys, h1, h2)).get("redispatched") == 1
    assert (await stats(redis, keys, h1, h2)).get("nodes_lost") == 1


async def test_node_lost_without_epoch_loses_whatever_is_registered(scheduler, redis, keys):
    await register(scheduler, "n1")
    await register(scheduler, "n1", now_ms=T0 + 1)

    assert await scheduler.node_lost("n1", now_ms=T0 + 2) == (NodeLost("h1", "n1", 2),)

    assert (await node_hash(redis, keys, "n1"))["state"] == "lost"
    assert await free(redis, keys, POOL) == {}


async def test_node_lost_leaves_the_live_sets_of_its_pairs(scheduler, redis, keys):
    de_en = (("de", "en"),)
    await register(scheduler, "n1", pairs=EN_FR + de_en)
    await register(scheduler, "n2", pairs=de_en)

    await scheduler.node_lost("n1", now_ms=T0 + 1)

    assert await redis.exists(keys.live("en", "fr")) == 0
    assert await smembers(redis, keys.live("de", "en")) == {"n2"}


async def test_node_lost_fails_the_job_when_no_node_is_free(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1", ref="r1", has_audio=True)
    await register(scheduler, "n2", max_jobs=1)
    await dispatch(scheduler, "s2", "j2")

    events = await scheduler.node_lost("n1", now_ms=T0 + 5)

    assert events == (
        CancelAttempt("h1", "n1", "j1", 1, "NODE_LOST"),
        JobEnded("h1", "s1", "j1", "r1", "failed", b"null", "NODE_LOST"),
        NodeLost("h1", "n1", 1),
    )
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["error"], job["attempt"]) == (b"failed", b"NODE_LOST", b"1")
    assert "payload" not in job and "audio" not in job
    assert 0 < await redis.pttl(keys.job("j1")) <= scheduler.settings.job_ttl_ms
    assert await redis.zscore(keys.deadlines, "j1") is None
    assert (await node_hash(redis, keys, "n2"))["running"] == "1"
    assert (await stats(redis, keys, scheduler)).get("error:NODE_LOST") == 1


async def test_node_lost_fails_the_job_past_its_deadline(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1", timeout_ms=100)
    await register(scheduler, "n2", max_jobs=1)

    events = await scheduler.node_lost("n1", now_ms=T0 + 100)

    assert ended(events) == [JobEnded("h1", "s1", "j1", "", "failed", b"null", "NODE_LOST")]
    assert dispatches(events) == []
    assert await free(redis, keys, POOL) == {"n2": 0.0}


async def test_node_lost_fails_the_job_after_max_attempts(make_scheduler, redis, keys):
    scheduler = await make_scheduler(max_attempts=2)
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1")
    await register(scheduler, "n2", max_jobs=1)
    first = await scheduler.node_lost("n1", now_ms=T0 + 1)
    assert [(d.node_id, d.attempt) for d in dispatches(first)] == [("n2", 2)]
    await register(scheduler, "n3", max_jobs=1, now_ms=T0 + 2)

    second = await scheduler.node_lost("n2", now_ms=T0 + 3)

    assert cancels(second) == [CancelAttempt("h1", "n2", "j1", 2, "NODE_LOST")]
    assert ended(second) == [JobEnded("h1", "s1", "j1", "", "failed", b"null", "NODE_LOST")]
    assert await free(redis, keys, POOL) == {"n3": 0.0}
    assert (await job_hash(redis, keys, "j1"))["hist"] == b",n1@1,n2@2,"


async def test_node_lost_settles_each_job_once_in_order(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=3)
    for jid in ("jc", "ja", "jb"):
        await dispatch(scheduler, f"s-{jid}", jid)
    await register(scheduler, "n2", max_jobs=2)
    await dispatch(scheduler, "other", "jx")

    events = await scheduler.node_lost("n1", now_ms=T0 + 1)

    # Sorted by job id: ja takes n2's last slot, the others fail.
    names = [(type(e).__name__, e.node_id if isinstance(e, NodeLost) else e.job_id) for e in events]
    assert names == [
        ("CancelAttempt", "ja"),
        ("Dispatch", "ja"),
        ("CancelAttempt", "jb"),
        ("JobEnded", "jb"),
        ("CancelAttempt", "jc"),
        ("JobEnded", "jc"),
        ("NodeLost", "n1"),
    ]
    assert (await node_hash(redis, keys, "n2"))["running"] == "2"
    assert await smembers(redis, keys.node_jobs("n2")) == {"ja", "jx"}


async def test_node_lost_redispatches_within_the_sessions_pool(scheduler, redis, keys):
    await register(scheduler, "a1", max_jobs=1, pools=("alpha",))
    await dispatch(scheduler, "s1", "j1")
    await register(scheduler, "a2", max_jobs=2, pools=("alpha",))
    await dispatch(scheduler, "other", "j2")  # a2 at 0.5
    await register(scheduler, "b1", max_jobs=2, pools=("beta",))

    events = await scheduler.node_lost("a1", now_ms=T0 + 1)

    assert [(d.node_id, d.attempt) for d in dispatches(events)] == [("a2", 2)]
    assert (await redis.hget(keys.session("s1"), "pool")) == ALPHA.encode()


# Returns: -8, -9


async def test_node_lost_of_an_unknown_or_lost_node_returns_unknown_node(scheduler, redis, keys):
    await register(scheduler, "n1")
    await scheduler.node_lost("n1", now_ms=T0)

    for nid in ("never", "n1"):
        error = await refused(scheduler, nid)
        assert error.error_code is ErrorCode.UNKNOWN_NODE
        assert error.code == "NOT_REGISTERED"
        assert str(error) == "NOT_REGISTERED: the node is not registered"
    assert await redis.exists(keys.node("never")) == 0
    assert (await stats(redis, keys, scheduler)).get("nodes_lost") == 1


async def test_node_lost_of_an_older_connection_returns_stale_epoch(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await dispatch(scheduler, "s1", "j1")
    await register(scheduler, "n1", max_jobs=2, resume=["j1"], now_ms=T0 + 1)

    error = await refused(scheduler, "n1", epoch=1)

    assert error.error_code is ErrorCode.STALE_EPOCH
    assert str(error) == "NOT_REGISTERED: the node registered again on a newer connection"
    node = await node_hash(redis, keys, "n1")
    assert (node["state"], node["epoch"], node["running"]) == ("live", "2", "1")
    assert (await job_hash(redis, keys, "j1"))["status"] == b"running"
    assert await free(redis, keys, POOL) == {"n1": 0.5}
