"""Fixtures of the Lua script tests: a Scheduler per test on a fresh cell."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from hub.config import Settings
from hub.keys import Keys
from hub.scheduler import Scheduler

# Small, explicit limits so every edge is reachable in a few calls.
TEST_SETTINGS: dict[str, Any] = {
    "queue_wait_ms": 5_000,
    "queue_max": 100,
    "job_timeout_ms": 10_000,
    "max_attempts": 3,
    "job_ttl_ms": 60_000,
    "node_lease_ms": 15_000,
    "sweep_batch": 100,
    "max_queued_per_session": 32,
}

MakeScheduler = Callable[..., Awaitable[Scheduler]]


@pytest.fixture
async def make_scheduler(redis: Redis, keys: Keys) -> AsyncIterator[MakeScheduler]:
    """Factory: ``await make_scheduler(hub_id="h1", **settings)``, scripts loaded."""
    made: list[Scheduler] = []

    async def make(*, hub_id: str = "h1", **overrides: Any) -> Scheduler:
        settings = Settings(**(TEST_SETTINGS | overrides))
        scheduler = Scheduler(redis, settings, hub_id=hub_id, keys=keys)
        await scheduler.load_scripts()
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        await scheduler.close()


@pytest.fixture
async def scheduler(make_scheduler: MakeScheduler) -> Scheduler:
    """A Scheduler of hub "h1" with :data:`TEST_SETTINGS`."""
    return await make_scheduler()
