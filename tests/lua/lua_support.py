"""Helpers for the Lua script tests: registering nodes, reading Redis state.

Import as ``from tests.lua.lua_support import T0, register, node_hash``.
Every time is explicit: tests pass
``now_ms`` from :data:`T0` on, never 0 (Redis ``TIME``), so they are
deterministic and need no sleeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from redis.asyncio import Redis

from hub.config import Settings
from hub.events import (
    Accepted,
    Beat,
    CancelAttempt,
    Dispatch,
    Event,
    JobEnded,
    NodeReplaced,
    Queued,
    Registration,
)
from hub.keys import Keys
from hub.node_scripts import pool_id
from hub.scheduler import Scheduler

__all__ = [
    "EN_FR",
    "SERVICES",
    "T0",
    "WORKLOAD_SETTINGS",
    "WORKLOAD_STEPS",
    "cancels",
    "dispatch_of",
    "dispatches",
    "ended",
    "free",
    "hash_of",
    "job_hash",
    "load",
    "node_hash",
    "pool_of",
    "register",
    "replaced",
    "run_every_script",
    "smembers",
    "stats",
]

T0 = 1_000_000
"""A fixed 'now' in ms for tests; later times are T0 + something."""

EN_FR = (("en", "fr"),)
SERVICES = ("asr", "nmt")


def pool_of(
    opool: str = "default",
    pairs: Sequence[tuple[str, str]] = EN_FR,
    services: Sequence[str] = SERVICES,
) -> str:
    """The scheduling pool id the scheduler gives such a node."""
    return pool_id(opool, services, [(s.lower(), t.lower()) for s, t in pairs])


async def register(
    scheduler: Scheduler,
    node_id: str,
    *,
    max_jobs: int = 2,
    pairs: Sequence[tuple[str, str]] = EN_FR,
    pools: Sequence[str] = ("default",),
    services: Sequence[str] = SERVICES,
    resume: Sequence[str] = (),
    hub_id: str | None = None,
    now_ms: int = T0,
) -> Registration:
    """register_node with test defaults: pair en:fr, max_jobs 2, pool "default"."""
    return await scheduler.register_node(
        node_id,
        services=services,
        lang_pairs=pairs,
        max_jobs=max_jobs,
        pools=pools,
        resume=resume,
        hub_id=hub_id,
        now_ms=now_ms,
    )


def _text(value: bytes) -> str:
    return value.decode()


async def hash_of(redis: Redis, key: str) -> dict[str, bytes]:
    """HGETALL with field names decoded and values left as bytes."""
    raw = await redis.hgetall(key)
    return {_text(f): v for f, v in raw.items()}


async def node_hash(redis: Redis, keys: Keys, node_id: str) -> dict[str, str]:
    """The node's hash, decoded."""
    return {f: _text(v) for f, v in (await hash_of(redis, keys.node(node_id))).items()}


async def job_hash(redis: Redis, keys: Keys, job_id: str) -> dict[str, bytes]:
    """The job's hash; values stay bytes (the payload is JSON text as sent)."""
    return await hash_of(redis, keys.job(job_id))


async def free(redis: Redis, keys: Keys, pool: str) -> dict[str, float]:
    """The free zset of ``pool``: node -> load (what its score encodes, :func:`load`)."""
    return {
        _text(m): load(s) for m, s in await redis.zrange(keys.free(pool), 0, -1, withscores=True)
    }


def load(score: float) -> float:
    """The load (running / max_jobs, in 2**20ths) a free zset score encodes.

    A score is the load level times 2**31 plus a random tie-break below 2**31.
    """
    assert score == int(score) and 0 <= score < 2**51
    return int(score) // 2**31 / 2**20


async def stats(redis: Redis, keys: Keys, *schedulers: Scheduler) -> dict[str, int]:
    """The cell's counters, once ``schedulers`` added all their counts (flush_stats)."""
    for scheduler in schedulers:
        await scheduler.flush_stats()
    return {_text(f): int(v) for f, v in (await redis.hgetall(keys.stats)).items()}


async def smembers(redis: Redis, key: str) -> set[str]:
    return {_text(m) for m in await redis.smembers(key)}


def dispatches(events: Iterable[Event]) -> list[Dispatch]:
    return [e for e in events if isinstance(e, Dispatch)]


def ended(events: Iterable[Event]) -> list[JobEnded]:
    return [e for e in events if isinstance(e, JobEnded)]


def cancels(events: Iterable[Event]) -> list[CancelAttempt]:
    return [e for e in events if isinstance(e, CancelAttempt)]


