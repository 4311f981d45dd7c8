"""hub/siblings.py, the merged ``/metrics`` of workers, and ``/v1/status``'s hubs.

Real Redis; the keys' expiry is Redis's, so short intervals make it quick.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from redis.asyncio import Redis

from hub.app import Hub
from hub.config import Settings
from hub.keys import Keys
from hub.metrics import Metrics, Snapshot, merge_expositions
from hub.siblings import Siblings
from loadtest.procs import RedisProcess, http_get
from tests.helpers import MS, wait_for


def siblings(
    redis: Redis, keys: Keys, hub_id: str, ids: tuple[str, ...], text: bytes, interval_s: float = 5
) -> Siblings:
    return Siblings(redis, keys, hub_id, ids, interval_s=interval_s, render_metrics=lambda: text)


async def test_a_worker_reads_the_metrics_its_siblings_wrote(redis: Redis, keys: Keys) -> None:
    ids = ("g-w0", "g-w1", "g-w2")
    w0 = siblings(redis, keys, "g-w0", ids, b"m 0\n")
    w1 = siblings(redis, keys, "g-w1", ids, b"m 1\n")
    await w0.publish()
    await w1.publish()

    assert w0.ids == ("g-w1", "g-w2")
    # g-w2 wrote nothing (not started yet, or gone): left out.
    assert await w0.metrics() == [("g-w1", b"m 1\n")]
    # Five intervals of TTL.
    assert 20_000 < await redis.pttl(keys.hub_metrics("g-w1")) <= 25_000


async def test_a_stopped_worker_leaves_at_once_and_a_dead_one_when_its_key_expires(
    redis: Redis, keys: Keys
) -> None:
    ids = ("g-w0", "g-w1", "g-w2")
    w0 = siblings(redis, keys, "g-w0", ids, b"m 0\n")
    w1 = siblings(redis, keys, "g-w1", ids, b"m 1\n")
    dead = siblings(redis, keys, "g-w2", ids, b"m 2\n", interval_s=0.02)
    for s in (w0, w1, dead):
        await s.publish()

    await w1.remove()
    await asyncio.sleep(200 * MS)

    assert await w0.metrics() == []


async def test_a_hub_of_its_own_reads_and_deletes_nothing(redis: Redis, keys: Keys) -> None:
    alone = siblings(redis, keys, "alone", (), b"m\n")
    await redis.set(keys.hub_metrics("alone"), b"kept")

    assert alone.ids == ()
    assert await alone.metrics() == []
    await alone.remove()
    assert await redis.get(keys.hub_metrics("alone")) == b"kept"


def test_merged_exposition_labels_every_sample_with_its_hub() -> None:
    a, b = Metrics("a"), Metrics("b")
    a.job_ended("finished", "")
    b.job_ended("failed", "NODE_LOST")
    b.rtt.observe(0.003)
    text = merge_expositions(
        [
            ("w0", a.render(Snapshot(1, 2, True, 3, 4))[0]),
            ("w1", b.render(Snapshot(5, 6, False, 7, 8))[0]),
        ]
    ).decode()

    assert text.count("# TYPE hub_jobs_ended_total counter") == 1
    assert 'hub_jobs_ended_total{error="",hub="w0",status="finished"} 1.0' in text
    assert 'hub_jobs_ended_total{error="NODE_LOST",hub="w1",status="failed"} 1.0' in text
    assert 'hub_nodes_connected{hub="w0"} 1.0' in text
    assert 'hub_nodes_connected{hub="w1"} 5.0' in text
    assert 'hub_ready{hub="w1"} 0.0' in text
    assert 'hub_node_ping_rtt_seconds_bucket{hub="w1",le="0.005"} 1.0' in text
    assert 'hub_node_ping_rtt_seconds_count{hub="w0"} 0.0' in text


@contextlib.asynccontextmanager
async def started_hub(
    url: str, keys: Keys, hub_id: str, workers: tuple[str, ...] = ()
) -> AsyncIterator[Hub]:
    """A hub on 127.0.0.1 as one of ``workers`` (none: a hub of its own)."""
    settings = Settings(
        port=0, cell=keys.cell, hub_id=hub_id, watch_interval_s=0.05, shutdown_grace_s=0
    )
    group = hub_id.rpartition("-w")[0] if workers else None
    hub = Hub(settings, url, siblings=workers, group=group)
    try:
        await hub.start()
        await hub.wait_ready(5000 * MS)
        yield hub
    finally:
        await hub.close()


async def test_status_lists_every_hub_and_metrics_of_a_worker_include_its_siblings(
    redis_server: RedisProcess, keys: Keys
) -> None:
    url, workers = redis_server.url, ("g-w0", "g-w1")
    async with (
        started_hub(url, keys, "alone") as alone,
        started_hub(url, keys, "g-w0", workers) as w0,
        started_hub(url, keys, "g-w1", workers),
    ):

        async def listed() -> set[tuple[str, str]]:
            _, body = await http_get(alone.port, "/v1/status")
            return {(h["hub_id"], h["group"]) for h in orjson.loads(body)["hubs"] if h["ready"]}

        await wait_for(
            lambda: _equals(listed, {("alone", "alone"), ("g-w0", "g"), ("g-w1", "g")}),
            timeout=5000 * MS,
        )

        async def merged() -> bool:
            _, body = await http_get(w0.port, "/metrics")
            return b'hub_ready{hub="g-w1"} 1.0' in body and b'hub_ready{hub="g-w0"} 1.0' in body

        await wait_for(merged, timeout=5000 * MS)
        # A hub of its own answers as before: no label, and writes no metrics to Redis.
        _, body = await http_get(alone.port, "/metrics")
        assert b"\nhub_ready 1.0\n" in body and b'hub="' not in body
    # Each worker deleted its metrics as it stopped; the other hub wrote none.
    client = Redis.from_url(url)
    try:
        names = [keys.hub_metrics(h) for h in (*workers, "alone")]
        assert await client.exists(*names) == 0
    finally:
        await client.aclose()


async def _equals(read: Callable[[], Awaitable[Any]], expected: Any) -> bool:
    return await read() == expected
