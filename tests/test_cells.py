"""Cells on one Redis: membership, spill-over, and spilled jobs' results, cancels and resume.

A hub serves the test's cell (``keys.cell``, its default) and others named
after it; each test's hubs, nodes and sessions live in those cells only,
and every key of them is deleted afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection

from hub.app import Hub
from hub.auth import mint_node_token, mint_session_token
from hub.cells import LACKS_PAIR_S, Cells
from hub.config import ConfigError, Settings
from hub.keys import Keys
from tests.helpers import MS, glob_escape, wait_for
from tests.hubtools import (
    expect,
    expect_closed,
    expect_silence,
    http_get,
    job_record,
    node_hash,
    register,
    result,
    send,
    submit,
)
from tests.test_jobsapi import HttpClient
from tests.test_shedding import called_scripts

MakeHub = Callable[..., Awaitable[Hub]]
Connect = Callable[..., Awaitable[ClientConnection]]

NODE_KEY = "node-token-key-cells-0123456789abcdef"
SESSION_KEY = "session-jwt-key-cells-0123456789abcdef"


@pytest.fixture
async def other_cells(redis: Redis, keys: Keys) -> AsyncIterator[tuple[str, str]]:
    """Two more cells beside the test's, ``<cell>-b`` and ``<cell>-c``; their keys go after."""
    cells = (keys.cell + "-b", keys.cell + "-c")
    yield cells
    for cell in cells:
        pattern = glob_escape(Keys(cell).prefix) + "*"
        found = [key async for key in redis.scan_iter(match=pattern, count=1000)]
        if found:
            await redis.unlink(*found)


async def open_node(
    connect: Connect, hub: Hub, node_id: str, cell: str | None = None, **fields: Any
) -> ClientConnection:
    ws = await connect(hub, "/v1/node")
    await register(ws, node_id=node_id, cell=cell, **fields)
    return ws


async def open_session(
    connect: Connect, hub: Hub, cell: str | None = None
) -> tuple[ClientConnection, dict[str, Any]]:
    path = "/v1/session" if cell is None else f"/v1/session?cell={cell}"
    ws = await connect(hub, path)
    return ws, await expect(ws, "welcome", hub_id=hub.hub_id)


# Membership