def replaced(events: Iterable[Event]) -> list[NodeReplaced]:
    return [e for e in events if isinstance(e, NodeReplaced)]


def dispatch_of(
    job_id: str,
    node_id: str,
    attempt: int,
    *,
    node_hub: str = "h1",
    session_id: str = "s1",
    payload: bytes = b"{}",
    audio_hub: str = "",
    ref: str = "",
    session_hub: str = "h1",
    deadline_ms: int = T0 + 10_000,
) -> Dispatch:
    """The dispatch event expected for an en:fr job (the deadline of the test settings)."""
    return Dispatch(
        node_hub=node_hub,
        node_id=node_id,
        job_id=job_id,
        attempt=attempt,
        session_id=session_id,
        src_lang="en",
        tgt_lang="fr",
        deadline_ms=deadline_ms,
        payload=payload,
        audio_hub=audio_hub,
        session_hub=session_hub,
        ref=ref,
    )


# A workload that runs every script at least once, touching every kind of key.

WORKLOAD_STEPS = (
    "register_node",
    "heartbeat",
    "dispatch_task",
    "complete_task",
    "cancel_task",
    "drain_node",
    "node_lost",
    "sweep",
    "session_closed",
    "resume_session",
    "ack_results",
    "route_partial",
    "end_lost_job",
    "add_session_cell",
)
"""The scripts :func:`run_every_script` calls, in order."""

WORKLOAD_SETTINGS = Settings(job_timeout_ms=10_000, node_lease_ms=15_000, queue_wait_ms=5_000)
"""The settings :func:`run_every_script` expects of its scheduler."""


async def run_every_script(scheduler: Scheduler) -> None:
    """Drive every script in :data:`WORKLOAD_STEPS` through ``scheduler``.

    Ends with a job running, another queued and a node free, so every kind of
    key exists.
    """
    assert scheduler.settings == WORKLOAD_SETTINGS
    t = T0
    await register(scheduler, "n1", max_jobs=1, pools=("default", "premium"), now_ms=t)
    await register(scheduler, "n2", max_jobs=1, pairs=(("de", "en"),), now_ms=t)
    await register(scheduler, "n3", max_jobs=1, now_ms=t + 100_000)
    assert await scheduler.heartbeat([Beat("n1", 1, load=b"{}", rtt_ms=1.0)], now_ms=t) == [1]
    a = await scheduler.dispatch_task("s1", "en", "fr", b"{}", has_audio=True, now_ms=t)
    b = await scheduler.dispatch_task("s1", "en", "fr", b"{}", now_ms=t)
    assert isinstance(a, Accepted) and isinstance(b, Accepted)
    assert isinstance(await scheduler.dispatch_task("s2", "en", "fr", b"{}", now_ms=t), Queued)
    assert isinstance(await scheduler.dispatch_task("s4", "en", "fr", b"{}", now_ms=t), Queued)
    assert isinstance(await scheduler.dispatch_task("s3", "de", "en", b"{}", now_ms=t), Accepted)
    done = await scheduler.complete_task(a.job_id, a.node_id, 1, "finished", now_ms=t + 1)
    assert dispatches(done.events)
    cancelled = await scheduler.cancel_task(b.job_id, "s1", now_ms=t + 2)
    assert dispatches(cancelled.events)
    assert await scheduler.drain_node("n2", epoch=1) == 1
    assert ended(await scheduler.node_lost("n2", epoch=1, now_ms=t + 3))
    report = await scheduler.sweep(now_ms=t + 20_000, lease_ms=1_000)
    assert report.ran and report.nodes_lost == 1
    await scheduler.session_closed("s4", now_ms=t + 20_001)
    known, _, results = await scheduler.resume_session("s1")
    assert known and len(results) == 2
    assert await scheduler.ack_results("s1", [r.job_id for r in results]) == 2
    for session_id, expected in (("s5", Accepted), ("s6", Queued)):
        reply = await scheduler.dispatch_task(session_id, "en", "fr", b"{}", now_ms=t + 20_002)
        assert isinstance(reply, expected), (session_id, reply)
        if isinstance(reply, Accepted):
            route = await scheduler.route_partial(reply.job_id, reply.node_id, reply.attempt)
            assert route.session_id == session_id
    await register(scheduler, "n4", pairs=(("de", "en"),), now_ms=t + 20_003)
    assert await scheduler.end_lost_job("lost-1", "s5", "r-lost", now_ms=t + 20_004)
    assert await scheduler.add_session_cell("s5", "other")
    await scheduler.flush_stats()  # the stats hash too
