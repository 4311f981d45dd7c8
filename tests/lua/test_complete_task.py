"""complete_task.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

import pytest

from hub.errors import ErrorCode, SchedulingError
from hub.events import Beat, Completion, JobEnded, Queued

from .lua_support import (
    EN_FR,
    T0,
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


async def dispatch(scheduler, session_id, job_id, **kwargs):
    kwargs.setdefault("now_ms", T0)
    return await scheduler.dispatch_task(session_id, "en", "fr", b"{}", job_id=job_id, **kwargs)


async def refused(scheduler, *args, **kwargs) -> SchedulingError:
    kwargs.setdefault("now_ms", T0 + 50)
    with pytest.raises(SchedulingError) as caught:
        await scheduler.complete_task(*args, **kwargs)
    return caught.value


# Returns: {1, result_event, drained, {events}}


async def test_complete_task_finished_ends_the_job_and_releases_the_slot(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await scheduler.dispatch_task(
        "s1", "en", "fr", b'{"a":1}', has_audio=True, ref="r1", job_id="j1", now_ms=T0
    )

    done = await scheduler.complete_task(
        "j1", "n1", 1, "finished", result=b'{"text":"salut"}', now_ms=T0 + 40
    )

    assert done == Completion(
        JobEnded("h1", "s1", "j1", "r1", "finished", b'{"text":"salut"}', None), False, ()
    )
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["result"], job["error"]) == (b"finished", b'{"text":"salut"}', b"")
    assert await redis.zscore(keys.session_done("s1"), "j1") == T0 + 40  # ended then
    assert "payload" not in job and "audio" not in job
    assert 0 < await redis.pttl(keys.job("j1")) <= scheduler.settings.job_ttl_ms
    assert await redis.zscore(keys.deadlines, "j1") is None
    assert await smembers(redis, keys.session_jobs("s1")) == set()
    assert await redis.zscore(keys.session_done("s1"), "j1") == T0 + 40
    assert (await node_hash(redis, keys, "n1"))["running"] == "0"
    assert await smembers(redis, keys.node_jobs("n1")) == set()
    assert await free(redis, keys, POOL) == {"n1": 0.0}
    assert (await stats(redis, keys, scheduler)).get("finished") == 1


async def test_complete_task_failed_keeps_the_error(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1")

    done = await scheduler.complete_task("j1", "n1", 1, "failed", error="MODEL_ERROR", now_ms=T0)

    assert done.ended == JobEnded("h1", "s1", "j1", "", "failed", b"null", "MODEL_ERROR")
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["error"], job["result"]) == (b"failed", b"MODEL_ERROR", b"null")
    assert await free(redis, keys, POOL) == {"n1": 0.0}
    assert (await stats(redis, keys, scheduler)).get("error:MODEL_ERROR") == 1


async def test_complete_task_hands_the_freed_slot_the_next_queued_job(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1, hub_id="hn")
    await dispatch(scheduler, "s1", "j1")
    queued = await scheduler.dispatch_task(
        "s2", "en", "fr", b'{"q":2}', has_audio=True, ref="r2", job_id="j2", session_hub="hs",
        now_ms=T0 + 1,
    )  # fmt: skip
    assert isinstance(queued, Queued)

    done = await scheduler.complete_task("j1", "n1", 1, "finished", now_ms=T0 + 20)

    assert done.events == (
        dispatch_of(
            "j2", "n1", 1, node_hub="hn", session_id="s2", deadline_ms=T0 + 1 + 10_000,
            payload=b'{"q":2}', audio_hub="hs", session_hub="hs", ref="r2",
        ),
    )  # fmt: skip
    job = await job_hash(redis, keys, "j2")
    assert (job["status"], job["node"], job["attempt"], job["hist"]) == (
        b"running",
        b"n1",
        b"1",
        b",n1@1,",
    )
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    assert await smembers(redis, keys.node_jobs("n1")) == {"j2"}
    assert await free(redis, keys, POOL) == {}
    assert await redis.hget(keys.queue_depth, "en:fr") is None
    assert await redis.zcard(keys.queued) == 0
    assert await redis.exists(keys.queue("en", "fr"), keys.session_queue("en", "fr", "s2")) == 0
    assert await redis.exists(keys.queue_heads) == 0
    assert (await redis.hget(keys.session("s2"), "node")) == b"n1"


async def test_complete_task_serves_the_queue_in_order_taking_turns(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s0", "j0")
    for jid in ("A1", "A2", "A3"):
        await dispatch(scheduler, "A", jid)
    await dispatch(scheduler, "B", "B1")

    order = []
    running = "j0"
    for t in range(4):
        done = await scheduler.complete_task(running, "n1", 1, "finished", now_ms=T0 + t)
        (started,) = dispatches(done.events)
        running = started.job_id
        order.append(running)

    assert order == ["A1", "B1", "A2", "A3"]
    await scheduler.complete_task(running, "n1", 1, "finished", now_ms=T0 + 9)
    assert await free(redis, keys, POOL) == {"n1": 0.0}
    assert await redis.hget(keys.queue_depth, "en:fr") is None


async def test_node_back_online_fills_its_free_slots_then_each_completion_one(
    scheduler, redis, keys
):
    await register(scheduler, "n1", max_jobs=3)
    await dispatch(scheduler, "s0", "j0")
    await scheduler.heartbeat([Beat("n1", 1, online=False)], now_ms=T0)
    await register(scheduler, "n2", max_jobs=1)  # live and busy: jobs wait
    assert (await dispatch(scheduler, "s0", "j00")).node_id == "n2"
    for i in range(4):
        assert isinstance(await dispatch(scheduler, f"s{i + 1}", f"q{i}"), Queued)

    back = await scheduler.heartbeat([Beat("n1", 1, online=True)], now_ms=T0 + 1)
    assert [d.job_id for d in dispatches(back.events)] == ["q0", "q1"]
    done = await scheduler.complete_task("j0", "n1", 1, "finished", now_ms=T0 + 2)

    assert [d.job_id for d in dispatches(done.events)] == ["q2"]
    assert (await node_hash(redis, keys, "n1"))["running"] == "3"
    assert await free(redis, keys, POOL) == {}
    assert await redis.hget(keys.queue_depth, "en:fr") == b"1"


async def test_complete_task_reports_a_draining_node_drained(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await dispatch(scheduler, "s1", "j1")
    await dispatch(scheduler, "s1", "j2")
    assert isinstance(await dispatch(scheduler, "s2", "j3"), Queued)
    assert await scheduler.drain_node("n1", epoch=1) == 2

    first = await scheduler.complete_task("j1", "n1", 1, "finished", now_ms=T0 + 1)
    last = await scheduler.complete_task("j2", "n1", 1, "finished", now_ms=T0 + 2)

    # A draining node is handed no queued job.
    assert (first.drained, first.events) == (False, ())
    assert (last.drained, last.events) == (True, ())
    assert (await node_hash(redis, keys, "n1"))["running"] == "0"
    assert await free(redis, keys, POOL) == {}
    assert (await job_hash(redis, keys, "j3"))["status"] == b"queued"


# Returns: -5, -6, -7


async def test_complete_task_of_an_unknown_job_returns_unknown_job(scheduler, redis, keys):
    await register(scheduler, "n1")
    await dispatch(scheduler, "s1", "j1")
    await redis.delete(keys.job("j1"))  # as when its record expired

    for jid in ("never", "j1"):
        error = await refused(scheduler, jid, "n1", 1, "finished")
        assert error.error_code is ErrorCode.UNKNOWN_JOB
        assert str(error) == "UNKNOWN_JOB: no such job"
    assert await redis.exists(keys.job("never")) == 0
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"


async def test_complete_task_by_another_node_returns_node_mismatch(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1")
    await register(scheduler, "n2", max_jobs=1)
    await dispatch(scheduler, "s2", "j2")
    assert isinstance(await dispatch(scheduler, "s3", "j3"), Queued)

    wrong = await refused(scheduler, "j1", "n2", 1, "finished")
    never = await refused(scheduler, "j3", "n1", 0, "finished")

    assert wrong.error_code is ErrorCode.NODE_MISMATCH
    assert str(wrong) == "NODE_MISMATCH: the job was not dispatched to this node"
    assert never.error_code is ErrorCode.NODE_MISMATCH
    assert (await job_hash(redis, keys, "j1"))["status"] == b"running"
    assert (await job_hash(redis, keys, "j3"))["status"] == b"queued"
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    assert (await node_hash(redis, keys, "n2"))["running"] == "1"


async def test_complete_task_twice_returns_stale_attempt(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await dispatch(scheduler, "s1", "j1")
    await dispatch(scheduler, "s1", "j2")
    await scheduler.complete_task("j1", "n1", 1, "finished", result=b"1", now_ms=T0 + 1)

    error = await refused(scheduler, "j1", "n1", 1, "failed", error="LATE")

    assert error.error_code is ErrorCode.STALE_ATTEMPT
    assert str(error) == "STALE_ATTEMPT: the attempt is stale or the job has already ended"
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["result"]) == (b"finished", b"1")
    assert await redis.zscore(keys.session_done("s1"), "j1") == 1_000_001
    # The slot was released once: j2 still holds one.
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    assert (await stats(redis, keys, scheduler)).get("finished") == 1
    assert "failed" not in await stats(redis, keys, scheduler)


async def test_complete_task_of_an_older_attempt_returns_stale_attempt(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1")
    await register(scheduler, "n2", max_jobs=1)
    events = await scheduler.node_lost("n1", now_ms=T0 + 1)
    assert [(d.node_id, d.attempt) for d in dispatches(events)] == [("n2", 2)]

    lost_node = await refused(scheduler, "j1", "n1", 1, "finished")
    old_attempt = await refused(scheduler, "j1", "n2", 1, "finished")
    future_attempt = await refused(scheduler, "j1", "n2", 3, "finished")

    assert lost_node.error_code is ErrorCode.STALE_ATTEMPT
    assert old_attempt.error_code is ErrorCode.STALE_ATTEMPT
    assert future_attempt.error_code is ErrorCode.STALE_ATTEMPT
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["node"], job["attempt"]) == (b"running", b"n2", b"2")
    assert (await node_hash(redis, keys, "n2"))["running"] == "1"
    done = await scheduler.complete_task("j1", "n2", 2, "finished", now_ms=T0 + 2)
    assert done.ended.status == "finished"
    assert (await node_hash(redis, keys, "n2"))["running"] == "0"


async def test_complete_task_of_a_cancelled_job_returns_stale_attempt(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await dispatch(scheduler, "s1", "j1")
    await dispatch(scheduler, "s1", "j2")
    await scheduler.cancel_task("j1", "s1", now_ms=T0 + 1)

    error = await refused(scheduler, "j1", "n1", 1, "finished")

    assert error.error_code is ErrorCode.STALE_ATTEMPT
    assert (await job_hash(redis, keys, "j1"))["error"] == b"CANCELLED"
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"


# The session's ended jobs, kept for resume


async def test_complete_task_keeps_the_ended_jobs_at_least_the_record_ttl(scheduler, redis, keys):
    ttl = scheduler.settings.job_ttl_ms
    await register(scheduler, "n1", max_jobs=4)
    for job_id in ("j1", "j2", "j3"):
        await dispatch(scheduler, "s1", job_id)
    done_key = keys.session_done("s1")

    # The first end gives the zset twice the record TTL, renewed once one TTL passed.
    await scheduler.complete_task("j1", "n1", 1, "finished", now_ms=T0 + 1)
    assert ttl < await redis.pttl(done_key) <= 2 * ttl
    assert await redis.hget(keys.session("s1"), "done_renew") == str(T0 + 1 + ttl).encode()
    await redis.pexpire(done_key, ttl + 5)  # shortened by hand, to see a renewal

    # Before the renewal time: no renewal (at least one TTL is left anyway).
    await scheduler.complete_task("j2", "n1", 1, "finished", now_ms=T0 + ttl)
    assert await redis.pttl(done_key) <= ttl + 5
    # From then on: renewed.
    await scheduler.complete_task("j3", "n1", 1, "finished", now_ms=T0 + 1 + ttl)
    assert await redis.pttl(done_key) > ttl + 5
    assert await redis.zrange(done_key, 0, -1) == [b"j1", b"j2", b"j3"]


async def test_complete_task_keeps_the_newest_1000_ended_jobs(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=4)
    await redis.zadd(keys.session_done("s1"), {f"old{i}": T0 - 1_000 + i for i in range(1_000)})
    await dispatch(scheduler, "s1", "j1")

    await scheduler.complete_task("j1", "n1", 1, "finished", now_ms=T0 + 1)

    assert await redis.zcard(keys.session_done("s1")) == 1_000
    assert await redis.zrange(keys.session_done("s1"), 0, 0) == [b"old1"]
    assert await redis.zscore(keys.session_done("s1"), "j1") == T0 + 1


# The queues: one per language pair, served by every pool of the pair


async def test_complete_task_hands_the_slot_a_job_queued_while_another_pool_was_busy(
    scheduler, redis, keys
):
    alpha, beta = pool_of("alpha"), pool_of("beta")
    await register(scheduler, "a1", max_jobs=1, pools=("alpha",))
    await register(scheduler, "b1", max_jobs=1, pools=("beta",))
    await dispatch(scheduler, "s1", "j1")
    await dispatch(scheduler, "s2", "j2")
    # Both pools busy: the job waits for whichever pool of its pair frees a slot first.
    assert isinstance(await dispatch(scheduler, "s3", "j3", now_ms=T0 + 1), Queued)
    busy = {(await job_hash(redis, keys, j))["node"].decode(): j for j in ("j1", "j2")}

    done = await scheduler.complete_task(busy["b1"], "b1", 1, "finished", now_ms=T0 + 2)

    assert [(d.job_id, d.node_id) for d in dispatches(done.events)] == [("j3", "b1")]
    assert (await job_hash(redis, keys, "j3"))["status"] == b"running"
    assert await free(redis, keys, alpha) == {}
    assert await free(redis, keys, beta) == {}
    assert (await redis.hget(keys.session("s3"), "pool")) == beta.encode()


async def test_complete_task_takes_the_oldest_queue_head_of_the_nodes_pairs(scheduler, redis, keys):
    de_en = (("de", "en"),)
    await register(scheduler, "x", max_jobs=1, pools=("alpha",))
    await register(scheduler, "y", max_jobs=1, pools=("beta",), pairs=EN_FR + de_en)
    await dispatch(scheduler, "s1", "j1")
    await dispatch(scheduler, "s2", "j2")
    # en:fr waits since T0 + 1, de:en since T0 + 2: y serves both.
    assert isinstance(await dispatch(scheduler, "s3", "old", now_ms=T0 + 1), Queued)
    newer = await scheduler.dispatch_task("s4", "de", "en", b"{}", job_id="new", now_ms=T0 + 2)
    assert isinstance(newer, Queued)
    on_y = "j1" if (await job_hash(redis, keys, "j1"))["node"] == b"y" else "j2"

    done = await scheduler.complete_task(on_y, "y", 1, "finished", now_ms=T0 + 3)

    assert [d.job_id for d in dispatches(done.events)] == ["old"]
    assert (await job_hash(redis, keys, "new"))["status"] == b"queued"


# A queued job's deadline


async def test_complete_task_ends_a_queued_job_past_its_deadline_and_starts_the_next(
    scheduler, redis, keys
):
    await register(scheduler, "n1", max_jobs=1, hub_id="hn")
    await dispatch(scheduler, "s1", "j1")
    await dispatch(scheduler, "s2", "late", timeout_ms=100, ref="r-late", session_hub="hs")
    await dispatch(scheduler, "s3", "next", now_ms=T0 + 1)

    # Past late's deadline, before the sweep saw it.
    done = await scheduler.complete_task("j1", "n1", 1, "finished", now_ms=T0 + 100)

    assert ended(done.events) == [
        JobEnded("hs", "s2", "late", "r-late", "failed", b"null", "JOB_TIMEOUT")
    ]
    assert [(d.job_id, d.node_id) for d in dispatches(done.events)] == [("next", "n1")]
    job = await job_hash(redis, keys, "late")
    assert (job["status"], job["error"], job["attempt"]) == (b"failed", b"JOB_TIMEOUT", b"0")
    assert await redis.zscore(keys.deadlines, "late") is None
    assert await redis.zscore(keys.queued, "late") is None
    assert await smembers(redis, keys.session_jobs("s2")) == set()
    assert await smembers(redis, keys.node_jobs("n1")) == {"next"}
    assert (await stats(redis, keys, scheduler)).get("error:JOB_TIMEOUT") == 1


async def test_complete_task_ends_at_most_32_expired_queued_jobs_and_leaves_the_rest_to_the_sweep(
    scheduler, redis, keys
):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s", "j0")
    for i in range(34):
        await dispatch(scheduler, f"s{i}", f"late{i}", timeout_ms=100)
    await dispatch(scheduler, "s-fresh", "fresh")

    done = await scheduler.complete_task("j0", "n1", 1, "finished", now_ms=T0 + 100)

    # Bounded work per call: 32 ended, in queue order; the slot stays free.
    assert [e.job_id for e in ended(done.events)] == [f"late{i}" for i in range(32)]
    assert dispatches(done.events) == []
    assert await free(redis, keys, POOL) == {"n1": 0.0}
    report = await scheduler.sweep(now_ms=T0 + 100, lease_ms=0)
    assert [e.job_id for e in ended(report.events)] == ["late32", "late33"]
    assert await redis.zrange(keys.queued, 0, -1) == [b"fresh"]
    assert await redis.hget(keys.queue_depth, "en:fr") == b"1"
