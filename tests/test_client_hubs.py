"""The SDKs given several hubs (``urls=[...]``): spread, fail over, resume.

Real hubs (in-process, or ``hub serve`` child processes stopped with SIGTERM
or SIGKILL) on the shared test Redis, on a fresh cell. No mocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hub.app import Hub
from hub.client import (
    Backoff,
    ConnectionRejected,
    JobResult,
    NodeClient,
    SessionClient,
    SessionLost,
)
from hub.client.link import FAILOVER_CLOSE_CODES
from hub.client.transport import hub_order, hub_urls
from hub.keys import Keys
from hub.protocol import SessionResult, ToSessionFrame
from loadtest.procs import Processes, RedisProcess, free_port
from tests.helpers import MS, wait_for
from tests.sdktools import FAST_BACKOFF, Gate, running_hub

PROCESS_HUB_SETTINGS: dict[str, Any] = {"session_rate_per_s": None, "shutdown_grace_s": 0.2}
"""Settings of the ``hub serve`` processes: a short grace, so SIGTERM closes soon."""


def url_of(hub: Hub) -> str:
    return f"ws://127.0.0.1:{hub.port}"


def dead_url() -> str:
    """A loopback URL nothing listens on: connecting is refused."""
    return f"ws://127.0.0.1:{free_port()}"


class Wire:
    """The ``result`` frames a session received, per job id."""

    def __init__(self) -> None:
        self.results: Counter[str] = Counter()

    def __call__(self, _client: SessionClient, frame: ToSessionFrame) -> None:
        if isinstance(frame, SessionResult):
            self.results[frame.job_id] += 1


def gated_node(node_id: str, urls: list[str], gate: Gate) -> NodeClient:
    """A node that tries ``urls`` in that order and runs its jobs with ``gate``."""
    return NodeClient(
        urls=urls,
        spread=False,
        node_id=node_id,
        languages=["zh", "en"],
        max_jobs=4,
        handler=gate,
        backoff=FAST_BACKOFF,
    )


@pytest.fixture
async def hub_b(redis_server: RedisProcess, keys: Keys) -> AsyncIterator[Hub]:
    async with running_hub(redis_server.url, keys.cell, hub_id="hub-b") as hub:
        yield hub


async def submit_gated(
    session: SessionClient, node: NodeClient, gate: Gate, n: int
) -> list[asyncio.Task[JobResult]]:
    """Submit ``n`` jobs and wait until the node runs all of them."""
    tasks = [
        asyncio.create_task(session.submit("zh", "en", {"text": f"j{i}"}, timeout_ms=20_000))
        for i in range(n)
    ]
    await wait_for(lambda: node.running == n, timeout=3000 * MS, what=f"{n} jobs running")
    return tasks


def assert_one_outcome_each(results: list[JobResult], n: int) -> None:
    """Every job got exactly one result, finished."""
    assert len({r.job_id for r in results}) == n
    assert [(r.status, r.result and r.result["text"]) for r in results] == [
        ("finished", "done")
    ] * n


def runs(gate: Gate) -> Counter[tuple[str, int]]:
    """How many times the gate ran each (job id, attempt)."""
    return Counter((job.job_id, job.attempt) for job in gate.jobs)


# The order of the hubs


def test_node_order_is_stable_and_spreads_a_fleet_evenly() -> None:
    urls = [f"ws://hub-{k}:8765/v1/node" for k in range(3)]
    firsts = Counter(hub_order(urls, f"gpu-{i}", random.Random(i))[0] for i in range(3000))
    assert set(firsts) == set(urls)
    assert all(900 <= count <= 1100 for count in firsts.values()), firsts
    # The same node tries the same hubs in the same order, whatever the rng.
    assert hub_order(urls, "gpu-7", random.Random(1)) == hub_order(urls, "gpu-7", random.Random(2))
    # Removing a hub moves only the nodes that chose it first.
    moved = [
        i
        for i in range(3000)
        if hub_order(urls, f"gpu-{i}", random.Random())[0]
        != hub_order(urls[:2], f"gpu-{i}", random.Random())[0]
    ]
    assert all(hub_order(urls, f"gpu-{i}", random.Random())[0] == urls[2] for i in moved)


def test_session_order_is_a_random_permutation() -> None:
    urls = [f"ws://hub-{k}:8765/v1/session" for k in range(3)]
    orders = [hub_order(urls, None, random.Random(seed)) for seed in range(300)]
    assert all(sorted(order) == urls for order in orders)
    assert len({order[0] for order in orders}) == 3


def test_urls_are_checked_and_normalized() -> None:
    assert hub_urls(None, ["ws://a:1", "ws://a:1/v1/node", "http://b:2"], "/v1/node") == [
        "ws://a:1/v1/node",
        "ws://b:2/v1/node",
    ]
    assert hub_urls("ws://a:1", None, "/v1/node") == ["ws://a:1/v1/node"]
    for url, urls, message in [
        ("ws://a:1", ["ws://b:1"], "exactly one of url and urls"),
        (None, None, "exactly one of url and urls"),
        (None, [], "at least one hub URL"),
        (None, "ws://a:1", "a list of hub URLs"),
    ]:
        with pytest.raises(ValueError, match=message):
            hub_urls(url, urls, "/v1/node")
    with pytest.raises(ValueError, match="exactly one of url and urls"):
        SessionClient("ws://a:1", urls=["ws://b:1"])


def test_spread_false_keeps_the_order_given() -> None:
    urls = ["ws://a:1", "ws://b:1", "ws://c:1"]
    node = NodeClient(urls=urls, spread=False, node_id="n1", languages=["zh", "en"])
    assert node.urls == [f"{u}/v1/node" for u in urls] and node.url == urls[0] + "/v1/node"
    session = SessionClient(urls=urls, spread=False)
    assert session.urls == [f"{u}/v1/session" for u in urls]


def test_the_codes_that_fail_over_exclude_those_a_client_must_not_retry_unchanged() -> None:
    # protocol.md §7/§8: 1008, 1009, 4002 and 4007 are the hub's answer to
    # this client, which another hub of the cell would give too.
    assert sorted(FAILOVER_CLOSE_CODES) == [1001, 1006, 1011, 1012, 1013, 1014]


# Failing over


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_node_and_session_move_to_the_other_hub_when_theirs_stops(
    processes: Processes, hub_b: Hub, stop: str
) -> None:
    # SIGTERM: the hub closes with 1001 and hands back its nodes' jobs
    # (node_lost): they go to the node on hub B (attempt 2), and hub A's
    # node, registering on hub B, learns they were dropped and stops them.
    # SIGKILL: no close frame (1006), nothing handed back: hub A's node
    # registers on hub B with resume and finishes them (attempt 1).
    hub_a = await processes.hub("hub-a")
    urls = [hub_a.url, url_of(hub_b)]
    gate, wire = Gate(), Wire()
    async with (
        gated_node("n1", urls, gate) as node,
        gated_node("n2", urls[::-1], gate) as other,
        SessionClient(urls=urls, spread=False, backoff=FAST_BACKOFF, on_frame=wire) as session,
    ):
        node.start()
        await node.wait_registered()
        assert (node.hub_id, session.hub_id) == ("hub-a", "hub-a")
        session_id = session.session_id
        tasks = await submit_gated(session, node, gate, 4)
        other.start()
        await other.wait_registered()
        assert other.hub_id == "hub-b"
        if stop == "sigterm":
            hub_a.signal(signal.SIGTERM)
            assert await hub_a.wait(5000 * MS) == 0
        else:
            hub_a.kill()
            await hub_a.wait(5000 * MS)
        await wait_for(
            lambda: node.hub_id == session.hub_id == "hub-b" and node.registered,
            timeout=3000 * MS,
            what="both on hub-b",
        )
        gate.opened.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10_000 * MS)
        assert (session.session_id, session.connections, node.connections) == (session_id, 2, 2)
        assert other.connections == 1
    assert_one_outcome_each(results, 4)
    assert wire.results == {r.job_id: 1 for r in results}
    # No attempt ran twice; a first attempt that moved was stopped, not finished.
    assert set(runs(gate).values()) == {1}
    moved = sorted(r.job_id for r in results if r.result and r.result["attempt"] == 2)
    assert sorted(gate.cancelled) == moved
    if stop == "sigkill":  # resumed, not re-dispatched
        assert moved == [] and sorted(runs(gate)) == sorted((r.job_id, 1) for r in results)


async def test_a_first_url_that_refuses_connections_is_skipped(hub_b: Hub) -> None:
    urls = [dead_url(), url_of(hub_b)]
    gate = Gate()
    gate.opened.set()
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with (
        NodeClient(
            urls=urls,
            spread=False,
            node_id="n1",
            languages=["zh", "en"],
            handler=gate,
            backoff=Backoff(min_s=100 * MS, max_s=5.0),
        ) as node,
        SessionClient(urls=urls, spread=False) as session,
    ):
        node.start()
        await node.wait_registered(timeout_s=2000 * MS)
        # One refused attempt each, then at most one first backoff delay.
        assert loop.time() - began < 1000 * MS
        assert (node.url, session.url) == (
            f"{url_of(hub_b)}/v1/node",
            f"{url_of(hub_b)}/v1/session",
        )
        result = await session.submit("zh", "en", {"text": "j0"})
    assert_one_outcome_each([result], 1)


async def test_session_connect_raises_the_last_error_when_no_hub_answers() -> None:
    with pytest.raises(OSError):
        async with SessionClient(urls=[dead_url(), dead_url()], open_timeout_s=2):
            pass


async def test_a_round_of_failed_urls_backs_off_before_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="hub.client.node")
    urls = [dead_url(), dead_url()]
    backoff = Backoff(min_s=100 * MS, max_s=400 * MS, jitter=False)
    async with NodeClient(
        urls=urls, spread=False, node_id="n1", languages=["zh", "en"], backoff=backoff
    ) as node:
        node.handler(Gate())
        node.start()
        await asyncio.sleep(1500 * MS)
        assert not node.registered
    tries = [
        (r.created, r.getMessage()) for r in caplog.records if "cannot connect" in r.getMessage()
    ]
    assert len(tries) >= 6
    # The URLs alternate…
    assert all(urls[k % 2] in message for k, (_, message) in enumerate(tries))
    # …within a round the delay stays; each failed round doubles it, up to max_s.
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(tries)]
    bounds = [backoff.delay_s(-(-(k + 1) // 2)) for k in range(len(gaps))]
    assert bounds[:6] == pytest.approx([k * 100 * MS for k in (1, 1, 2, 2, 4, 4)])
    assert all(gap >= bound - 10 * MS for gap, bound in zip(gaps, bounds, strict=True))


# What does not fail over


async def test_a_refused_resume_token_starts_a_fresh_session_on_that_hub_and_stays(
    redis_server: RedisProcess, keys: Keys
) -> None:
    # Hub B signs resume tokens with another secret: it answers 4007. The
    # session must not go round the URLs with its token: the old jobs fail
    # with SessionLost and a fresh session opens on hub B, once.
    gate = Gate()
    async with (
        running_hub(redis_server.url, keys.cell, resume_secret="one") as hub_a,
        running_hub(redis_server.url, keys.cell, resume_secret="two") as hub_b,
        NodeClient(url_of(hub_b), node_id="n1", languages=["zh", "en"], handler=gate) as node,
        SessionClient(
            urls=[url_of(hub_a), url_of(hub_b)], spread=False, backoff=FAST_BACKOFF
        ) as session,
    ):
        node.start()
        await node.wait_registered()
        old_id = session.session_id
        task = asyncio.create_task(session.submit("zh", "en", {"text": "j0"}))
        await wait_for(lambda: node.running == 1, timeout=2000 * MS, what="the job")
        await hub_a.close()  # 1001: the session moves to hub B, which answers 4007
        with pytest.raises(SessionLost):
            await asyncio.wait_for(task, 5000 * MS)
        await wait_for(lambda: session.connected, timeout=2000 * MS, what="a new session")
        await asyncio.sleep(300 * MS)  # it stays there
        assert session.session_id != old_id
        assert (session.connections, session.url) == (2, f"{url_of(hub_b)}/v1/session")
        gate.opened.set()
        assert (await session.submit("zh", "en", {"text": "j0"})).ok


async def test_a_replaced_node_stops_instead_of_failing_over(
    hub_b: Hub, redis_server: RedisProcess, keys: Keys
) -> None:
    async with running_hub(redis_server.url, keys.cell, hub_id="hub-a") as hub_a:
        urls = [url_of(hub_a), url_of(hub_b)]
        first = NodeClient(
            urls=urls,
            spread=False,
            node_id="n1",
            languages=["zh", "en"],
            handler=Gate(),
            backoff=FAST_BACKOFF,
        )
        second = NodeClient(url_of(hub_b), node_id="n1", languages=["zh", "en"], handler=Gate())
        async with first, second:
            first.start()
            await first.wait_registered()
            second.start()
            await second.wait_registered()
            with pytest.raises(ConnectionRejected) as rejected:
                await asyncio.wait_for(first.wait_closed(), 2000 * MS)
            assert rejected.value.code == 4002
            assert (first.connections, first.url) == (1, f"{url_of(hub_a)}/v1/node")
            assert second.registered
