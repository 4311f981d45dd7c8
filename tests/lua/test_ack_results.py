"""ack_results.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

from .lua_support import T0, register


async def end_jobs(scheduler, session_id, *job_ids):
    for job_id in job_ids:
        await scheduler.dispatch_task(session_id, "en", "fr", b"{}", job_id=job_id, now_ms=T0)
        await scheduler.complete_task(job_id, "n1", 1, "finished", now_ms=T0 + 1)


# Returns: n


async def test_ack_results_forgets_the_results_pending_acknowledgement(scheduler, redis, keys):
    await register(scheduler, "n1")
    await end_jobs(scheduler, "s1", "j1", "j2", "j3")

    assert await scheduler.ack_results("s1", ["j1", "j3", "unknown", "j1"]) == 2

    assert await redis.zrange(keys.session_done("s1"), 0, -1) == [b"j2"]
    # Not emptied: its TTL and renewal time stay.
    assert await redis.hget(keys.session("s1"), "done_renew") is not None
    assert await redis.pttl(keys.session_done("s1")) > 0


async def test_ack_results_of_nothing_pending_is_0(scheduler, redis, keys):
    await register(scheduler, "n1")
    await end_jobs(scheduler, "s1", "j1")

    assert await scheduler.ack_results("s1", ["unknown"]) == 0
    assert await scheduler.ack_results("s1", []) == 0
    assert await scheduler.ack_results("s2", ["j1"]) == 0  # another session's result
    assert await redis.zrange(keys.session_done("s1"), 0, -1) == [b"j1"]


async def test_ack_results_that_empties_the_zset_lets_the_next_end_set_its_ttl(
    scheduler, redis, keys
):
    await register(scheduler, "n1")
    await end_jobs(scheduler, "s1", "j1")

    assert await scheduler.ack_results("s1", ["j1"]) == 1

    assert await redis.exists(keys.session_done("s1")) == 0
    assert await redis.hget(keys.session("s1"), "done_renew") is None
    # Well before the old renewal time, the zset the next end creates gets a TTL.
    await end_jobs(scheduler, "s1", "j2")
    assert await redis.pttl(keys.session_done("s1")) > 0
