"""Helpers of the SDK, CLI and browser tests: in-process hubs on a test cell.

Import as ``from tests.sdktools import running_hub``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from hub.app import Hub
from hub.client import Backoff, Job
from hub.config import Settings
from tests.helpers import MS, NO_SHEDDING

__all__ = ["FAST_BACKOFF", "Gate", "running_hub"]

FAST_BACKOFF = Backoff(min_s=20 * MS, max_s=200 * MS)
"""Reconnection delays short enough for tests."""


@contextlib.asynccontextmanager
async def running_hub(redis_url: str, cell: str, **settings: Any) -> AsyncIterator[Hub]:
    """A started, ready hub on 127.0.0.1 (port 0 unless given), closed afterwards."""
    values: dict[str, Any] = {"port": 0, "cell": cell, "shutdown_grace_s": 0.0, **NO_SHEDDING}
    values.update(settings)
    hub = Hub(Settings(**values), redis_url)
    try:
        await hub.start()
        await hub.wait_ready(5000 * MS)
        yield hub
    finally:
        await hub.close()


class Gate:
    """A handler that records its jobs and waits until the test opens it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.opened = asyncio.Event()
        self.jobs: list[Job] = []
        self.cancelled: list[str] = []

    async def __call__(self, job: Job) -> dict[str, Any]:
        self.jobs.append(job)
        self.started.set()
        try:
            async with asyncio.timeout(10):
                await self.opened.wait()
        except asyncio.CancelledError:
            self.cancelled.append(job.job_id)
            raise
        return {"text": "done", "attempt": job.attempt}
