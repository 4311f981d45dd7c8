"""end_lost_job.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

from hub.events import JobEnded

from .lua_support import T0, job_hash, register, smembers, stats

# Returns: {1, result_event}


async def test_end_lost_job_records_job_lost_and_files_it_for_the_resume(scheduler, redis, keys):
    await scheduler.resume_session("s1")  # the session's hash: its hub is h1

    ended = await scheduler.end_lost_job("j1", "s1", "r1", session_hub="h9", now_ms=T0)

    assert ended == JobEnded("h1", "s1", "j1", "r1", "failed", b"null", "JOB_LOST")
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["error"], job["ref"], job["session"]) == (
        b"failed",
        b"JOB_LOST",
        b"r1",
        b"s1",
    )
    assert 0 < await redis.pttl(keys.job("j1")) <= scheduler.settings.job_ttl_ms
    assert await redis.zscore(keys.session_done("s1"), "j1") == T0
    # The session's resume delivers it.
    _, _, results = await scheduler.resume_session("s1")
    assert [(r.job_id, r.ref, r.error) for r in results] == [("j1", "r1", "JOB_LOST")]
    assert (await stats(redis, keys, scheduler)).get("error:JOB_LOST") == 1


async def test_end_lost_job_without_a_session_hash_sends_the_result_to_the_hub_given(
    scheduler, redis, keys
):
    ended = await scheduler.end_lost_job("j1", "s1", "r1", session_hub="h9", now_ms=T0)

    assert ended is not None and ended.session_hub == "h9"
    assert await redis.exists(keys.session("s1")) == 0  # not recreated without a TTL


# Returns: 0


async def test_end_lost_job_of_a_job_redis_knows_changes_nothing(scheduler, redis, keys):
    await register(scheduler, "n1")
    await scheduler.dispatch_task("s1", "en", "fr", b"{}", job_id="j1", now_ms=T0)
    before = await job_hash(redis, keys, "j1")

    assert await scheduler.end_lost_job("j1", "s1", "r1", now_ms=T0 + 1) is None
    # A second caller (the node's hub after the session's) changes nothing either.
    await scheduler.end_lost_job("j2", "s1", "r2", now_ms=T0 + 1)
    assert await scheduler.end_lost_job("j2", "s1", "r2", now_ms=T0 + 2) is None

    assert await job_hash(redis, keys, "j1") == before
    assert await smembers(redis, keys.session_jobs("s1")) == {"j1"}