async def test_node_and_session_in_a_non_default_cell_run_jobs_there(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, _ = other_cells
    hub = await make_hub(cells=(keys.cell, b))
    node = await open_node(connect, hub, "n-b", cell=b)
    assert await node_hash(redis, Keys(b), "n-b") != {}
    assert await node_hash(redis, keys, "n-b") == {}

    session, _ = await open_session(connect, hub, cell=b)
    await submit(session, "r1", payload={"x": 1})
    accepted = await expect(session, "accepted", ref="r1", node_id="n-b")
    assert accepted["job_id"].startswith(b + ".")
    job = await expect(node, "job", job_id=accepted["job_id"])
    await result(node, job, result={"ok": 1})
    await expect(session, "result", ref="r1", status="finished", result={"ok": 1})
    assert (await job_record(redis, Keys(b), accepted["job_id"]))["status"] == "finished"
    assert await job_record(redis, keys, accepted["job_id"]) == {}

    # A session of the default cell does not see cell b's nodes (no spill-over).
    home, _ = await open_session(connect, hub)
    await submit(home, "r2")
    await expect(home, "error", ref="r2", code="NO_POOL_FOR_LANG_PAIR")


async def test_nodes_of_two_cells_on_one_hub_keep_their_heartbeats_and_sweeps(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, _ = other_cells
    hub = await make_hub(cells=(keys.cell, b), node_lease_ms=600)
    await open_node(connect, hub, "n-a")
    await open_node(connect, hub, "n-b", cell=b)
    first = {c: await redis.zscore(Keys(c).seen, f"n-{'a' if c == keys.cell else 'b'}")
             for c in (keys.cell, b)}  # fmt: skip

    async def both_beat() -> bool:
        a_seen = await redis.zscore(keys.seen, "n-a")
        b_seen = await redis.zscore(Keys(b).seen, "n-b")
        return bool(a_seen and b_seen and a_seen > first[keys.cell] and b_seen > first[b])

    await wait_for(both_beat, timeout=3000 * MS)
    session, _ = await open_session(connect, hub, cell=b)
    await submit(session, "late", timeout_ms=200)
    accepted = await expect(session, "accepted", ref="late", node_id="n-b")
    # The node never answers: cell b's sweep ends the job on its deadline.
    await expect(
        session, "result", ref="late", job_id=accepted["job_id"], status="failed",
        error="JOB_TIMEOUT", within=3000 * MS,
    )  # fmt: skip
    # Past two leases both are still live: each cell's heartbeats and sweep ran.
    await asyncio.sleep(1200 * MS)
    assert (await node_hash(redis, Keys(b), "n-b"))["state"] == "live"
    assert (await node_hash(redis, keys, "n-a"))["state"] == "live"


async def test_node_token_cell_claim_puts_the_node_there_and_forbids_another(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, c = other_cells
    hub = await make_hub(cells=(keys.cell, b, c), node_token_key=NODE_KEY)
    token = mint_node_token(NODE_KEY, ["gpu-*"], cell=b)
    headers = {"additional_headers": {"Authorization": f"Bearer {token}"}}
    ws = await connect(hub, "/v1/node", **headers)
    await register(ws, node_id="gpu-1")
    assert await node_hash(redis, Keys(b), "gpu-1") != {}
    ws = await connect(hub, "/v1/node", **headers)
    await register(ws, node_id="gpu-2", cell=b)  # naming the token's cell is fine
    ws = await connect(hub, "/v1/node", **headers)
    await send(ws, type="register", node_id="gpu-3", services=["asr"], max_jobs=1,
               languages=["en", "fr"], cell=c)  # fmt: skip
    frames = await expect_closed(ws, 1008)
    assert [f["code"] for f in frames] == ["UNAUTHORIZED"], frames
    assert await node_hash(redis, Keys(c), "gpu-3") == {}


async def test_node_naming_a_cell_not_served_gets_unknown_cell_and_4008(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, c = other_cells
    hub = await make_hub(cells=(keys.cell, b))
    ws = await connect(hub, "/v1/node")
    await send(ws, type="register", node_id="n1", services=["asr"], max_jobs=1,
               languages=["en", "fr"], cell=c)  # fmt: skip
    frames = await expect_closed(ws, 4008)
    assert [f["code"] for f in frames] == ["UNKNOWN_CELL"], frames
    assert await node_hash(redis, Keys(c), "n1") == {}
    # A cell that is no cell name is a bad frame; the connection stays open.
    ws = await connect(hub, "/v1/node")
    await send(ws, type="register", node_id="n1", services=["asr"], max_jobs=1,
               languages=["en", "fr"], cell="a.b")  # fmt: skip
    await expect(ws, "error", code="BAD_FRAME")
    await register(ws, node_id="n1")  # then a good register goes through
    # A single-cell hub serves only its cell.
    single = await make_hub()
    ws = await connect(single, "/v1/node")
    await send(ws, type="register", node_id="n2", services=["asr"], max_jobs=1,
               languages=["en", "fr"], cell=b)  # fmt: skip
    frames = await expect_closed(ws, 4008)
    assert [f["code"] for f in frames] == ["UNKNOWN_CELL"], frames


async def test_session_cell_from_token_or_url_and_refusals(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, c = other_cells
    hub = await make_hub(cells=(keys.cell, b), session_jwt_key=SESSION_KEY)
    await open_node(connect, hub, "n-b", cell=b)
    token = mint_session_token(SESSION_KEY, cell=b)
    ws = await connect(hub, f"/v1/session?token={token}")
    await expect(ws, "welcome")
    await submit(ws, "r1")
    accepted = await expect(ws, "accepted", ref="r1", node_id="n-b")
    assert accepted["job_id"].startswith(b + ".")
    # The URL names another cell than the token: 1008.
    ws = await connect(hub, f"/v1/session?token={token}&cell={keys.cell}")
    await expect_closed(ws, 1008)
    # A cell this hub does not serve, from the URL or the token: 4008, before any frame.
    ws = await connect(hub, f"/v1/session?token={mint_session_token(SESSION_KEY)}&cell={c}")
    assert await expect_closed(ws, 4008) == []
    ws = await connect(hub, f"/v1/session?token={mint_session_token(SESSION_KEY, cell=c)}")
    assert await expect_closed(ws, 4008) == []
    # The URL alone picks the cell.
    ws = await connect(hub, f"/v1/session?token={mint_session_token(SESSION_KEY)}&cell={b}")
    await expect(ws, "welcome")
    await submit(ws, "r2")
    await expect(ws, "accepted", ref="r2", node_id="n-b")


# Spill-over


async def test_job_spills_to_a_cell_with_a_free_node_and_queues_when_none(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, _ = other_cells
    hub = await make_hub(cells=(keys.cell, b), spill=1)
    node_a = await open_node(connect, hub, "n-a", max_jobs=1)
    node_b = await open_node(connect, hub, "n-b", cell=b, max_jobs=1)
    session, _ = await open_session(connect, hub)

    await submit(session, "r1")
    first = await expect(session, "accepted", ref="r1", node_id="n-a")
    assert first["job_id"].startswith(keys.cell + ".")
    await submit(session, "r2")  # cell a is full: cell b has a free node
    spilled = await expect(session, "accepted", ref="r2", node_id="n-b")
    assert spilled["job_id"].startswith(b + ".")
    record = await job_record(redis, Keys(b), spilled["job_id"])
    assert record["session"] and record["status"] == "running"
    assert await job_record(redis, keys, spilled["job_id"]) == {}
    assert await redis.smembers(keys.session_cells(record["session"])) == {b.encode()}
    await submit(session, "r3")  # both full: it queues in its own cell
    queued = await expect(session, "queued", ref="r3")
    assert queued["job_id"].startswith(keys.cell + ".")
    assert await redis.zscore(keys.queued, queued["job_id"]) is not None

    # The spilled job's result comes back; the queued job starts when cell a's slot frees.
    job_b = await expect(node_b, "job", job_id=spilled["job_id"])
    await result(node_b, job_b, result={"from": "b"})
    await expect(session, "result", ref="r2", status="finished", result={"from": "b"})
    job_a = await expect(node_a, "job", job_id=first["job_id"])
    await result(node_a, job_a)
    await expect(session, "result", ref="r1", status="finished")
    await expect(session, "accepted", ref="r3", job_id=queued["job_id"], node_id="n-a")
    # Spill tries are no refusals; each cell counts the jobs it took.
    home_counts = (await hub.cells[keys.cell].status())["counters"]
    assert "refused:NO_AVAILABLE_NODE" not in home_counts and home_counts["dispatched"] == 2
    assert (await hub.cells[b].status())["counters"]["dispatched"] == 1
    assert hub.metrics.snapshot()["hub_jobs_spilled_total"] == 1


async def test_spill_0_queues_in_its_own_cell(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, _ = other_cells
    hub = await make_hub(cells=(keys.cell, b), spill=0)
    await open_node(connect, hub, "n-a", max_jobs=1)
    node_b = await open_node(connect, hub, "n-b", cell=b, max_jobs=1)
    session, _ = await open_session(connect, hub)
    await submit(session, "r1")
    await expect(session, "accepted", ref="r1", node_id="n-a")
    await submit(session, "r2")
    await expect(session, "queued", ref="r2")
    await expect_silence(node_b)
    assert (await node_hash(redis, Keys(b), "n-b"))["running"] == "0"


async def test_job_spills_when_its_cell_has_no_node_for_the_pair(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, c = other_cells
    hub = await make_hub(cells=(keys.cell, b, c), spill=2)
    node_c = await open_node(connect, hub, "n-c", cell=c, max_jobs=1, languages=["de", "en"])
    session, _ = await open_session(connect, hub)
    # No cell serves the pair: the own cell's refusal.
    await submit(session, "none", src_lang="ja", tgt_lang="ko")
    await expect(session, "error", ref="none", code="NO_POOL_FOR_LANG_PAIR")
    # Only cell c serves de->en: the job goes there, wherever c is in the turn.
    await submit(session, "r1", src_lang="de", tgt_lang="en")
    accepted = await expect(session, "accepted", ref="r1", node_id="n-c")
    assert accepted["job_id"].startswith(c + ".")
    # c is busy and the own cell has no node: the job queues in c.
    await submit(session, "r2", src_lang="de", tgt_lang="en")
    queued = await expect(session, "queued", ref="r2")
    assert queued["job_id"].startswith(c + ".")
    job = await expect(node_c, "job", job_id=accepted["job_id"])
    await result(node_c, job)
    await expect(session, "result", ref="r1", status="finished")
    await expect(session, "accepted", ref="r2", job_id=queued["job_id"], node_id="n-c")


async def test_queue_fairness_within_a_cell_is_unchanged_by_other_cells(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, _ = other_cells
    hub = await make_hub(cells=(keys.cell, b), spill=1)
    node = await open_node(connect, hub, "n-a", max_jobs=1)
    await open_node(connect, hub, "n-b", cell=b, max_jobs=1, languages=["de", "en"])
    s1, _ = await open_session(connect, hub)
    s2, _ = await open_session(connect, hub)
    await submit(s1, "busy")
    running = await expect(s1, "accepted", ref="busy")
    for ref in ("s1-1", "s1-2"):
        await submit(s1, ref)
        await expect(s1, "queued", ref=ref)
    await submit(s2, "s2-1")
    await expect(s2, "queued", ref="s2-1")
    # Sessions take turns in the pair's queue: s1, s2, s1.
    order = []
    job = await expect(node, "job", job_id=running["job_id"])
    for _ in range(3):
        await result(node, job)
        job = await expect(node, "job")
        order.append(job["session_id"])
    first = order[0]
    assert order[1] != first and order[2] == first, order


async def test_spilled_job_cancel_and_ack_reach_its_cell(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, _ = other_cells
    hub = await make_hub(cells=(keys.cell, b), spill=1)
    await open_node(connect, hub, "n-a", max_jobs=1)
    node_b = await open_node(connect, hub, "n-b", cell=b, max_jobs=2)
    session, welcome = await open_session(connect, hub)
    sid = welcome["session_id"]
    await submit(session, "r1")
    await expect(session, "accepted", ref="r1", node_id="n-a")
    for ref in ("r2", "r3"):
        await submit(session, ref)
        await expect(session, "accepted", ref=ref, node_id="n-b")
    job2 = await expect(node_b, "job")
    job3 = await expect(node_b, "job")
    # Cancel reaches cell b: the node is told, the session gets CANCELLED.
    to_cancel = job2 if job2["job_id"] != job3["job_id"] else job3
    ref = (await job_record(redis, Keys(b), to_cancel["job_id"]))["ref"]
    await send(session, type="cancel", ref=ref)
    await expect(node_b, "cancel", job_id=to_cancel["job_id"], reason="CANCELLED")
    await expect(session, "result", ref=ref, status="failed", error="CANCELLED")
    other = job3 if to_cancel is job2 else job2
    await result(node_b, other)
    done = await expect(session, "result", status="finished", job_id=other["job_id"])
    assert await redis.zcard(Keys(b).session_done(sid)) == 2
    await send(session, type="ack", job_ids=[done["job_id"], to_cancel["job_id"], "x.y", "z"])

    async def acked() -> bool:
        return await redis.exists(Keys(b).session_done(sid)) == 0

    await wait_for(acked, timeout=2000 * MS)


async def test_resume_on_another_hub_gets_spilled_jobs_results_and_later_ones(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, _ = other_cells
    cells = (keys.cell, b)
    first = await make_hub(cells=cells, spill=1, resume_window_s=30.0)
    second = await make_hub(cells=cells, spill=1, resume_window_s=30.0)
    node_a = await open_node(connect, first, "n-a", max_jobs=1)
    node_b = await open_node(connect, first, "n-b", cell=b, max_jobs=2)
    session, welcome = await open_session(connect, first)
    await submit(session, "home")
    home = await expect(session, "accepted", ref="home", node_id="n-a")
    for ref in ("ended-away", "open"):
        await submit(session, ref)
        await expect(session, "accepted", ref=ref, node_id="n-b")
    jobs = {}
    for _ in range(2):
        job = await expect(node_b, "job")
        jobs[(await job_record(redis, Keys(b), job["job_id"]))["ref"]] = job
    await session.close()

    # While the session is away: one spilled job and the home job end.
    await result(node_b, jobs["ended-away"], result={"r": "away"})
    await result(node_a, await expect(node_a, "job", job_id=home["job_id"]))
    sid, token = welcome["session_id"], welcome["resume_token"]

    async def ended_away() -> bool:
        return await redis.zcard(Keys(b).session_done(sid)) == 1

    await wait_for(ended_away, timeout=2000 * MS)

    resumed = await connect(second, f"/v1/session?session_id={sid}&resume_token={token}")
    await expect(resumed, "welcome", session_id=sid, hub_id=second.hub_id)
    missed = {}
    for _ in range(2):
        frame = await expect(resumed, "result")
        missed[frame["ref"]] = frame
    assert missed["ended-away"]["result"] == {"r": "away"}
    assert missed["home"]["status"] == "finished"
    # The spilled job still open is the session's on its new hub: its result comes there.
    assert (await redis.hget(Keys(b).session(sid), "hub")).decode() == second.hub_id
    await result(node_b, jobs["open"], result={"r": "later"})
    await expect(resumed, "result", ref="open", status="finished", result={"r": "later"})
    # And a cancel of a new spilled job from the new hub reaches cell b.
    await submit(resumed, "new-home")
    await expect(resumed, "accepted", ref="new-home", node_id="n-a")
    await submit(resumed, "new-away")
    await expect(resumed, "accepted", ref="new-away", node_id="n-b")
    await send(resumed, type="cancel", ref="new-away")
    await expect(resumed, "result", ref="new-away", status="failed", error="CANCELLED")


async def test_gone_session_spilled_jobs_are_cancelled_after_the_window(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, _ = other_cells
    hub = await make_hub(cells=(keys.cell, b), spill=1, resume_window_s=0.2)
    await open_node(connect, hub, "n-a", max_jobs=1)
    node_b = await open_node(connect, hub, "n-b", cell=b, max_jobs=1)
    session, _ = await open_session(connect, hub)
    await submit(session, "r1")
    await expect(session, "accepted", ref="r1", node_id="n-a")
    await submit(session, "r2")
    spilled = await expect(session, "accepted", ref="r2", node_id="n-b")
    await session.close()
    await expect(node_b, "job", job_id=spilled["job_id"])
    await expect(node_b, "cancel", job_id=spilled["job_id"], reason="CANCELLED", within=3000 * MS)
    record = await job_record(redis, Keys(b), spilled["job_id"])
    assert record["status"] == "failed" and record["error"] == "CANCELLED"


# Settings and lookups


def test_settings_refuse_bad_cells_and_negative_spill() -> None:
    with pytest.raises(ConfigError, match="cells"):
        Settings(cells=("a", "b.c"))
    with pytest.raises(ConfigError, match="cells"):
        Settings(cells=("a", "{b}"))
    with pytest.raises(ConfigError, match="spill"):
        Settings(spill=-1)
    with pytest.raises(ConfigError, match="cell"):
        Settings(cell="x.y", cells=("z",))  # a default cell shared with others names ids
    assert Settings(cell="x.y").served_cells == ("x.y",)  # alone it names no id
    assert Settings(cell="a", cells=("b", "a", "b")).served_cells == ("a", "b")
    assert Settings.load(flags={"cells": "a, b", "spill": "2"}).served_cells == ("0", "a", "b")


async def test_cells_share_one_client_and_batcher_and_name_job_ids(redis: Redis) -> None:
    settings = Settings(cell="a", cells=("b", "c"), spill=1)
    cells = Cells(settings, redis, hub_id="h")
    assert cells.client("b") is cells.client("c") is redis
    assert cells["a"].batcher is cells["b"].batcher is cells["c"].batcher
    assert [s.keys.cell for s in cells] == ["a", "b", "c"] and cells.main is cells["a"]
    assert cells.job_id("b", "xyz") == "b.xyz"
    assert cells.job_cell("b.xyz") == "b" and cells.job_cell("xyz") == "a"
    assert cells.job_cell("q.xyz") is None and cells.for_job("q.xyz") is None
    # Spill tries rotate over the other cells, and skip one without the pair for a while.
    orders = {tuple(cells.spill_order("a", "en:fr")) for _ in range(4)}
    assert orders == {("b",), ("c",)}
    cells.lacks("b", "en:fr")
    assert {tuple(cells.spill_order("a", "en:fr")) for _ in range(4)} == {("c",)}
    assert {tuple(cells.spill_order("a", "de:en")) for _ in range(4)} == {("b",), ("c",)}
    assert LACKS_PAIR_S > 0
    single = Cells(Settings(cell="a", spill=3), redis, hub_id="h")
    assert single.job_id("a", "xyz") == "xyz" and single.spill == 0
    assert single.spill_order("a", "en:fr") == []
    await cells.close()
    await single.close()


async def test_status_shows_each_cell_served(
    make_hub: MakeHub, connect: Connect, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, c = other_cells
    hub = await make_hub(cells=(keys.cell, b))
    await open_node(connect, hub, "n-b", cell=b)

    async def status(query: str) -> tuple[int, dict[str, Any]]:
        code, _, body = await http_get(hub.port, "/v1/status" + query)
        return code, orjson.loads(body)

    code, body = await status("")
    assert code == 200
    assert (body["cell"], body["cells"], body["nodes"]) == (keys.cell, [keys.cell, b], [])
    code, body = await status(f"?cell={b}")
    assert code == 200 and [n["node_id"] for n in body["nodes"]] == ["n-b"]
    code, body = await status(f"?cell={c}")
    assert (code, body["error"]) == (404, "UNKNOWN_CELL")


async def test_hubs_with_different_default_cells_reach_each_other(
    make_hub: MakeHub, connect: Connect, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, _ = other_cells
    first = await make_hub(cell=keys.cell, cells=(keys.cell, b))
    second = await make_hub(cell=b, cells=(keys.cell, b))
    # A node of cell a on the second hub, a session of cell a on the first:
    # job frames and results cross over the bus both ways.
    node = await open_node(connect, second, "n-a", cell=keys.cell)
    session, _ = await open_session(connect, first)
    await submit(session, "r1")
    accepted = await expect(session, "accepted", ref="r1", node_id="n-a")
    job = await expect(node, "job", job_id=accepted["job_id"])
    await result(node, job, result={"via": "bus"})
    await expect(session, "result", ref="r1", status="finished", result={"via": "bus"})


@pytest.mark.parametrize("cells", [None, "two"])
async def test_submit_without_spill_is_one_dispatch_call(
    make_hub: MakeHub, connect: Connect, keys: Keys, other_cells: tuple[str, str], cells: Any
) -> None:
    served = (keys.cell,) if cells is None else (keys.cell, other_cells[0])
    # A single cell ignores spill: there is nowhere to spill to.
    hub = await make_hub(cells=served, spill=3 if cells is None else 0)
    await open_node(connect, hub, "n-a", max_jobs=1)
    session, _ = await open_session(connect, hub)
    scripts = called_scripts(hub)
    await submit(session, "r1")
    await expect(session, "accepted", ref="r1")
    await submit(session, "r2")
    await expect(session, "queued", ref="r2")
    assert [n for n in scripts if n in ("dispatch_task", "add_session_cell")] == [
        "dispatch_task",
        "dispatch_task",
    ]


async def test_spilled_submit_is_one_call_per_cell_tried_and_one_record(
    make_hub: MakeHub, connect: Connect, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, c = other_cells
    hub = await make_hub(cells=(keys.cell, b, c), spill=1)
    await open_node(connect, hub, "n-a", max_jobs=1)
    await open_node(connect, hub, "n-b", cell=b, max_jobs=2)
    await open_node(connect, hub, "n-c", cell=c, max_jobs=2)
    session, _ = await open_session(connect, hub)
    await submit(session, "r1")
    await expect(session, "accepted", ref="r1", node_id="n-a")
    scripts = called_scripts(hub)
    for ref in ("r2", "r3", "r4"):
        await submit(session, ref)
        await expect(session, "accepted", ref=ref)
    spills = [n for n in scripts if n in ("dispatch_task", "add_session_cell")]
    # Per job: its own cell, then one other (K=1), in turn b, c, b: each cell recorded once.
    assert spills.count("dispatch_task") == 6 and spills.count("add_session_cell") == 2


async def test_http_jobs_run_in_the_token_cell_and_an_unserved_one_is_404(
    make_hub: MakeHub, connect: Connect, keys: Keys, other_cells: tuple[str, str]
) -> None:
    b, c = other_cells
    hub = await make_hub(cells=(keys.cell, b), session_jwt_key=SESSION_KEY)
    node = await open_node(connect, hub, "n-b", cell=b)
    http_ = await HttpClient.open(hub.port)
    try:
        token = mint_session_token(SESSION_KEY, session_id="dana", cell=b)
        body = {"src_lang": "en", "tgt_lang": "fr", "payload": {"text": "hi"}}
        reply = await http_.request("POST", "/v1/jobs", json=body, token=token)
        assert reply.status == 202, reply
        jid = reply.json()["job_id"]
        assert jid.startswith(b + ".")
        job = await expect(node, "job", job_id=jid, session_id="dana")
        await result(node, job, result={"cell": b})
        done = await http_.request("GET", f"/v1/jobs/{jid}?wait_ms=3000", token=token)
        assert done.status == 200 and done.json()["result"] == {"cell": b}, done
        elsewhere = mint_session_token(SESSION_KEY, session_id="erin", cell=c)
        refused = await http_.request("POST", "/v1/jobs", json=body, token=elsewhere)
        assert refused.status == 404 and refused.json()["code"] == "UNKNOWN_CELL", refused
        unknown = await http_.request("GET", f"/v1/jobs/{c}.abc", token=token)
        assert unknown.status == 404 and unknown.json()["code"] == "UNKNOWN_JOB", unknown
    finally:
        await http_.close()
