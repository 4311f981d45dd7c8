"""heartbeat.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

import pytest

from hub.errors import ErrorCode, SchedulingError
from hub.events import Accepted, Beat, Dispatch, JobEnded, Queued

from .lua_support import T0, free, job_hash, node_hash, pool_of, register, smembers

POOL = pool_of()


async def test_heartbeat_records_several_nodes_in_one_call(scheduler, redis, keys):
    for nid in ("n1", "n2", "n3"):
        await register(scheduler, nid)
    calls = scheduler.calls

    codes = await scheduler.heartbeat(
        [
            Beat("n1", 1, load=b'{"gpu":0.5}', rtt_ms=1.25),
            Beat("n2", 1),
            Beat("n3", 1, load=b"{}"),
        ],
        now_ms=T0 + 100,
    )

    assert codes == [1, 1, 1]
    assert scheduler.calls == calls + 1
    n1 = await node_hash(redis, keys, "n1")
    assert (n1["seen"], n1["load"], n1["rtt_ms"]) == (str(T0 + 100), '{"gpu":0.5}', "1.250")
    n2 = await node_hash(redis, keys, "n2")
    assert n2["seen"] == str(T0 + 100)
    assert "load" not in n2 and "rtt_ms" not in n2
    assert (await node_hash(redis, keys, "n3"))["load"] == "{}"
    assert await redis.zrange(keys.seen, 0, -1, withscores=True) == [
        (b"n1", T0 + 100),
        (b"n2", T0 + 100),
        (b"n3", T0 + 100),
    ]


async def test_heartbeat_without_load_keeps_the_last_one(scheduler, redis, keys):
    await register(scheduler, "n1")
    await scheduler.heartbeat([Beat("n1", 1, load=b'{"q":3}')], now_ms=T0 + 1)

    assert await scheduler.heartbeat([Beat("n1", 1)], now_ms=T0 + 2) == [1]

    node = await node_hash(redis, keys, "n1")
    assert (node["load"], node["seen"]) == ('{"q":3}', str(T0 + 2))


async def test_heartbeat_of_no_node_makes_no_call(scheduler):
    assert await scheduler.heartbeat([], now_ms=T0) == []
    assert scheduler.calls == 0


async def test_heartbeat_of_unknown_or_lost_node_returns_minus_8(scheduler, redis, keys):
    await register(scheduler, "n1")
    await register(scheduler, "lost")
    await scheduler.node_lost("lost", now_ms=T0)

    codes = await scheduler.heartbeat(
        [Beat("never", 1), Beat("n1", 1), Beat("lost", 1)], now_ms=T0 + 5
    )

    assert codes == [-8, 1, -8]
    assert ErrorCode(codes[0]) is ErrorCode.UNKNOWN_NODE
    # Nothing recorded for them: no lease, no hash fields, no free slot.
    assert await redis.zscore(keys.seen, "never") is None
    assert await redis.zscore(keys.seen, "lost") is None
    assert await redis.exists(keys.node("never")) == 0
    assert await free(redis, keys, POOL) == {"n1": 0.0}


async def test_heartbeat_of_an_older_connection_returns_minus_9(make_scheduler, redis, keys):
    h1 = await make_scheduler(hub_id="h1")
    h2 = await make_scheduler(hub_id="h2")
    await register(h1, "n1", now_ms=T0)
    await register(h2, "n1", now_ms=T0 + 1)

    codes = await h1.heartbeat([Beat("n1", 1, online=False, load=b"{}")], now_ms=T0 + 50)

    assert codes == [-9]
    assert ErrorCode(codes[0]) is ErrorCode.STALE_EPOCH
    node = await node_hash(redis, keys, "n1")
    assert (node["seen"], node["state"], node["hub"]) == (str(T0 + 1), "live", "h2")
    assert "load" not in node
    assert await redis.zscore(keys.seen, "n1") == T0 + 1
    assert await h2.heartbeat([Beat("n1", 2)], now_ms=T0 + 50) == [1]


async def test_heartbeat_offline_takes_the_node_out_of_dispatch(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)

    assert await scheduler.heartbeat([Beat("n1", 1, online=False)], now_ms=T0 + 1) == [0]

    node = await node_hash(redis, keys, "n1")
    assert (node["state"], node["seen"]) == ("offline", str(T0 + 1))
    assert await free(redis, keys, POOL) == {}
    # No longer a live node of its pair: a job is refused rather than left
    # waiting for a node that may not come back online.
    assert await smembers(redis, keys.live("en", "fr")) == set()
    with pytest.raises(SchedulingError) as caught:
        await scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=T0 + 2)
    assert caught.value.error_code is ErrorCode.EMPTY_POOL
    # Offline again: still offline, still 0.
    assert await scheduler.heartbeat([Beat("n1", 1, online=False)], now_ms=T0 + 3) == [0]
    assert (await node_hash(redis, keys, "n1"))["state"] == "offline"


async def test_heartbeat_online_again_restores_the_free_slot_with_its_load(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=4)
    await scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=T0)
    await scheduler.heartbeat([Beat("n1", 1, online=False)], now_ms=T0 + 1)
    assert await free(redis, keys, POOL) == {}

    codes = await scheduler.heartbeat([Beat("n1", 1, online=True)], now_ms=T0 + 2)

    assert (codes, codes.events) == ([1], ())
    assert (await node_hash(redis, keys, "n1"))["state"] == "live"
    assert await smembers(redis, keys.live("en", "fr")) == {"n1"}
    assert await free(redis, keys, POOL) == {"n1": 0.25}
    accepted = await scheduler.dispatch_task("s2", "en", "fr", b"{}", now_ms=T0 + 3)
    assert isinstance(accepted, Accepted) and accepted.node_id == "n1"


async def test_heartbeat_online_does_not_undo_a_drain(scheduler, redis, keys):
    await register(scheduler, "n1")
    await scheduler.drain_node("n1", epoch=1)

    codes = await scheduler.heartbeat(
        [Beat("n1", 1, online=True)], now_ms=T0 + 1
    ) + await scheduler.heartbeat([Beat("n1", 1, online=False)], now_ms=T0 + 2)

    assert codes == [1, 0]
    assert (await node_hash(redis, keys, "n1"))["state"] == "draining"
    assert await free(redis, keys, POOL) == {}
    assert await smembers(redis, keys.live("en", "fr")) == set()


async def test_heartbeat_keeps_a_node_from_losing_its_lease(scheduler, redis, keys):
    await register(scheduler, "n1", now_ms=T0)
    await register(scheduler, "n2", now_ms=T0)
    lease = scheduler.settings.lease_ms

    await scheduler.heartbeat([Beat("n1", 1)], now_ms=T0 + lease - 1)
    report = await scheduler.sweep(now_ms=T0 + lease + 1, lease_ms=0)

    assert report.nodes_lost == 1
    assert (await node_hash(redis, keys, "n1"))["state"] == "live"
    assert (await node_hash(redis, keys, "n2"))["state"] == "lost"


async def test_heartbeat_online_again_starts_the_jobs_waiting_for_it(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await register(scheduler, "n2", max_jobs=1)
    await scheduler.heartbeat([Beat("n1", 1, online=False)], now_ms=T0)
    await scheduler.dispatch_task("s0", "en", "fr", b"{}", job_id="j0", now_ms=T0)  # on n2
    queued = await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="j1", now_ms=T0 + 1)
    assert isinstance(queued, Queued)

    codes = await scheduler.heartbeat([Beat("n1", 1, online=True)], now_ms=T0 + 2)

    assert codes == [1]
    (started,) = codes.events
    assert isinstance(started, Dispatch)
    assert (started.job_id, started.node_id, started.attempt) == ("j1", "n1", 1)
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["node"], job["hist"]) == (b"running", b"n1", b",n1@1,")
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    assert await free(redis, keys, POOL) == {}
    assert await redis.hget(keys.queue_depth, "en:fr") is None


async def test_heartbeat_online_again_starts_jobs_queued_for_another_pool(scheduler, redis, keys):
    await register(scheduler, "a1", max_jobs=1, pools=("alpha",))
    await register(scheduler, "b1", max_jobs=1, pools=("beta",))
    await scheduler.heartbeat([Beat("b1", 1, online=False)], now_ms=T0)
    await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="j1", now_ms=T0 + 1)
    queued = await scheduler.dispatch_task("s2", "en", "fr", b"{}", job_id="j2", now_ms=T0 + 2)
    assert isinstance(queued, Queued)

    codes = await scheduler.heartbeat([Beat("b1", 1, online=True)], now_ms=T0 + 3)

    assert [(d.job_id, d.node_id) for d in codes.events if isinstance(d, Dispatch)] == [
        ("j2", "b1")
    ]


async def test_heartbeat_online_again_ends_queued_jobs_past_their_deadline(scheduler, redis, keys):
    await register(scheduler, "a1", max_jobs=1)
    await register(scheduler, "b1", max_jobs=1)
    await scheduler.heartbeat([Beat("b1", 1, online=False)], now_ms=T0)
    await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="j1", now_ms=T0)
    await scheduler.dispatch_task("s2", "en", "fr", b"{}", job_id="j2", timeout_ms=50, now_ms=T0)

    codes = await scheduler.heartbeat([Beat("b1", 1, online=True)], now_ms=T0 + 50)

    assert [(e.job_id, e.error) for e in codes.events if isinstance(e, JobEnded)] == [
        ("j2", "JOB_TIMEOUT")
    ]
    assert not [e for e in codes.events if isinstance(e, Dispatch)]
    assert (await job_hash(redis, keys, "j2"))["status"] == b"failed"
    assert await free(redis, keys, POOL) == {"b1": 0.0}
