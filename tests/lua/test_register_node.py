"""register_node.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

import orjson
import pytest

from hub.errors import ErrorCode, SchedulingError
from hub.events import Beat, CancelAttempt, JobEnded, NodeReplaced, Queued

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
    replaced,
    smembers,
)

POOL = pool_of()


async def test_register_node_first_time_returns_epoch_1(scheduler, redis, keys):
    reg = await register(scheduler, "n1", max_jobs=3, now_ms=T0)

    assert (reg.epoch, reg.resumed, reg.dropped, reg.events) == (1, (), (), ())
    node = await node_hash(redis, keys, "n1")
    assert node == {
        "hub": "h1",
        "epoch": "1",
        "max_jobs": "3",
        "services": '["asr","nmt"]',
        "pairs": '[["en","fr"]]',
        "pools": POOL,
        "opools": '["default"]',
        "state": "live",
        "running": "0",
        "seen": str(T0),
        "registered": str(T0),
        "lpairs": "en:fr",
    }
    assert await free(redis, keys, POOL) == {"n1": 0.0}
    assert await smembers(redis, keys.live("en", "fr")) == {"n1"}
    assert await redis.zscore(keys.seen, "n1") == T0
    assert await smembers(redis, keys.pools) == {POOL}
    assert await smembers(redis, keys.lang("en", "fr")) == {POOL}
    assert await smembers(redis, keys.pool_nodes(POOL)) == {"n1"}
    assert await redis.exists(keys.node_jobs("n1")) == 0


async def test_register_node_joins_every_pool_and_pair(scheduler, redis, keys):
    pairs = (("en", "fr"), ("DE", "en"))
    await register(scheduler, "n1", pairs=pairs, pools=("default", "premium"))

    p_default = pool_of("default", pairs)
    p_premium = pool_of("premium", pairs)
    assert p_default != p_premium
    node = await node_hash(redis, keys, "n1")
    assert node["pools"] == f"{p_default},{p_premium}"
    assert orjson.loads(node["opools"]) == ["default", "premium"]
    # Pairs are lowercased and sorted.
    assert orjson.loads(node["pairs"]) == [["de", "en"], ["en", "fr"]]
    for pool in (p_default, p_premium):
        assert await free(redis, keys, pool) == {"n1": 0.0}
        assert await smembers(redis, keys.pool_nodes(pool)) == {"n1"}
    assert await smembers(redis, keys.lang("en", "fr")) == {p_default, p_premium}
    assert await smembers(redis, keys.lang("de", "en")) == {p_default, p_premium}


async def test_register_node_again_replaces_the_live_connection(make_scheduler, redis, keys):
    h1 = await make_scheduler(hub_id="h1")
    h2 = await make_scheduler(hub_id="h2")
    await register(h1, "n1")

    reg = await register(h2, "n1", now_ms=T0 + 5)

    assert reg.epoch == 2
    assert reg.events == (NodeReplaced(hub="h1", node_id="n1", epoch=1),)
    node = await node_hash(redis, keys, "n1")
    assert (node["hub"], node["epoch"], node["state"], node["seen"]) == (
        "h2",
        "2",
        "live",
        str(T0 + 5),
    )


@pytest.mark.parametrize("state", ["offline", "draining"])
async def test_register_node_replaces_an_offline_or_draining_connection(
    scheduler, redis, keys, state
):
    reg = await register(scheduler, "n1")
    if state == "offline":
        assert await scheduler.heartbeat([Beat("n1", reg.epoch, online=False)], now_ms=T0) == [0]
    else:
        assert await scheduler.drain_node("n1", epoch=reg.epoch) == 0

    again = await register(scheduler, "n1", now_ms=T0 + 1)

    assert replaced(again.events) == [NodeReplaced("h1", "n1", 1)]
    assert (await node_hash(redis, keys, "n1"))["state"] == "live"
    assert await free(redis, keys, POOL) == {"n1": 0.0}


async def test_register_node_after_loss_sends_no_replaced(scheduler, redis, keys):
    await register(scheduler, "n1")
    await scheduler.node_lost("n1", epoch=1, now_ms=T0)

    reg = await register(scheduler, "n1", now_ms=T0 + 1)

    assert reg.events == ()
    assert (await node_hash(redis, keys, "n1"))["state"] == "live"
    assert await free(redis, keys, POOL) == {"n1": 0.0}


async def test_register_node_after_loss_fences_the_old_connection(scheduler, redis, keys):
    # The old connection (epoch 1) was lost; the node came back on a new one.
    # A late node_lost or heartbeat from the old connection must not touch it.
    old = await register(scheduler, "n1")
    await scheduler.node_lost("n1", epoch=old.epoch, now_ms=T0)
    new = await register(scheduler, "n1", now_ms=T0 + 1)

    assert new.epoch > old.epoch
    assert await scheduler.heartbeat([Beat("n1", old.epoch)], now_ms=T0 + 2) == [-9]
    with pytest.raises(SchedulingError) as caught:
        await scheduler.node_lost("n1", epoch=old.epoch, now_ms=T0 + 2)
    assert caught.value.error_code is ErrorCode.STALE_EPOCH
    assert (await node_hash(redis, keys, "n1"))["state"] == "live"


async def test_register_node_resume_keeps_the_jobs(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    a = await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="ja", now_ms=T0)
    b = await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="jb", now_ms=T0)
    assert a.node_id == b.node_id == "n1"

    reg = await register(scheduler, "n1", max_jobs=2, resume=["jb", "ja"], now_ms=T0 + 1)

    assert reg.epoch == 2
    assert reg.resumed == ("ja", "jb")
    assert reg.dropped == ()
    assert reg.events == (NodeReplaced("h1", "n1", 1),)
    assert (await node_hash(redis, keys, "n1"))["running"] == "2"
    assert await smembers(redis, keys.node_jobs("n1")) == {"ja", "jb"}
    assert await free(redis, keys, POOL) == {}
    for jid in ("ja", "jb"):
        job = await job_hash(redis, keys, jid)
        assert (job["status"], job["node"], job["attempt"]) == (b"running", b"n1", b"1")


async def test_register_node_redispatches_jobs_it_did_not_resume(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await scheduler.dispatch_task(
        "s1", "en", "fr", b'{"k":1}', has_audio=True, ref="r1", job_id="ja", now_ms=T0
    )
    await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="jb", now_ms=T0)
    await register(scheduler, "n2", max_jobs=1, now_ms=T0 + 1)

    reg = await register(scheduler, "n1", max_jobs=2, resume=["jb"], now_ms=T0 + 2)

    assert reg.resumed == ("jb",)
    assert reg.events == (
        NodeReplaced("h1", "n1", 1),
        CancelAttempt("h1", "n1", "ja", 1, "NODE_LOST"),
        dispatch_of("ja", "n2", 2, payload=b'{"k":1}', audio_hub="h1", ref="r1"),
    )
    job = await job_hash(redis, keys, "ja")
    assert (job["status"], job["node"], job["attempt"]) == (b"running", b"n2", b"2")
    assert job["hist"] == b",n1@1,n2@2,"
    assert job["audio"] == b"1"
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    assert (await node_hash(redis, keys, "n2"))["running"] == "1"
    assert await smembers(redis, keys.node_jobs("n1")) == {"jb"}
    assert await smembers(redis, keys.node_jobs("n2")) == {"ja"}
    assert await free(redis, keys, POOL) == {"n1": 0.5}


async def test_register_node_fails_jobs_it_did_not_resume_when_no_node_is_free(
    scheduler, redis, keys
):
    await register(scheduler, "n1", max_jobs=1)
    await scheduler.dispatch_task(
        "s1", "en", "fr", b"{}", has_audio=True, ref="r1", job_id="ja", now_ms=T0
    )

    reg = await register(scheduler, "n1", max_jobs=1, now_ms=T0 + 3)

    assert reg.resumed == ()
    assert cancels(reg.events) == [CancelAttempt("h1", "n1", "ja", 1, "NODE_LOST")]
    assert ended(reg.events) == [JobEnded("h1", "s1", "ja", "r1", "failed", b"null", "NODE_LOST")]
    job = await job_hash(redis, keys, "ja")
    assert (job["status"], job["error"]) == (b"failed", b"NODE_LOST")
    assert await redis.zscore(keys.session_done("s1"), "ja") == T0 + 3  # ended then
    assert "payload" not in job and "audio" not in job
    assert 0 < await redis.pttl(keys.job("ja")) <= 60_000
    assert (await node_hash(redis, keys, "n1"))["running"] == "0"
    assert await free(redis, keys, POOL) == {"n1": 0.0}
    assert await redis.exists(keys.node_jobs("n1")) == 0


async def test_register_node_drops_jobs_that_are_not_its_own(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await register(scheduler, "n2", max_jobs=1)
    mine = await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="j1", now_ms=T0)
    theirs = await scheduler.dispatch_task("s2", "en", "fr", b"{}", job_id="j2", now_ms=T0)
    done = await scheduler.dispatch_task("s3", "en", "fr", b"{}", job_id="j3", now_ms=T0)
    assert isinstance(done, Queued)
    mine_node = mine.node_id
    other = "n2" if mine_node == "n1" else "n1"
    assert theirs.node_id == other
    await scheduler.cancel_task("j3", "s3", now_ms=T0)

    reg = await register(
        scheduler, mine_node, max_jobs=1, resume=["j1", "j2", "j3", "nope"], now_ms=T0 + 1
    )

    assert reg.resumed == ("j1",)
    assert reg.dropped == ("j2", "j3", "nope")
    assert replaced(reg.events) == [NodeReplaced("h1", mine_node, 1)]
    assert cancels(reg.events) == []
    other_job = await job_hash(redis, keys, "j2")
    assert (other_job["status"], other_job["node"]) == (b"running", other.encode())
    assert (await node_hash(redis, keys, other))["running"] == "1"


async def test_register_node_hands_queued_jobs_to_its_free_slots(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="j1", now_ms=T0)
    q2 = await scheduler.dispatch_task(
        "s1", "en", "fr", b"{}", has_audio=True, job_id="j2", now_ms=T0 + 1
    )
    q3 = await scheduler.dispatch_task("s2", "en", "fr", b"{}", job_id="j3", now_ms=T0 + 2)
    q4 = await scheduler.dispatch_task("s2", "en", "fr", b"{}", job_id="j4", now_ms=T0 + 3)
    assert {q2.queue, q3.queue, q4.queue} == {"en:fr"}

    reg = await register(scheduler, "n2", max_jobs=2, hub_id="h2", now_ms=T0 + 10)

    got = dispatches(reg.events)
    assert [(d.job_id, d.node_id, d.attempt, d.node_hub) for d in got] == [
        ("j2", "n2", 1, "h2"),
        ("j3", "n2", 1, "h2"),
    ]
    assert got[0].audio_hub == "h1"
    assert (await node_hash(redis, keys, "n2"))["running"] == "2"
    assert await free(redis, keys, POOL) == {}
    assert await redis.hget(keys.queue_depth, "en:fr") == b"1"
    assert await redis.zrange(keys.queued, 0, -1) == [b"j4"]
    assert await redis.zscore(keys.queue_heads, "en:fr") == T0 + 3 + 5_000


async def test_register_node_with_new_capabilities_leaves_its_old_pools(scheduler, redis, keys):
    await register(scheduler, "n1", pairs=EN_FR)
    de_en = (("de", "en"),)

    await register(scheduler, "n1", pairs=de_en, now_ms=T0 + 1)

    new_pool = pool_of(pairs=de_en)
    assert await free(redis, keys, POOL) == {}
    assert await smembers(redis, keys.pool_nodes(POOL)) == set()
    assert await free(redis, keys, new_pool) == {"n1": 0.0}
    assert await smembers(redis, keys.live("en", "fr")) == set()
    assert await smembers(redis, keys.live("de", "en")) == {"n1"}
    with pytest.raises(SchedulingError) as caught:
        await scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=T0 + 2)
    assert caught.value.error_code is ErrorCode.EMPTY_POOL


async def test_register_node_starts_jobs_queued_for_its_pairs_while_other_pools_were_busy(
    scheduler, redis, keys
):
    await register(scheduler, "a1", max_jobs=1, pools=("alpha",))
    await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="j1", now_ms=T0)
    assert isinstance(
        await scheduler.dispatch_task("s2", "en", "fr", b"{}", job_id="j2", now_ms=T0 + 1), Queued
    )

    # A node of another operator pool, and another capability signature, serves en:fr too.
    reg = await register(
        scheduler, "b1", pools=("beta",), pairs=(*EN_FR, ("de", "en")), now_ms=T0 + 2
    )

    assert [(d.job_id, d.node_id) for d in dispatches(reg.events)] == [("j2", "b1")]
    assert (await job_hash(redis, keys, "j2"))["status"] == b"running"
    assert await redis.zcard(keys.queued) == 0
