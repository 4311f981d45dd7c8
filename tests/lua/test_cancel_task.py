"""cancel_task.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

import pytest

from hub.errors import ErrorCode, SchedulingError
from hub.events import CancelAttempt, Cancellation, Dispatch, JobEnded, Queued

from .lua_support import T0, free, job_hash, node_hash, pool_of, register, smembers, stats

POOL = pool_of()


async def dispatch(scheduler, session_id, job_id, **kwargs):
    kwargs.setdefault("now_ms", T0)
    return await scheduler.dispatch_task(session_id, "en", "fr", b"{}", job_id=job_id, **kwargs)


async def refused(scheduler, job_id, session_id) -> SchedulingError:
    with pytest.raises(SchedulingError) as caught:
        await scheduler.cancel_task(job_id, session_id, now_ms=T0 + 50)
    return caught.value


# Returns: {1, result_event, {events}}


async def test_cancel_task_of_a_running_job_releases_the_slot(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2, hub_id="hn")
    await dispatch(scheduler, "s1", "j1", ref="r1", has_audio=True, session_hub="hs")

    cancelled = await scheduler.cancel_task("j1", "s1", now_ms=T0 + 30)

    assert cancelled == Cancellation(
        JobEnded("hs", "s1", "j1", "r1", "failed", b"null", "CANCELLED"),
        (CancelAttempt("hn", "n1", "j1", 1, "CANCELLED"),),
    )
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["error"]) == (b"failed", b"CANCELLED")
    assert await redis.zscore(keys.session_done("s1"), "j1") == T0 + 30  # ended then
    assert "payload" not in job and "audio" not in job
    assert 0 < await redis.pttl(keys.job("j1")) <= scheduler.settings.job_ttl_ms
    assert (await node_hash(redis, keys, "n1"))["running"] == "0"
    assert await smembers(redis, keys.node_jobs("n1")) == set()
    assert await free(redis, keys, POOL) == {"n1": 0.0}
    assert await redis.zscore(keys.deadlines, "j1") is None
    assert await smembers(redis, keys.session_jobs("s1")) == set()
    assert await redis.zscore(keys.session_done("s1"), "j1") == T0 + 30


async def test_cancel_task_gives_the_freed_slot_to_a_queued_job(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1")
    await dispatch(scheduler, "s2", "j2")

    cancelled = await scheduler.cancel_task("j1", "s1", reason="SESSION_GONE", now_ms=T0 + 1)

    assert cancelled.ended.error == "SESSION_GONE"
    cancel, started = cancelled.events
    assert cancel == CancelAttempt("h1", "n1", "j1", 1, "SESSION_GONE")
    assert isinstance(started, Dispatch)
    assert (started.job_id, started.node_id, started.attempt) == ("j2", "n1", 1)
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    assert (await job_hash(redis, keys, "j2"))["status"] == b"running"


async def test_cancel_task_of_a_queued_job_takes_it_out_of_the_queue(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s0", "j0")
    for jid in ("a1", "a2"):
        assert isinstance(await dispatch(scheduler, "A", jid), Queued)
    assert isinstance(await dispatch(scheduler, "B", "b1"), Queued)

    first = await scheduler.cancel_task("a1", "A", now_ms=T0 + 1)
    await scheduler.cancel_task("a2", "A", now_ms=T0 + 2)

    assert first.events == ()
    assert first.ended == JobEnded("h1", "A", "a1", "", "failed", b"null", "CANCELLED")
    assert await redis.lrange(keys.queue("en", "fr"), 0, -1) == [b"B"]
    assert await redis.exists(keys.session_queue("en", "fr", "A")) == 0
    assert await redis.hget(keys.queue_depth, "en:fr") == b"1"
    assert await redis.zrange(keys.queued, 0, -1) == [b"b1"]
    # The pair's head is b1 now.
    assert await redis.zrange(keys.queue_heads, 0, -1, withscores=True) == [
        (b"en:fr", await redis.zscore(keys.queued, "b1"))
    ]
    job = await job_hash(redis, keys, "a1")
    assert (job["status"], job["error"]) == (b"failed", b"CANCELLED")
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    # The queue still works: the next completion starts b1.
    done = await scheduler.complete_task("j0", "n1", 1, "finished", now_ms=T0 + 3)
    assert [e.job_id for e in done.events] == ["b1"]
    assert await redis.exists(keys.queue_depth, keys.queue_heads) == 0


# Returns: -5, -10, -7


async def test_cancel_task_of_an_unknown_job_returns_unknown_job(scheduler, redis, keys):
    error = await refused(scheduler, "never", "s1")

    assert error.error_code is ErrorCode.UNKNOWN_JOB
    assert await redis.exists(keys.job("never"), keys.session_done("s1")) == 0


async def test_cancel_task_of_another_sessions_job_returns_session_mismatch(scheduler, redis, keys):
    await register(scheduler, "n1")
    await dispatch(scheduler, "s1", "j1")

    error = await refused(scheduler, "j1", "intruder")

    assert error.error_code is ErrorCode.SESSION_MISMATCH
    # The session is told nothing more than for a job that does not exist.
    assert error.code == "UNKNOWN_JOB"
    assert str(error) == "UNKNOWN_JOB: no such job"
    assert (await job_hash(redis, keys, "j1"))["status"] == b"running"
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"


async def test_cancel_task_of_an_ended_job_returns_stale_attempt(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await dispatch(scheduler, "s1", "j1")
    await dispatch(scheduler, "s1", "j2")
    await scheduler.complete_task("j1", "n1", 1, "finished", result=b"7", now_ms=T0 + 1)
    await scheduler.cancel_task("j2", "s1", now_ms=T0 + 2)

    for jid in ("j1", "j2"):
        error = await refused(scheduler, jid, "s1")
        assert error.error_code is ErrorCode.STALE_ATTEMPT

    assert (await job_hash(redis, keys, "j1"))["result"] == b"7"
    assert (await node_hash(redis, keys, "n1"))["running"] == "0"
    assert (await stats(redis, keys, scheduler)).get("failed") == 1
