"""The deployment guide's load balancer example (docs/deployment.md), run on loopback.

HAProxy, with the guide's configuration (only its ``bind`` address and
``server`` lines replaced), in front of two ``hub serve --workers 2`` on one
Redis: nodes and sessions connect through it, jobs run, every worker of
both servers shows in ``/v1/status``; then one server stops (SIGTERM), the
health check takes it out, and its nodes and sessions carry on through
HAProxy on the other. Skipped when ``haproxy`` is not installed (CI
installs it: ``.ci/run``).
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from hub.client import Job, NodeClient, SessionClient
from hub.keys import Keys
from loadtest.procs import CommandProcess, HubProcess, RedisProcess, http_get, pick_port
from tests.helpers import MS, wait_for
from tests.sdktools import FAST_BACKOFF

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
HAPROXY = shutil.which("haproxy")

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


def guide_config(listen_port: int, servers: dict[str, int]) -> str:
    """The guide's HAProxy configuration, listening and forwarding on loopback."""
    [block] = re.findall(r"```haproxy\n(.*?)```", GUIDE.read_text(), re.DOTALL)
    bind = re.compile(r"^(\s+)bind \S+$", re.MULTILINE)
    assert len(bind.findall(block)) == 1, block
    block = bind.sub(rf"\1bind 127.0.0.1:{listen_port}", block)
    server = re.compile(r"^(\s+)server \S+ \S+ check\n", re.MULTILINE)
    indent = server.findall(block)
    assert len(indent) == 2, block
    lines = "".join(f"{indent[0]}server {n} 127.0.0.1:{p} check\n" for n, p in servers.items())
    return server.sub("", block).rstrip("\n") + "\n" + lines


async def status_via(port: int) -> dict[str, Any]:
    status, body = await http_get(port, "/v1/status")
    if status != 200:
        return {}
    data: dict[str, Any] = orjson.loads(body)
    return data


@pytest.fixture
async def servers(
    redis_server: RedisProcess, keys: Keys, tmp_path: Path
) -> AsyncIterator[list[HubProcess]]:
    """Two ``hub serve --workers 2`` on the test's cell, stopped at teardown."""
    settings = {
        "workers": 2,
        "watch_interval_s": 0.2,
        "max_connections_per_ip": None,
        "heartbeat_interval_ms": 200,
        "shutdown_grace_s": 1,
    }
    hubs = [
        HubProcess(name, redis_url=redis_server.url, cell=keys.cell, log_dir=tmp_path,
                   settings=settings, log_level="INFO")
        for name in ("edge-1", "edge-2")
    ]  # fmt: skip
    try:
        await asyncio.gather(*(h.start() for h in hubs))
        await asyncio.gather(*(h.wait_ready() for h in hubs))
        yield hubs
    finally:
        await asyncio.gather(*(h.stop(20) for h in hubs))


async def test_haproxy_of_the_guide_balances_two_worker_servers(
    servers: list[HubProcess], tmp_path: Path
) -> None:
    assert HAPROXY is not None
    port = pick_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(guide_config(port, {h.hub_id or "": h.port for h in servers}))
    check = await asyncio.create_subprocess_exec(HAPROXY, "-c", "-q", "-f", str(config))
    assert await check.wait() == 0, config.read_text()
    async with CommandProcess(
        [HAPROXY, "-db", "-f", str(config)], log_path=tmp_path / "haproxy.log"
    ):
        url = f"ws://127.0.0.1:{port}"
        every_worker = {f"{h.hub_id}-w{k}" for h in servers for k in (0, 1)}

        async def all_workers_listed() -> bool:
            hubs = (await status_via(port)).get("hubs", [])
            return {h["hub_id"] for h in hubs if h["ready"]} == every_worker

        await wait_for(all_workers_listed, timeout=20_000 * MS)

        ran: list[str] = []

        async def handle(job: Job) -> dict[str, Any]:
            ran.append(job.job_id)
            await asyncio.sleep(0.01)
            return {"text": str(job.payload.get("text", "")).upper()}

        nodes = [
            NodeClient(url, node_id=f"n{i}", languages=["en", "fr"], max_jobs=4,
                       handler=handle, backoff=FAST_BACKOFF)
            for i in range(6)
        ]  # fmt: skip
        sessions = [SessionClient(url, backoff=FAST_BACKOFF) for _ in range(4)]
        try:
            for node in nodes:
                node.start()
            for node in nodes:
                await node.wait_registered(timeout_s=10)
            for session in sessions:
                await session.connect()

            async def run_jobs(tag: str, per_session: int) -> None:
                async def one(s: int, session: SessionClient) -> None:
                    for j in range(per_session):
                        text = f"{tag}-{s}-{j}"
                        result = await session.submit("en", "fr", {"text": text})
                        assert result.ok, result
                        assert result.result == {"text": text.upper()}

                await asyncio.gather(*(one(s, x) for s, x in enumerate(sessions)))

            await run_jobs("a", 10)
            # HAProxy spread the nodes over both servers (leastconn).
            status = await status_via(port)
            groups = {n["hub_id"].rpartition("-w")[0] for n in status["nodes"]}
            assert groups == {h.hub_id for h in servers}, status["nodes"]

            # One server stops: HAProxy takes it out; its clients come back
            # through HAProxy on the other, and jobs keep running.
            gone, kept = servers
            assert await gone.stop(20) == 0
            for node in nodes:
                await node.wait_registered(timeout_s=20)
            await run_jobs("b", 10)

            async def all_on_kept() -> bool:
                status = await status_via(port)
                on = {n["hub_id"].rpartition("-w")[0] for n in status.get("nodes", [])}
                hubs = {h["hub_id"] for h in status.get("hubs", [])}
                return on == {kept.hub_id} and hubs == {f"{kept.hub_id}-w{k}" for k in (0, 1)}

            await wait_for(all_on_kept, timeout=10_000 * MS)
            assert len(ran) == len(set(ran)) >= 80
        finally:
            for session in sessions:
                await session.close()
            for node in nodes:
                await node.close()
