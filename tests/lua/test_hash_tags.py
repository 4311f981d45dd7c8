"""Every key the scripts touch shares the cell's hash tag (Redis Cluster ready).

All keys of a cell live in one cluster slot, including the keys a script
derives from what it reads. Two checks:

- on a fresh server holding only this test's data, every key left after a
  workload of every script starts with the cell's prefix and maps to one slot
  (CRC16 computed here, the way Redis Cluster does);
- on a real cluster-mode node, made to refuse any script that touches keys of
  two slots, the same workload runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError

from hub.keys import Keys
from hub.scheduler import Scheduler
from hub.scripts import SCRIPT_NAMES, load_script_sources
from loadtest.procs import RedisProcess
from tests.helpers import MS, wait_for

from .lua_support import WORKLOAD_SETTINGS, WORKLOAD_STEPS, run_every_script

CLUSTER_SLOTS = 16384


def crc16_xmodem(data: bytes) -> int:
    """CRC-16/XMODEM (poly 0x1021, init 0), the checksum of Redis Cluster key slots."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: bytes) -> int:
    """The cluster slot of ``key``: only the first non-empty ``{...}`` is hashed."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16_xmodem(key) % CLUSTER_SLOTS


def test_key_slot_matches_redis_cluster():
    # Reference values from the Redis Cluster specification and CLUSTER KEYSLOT.
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert key_slot(b"foo") == 12182
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")
    assert key_slot(b"foo{}{bar}") == key_slot(b"foo{}{bar}")  # empty tag: whole key
    assert key_slot(b"foo{{bar}}zap") == key_slot(b"{bar")


def test_workload_runs_every_script():
    assert set(WORKLOAD_STEPS) == set(SCRIPT_NAMES)


@pytest.fixture
async def fresh_redis(spawn_redis: Callable[..., RedisProcess]) -> AsyncIterator[Redis]:
    """A client of a server of our own, so the database holds only this test's keys."""
    server = spawn_redis()
    client = Redis.from_url(server.url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        yield client
    finally:
        await client.aclose()


async def test_every_key_shares_the_cells_hash_tag(fresh_redis):
    keys = Keys(cell="hash-tag")
    scheduler = Scheduler(fresh_redis, WORKLOAD_SETTINGS, hub_id="h1", keys=keys)
    await scheduler.load_scripts()

    await run_every_script(scheduler)
    await scheduler.close()

    found = [key async for key in fresh_redis.scan_iter(count=1000)]
    prefix = keys.prefix.encode()
    assert [key for key in found if not key.startswith(prefix)] == []
    assert {key_slot(key) for key in found} == {key_slot(prefix)}
    # Not vacuous: every kind of key is there.
    kinds = {key[len(prefix) :].split(b":")[0] for key in found}
    assert kinds >= {
        b"node", b"free", b"pool", b"pools", b"lang", b"seen", b"job", b"deadlines",
        b"queued", b"qdepth", b"queue", b"session", b"sweep", b"stats",
    }  # fmt: skip


def slot_checked_sources() -> dict[str, str]:
    """The scripts, each starting with ``#!lua``.

    Redis lets a script without a shebang touch keys of any slot (backward
    compatibility); with a shebang and no ``allow-cross-slot-keys`` flag, a
    cluster node refuses any access to a second slot, declared or not.
    """
    return {name: "#!lua\n" + src for name, src in load_script_sources().items()}


async def test_every_script_runs_on_a_cluster_node(spawn_redis):
    server = spawn_redis(
        extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    )
    client = Redis.from_url(server.url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        await client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, CLUSTER_SLOTS - 1)

        async def cluster_ok() -> bool:
            info = await client.execute_command("CLUSTER", "INFO")
            if isinstance(info, dict):
                return info.get("cluster_state") == "ok"
            return b"cluster_state:ok" in info

        # A new master waits a moment before it serves (CLUSTER_WRITABLE_DELAY).
        await wait_for(cluster_ok, timeout=10_000 * MS, interval=20 * MS)
        keys = Keys(cell="cluster")
        # The check is live: a second slot is refused.
        with pytest.raises(ResponseError, match="do not hash to the same slot"):
            await client.eval(
                "#!lua\nredis.call('GET', KEYS[1]) return redis.call('GET', 'elsewhere')",
                1,
                keys.seen,
            )
        scheduler = Scheduler(
            client, WORKLOAD_SETTINGS, hub_id="h1", keys=keys, sources=slot_checked_sources()
        )
        await scheduler.load_scripts()

        await run_every_script(scheduler)
        await scheduler.close()

        found = [key async for key in client.scan_iter(count=1000)]
        assert found
        slot = key_slot(keys.prefix.encode())
        for key in found:
            assert await client.execute_command("CLUSTER", "KEYSLOT", key) == slot
    finally:
        await client.aclose()
