"""resume_session.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

from hub.events import JobEnded

from .lua_support import T0, register


async def dispatch(scheduler, session_id, job_id):
    return await scheduler.dispatch_task(
        session_id, "en", "fr", b"{}", ref=f"r-{job_id}", job_id=job_id, now_ms=T0
    )


# Returns: {1, {{job_id, ref, status}, ...}, {result_event, ...}}


async def test_resume_session_returns_unfinished_jobs_then_unacknowledged_results(
    make_scheduler, redis, keys
):
    h1 = await make_scheduler(hub_id="h1")
    h2 = await make_scheduler(hub_id="h2")
    await register(h1, "n1", max_jobs=1)
    await dispatch(h1, "s1", "j1")
    await dispatch(h1, "s1", "j2")  # queued
    await h1.complete_task("j1", "n1", 1, "finished", result=b'"ok"', now_ms=T0 + 1)  # j2 starts
    await dispatch(h1, "s1", "j3")  # queued

    known, open_jobs, ended = await h2.resume_session("s1")

    assert known
    assert sorted(open_jobs) == [("j2", "r-j2", "running"), ("j3", "r-j3", "queued")]
    assert ended == (JobEnded("h2", "s1", "j1", "r-j1", "finished", b'"ok"', None),)
    assert await redis.hget(keys.session("s1"), "hub") == b"h2"


async def test_resume_session_drops_results_whose_record_expired(scheduler, redis, keys):
    await register(scheduler, "n1")
    for job_id in ("j1", "j2"):
        await dispatch(scheduler, "s1", job_id)
        await scheduler.complete_task(job_id, "n1", 1, "finished", now_ms=T0 + 1)
    await redis.delete(keys.job("j1"))

    _, _, ended = await scheduler.resume_session("s1")

    assert [e.job_id for e in ended] == ["j2"]
    assert await redis.zrange(keys.session_done("s1"), 0, -1) == [b"j2"]
    assert await redis.hget(keys.session("s1"), "done_renew") is not None
    # Every record gone: the zset is emptied, and the next end will set its TTL.
    await redis.delete(keys.job("j2"))
    assert (await scheduler.resume_session("s1"))[2] == ()
    assert await redis.exists(keys.session_done("s1")) == 0
    assert await redis.hget(keys.session("s1"), "done_renew") is None


# Returns: {0, {}, {}}


async def test_resume_session_of_an_unknown_session_is_a_fresh_start(scheduler, redis, keys):
    assert await scheduler.resume_session("nobody") == (False, (), ())
    # The session's hash now names this hub, with a TTL.
    assert await redis.hget(keys.session("nobody"), "hub") == b"h1"
    assert await redis.pttl(keys.session("nobody")) > 0
