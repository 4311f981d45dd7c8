"""Hubs whose wall clocks are off by 30 s, beside a right one, on one Redis (issue 12, gap 8).

Each skewed hub is a real ``hub serve`` process whose clocks libfaketime
shifts (Debian's ``faketime`` package). The library is preloaded by ``env``,
which execs the hub, rather than by the ``faketime`` command, which forks
it: a hub under that command outlives the SIGKILL the tests stop it with.
Nodes and
sessions on every hub keep working for many lease periods: no node is
lost, no job times out early, and every job frame's ``deadline_ms`` is on
Redis's clock, because scripts take time from Redis ``TIME`` and the hubs
compare only their own monotonic clock with itself (protocol.md §8,
Windows and limits). The hub ahead of time is the only one that sweeps, so
its sweeps are the ones that expire nodes and jobs; the hub behind sees
every fresh token's ``iat`` in its future (§10).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import sys
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from hub.auth import mint_node_token, mint_session_token
from hub.client import Backoff, Job, NodeClient, SessionClient
from hub.keys import Keys
from loadtest.procs import Processes, hub_command, run_command
from tests.helpers import MS

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))), None)
"""libfaketime, thread-safe build, as the ``faketime`` package installs it."""
SKEW_S = 30
NODE_KEY = "node-token-key-of-the-skew-test-32b"
SESSION_KEY = "session-jwt-key-of-the-skew-test-32"
LEASE_MS = 1_000
RUN_S = 6.0
"""Six leases: every node's lease is renewed (or would run out) many times."""
TIMEOUT_MS = 5_000
"""The jobs' budget: far less than the skew, so a deadline on a skewed clock shows."""

PROCESS_HUB_SETTINGS: dict[str, Any] = {
    "heartbeat_interval_ms": 250,
    "node_lease_ms": LEASE_MS,
    "sweep_interval_ms": 50,
    "session_rate_per_s": None,
    "shutdown_grace_s": 0.5,
    "node_token_key": NODE_KEY,
    "session_jwt_key": SESSION_KEY,
}
"""Settings of the ``hub serve`` processes of the ``processes`` fixture."""

pytestmark = pytest.mark.skipif(
    LIBFAKETIME is None, reason="needs libfaketime (Debian package faketime; .ci/run installs it)"
)


def skewed(offset: str, command: list[str]) -> list[str]:
    """``command`` with its clocks shifted by ``offset`` (``+30s``, ``-30s``), as our child."""
    assert LIBFAKETIME is not None
    return ["env", f"LD_PRELOAD={LIBFAKETIME}", f"FAKETIME={offset}", *command]


def test_libfaketime_shifts_the_wall_clock_of_a_python_child() -> None:
    # The premise of the test below: the library works with this
    # interpreter, and the shifted process is our child (env execs it).
    probe = "import os, time; print(time.time(), os.getppid())"
    for offset, sign in ((f"+{SKEW_S}s", 1), (f"-{SKEW_S}s", -1)):
        before = time.time()
        done = run_command(skewed(offset, [sys.executable, "-c", probe]), timeout_s=30)
        after = time.time()
        assert done.returncode == 0, done.stderr
        now, parent = done.stdout.split()
        assert before - 1 <= float(now) - sign * SKEW_S <= after + 1, (offset, now, before)
        assert int(parent) == os.getpid()


async def test_hubs_30s_ahead_and_behind_lose_no_node_and_time_out_no_job(
    processes: Processes, redis: Redis, keys: Keys
) -> None:
    # Only the hub ahead sweeps (the others try once a minute).
    ahead = await processes.hub("ahead", launcher=skewed(f"+{SKEW_S}s", hub_command()))
    plain = await processes.hub("plain", sweep_interval_ms=60_000)
    behind = await processes.hub(
        "behind", launcher=skewed(f"-{SKEW_S}s", hub_command()), sweep_interval_ms=60_000
    )
    sweep_holders: list[bytes | None] = []
    hubs = {"ahead": ahead, "plain": plain, "behind": behind}

    deadlines_off_ms: list[float] = []
    ran_on: dict[str, int] = {name: 0 for name in hubs}

    def handler_of(name: str) -> Any:
        async def handler(job: Job) -> dict[str, Any]:
            # The fleet's clock is Redis's: on this machine, the test's own.
            deadlines_off_ms.append(job.deadline_ms - (time.time() * 1000 + TIMEOUT_MS))
            ran_on[name] += 1
            await asyncio.sleep(0.03)
            return {"text": job.payload["text"].upper()}

        return handler

    backoff = Backoff(min_s=20 * MS, max_s=200 * MS)
    results = []
    async with contextlib.AsyncExitStack() as stack:
        for name, hub in hubs.items():
            node = NodeClient(
                hub.url,
                node_id=f"n-{name}",
                languages=["en", "fr"],
                max_jobs=2,
                token=mint_node_token(NODE_KEY, [f"n-{name}"]),
                handler=handler_of(name),
                backoff=backoff,
            )
            await stack.enter_async_context(node)
            node.start()
            await node.wait_registered()
        sessions = [
            await stack.enter_async_context(
                SessionClient(hub.url, token=mint_session_token(SESSION_KEY), backoff=backoff)
            )
            for hub in hubs.values()
        ]

        async def submit_until(session: SessionClient, stop: float, lane: int) -> None:
            k = 0
            while time.monotonic() < stop:
                k += 1
                payload = {"text": f"{lane}-{k}"}
                results.append(await session.submit("en", "fr", payload, timeout_ms=TIMEOUT_MS))

        async def watch_sweep(stop: float) -> None:
            while time.monotonic() < stop:
                sweep_holders.append(await redis.get(keys.sweep_lease))
                await asyncio.sleep(0.1)

        stop = time.monotonic() + RUN_S
        async with asyncio.timeout(RUN_S + TIMEOUT_MS / 1000 + 10):
            await asyncio.gather(
                watch_sweep(stop),
                *(submit_until(s, stop, 2 * i + j) for i, s in enumerate(sessions) for j in (0, 1)),
            )
        nodes = {name: await redis.hmget(keys.node(f"n-{name}"), "state", "epoch") for name in hubs}

    # The hub ahead swept all along: its sweeps would have expired every
    # other node and job had it used its own clock.
    assert set(sweep_holders) <= {b"ahead", None}, sweep_holders
    assert sweep_holders.count(b"ahead") >= len(sweep_holders) / 2, sweep_holders
    # Every job finished: none timed out early, none lost its node.
    assert len(results) > 30
    assert [(r.status, r.error) for r in results if not r.ok] == []
    assert all(ran_on.values()), ran_on
    # Dispatched by every hub, each job's deadline is Redis's now plus its budget.
    assert max(abs(off) for off in deadlines_off_ms) < 2_000, deadlines_off_ms
    # No node was lost and registered again: each is on its first epoch, live.
    assert nodes == {name: [b"live", b"1"] for name in hubs}
    assert all(hub.alive for hub in hubs.values())
