"""drain_node.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

import pytest

from hub.errors import ErrorCode, SchedulingError
from hub.events import NodeLost, Queued

from .lua_support import T0, free, node_hash, pool_of, register, smembers

POOL = pool_of()


async def refused(scheduler, node_id, epoch) -> SchedulingError:
    with pytest.raises(SchedulingError) as caught:
        await scheduler.drain_node(node_id, epoch=epoch)
    return caught.value


# Returns: {1, running}


async def test_drain_node_idle_returns_0(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await register(scheduler, "n2", max_jobs=2)

    assert await scheduler.drain_node("n1", epoch=1) == 0

    node = await node_hash(redis, keys, "n1")
    assert (node["state"], node["running"]) == ("draining", "0")
    assert await free(redis, keys, POOL) == {"n2": 0.0}
    for i in range(2):
        accepted = await scheduler.dispatch_task(f"s{i}", "en", "fr", b"{}", now_ms=T0)
        assert accepted.node_id == "n2"
    assert isinstance(await scheduler.dispatch_task("s", "en", "fr", b"{}", now_ms=T0), Queued)


async def test_drain_node_busy_returns_its_running_jobs(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=3)
    for _ in range(2):
        await scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=T0)

    assert await scheduler.drain_node("n1", epoch=1) == 2

    assert (await node_hash(redis, keys, "n1"))["state"] == "draining"
    assert await free(redis, keys, POOL) == {}
    # No longer a live node of its pair: a new job is refused, not left waiting.
    assert await smembers(redis, keys.live("en", "fr")) == set()
    with pytest.raises(SchedulingError) as caught:
        await scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=T0)
    assert caught.value.error_code is ErrorCode.EMPTY_POOL
    # Draining again changes nothing.
    assert await scheduler.drain_node("n1", epoch=1) == 2


async def test_drain_node_then_node_lost_leaves_nothing_behind(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    accepted = await scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=T0)
    await scheduler.drain_node("n1", epoch=1)
    done = await scheduler.complete_task(accepted.job_id, "n1", 1, "finished", now_ms=T0 + 1)
    assert done.drained

    assert await scheduler.node_lost("n1", epoch=1, now_ms=T0 + 2) == (NodeLost("h1", "n1", 1),)

    assert await node_hash(redis, keys, "n1") == {"state": "lost", "epoch": "1"}
    assert await redis.zscore(keys.seen, "n1") is None


# Returns: -8, -9


async def test_drain_node_of_an_unknown_or_lost_node_returns_unknown_node(scheduler, redis, keys):
    await register(scheduler, "n1")
    await scheduler.node_lost("n1", now_ms=T0)

    for nid in ("never", "n1"):
        error = await refused(scheduler, nid, 1)
        assert error.error_code is ErrorCode.UNKNOWN_NODE
    assert await redis.exists(keys.node("never")) == 0
    assert (await node_hash(redis, keys, "n1"))["state"] == "lost"


async def test_drain_node_of_an_older_connection_returns_stale_epoch(scheduler, redis, keys):
    await register(scheduler, "n1")
    await register(scheduler, "n1", now_ms=T0 + 1)

    error = await refused(scheduler, "n1", 1)

    assert error.error_code is ErrorCode.STALE_EPOCH
    assert (await node_hash(redis, keys, "n1"))["state"] == "live"
    assert await free(redis, keys, POOL) == {"n1": 0.0}
