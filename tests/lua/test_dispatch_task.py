"""dispatch_task.lua: every line of its Returns block, and how it picks a node."""

from __future__ import annotations

import pytest

from hub.errors import ErrorCode, SchedulingError
from hub.events import Accepted, Beat, Queued

from .lua_support import T0, free, job_hash, node_hash, pool_of, register, smembers, stats

POOL = pool_of()
ALPHA = pool_of("alpha")
BETA = pool_of("beta")


async def dispatch(scheduler, session_id="s1", src="en", tgt="fr", **kwargs):
    kwargs.setdefault("now_ms", T0)
    return await scheduler.dispatch_task(session_id, src, tgt, b"{}", **kwargs)


async def refused(scheduler, session_id="s1", src="en", tgt="fr", **kwargs) -> SchedulingError:
    with pytest.raises(SchedulingError) as caught:
        await dispatch(scheduler, session_id, src, tgt, **kwargs)
    return caught.value


# Returns: {1, node_id, attempt, node_hub, deadline_ms}


async def test_dispatch_task_accepted_takes_a_slot(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2, hub_id="hn")

    accepted = await scheduler.dispatch_task(
        "s1",
        "EN",
        "Fr",
        b'{"text":"hello"}',
        ref="r1",
        has_audio=True,
        timeout_ms=7_000,
        job_id="j1",
        session_hub="hs",
        now_ms=T0 + 10,
    )

    assert accepted == Accepted("j1", "n1", 1, "hn", T0 + 10 + 7_000)
    job = await job_hash(redis, keys, "j1")
    assert job == {
        "session": b"s1",
        "ref": b"r1",
        "src": b"en",
        "tgt": b"fr",
        "payload": b'{"text":"hello"}',
        "audio": b"1",
        "deadline": str(T0 + 7_010).encode(),
        "shub": b"hs",
        "status": b"running",
        "attempt": b"1",
        "node": b"n1",
        "hist": b",n1@1,",
    }
    assert await redis.pttl(keys.job("j1")) == -1  # kept until the job ends
    assert await redis.zscore(keys.deadlines, "j1") == T0 + 7_010
    assert await redis.zscore(keys.queued, "j1") is None
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    assert await smembers(redis, keys.node_jobs("n1")) == {"j1"}
    assert await free(redis, keys, POOL) == {"n1": 0.5}
    assert await smembers(redis, keys.session_jobs("s1")) == {"j1"}
    session = await redis.hgetall(keys.session("s1"))
    ttl = scheduler.session_ttl_ms()
    assert session == {
        b"hub": b"hs",
        b"pool": POOL.encode(),
        b"node": b"n1",
        b"pair": b"en:fr",
        b"renew": str(T0 + 10 + ttl // 2).encode(),
    }
    assert 0 < await redis.pttl(keys.session("s1")) <= ttl
    assert 0 < await redis.pttl(keys.session_jobs("s1")) <= ttl


async def test_dispatch_task_uses_the_default_timeout(scheduler):
    await register(scheduler, "n1")

    accepted = await dispatch(scheduler, now_ms=T0 + 1)

    assert accepted.deadline_ms == T0 + 1 + scheduler.settings.job_timeout_ms


async def test_dispatch_task_picks_the_least_loaded_node(scheduler, redis, keys):
    await register(scheduler, "n2", max_jobs=2)
    assert (await dispatch(scheduler, "s0")).node_id == "n2"  # n2 at 0.5
    await register(scheduler, "n1", max_jobs=5)

    # Fresh sessions each time, so no session affinity gets in the way.
    picks = [(await dispatch(scheduler, f"s{i}")).node_id for i in range(1, 7)]

    # n1: 0 -> .2 -> .4 -> .6; n2 (.5) is lower; n1: .6 -> .8 -> 1.
    assert picks == ["n1", "n1", "n1", "n2", "n1", "n1"]
    assert (await node_hash(redis, keys, "n1"))["running"] == "5"
    assert (await node_hash(redis, keys, "n2"))["running"] == "2"
    assert await free(redis, keys, POOL) == {}


async def test_dispatch_task_never_runs_more_than_max_jobs(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await register(scheduler, "n2", max_jobs=3)

    replies = [await dispatch(scheduler, f"s{i}") for i in range(9)]

    accepted = [r for r in replies if isinstance(r, Accepted)]
    assert [type(r) for r in replies] == [Accepted] * 5 + [Queued] * 4
    assert sum(r.node_id == "n1" for r in accepted) == 2
    assert sum(r.node_id == "n2" for r in accepted) == 3
    assert (await node_hash(redis, keys, "n1"))["running"] == "2"
    assert (await node_hash(redis, keys, "n2"))["running"] == "3"


@pytest.mark.parametrize(
    "pools",
    [
        pytest.param({"n1": "default", "n2": "default"}, id="within-a-pool"),
        pytest.param({"a1": "alpha", "b1": "beta"}, id="between-pools"),
    ],
)
async def test_dispatch_task_breaks_ties_at_random(scheduler, pools):
    for node_id, pool in pools.items():
        await register(scheduler, node_id, max_jobs=1, pools=(pool,))
    picks = set()

    for i in range(40):
        accepted = await dispatch(scheduler, f"s{i}", job_id=f"j{i}")
        picks.add(accepted.node_id)
        await scheduler.cancel_task(f"j{i}", f"s{i}", now_ms=T0)

    # Each pick is a fair coin (the seed comes from the hub); 40 heads in a
    # row has probability 2**-39.
    assert picks == set(pools)


# Session affinity


async def test_dispatch_task_prefers_the_sessions_pool_then_falls_back(scheduler, redis, keys):
    await register(scheduler, "a1", max_jobs=1, pools=("alpha",))
    assert (await dispatch(scheduler, "s", job_id="j1")).node_id == "a1"
    await register(scheduler, "a2", max_jobs=2, pools=("alpha",))
    await register(scheduler, "b1", max_jobs=4, pools=("beta",))

    # a1 is full: another node of the session's pool, although b1 is as idle.
    assert (await dispatch(scheduler, "s", job_id="j2")).node_id == "a2"
    # The session's previous node while it has a free slot, though b1 is idler.
    assert await free(redis, keys, ALPHA) == {"a2": 0.5}
    assert await free(redis, keys, BETA) == {"b1": 0.0}
    assert (await dispatch(scheduler, "s", job_id="j3")).node_id == "a2"
    # The pool is full: any pool that serves the pair.
    assert (await dispatch(scheduler, "s", job_id="j4")).node_id == "b1"

    session = await redis.hgetall(keys.session("s"))
    assert (session[b"pool"], session[b"node"], session[b"pair"]) == (
        BETA.encode(),
        b"b1",
        b"en:fr",
    )
    assert (await job_hash(redis, keys, "j4"))["node"] == b"b1"
    # And the new preference sticks.
    assert (await dispatch(scheduler, "s", job_id="j5")).node_id == "b1"


async def test_dispatch_task_forgets_the_preference_when_the_pair_changes(scheduler, redis, keys):
    de_en = (("de", "en"),)
    await register(scheduler, "a1", max_jobs=4, pools=("alpha",))
    assert (await dispatch(scheduler, "s")).node_id == "a1"
    await register(scheduler, "b1", max_jobs=4, pools=("beta",))
    await register(scheduler, "g1", max_jobs=4, pairs=de_en)
    # Same pair: the previous node, though b1 is idler.
    assert (await dispatch(scheduler, "s")).node_id == "a1"

    assert (await dispatch(scheduler, "s", "de", "en")).node_id == "g1"
    assert (await redis.hget(keys.session("s"), "pair")) == b"de:en"
    # Back to en:fr: no preference left, so the least-loaded node.
    assert await free(redis, keys, ALPHA) == {"a1": 0.5}
    assert (await dispatch(scheduler, "s")).node_id == "b1"


async def test_dispatch_task_queues_for_the_pair_whatever_the_pools(scheduler, redis, keys):
    await register(scheduler, "a1", max_jobs=1, pools=("alpha",))
    assert (await dispatch(scheduler, "s1")).node_id == "a1"
    for i in range(3):
        await register(scheduler, f"b{i}", max_jobs=1, pools=("beta",))
        await dispatch(scheduler, f"other{i}")

    # Every node busy: the session that ran on alpha and a fresh one wait in
    # the pair's one queue, which a slot of either pool serves.
    assert (await dispatch(scheduler, "s1", job_id="q1")).queue == "en:fr"
    assert (await dispatch(scheduler, "s2", job_id="q2", now_ms=T0 + 1)).queue == "en:fr"
    assert await redis.lrange(keys.queue("en", "fr"), 0, -1) == [b"s1", b"s2"]
    # The head is s1's job, whose wait ends first.
    assert await redis.zrange(keys.queue_heads, 0, -1, withscores=True) == [(b"en:fr", T0 + 5_000)]


# Returns: {0, 'src:tgt', deadline_ms}


async def test_dispatch_task_queued_when_every_node_is_busy(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", job_id="j1")

    queued = await dispatch(scheduler, "s2", job_id="j2", ref="r2", now_ms=T0 + 5)

    assert queued == Queued("j2", "en:fr", T0 + 5 + 10_000)
    job = await job_hash(redis, keys, "j2")
    assert (job["status"], job["attempt"], job["ref"]) == (b"queued", b"0", b"r2")
    assert "node" not in job and job["audio"] == b""
    assert await redis.lrange(keys.queue("en", "fr"), 0, -1) == [b"s2"]
    assert await redis.lrange(keys.session_queue("en", "fr", "s2"), 0, -1) == [b"j2"]
    assert await redis.hget(keys.queue_depth, "en:fr") == b"1"
    assert await redis.zscore(keys.queue_heads, "en:fr") == T0 + 5 + 5_000
    assert await redis.zscore(keys.queued, "j2") == T0 + 5 + 5_000
    assert await redis.zscore(keys.deadlines, "j2") == T0 + 5 + 10_000
    assert await smembers(redis, keys.session_jobs("s2")) == {"j2"}
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"


# The session's TTLs


async def test_dispatch_task_renews_the_session_ttls_when_half_has_passed(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=4)
    ttl = scheduler.session_ttl_ms()
    await dispatch(scheduler, "s1", job_id="j1", now_ms=T0)
    # Shortened by hand, to tell a renewal from no renewal.
    await redis.pexpire(keys.session("s1"), 50_000)
    await redis.pexpire(keys.session_jobs("s1"), 50_000)

    # Before the renewal time: the TTLs stay as they are.
    await dispatch(scheduler, "s1", job_id="j2", now_ms=T0 + ttl // 2 - 1)
    assert await redis.pttl(keys.session("s1")) <= 50_000
    assert await redis.pttl(keys.session_jobs("s1")) <= 50_000

    # From the renewal time on: both are renewed, and so is the renewal time.
    await dispatch(scheduler, "s1", job_id="j3", now_ms=T0 + ttl // 2)
    assert await redis.pttl(keys.session("s1")) > 50_000
    assert await redis.pttl(keys.session_jobs("s1")) > 50_000
    assert await redis.hget(keys.session("s1"), "renew") == str(T0 + ttl).encode()


async def test_dispatch_task_leaves_a_recreated_jobs_set_to_the_next_renewal(
    scheduler, redis, keys
):
    await register(scheduler, "n1", max_jobs=4)
    ttl = scheduler.session_ttl_ms()
    await dispatch(scheduler, "s1", job_id="j1", now_ms=T0)
    await scheduler.complete_task("j1", "n1", 1, "finished", now_ms=T0 + 1)
    assert await redis.exists(keys.session_jobs("s1")) == 0  # gone when empty

    # Between renewals, a job that creates the set leaves it without a TTL:
    # the set empties itself, as each of its jobs ends by its deadline...
    await dispatch(scheduler, "s1", job_id="j2", now_ms=T0 + 2)
    assert await smembers(redis, keys.session_jobs("s1")) == {"j2"}
    assert await redis.pttl(keys.session_jobs("s1")) == -1
    report = await scheduler.sweep(now_ms=T0 + 2 + 10_000, lease_ms=0)
    assert report.timed_out == 1
    assert await redis.exists(keys.session_jobs("s1")) == 0

    # ...and the next renewal gives it one.
    await dispatch(scheduler, "s1", job_id="j3", now_ms=T0 + 3)
    await dispatch(scheduler, "s1", job_id="j4", now_ms=T0 + ttl // 2)
    assert 0 < await redis.pttl(keys.session_jobs("s1")) <= ttl


async def hsets(redis) -> int:
    """HSET commands Redis ran so far (scripts' included)."""
    return int((await redis.info("commandstats")).get("cmdstat_hset", {}).get("calls", 0))


async def test_dispatch_task_writes_the_session_hash_only_when_it_changes(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=4)
    await dispatch(scheduler, "s1", job_id="j1", session_hub="hs")
    before = await redis.hgetall(keys.session("s1"))

    # Nothing changed (same hub, pair and node): the job's HSET only.
    count = await hsets(redis)
    await dispatch(scheduler, "s1", job_id="j2", session_hub="hs")
    assert await hsets(redis) == count + 1
    assert (await job_hash(redis, keys, "j2"))["node"] == b"n1"

    # What the session's hash says differs: written again.
    await redis.hset(keys.session("s1"), "pool", "stale")
    await dispatch(scheduler, "s1", job_id="j3", session_hub="hs")
    assert await redis.hgetall(keys.session("s1")) == before

    # Another hub holds the session now: written.
    count = await hsets(redis)
    await dispatch(scheduler, "s1", job_id="j4", session_hub="hs2")
    assert await hsets(redis) == count + 2
    assert await redis.hgetall(keys.session("s1")) == before | {b"hub": b"hs2"}


async def test_dispatch_task_queued_tracks_the_session(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s0", job_id="j0")

    await dispatch(scheduler, "s1", job_id="j1", session_hub="hs")

    assert await smembers(redis, keys.session_jobs("s1")) == {"j1"}
    assert await redis.hgetall(keys.session("s1")) == {
        b"hub": b"hs",
        b"renew": str(T0 + scheduler.session_ttl_ms() // 2).encode(),
    }
    assert await redis.pttl(keys.session("s1")) > 0
    assert await redis.pttl(keys.session_jobs("s1")) > 0


# Returns: -1 .. -4, -11


async def test_dispatch_task_refused_when_no_pool_serves_the_pair(scheduler, redis, keys):
    await register(scheduler, "n1")

    error = await refused(scheduler, "s1", "en", "ja", ref="r9", job_id="j1")

    assert error.error_code is ErrorCode.NO_POOL_FOR_LANG_PAIR
    assert error.code == "NO_POOL_FOR_LANG_PAIR"
    assert error.ref == "r9"
    assert str(error) == "NO_POOL_FOR_LANG_PAIR: no pool serves this language pair"
    assert await redis.exists(keys.job("j1"), keys.session("s1"), keys.session_jobs("s1")) == 0


async def test_dispatch_task_refused_when_no_live_node_serves_the_pair(scheduler, redis, keys):
    await register(scheduler, "n1")
    await scheduler.node_lost("n1", now_ms=T0)

    error = await refused(scheduler, job_id="j1")

    assert error.error_code is ErrorCode.EMPTY_POOL
    assert str(error) == "EMPTY_POOL: no live node serves this language pair"
    assert await redis.exists(keys.job("j1")) == 0


async def test_dispatch_task_refused_when_busy_and_queueing_is_off(make_scheduler, redis, keys):
    scheduler = await make_scheduler(queue_wait_ms=0)
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1")

    error = await refused(scheduler, "s2", job_id="j2")

    assert error.error_code is ErrorCode.NO_AVAILABLE_NODE
    assert str(error) == "NO_AVAILABLE_NODE: every node for this language pair is busy"
    assert await redis.exists(keys.job("j2")) == 0
    assert await redis.hget(keys.queue_depth, "en:fr") is None
    assert (await stats(redis, keys, scheduler)).get("refused:NO_AVAILABLE_NODE") == 1


async def test_dispatch_task_refused_when_the_queue_is_full(make_scheduler, redis, keys):
    scheduler = await make_scheduler(queue_max=2)
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s0")
    await dispatch(scheduler, "s1")
    await dispatch(scheduler, "s2")

    error = await refused(scheduler, "s3", job_id="j3")

    assert error.error_code is ErrorCode.QUEUE_FULL
    assert str(error) == "QUEUE_FULL: the queue for this language pair is full"
    assert await redis.exists(keys.job("j3")) == 0
    assert await redis.hget(keys.queue_depth, "en:fr") == b"2"
    assert await redis.lrange(keys.queue("en", "fr"), 0, -1) == [b"s1", b"s2"]


async def test_dispatch_task_refused_when_the_session_queued_too_many(make_scheduler, redis, keys):
    scheduler = await make_scheduler(max_queued_per_session=2)
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1")
    await dispatch(scheduler, "s1")
    await dispatch(scheduler, "s1")

    error = await refused(scheduler, "s1", job_id="j4")

    assert error.error_code is ErrorCode.SESSION_QUEUE_FULL
    assert error.code == "QUEUE_FULL"
    assert str(error) == "QUEUE_FULL: this session has too many queued jobs"
    assert await redis.exists(keys.job("j4")) == 0
    assert await redis.hget(keys.queue_depth, "en:fr") == b"2"
    # Another session still gets in.
    assert isinstance(await dispatch(scheduler, "s2"), Queued)


# Only live nodes that take jobs count as members (EMPTY_POOL otherwise)


@pytest.mark.parametrize("leaves", ["offline", "draining", "lost"])
async def test_dispatch_task_refused_when_the_pairs_only_node_takes_no_jobs(
    scheduler, redis, keys, leaves
):
    await register(scheduler, "n1", max_jobs=1)
    await register(scheduler, "g1", pairs=(("de", "en"),))  # another pair, live
    if leaves == "offline":
        await scheduler.heartbeat([Beat("n1", 1, online=False)], now_ms=T0)
    elif leaves == "draining":
        await scheduler.drain_node("n1", epoch=1)
    else:
        await scheduler.sweep(now_ms=T0 + scheduler.settings.lease_ms + 1, lease_ms=0)
        await register(scheduler, "g1", pairs=(("de", "en"),), now_ms=T0 + 20_000)

    error = await refused(scheduler, job_id="j1", now_ms=T0 + 20_001)

    assert error.error_code is ErrorCode.EMPTY_POOL
    assert await redis.exists(keys.job("j1")) == 0
    assert await redis.zcard(keys.queued) == 0


async def test_dispatch_task_queues_again_once_a_node_of_the_pair_is_live(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1, pools=("alpha",))
    await register(scheduler, "n2", max_jobs=1, pools=("beta",))
    await scheduler.heartbeat([Beat("n1", 1, online=False)], now_ms=T0)
    await scheduler.drain_node("n2", epoch=1)
    assert (await refused(scheduler, "s1")).error_code is ErrorCode.EMPTY_POOL

    # n1 comes back and gets busy: the next job waits for it.
    await scheduler.heartbeat([Beat("n1", 1, online=True)], now_ms=T0 + 1)
    assert (await dispatch(scheduler, "s1", now_ms=T0 + 2)).node_id == "n1"
    assert isinstance(await dispatch(scheduler, "s2", now_ms=T0 + 3), Queued)
