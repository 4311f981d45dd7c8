"""``/v1/watch`` and ``/dashboard`` (protocol.md §12): snapshots of the whole
deployment, one per tick shared by every watcher, and who may see them."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from hub.app import Hub
from hub.auth import mint_admin_token, mint_node_token
from hub.keys import Keys
from tests.helpers import MS, wait_for
from tests.hubtools import (
    Connect,
    expect,
    expect_closed,
    http_get,
    open_node,
    open_session,
    result,
    submit,
)

MakeHub = Callable[..., Awaitable[Hub]]

ADMIN_KEY = "admin-key-" + "k" * 32
NODE_KEY = "node-key-" + "n" * 32
FAST = {"watch_interval_s": 0.1}


async def snapshot(ws: ClientConnection, within: float = 3000 * MS) -> dict[str, Any]:
    """The next snapshot frame of a watcher."""
    async with asyncio.timeout(within):
        frame: dict[str, Any] = orjson.loads(await ws.recv())
    assert frame["type"] == "snapshot"
    assert frame["v"] == 1
    return frame


async def snapshot_where(
    ws: ClientConnection, check: Callable[[dict[str, Any]], bool], within: float = 5000 * MS
) -> dict[str, Any]:
    """The first snapshot for which ``check`` holds."""
    last: dict[str, Any] = {}
    try:
        async with asyncio.timeout(within):
            while True:
                last = await snapshot(ws, within)
                if check(last):
                    return last
    except TimeoutError:
        raise AssertionError(f"no such snapshot; the last: {last!r}") from None


async def test_snapshot_shows_nodes_pools_queues_hubs_and_redis(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(**FAST)
    node = await open_node(connect, hub, "gpu-1", languages=["en", "fr"], pools=["premium"])
    session = await open_session(connect, hub)
    watcher = await connect(hub, "/v1/watch")
    frame = await snapshot_where(watcher, lambda f: any(f["nodes"]) and f["hubs"])
    assert frame["hub_id"] == hub.hub_id
    assert frame["interval_s"] == 0.1
    assert frame["stale"] is False
    (row,) = frame["nodes"]
    assert row["node_id"] == "gpu-1"
    assert row["hub_id"] == hub.hub_id
    assert (row["running"], row["max_jobs"], row["state"]) == (0, 2, "live")
    assert row["pools"] == ["premium"]
    assert sorted(map(tuple, row["lang_pairs"])) == [("en", "fr"), ("fr", "en")]
    assert row["seen_ago_ms"] is not None and row["seen_ago_ms"] >= 0
    assert frame["pools"] == [
        {
            "pool": "premium",
            "nodes": 1,
            "live": 1,
            "running": 0,
            "max_jobs": 2,
            "pairs": ["en:fr", "fr:en"],
            "queued": 0,
        }
    ]
    assert frame["hubs"] == [
        {"hub_id": hub.hub_id, "sessions": 1, "nodes": 1, "watchers": 1, "ready": True}
    ]
    redis = frame["redis"]
    assert redis["ok"] is True
    assert redis["rtt_ms"] > 0 and redis["used_memory"] > 0 and redis["version"]
    # A job in flight shows in the table, then its result in the counters and latencies.
    await submit(session, "r1")
    await expect(session, "accepted", ref="r1")
    job = await expect(node, "job")
    frame = await snapshot_where(watcher, lambda f: f["nodes"][0]["running"] == 1)
    assert frame["pools"][0]["running"] == 1
    assert frame["latency"]["accepted"]["count"] == 1
    await result(node, job)
    await expect(session, "result", ref="r1")
    frame = await snapshot_where(watcher, lambda f: f["jobs"]["totals"].get("finished") == 1)
    assert frame["nodes"][0]["running"] == 0
    latency = frame["latency"]
    assert latency["window_s"] == 300.0
    assert latency["end_to_end"]["count"] == 1
    assert 0 < latency["accepted"]["p50_ms"] <= latency["end_to_end"]["p50_ms"] < 2000
    assert latency["end_to_end"]["p99_ms"] == latency["end_to_end"]["p50_ms"]


async def test_rates_count_finished_failed_and_refused_jobs_by_code(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(**FAST, queue_wait_ms=0)
    node = await open_node(connect, hub, "gpu-1", languages=["en", "fr"], max_jobs=1)
    session = await open_session(connect, hub)
    watcher = await connect(hub, "/v1/watch")
    await snapshot(watcher)
    await submit(session, "a")
    await expect(session, "accepted", ref="a")
    job = await expect(node, "job")
    await submit(session, "b")  # no free slot, no queue wait
    await expect(session, "error", ref="b", code="NO_AVAILABLE_NODE")
    await submit(session, "c", src_lang="xx", tgt_lang="yy")
    await expect(session, "error", ref="c", code="NO_POOL_FOR_LANG_PAIR")
    await result(node, job, status="failed", error="MODEL_CRASHED")
    await expect(session, "result", ref="a", status="failed")
    seen: dict[str, float] = {}

    def rates_seen(f: dict[str, Any]) -> bool:
        jobs = f["jobs"]
        for code, rate in jobs["refused_per_s"].items():
            seen["refused:" + code] = max(rate, seen.get("refused:" + code, 0.0))
        for code, rate in jobs["failed_per_s"].items():
            seen["failed:" + code] = max(rate, seen.get("failed:" + code, 0.0))
        seen["failed"] = max(jobs["per_s"]["failed"], seen.get("failed", 0.0))
        seen["refused"] = max(jobs["per_s"]["refused"], seen.get("refused", 0.0))
        return len([v for v in seen.values() if v > 0]) == 5

    frame = await snapshot_where(watcher, rates_seen)
    totals = frame["jobs"]["totals"]
    assert totals["refused:NO_AVAILABLE_NODE"] == 1
    assert totals["refused:NO_POOL_FOR_LANG_PAIR"] == 1
    assert totals["error:MODEL_CRASHED"] == 1
    assert totals["failed"] == 1
    # One job in a tick of about 0.1 s (a late tick makes the next one short).
    assert 0 < seen["failed:MODEL_CRASHED"] < 100
    assert set(seen) == {
        "refused:NO_AVAILABLE_NODE",
        "refused:NO_POOL_FOR_LANG_PAIR",
        "failed:MODEL_CRASHED",
        "failed",
        "refused",
    }
    # Once nothing happens, the rates fall back to zero.
    frame = await snapshot_where(
        watcher,
        lambda f: (
            not any(f["jobs"]["per_s"].values())
            and not any(f["jobs"]["refused_per_s"].values())
            and not any(f["jobs"]["failed_per_s"].values())
        ),
    )
    assert frame["jobs"]["totals"]["failed"] == 1


async def test_nodes_own_error_messages_count_as_other(make_hub: MakeHub, connect: Connect) -> None:
    # A message per job would grow the cell's counters and every snapshot forever.
    hub = await make_hub(**FAST)
    node = await open_node(connect, hub, "gpu-1", languages=["en", "fr"], max_jobs=1)
    session = await open_session(connect, hub)
    errors = ["CUDA OOM on job 1", "CUDA OOM on job 2", "MODEL_CRASHED", "JOB_TIMEOUT"]
    for i, error in enumerate(errors):
        await submit(session, f"r{i}")
        await expect(session, "accepted", ref=f"r{i}")
        job = await expect(node, "job")
        await result(node, job, status="failed", error=error)
        # The session still gets the node's own message.
        await expect(session, "result", ref=f"r{i}", status="failed", error=error)
    watcher = await connect(hub, "/v1/watch")
    frame = await snapshot_where(watcher, lambda f: f["jobs"]["totals"].get("failed") == 4)
    failed = {k: v for k, v in frame["jobs"]["totals"].items() if k.startswith("error:")}
    assert failed == {"error:OTHER": 2, "error:MODEL_CRASHED": 1, "error:JOB_TIMEOUT": 1}
    _, _, metrics = await http_get(hub.port, "/metrics")
    assert b'hub_jobs_ended_total{error="OTHER",status="failed"} 2.0' in metrics
    assert b"CUDA" not in metrics


async def test_a_lost_node_is_marked_lost_then_leaves_the_table(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(**FAST)
    node = await open_node(connect, hub, "gpu-1")
    await open_node(connect, hub, "gpu-2")
    watcher = await connect(hub, "/v1/watch")
    await snapshot_where(watcher, lambda f: len(f["nodes"]) == 2)
    await node.close()
    frame = await snapshot_where(watcher, lambda f: f["nodes"][0]["state"] == "lost")
    assert [(r["node_id"], r["state"]) for r in frame["nodes"]] == [
        ("gpu-1", "lost"),
        ("gpu-2", "live"),
    ]
    assert frame["pools"][0]["nodes"] == 1  # a lost node is in no pool
    # Ten ticks later it is gone.
    frame = await snapshot_where(watcher, lambda f: len(f["nodes"]) == 1)
    assert frame["nodes"][0]["node_id"] == "gpu-2"


async def test_every_hub_sees_the_whole_deployment(make_hub: MakeHub, connect: Connect) -> None:
    hub_a = await make_hub(**FAST)
    hub_b = await make_hub(**FAST)
    node = await open_node(connect, hub_a, "gpu-1")
    session = await open_session(connect, hub_b)
    await open_session(connect, hub_b)
    await submit(session, "r1")
    await expect(session, "accepted", ref="r1")
    job = await expect(node, "job")
    await result(node, job)
    await expect(session, "result", ref="r1")
    watcher = await connect(hub_a, "/v1/watch")
    frame = await snapshot_where(
        watcher,
        lambda f: len(f["hubs"]) == 2 and f["latency"]["end_to_end"]["count"] == 1,
    )
    hubs = {h["hub_id"]: (h["sessions"], h["nodes"], h["watchers"]) for h in frame["hubs"]}
    assert hubs == {hub_a.hub_id: (0, 1, 1), hub_b.hub_id: (2, 0, 0)}
    assert frame["jobs"]["totals"]["finished"] == 1
    # A stopped hub leaves the list when its record expires (five ticks).
    await hub_b.close()
    frame = await snapshot_where(watcher, lambda f: len(f["hubs"]) == 1)
    assert frame["hubs"][0]["hub_id"] == hub_a.hub_id


async def test_one_snapshot_per_tick_goes_to_every_watcher(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(watch_interval_s=0.2)
    watchers = [await connect(hub, "/v1/watch") for _ in range(5)]
    await wait_for(lambda: hub.watch.snapshots >= 1, timeout=3000 * MS)
    built = hub.watch.snapshots
    frames = [await ws.recv() for ws in watchers]
    after = [await ws.recv() for ws in watchers]
    # Each tick's snapshot is one object, encoded once: the same bytes to all.
    assert len(set(after)) == 1
    assert hub.watch.snapshots - built <= 3
    assert all(orjson.loads(f)["type"] == "snapshot" for f in frames)


async def test_a_watcher_never_gets_a_snapshot_older_than_a_tick(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(**FAST)
    first = await connect(hub, "/v1/watch")
    assert (await snapshot(first))["nodes"] == []
    await first.close()
    await wait_for(lambda: hub.watch.last is None, timeout=2000 * MS)
    await open_node(connect, hub, "gpu-1")
    # The snapshot sent at once is this tick's, not the one from before the node.
    later = await connect(hub, "/v1/watch")
    assert [row["node_id"] for row in (await snapshot(later))["nodes"]] == ["gpu-1"]


async def test_no_watcher_costs_no_snapshot(make_hub: MakeHub, redis: Redis, keys: Keys) -> None:
    hub = await make_hub(**FAST)
    # The hub still publishes its own record for the others.
    await wait_for(lambda: redis.exists(keys.hub_record(hub.hub_id)), timeout=2000 * MS)
    await asyncio.sleep(300 * MS)
    assert hub.watch.snapshots == 0
    ttl = await redis.pttl(keys.hub_record(hub.hub_id))
    assert 0 < ttl <= 500


async def test_a_watcher_that_sends_anything_is_closed_1008(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(**FAST)
    watcher = await connect(hub, "/v1/watch")
    other = await connect(hub, "/v1/watch")
    await watcher.send('{"type": "job"}')
    await expect_closed(watcher, 1008)
    assert watcher.close_reason == "the watch stream is read-only"
    await snapshot(other)  # the others go on


async def test_watchers_get_1001_when_the_hub_shuts_down(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(**FAST)
    watcher = await connect(hub, "/v1/watch")
    await snapshot(watcher)
    await hub.close()
    await expect_closed(watcher, 1001)
    assert not hub.watch.watchers


async def test_watchers_past_the_cap_are_refused_503(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(**FAST, max_watchers=2)
    await connect(hub, "/v1/watch")
    await connect(hub, "/v1/watch")
    with pytest.raises(InvalidStatus) as refused:
        await connect(hub, "/v1/watch")
    assert refused.value.response.status_code == 503
    assert refused.value.response.body == b"too many watchers\n"


async def test_a_watcher_that_does_not_read_is_closed(make_hub: MakeHub) -> None:
    hub = await make_hub(watch_interval_s=0.05, send_buffer_bytes=4096)
    for n in range(100):  # snapshots of about 20 kB
        await hub.scheduler.register_node(
            f"node-{n:03}", services=["asr"], lang_pairs=[("en", "fr")], max_jobs=1
        )
    # A slow network: small socket buffers on both sides.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", hub.port))
    async with connect(
        f"ws://127.0.0.1:{hub.port}/v1/watch", sock=sock, max_queue=1, close_timeout=500 * MS
    ):
        await wait_for(lambda: hub.watch.watchers, timeout=2000 * MS)
        (served,) = hub.watch.watchers
        served.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        # It reads nothing: the snapshots fill the socket buffers, then the
        # hub's send buffer; past send_buffer_bytes the hub closes it (4005).
        await wait_for(lambda: not hub.watch.watchers, timeout=20_000 * MS)
    assert hub.metrics.snapshot()["hub_slow_connections_closed_total"] == 1


async def test_a_foreign_origin_cannot_watch(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(**FAST)
    with pytest.raises(InvalidStatus) as refused:
        await connect(hub, "/v1/watch", origin="http://evil.example")
    assert refused.value.response.status_code == 403
    # The hub's own page may.
    ws = await connect(hub, "/v1/watch", origin=f"http://127.0.0.1:{hub.port}")
    await snapshot(ws)


# Access


async def test_open_mode_serves_the_dashboard_to_loopback(make_hub: MakeHub) -> None:
    hub = await make_hub(**FAST)
    status, headers, body = await http_get(hub.port, "/dashboard")
    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert b"/v1/watch" in body
    status, headers, body = await http_get(hub.port, "/dashboard/uPlot.iife.min.js")
    assert status == 200 and body.startswith(b"/*! https://github.com/leeoniya/uPlot")
    status, _, body = await http_get(hub.port, "/dashboard/uPlot.LICENSE.txt")
    assert status == 200 and b"MIT" in body


async def test_auth_without_an_admin_key_serves_no_dashboard(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(**FAST, node_token_key=NODE_KEY)
    status, _, body = await http_get(hub.port, "/dashboard")
    assert (status, body) == (403, b"the dashboard needs admin_token_key when auth is enabled\n")
    with pytest.raises(InvalidStatus) as refused:
        await connect(hub, "/v1/watch")
    assert refused.value.response.status_code == 403


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (None, b"unauthorized: missing admin token\n"),
        ("not-a-jwt", b"unauthorized: invalid token\n"),
        (mint_admin_token("x" * 40), b"unauthorized: invalid token\n"),
        (mint_admin_token(ADMIN_KEY, ttl_s=-3600), b"unauthorized: token expired\n"),
        (mint_node_token(ADMIN_KEY, ["gpu-*"]), b"unauthorized: not an admin token\n"),
    ],
    ids=["missing", "garbage", "other-key", "expired", "node-token"],
)
async def test_the_dashboard_and_stream_need_an_admin_token(
    make_hub: MakeHub, connect: Connect, token: str | None, message: bytes
) -> None:
    hub = await make_hub(**FAST, admin_token_key=ADMIN_KEY)
    query = f"?token={token}" if token else ""
    status, headers, body = await http_get(hub.port, "/dashboard" + query)
    # A browser shows the body: the page's refusal says how to open it.
    hint = b"open /dashboard?token=TOKEN with a token from `hub token --admin`\n"
    assert (status, body) == (401, message + hint)
    assert headers["www-authenticate"] == "Bearer"
    with pytest.raises(InvalidStatus) as refused:
        await connect(hub, "/v1/watch" + query)
    assert refused.value.response.status_code == 401
    assert refused.value.response.body == message


async def test_an_admin_token_opens_the_dashboard_and_stream(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(**FAST, admin_token_key=ADMIN_KEY)
    token = mint_admin_token(ADMIN_KEY)
    status, _, _ = await http_get(hub.port, f"/dashboard?token={token}")
    assert status == 200
    # In the query (browsers) or the Authorization header (scripts).
    await snapshot(await connect(hub, f"/v1/watch?token={token}"))
    ws = await connect(hub, "/v1/watch", additional_headers={"Authorization": f"Bearer {token}"})
    await snapshot(ws)


async def test_a_watcher_gets_the_snapshot_of_redis_down(
    make_hub: MakeHub, connect: Connect, spawn_redis: Any
) -> None:
    server = spawn_redis()
    hub = await make_hub(redis_url=server.url, **FAST)
    await open_node(connect, hub, "gpu-1")
    watcher = await connect(hub, "/v1/watch")
    await snapshot_where(watcher, lambda f: len(f["nodes"]) == 1)
    await asyncio.to_thread(server.freeze)
    try:
        frame = await snapshot_where(watcher, lambda f: not f["redis"]["ok"], within=10_000 * MS)
    finally:
        await asyncio.to_thread(server.thaw)
    assert frame["redis"] == {"ok": False, "error": "UNAVAILABLE"}
    assert frame["stale"] is True
    assert [r["node_id"] for r in frame["nodes"]] == ["gpu-1"]  # the last known table
    frame = await snapshot_where(watcher, lambda f: f["redis"]["ok"], within=10_000 * MS)
    assert frame["stale"] is False
