"""route_partial.lua: where a node's partial goes, and why it may not go anywhere."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from hub.errors import ErrorCode, SchedulingError
from hub.events import Accepted, PartialRoute, Queued
from hub.keys import Keys
from hub.scheduler import Scheduler

from .lua_support import T0, register


async def cell_dump(
    redis: Redis, keys: Keys, scheduler: Scheduler
) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the cell: its serialized value and expiry time (to see that nothing changed).

    The scheduler's counts are flushed first (they are added to the stats hash in the background).
    """
    await scheduler.flush_stats()
    dump = {}
    async for key in redis.scan_iter(match=keys.scan_pattern, count=1000):
        dump[key] = (await redis.dump(key), await redis.execute_command("PEXPIRETIME", key))
    return dump


async def dispatch(scheduler: Scheduler, job_id: str, session_id: str, **kwargs):
    return await scheduler.dispatch_task(
        session_id, "en", "fr", b"{}", job_id=job_id, ref=f"ref-{job_id}", now_ms=T0, **kwargs
    )


async def test_the_current_attempt_gets_the_session_and_ref(scheduler, redis, keys):
    await register(scheduler, "n1")
    assert isinstance(await dispatch(scheduler, "j1", "s1", session_hub="hs"), Accepted)
    before = await cell_dump(redis, keys, scheduler)

    route = await scheduler.route_partial("j1", "n1", 1)

    assert route == PartialRoute(session_id="s1", session_hub="hs", ref="ref-j1")
    assert await cell_dump(redis, keys, scheduler) == before, "route_partial only reads"


async def test_the_route_follows_the_session_to_its_new_hub(scheduler, make_scheduler):
    await register(scheduler, "n1")
    await dispatch(scheduler, "j1", "s1")
    other_hub = await make_scheduler(hub_id="h2")
    await other_hub.resume_session("s1")

    assert (await scheduler.route_partial("j1", "n1", 1)).session_hub == "h2"


async def test_without_the_session_hash_the_route_is_the_hub_the_job_came_through(
    scheduler, redis, keys
):
    await register(scheduler, "n1")
    await dispatch(scheduler, "j1", "s1", session_hub="hs")
    await redis.delete(keys.session("s1"))

    route = await scheduler.route_partial("j1", "n1", 1)

    assert route == PartialRoute(session_id="s1", session_hub="hs", ref="ref-j1")


@pytest.fixture
async def jobs(scheduler: Scheduler) -> None:
    """j1 moved from n1 (lost) to n2 as attempt 2, j2 ended on n3, j3 runs on n3, j4 queued."""
    await register(scheduler, "n1", max_jobs=1)
    await dispatch(scheduler, "j1", "s1")
    await register(scheduler, "n2", max_jobs=1)
    await scheduler.node_lost("n1", now_ms=T0 + 1)
    await register(scheduler, "n3", max_jobs=1)
    await dispatch(scheduler, "j2", "s2")
    await scheduler.complete_task("j2", "n3", 1, "finished", now_ms=T0 + 2)
    assert isinstance(await dispatch(scheduler, "j3", "s3"), Accepted)
    assert isinstance(await dispatch(scheduler, "j4", "s4"), Queued)


@pytest.mark.parametrize(
    ("job_id", "node_id", "attempt", "session_id"),
    [("j1", "n2", 2, "s1"), ("j3", "n3", 1, "s3")],
)
async def test_current_attempts_are_routed(jobs, scheduler, job_id, node_id, attempt, session_id):
    route = await scheduler.route_partial(job_id, node_id, attempt)

    assert route == PartialRoute(session_id, "h1", f"ref-{job_id}")


NO_SUCH_JOB = "UNKNOWN_JOB: no such job"
NOT_THIS_NODE = "NODE_MISMATCH: the job was not dispatched to this node"
MOVED = "STALE_ATTEMPT: the job moved to another node"
STALE = "STALE_ATTEMPT: the attempt is stale or the job has ended"


@pytest.mark.parametrize(
    ("job_id", "node_id", "attempt", "code", "text"),
    [
        pytest.param("nope", "n2", 1, ErrorCode.UNKNOWN_JOB, NO_SUCH_JOB, id="unknown"),
        pytest.param("j1", "n3", 2, ErrorCode.NODE_MISMATCH, NOT_THIS_NODE, id="other-node"),
        pytest.param("j4", "n2", 1, ErrorCode.NODE_MISMATCH, NOT_THIS_NODE, id="queued"),
        pytest.param("j1", "n1", 1, ErrorCode.JOB_MOVED, MOVED, id="moved"),
        pytest.param("j1", "n1", 2, ErrorCode.JOB_MOVED, MOVED, id="moved-current-number"),
        pytest.param("j1", "n2", 1, ErrorCode.STALE_PARTIAL, STALE, id="older-attempt"),
        pytest.param("j1", "n2", 3, ErrorCode.STALE_PARTIAL, STALE, id="newer-attempt"),
        pytest.param("j2", "n3", 1, ErrorCode.STALE_PARTIAL, STALE, id="ended"),
    ],
)
async def test_refusals(jobs, scheduler, redis, keys, job_id, node_id, attempt, code, text):
    before = await cell_dump(redis, keys, scheduler)

    with pytest.raises(SchedulingError) as caught:
        await scheduler.route_partial(job_id, node_id, attempt)

    assert caught.value.error_code is code
    assert str(caught.value) == text
    assert await cell_dump(redis, keys, scheduler) == before, "route_partial only reads"
