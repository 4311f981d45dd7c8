"""sweep.lua: every line of its Returns block, and the state it leaves."""

from __future__ import annotations

from hub.events import CancelAttempt, JobEnded, NodeLost, Queued, SweepReport

from .lua_support import (
    T0,
    cancels,
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
LEASE = 15_000  # node_lease_ms of the test settings


async def dispatch(scheduler, session_id, job_id, **kwargs):
    kwargs.setdefault("now_ms", T0)
    return await scheduler.dispatch_task(session_id, "en", "fr", b"{}", job_id=job_id, **kwargs)


# Returns: {1, timed_out, queue_expired, nodes_lost, {events}}


async def test_sweep_with_nothing_due_changes_nothing(scheduler, redis, keys):
    await register(scheduler, "n1")
    await dispatch(scheduler, "s1", "j1")

    report = await scheduler.sweep(now_ms=T0 + 1, lease_ms=0)

    assert report == SweepReport(True, 0, 0, 0, ())
    assert (await job_hash(redis, keys, "j1"))["status"] == b"running"


async def test_sweep_times_out_a_running_job_and_hands_its_slot_on(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1, hub_id="hn")
    await dispatch(scheduler, "s1", "j1", timeout_ms=100, ref="r1", has_audio=True)
    assert isinstance(await dispatch(scheduler, "s2", "j2", now_ms=T0 + 1), Queued)

    report = await scheduler.sweep(now_ms=T0 + 100, lease_ms=0)

    assert (report.ran, report.timed_out, report.queue_expired, report.nodes_lost) == (
        True,
        1,
        0,
        0,
    )
    cancel, result, started = report.events
    assert cancel == CancelAttempt("hn", "n1", "j1", 1, "JOB_TIMEOUT")
    assert result == JobEnded("h1", "s1", "j1", "r1", "failed", b"null", "JOB_TIMEOUT")
    assert (started.job_id, started.node_id, started.attempt) == ("j2", "n1", 1)
    job = await job_hash(redis, keys, "j1")
    assert (job["status"], job["error"]) == (b"failed", b"JOB_TIMEOUT")
    assert await redis.zscore(keys.session_done("s1"), "j1") == T0 + 100  # ended then
    assert "payload" not in job and "audio" not in job
    assert 0 < await redis.pttl(keys.job("j1")) <= scheduler.settings.job_ttl_ms
    assert await redis.zrange(keys.deadlines, 0, -1) == [b"j2"]
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    assert await smembers(redis, keys.node_jobs("n1")) == {"j2"}
    assert (await stats(redis, keys, scheduler)).get("error:JOB_TIMEOUT") == 1


async def test_sweep_times_out_a_queued_job(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1")
    await dispatch(scheduler, "s2", "j2", timeout_ms=100)  # shorter than the queue wait

    report = await scheduler.sweep(now_ms=T0 + 100, lease_ms=0)

    assert (report.timed_out, report.queue_expired) == (1, 0)
    assert report.events == (JobEnded("h1", "s2", "j2", "", "failed", b"null", "JOB_TIMEOUT"),)
    assert await redis.hget(keys.queue_depth, "en:fr") is None
    assert await redis.exists(keys.queue("en", "fr"), keys.session_queue("en", "fr", "s2")) == 0
    assert await redis.exists(keys.queue_heads) == 0
    assert await redis.zcard(keys.queued) == 0
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"


async def test_sweep_ends_queue_waits_that_ran_out(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1", timeout_ms=60_000)
    await dispatch(scheduler, "s2", "j2", timeout_ms=60_000, ref="r2")
    await dispatch(scheduler, "s3", "j3", timeout_ms=60_000, now_ms=T0 + 1)

    early = await scheduler.sweep(now_ms=T0 + 4_999, lease_ms=0)
    report = await scheduler.sweep(now_ms=T0 + 5_000, lease_ms=0)

    assert early == SweepReport(True, 0, 0, 0, ())
    assert (report.timed_out, report.queue_expired, report.nodes_lost) == (0, 1, 0)
    assert report.events == (
        JobEnded("h1", "s2", "j2", "r2", "failed", b"null", "NO_AVAILABLE_NODE"),
    )
    job = await job_hash(redis, keys, "j2")
    assert (job["status"], job["error"]) == (b"failed", b"NO_AVAILABLE_NODE")
    assert await redis.zscore(keys.deadlines, "j2") is None
    assert await redis.zrange(keys.queued, 0, -1) == [b"j3"]
    assert await redis.lrange(keys.queue("en", "fr"), 0, -1) == [b"s3"]
    assert await redis.hget(keys.queue_depth, "en:fr") == b"1"
    assert await redis.zscore(keys.queue_heads, "en:fr") == T0 + 1 + 5_000
    assert (await job_hash(redis, keys, "j1"))["status"] == b"running"


async def test_sweep_loses_nodes_whose_lease_ran_out(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1, now_ms=T0)
    await dispatch(scheduler, "s1", "j1", timeout_ms=60_000)
    await register(scheduler, "n2", max_jobs=1, now_ms=T0 + 10_000)

    early = await scheduler.sweep(now_ms=T0 + LEASE - 1, lease_ms=0)
    report = await scheduler.sweep(now_ms=T0 + LEASE, lease_ms=0)

    assert early.nodes_lost == 0
    assert (report.timed_out, report.queue_expired, report.nodes_lost) == (0, 0, 1)
    assert cancels(report.events) == [CancelAttempt("h1", "n1", "j1", 1, "NODE_LOST")]
    assert [(d.job_id, d.node_id, d.attempt) for d in dispatches(report.events)] == [
        ("j1", "n2", 2)
    ]
    assert report.events[-1] == NodeLost("h1", "n1", 1)
    assert (await node_hash(redis, keys, "n1"))["state"] == "lost"
    assert await redis.zrange(keys.seen, 0, -1) == [b"n2"]
    assert (await node_hash(redis, keys, "n2"))["running"] == "1"
    assert await free(redis, keys, POOL) == {}
    assert await smembers(redis, keys.live("en", "fr")) == {"n2"}


async def test_sweep_handles_at_most_a_batch_of_each_kind(make_scheduler, redis, keys):
    scheduler = await make_scheduler(sweep_batch=2)
    await register(scheduler, "big", max_jobs=5, now_ms=T0 + 100_000)
    for i in range(5):
        await dispatch(scheduler, f"s{i}", f"j{i}", timeout_ms=100)
    for i in range(3):
        await register(scheduler, f"old{i}", max_jobs=1, pairs=(("de", "en"),), now_ms=T0)

    reports = [await scheduler.sweep(now_ms=T0 + LEASE, lease_ms=0) for _ in range(4)]

    assert [(r.timed_out, r.nodes_lost) for r in reports] == [(2, 2), (2, 1), (1, 0), (0, 0)]
    assert len(ended(e for r in reports for e in r.events)) == 5
    assert (await node_hash(redis, keys, "big"))["running"] == "0"
    assert await redis.zrange(keys.seen, 0, -1) == [b"big"]


# Returns: {0, 0, 0, 0, {}}


async def test_sweep_skips_while_another_hub_holds_the_lease(make_scheduler, redis, keys):
    h1 = await make_scheduler(hub_id="h1")
    h2 = await make_scheduler(hub_id="h2")
    await register(h1, "n1")
    await dispatch(h1, "s1", "j1", timeout_ms=100)
    assert (await h1.sweep(now_ms=T0 + 1, lease_ms=60_000)).ran
    assert await redis.get(keys.sweep_lease) == b"h1"
    assert 0 < await redis.pttl(keys.sweep_lease) <= 60_000

    skipped = await h2.sweep(now_ms=T0 + 200, lease_ms=60_000)

    assert skipped == SweepReport(False, 0, 0, 0, ())
    assert (await job_hash(redis, keys, "j1"))["status"] == b"running"
    assert await redis.get(keys.sweep_lease) == b"h1"
    # The holder sweeps again (and renews); lease 0 always sweeps.
    assert (await h1.sweep(now_ms=T0 + 200, lease_ms=60_000)).timed_out == 1
    assert (await h2.sweep(now_ms=T0 + 200, lease_ms=0)).ran
    assert await redis.get(keys.sweep_lease) == b"h1"


async def test_sweep_takes_a_free_lease(make_scheduler, redis, keys):
    h2 = await make_scheduler(hub_id="h2")

    report = await h2.sweep(now_ms=T0)

    assert report.ran
    assert await redis.get(keys.sweep_lease) == b"h2"
    assert 0 < await redis.pttl(keys.sweep_lease) <= 2 * h2.settings.sweep_interval_ms
