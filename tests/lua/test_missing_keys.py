"""The scripts cope when an auxiliary key is missing (evicted, deleted by hand).

Auxiliary keys are indexes over the job and node hashes: free zsets, a node's
jobs set, the session hash, the deadline and queue-wait zsets. Losing one may
delay a job, but no script may fail, no job may end twice, and no slot may be
taken for good.
"""

from __future__ import annotations

from hub.events import NodeLost, Queued, SweepReport

from .lua_support import T0, dispatches, ended, free, job_hash, node_hash, pool_of, register

POOL = pool_of()


async def dispatch(scheduler, session_id, job_id, **kwargs):
    kwargs.setdefault("now_ms", T0)
    return await scheduler.dispatch_task(session_id, "en", "fr", b"{}", job_id=job_id, **kwargs)


async def running_jobs(redis, keys, job_ids, node_id) -> int:
    count = 0
    for jid in job_ids:
        job = await job_hash(redis, keys, jid)
        count += job.get("status") == b"running" and job.get("node") == node_id.encode()
    return count


async def test_scripts_cope_without_the_free_zset(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await dispatch(scheduler, "s1", "j1")
    await redis.delete(keys.free(POOL))

    # No free node is visible: the job waits rather than failing.
    queued = await dispatch(scheduler, "s2", "j2")
    assert isinstance(queued, Queued)

    # The next release rebuilds the node's entry and starts the waiting job.
    done = await scheduler.complete_task("j1", "n1", 1, "finished", now_ms=T0 + 1)
    assert [d.job_id for d in dispatches(done.events)] == ["j2"]
    assert (await node_hash(redis, keys, "n1"))["running"] == "1"
    assert await running_jobs(redis, keys, ["j1", "j2"], "n1") == 1
    assert await free(redis, keys, POOL) == {"n1": 0.5}
    await scheduler.complete_task("j2", "n1", 1, "finished", now_ms=T0 + 2)
    assert await free(redis, keys, POOL) == {"n1": 0.0}


async def test_scripts_cope_without_the_nodes_jobs_set(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=2)
    await register(scheduler, "n2", max_jobs=2)
    await dispatch(scheduler, "s1", "j1", timeout_ms=1_000)
    await dispatch(scheduler, "s1", "j2", timeout_ms=1_000)  # the session's node again
    node = (await job_hash(redis, keys, "j1"))["node"].decode()
    other = "n2" if node == "n1" else "n1"
    await redis.delete(keys.node_jobs(node))

    # Completion does not need the set.
    done = await scheduler.complete_task("j1", node, 1, "finished", now_ms=T0 + 1)
    assert done.ended.status == "finished"
    assert (await node_hash(redis, keys, node))["running"] == "1"

    # Losing the node cannot see j2: it stays running on the lost node...
    assert await scheduler.node_lost(node, now_ms=T0 + 2) == (NodeLost("h1", node, 1),)
    assert (await job_hash(redis, keys, "j2"))["status"] == b"running"
    # ...until its deadline, when the sweep ends it exactly once.
    report = await scheduler.sweep(now_ms=T0 + 1_000, lease_ms=0)
    assert [(e.job_id, e.error) for e in ended(report.events)] == [("j2", "JOB_TIMEOUT")]
    assert await scheduler.sweep(now_ms=T0 + 2_000, lease_ms=0) == SweepReport(True, 0, 0, 0, ())
    # No slot was taken or given back anywhere else.
    assert (await node_hash(redis, keys, other))["running"] == "0"
    assert await free(redis, keys, POOL) == {other: 0.0}
    assert await node_hash(redis, keys, node) == {"state": "lost", "epoch": "1"}


async def test_scripts_cope_without_the_session_hash(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1")
    await register(scheduler, "n2", max_jobs=1)
    await redis.delete(keys.session("s1"))

    # Re-dispatch without the session's preferences, and completion, still work.
    events = await scheduler.node_lost("n1", now_ms=T0 + 1)
    assert [(d.node_id, d.attempt) for d in dispatches(events)] == [("n2", 2)]
    # The hash is not brought back without its TTL.
    assert await redis.exists(keys.session("s1")) == 0
    done = await scheduler.complete_task("j1", "n2", 2, "finished", now_ms=T0 + 2)
    assert done.ended.session_id == "s1"
    assert (await node_hash(redis, keys, "n2"))["running"] == "0"
    # A new job of the session is accepted as from a new session.
    assert (await dispatch(scheduler, "s1", "j2", now_ms=T0 + 3)).node_id == "n2"
    assert await redis.pttl(keys.session("s1")) > 0


async def test_sweep_drops_index_entries_of_vanished_jobs(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1", timeout_ms=100)
    await dispatch(scheduler, "s2", "j2", timeout_ms=100)
    # Both records vanish, leaving their deadline and queue-wait entries.
    await redis.delete(keys.job("j1"), keys.job("j2"))
    await redis.zadd(keys.deadlines, {"ghost": T0})
    await redis.zadd(keys.queued, {"ghost": T0})

    report = await scheduler.sweep(now_ms=T0 + 10_000, lease_ms=0)

    assert report == SweepReport(True, 0, 0, 0, ())
    assert await redis.zcard(keys.deadlines) == 0
    assert await redis.zcard(keys.queued) == 0


async def test_scripts_cope_without_the_queue_heads(scheduler, redis, keys):
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "s1", "j1")
    assert isinstance(await dispatch(scheduler, "s2", "j2"), Queued)
    await redis.delete(keys.queue_heads)

    # No head is visible: the freed slot starts nothing, and the job waits.
    done = await scheduler.complete_task("j1", "n1", 1, "finished", now_ms=T0 + 1)
    assert done.events == ()
    assert (await job_hash(redis, keys, "j2"))["status"] == b"queued"

    # The next job queued for the pair restores the entry; the queue goes on in order.
    assert (await dispatch(scheduler, "s3", "j3", now_ms=T0 + 2)).node_id == "n1"
    assert isinstance(await dispatch(scheduler, "s4", "j4", now_ms=T0 + 3), Queued)
    done = await scheduler.complete_task("j3", "n1", 1, "finished", now_ms=T0 + 4)
    assert [d.job_id for d in dispatches(done.events)] == ["j2"]
    done = await scheduler.complete_task("j2", "n1", 1, "finished", now_ms=T0 + 5)
    assert [d.job_id for d in dispatches(done.events)] == ["j4"]
    assert await redis.exists(keys.queue_heads, keys.queue_depth) == 0
