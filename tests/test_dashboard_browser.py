"""The dashboard (/dashboard) in headless Chromium against a ``hub serve``
process with demo node processes: jobs move its counters and node table,
and a killed node leaves the table.

The test writes a screenshot of the page to its tmp dir, and to the path in
``HUB_DASHBOARD_SCREENSHOT`` when set (the README's picture is made so:
``HUB_DASHBOARD_SCREENSHOT=docs/dashboard.png python -m pytest
tests/test_dashboard_browser.py``).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from hub.auth import mint_admin_token
from loadtest.procs import HubProcess, Processes
from tests.browser import Page, chromium, needs_chromium
from tests.helpers import MS, wait_for

pytestmark = needs_chromium

ADMIN_KEY = "dashboard-test-key-" + "d" * 32
PROCESS_HUB_SETTINGS = {"watch_interval_s": 0.25, "admin_token_key": ADMIN_KEY}


async def session(hub: HubProcess) -> ClientConnection:
    ws = await connect(f"{hub.url}/v1/session", open_timeout=2000 * MS)
    welcome = orjson.loads(await ws.recv())
    assert welcome["type"] == "welcome"
    return ws


async def run_jobs(ws: ClientConnection, jobs: list[tuple[str, str, str]]) -> dict[str, str]:
    """Submit (ref, src, tgt) jobs at once; each ref's outcome: status or error code."""
    for ref, src, tgt in jobs:
        frame = {"type": "job", "ref": ref, "src_lang": src, "tgt_lang": tgt, "payload": {}}
        await ws.send(orjson.dumps(frame).decode())
    outcomes: dict[str, str] = {}
    async with asyncio.timeout(10_000 * MS):
        while len(outcomes) < len(jobs):
            frame = orjson.loads(await ws.recv())
            if frame["type"] == "result":
                outcomes[frame["ref"]] = frame["status"]
            elif frame["type"] == "error":
                outcomes[frame["ref"]] = frame["code"]
    return outcomes


async def nodes_on_page(page: Page) -> dict[str, dict[str, Any]]:
    rows = await page.evaluate(
        """[...document.querySelectorAll('#nodes tbody tr[data-node]')].map(tr => ({
            node: tr.dataset.node, state: tr.dataset.state, running: tr.dataset.running,
            cells: [...tr.cells].map(td => td.textContent)}))"""
    )
    return {row["node"]: row for row in rows}


async def text(page: Page, selector: str) -> str:
    value = await page.evaluate(f"document.querySelector({selector!r}).textContent")
    return str(value)


async def test_dashboard_shows_jobs_and_nodes_and_a_killed_node_leaving(
    processes: Processes, tmp_path: Path
) -> None:
    hub = await processes.hub("hub-dash")
    demo_1 = await processes.node("demo-1", [hub.url], languages=["zh", "en", "ja"], max_jobs=4,
                                  service_ms=(150, 300))  # fmt: skip
    demo_2 = await processes.node("demo-2", [hub.url], languages=["en", "fr"], max_jobs=2,
                                  service_ms=(150, 300))  # fmt: skip
    token = mint_admin_token(ADMIN_KEY)
    async with chromium(tmp_path) as page:
        await page.goto(f"http://127.0.0.1:{hub.port}/dashboard?token={token}")
        await wait_for(
            lambda: page.evaluate("document.querySelector('#link').textContent === 'live'"),
            timeout=5000 * MS,
            what="the watch stream to open",
        )
        nodes = await wait_for(
            lambda: _when(nodes_on_page(page), lambda n: len(n) == 2),
            timeout=5000 * MS,
            what="both nodes in the table",
        )
        assert {n: r["state"] for n, r in nodes.items()} == {"demo-1": "live", "demo-2": "live"}
        cells = nodes["demo-1"]["cells"]
        assert cells[2] == "0 / 4"
        assert cells[3] == "default"
        assert "zh→en" in cells[4] and "ja→zh" in cells[4]
        assert cells[5] == "hub-dash"
        assert await text(page, "#hub-id") == "hub-dash"
        assert await text(page, "#redis-state") == "ok"
        assert await text(page, "#hubs tbody tr[data-hub='hub-dash'] td:nth-child(2)") == "0"

        # Jobs: the running counts move while they run, then the counters.
        ws = await session(hub)
        jobs = [(f"j{i}", "zh", "en") for i in range(6)] + [(f"k{i}", "en", "fr") for i in range(2)]
        running = asyncio.create_task(run_jobs(ws, [*jobs, ("bad", "xx", "yy")]))
        await wait_for(
            lambda: _when(nodes_on_page(page), lambda n: n["demo-1"]["running"] != "0"),
            timeout=5000 * MS,
            what="demo-1 running jobs on the page",
        )
        outcomes = await running
        assert outcomes == {
            **{ref: "finished" for ref, _, _ in jobs},
            "bad": "NO_POOL_FOR_LANG_PAIR",
        }
        await wait_for(
            lambda: page.evaluate("document.body.dataset.finished === '8'"),
            timeout=5000 * MS,
            what="8 finished jobs on the page",
        )
        assert float(await text(page, "#rate-finished")) >= 0
        refused = "#refused tbody tr[data-code='NO_POOL_FOR_LANG_PAIR'] td:nth-child(3)"
        await wait_for(lambda: _when(text(page, refused), lambda t: t == "1"), timeout=5000 * MS)
        assert await text(page, "#e2e-count") == "8"
        p50 = await text(page, "#e2e-p50")
        assert p50.endswith(" ms") and 100 <= float(p50.split()[0]) <= 5000, p50
        assert await text(page, "#hubs tbody tr[data-hub='hub-dash'] td:nth-child(2)") == "1"
        # The charts keep a point per snapshot (as many as ticks passed: waited for).
        await wait_for(
            lambda: page.evaluate("series.t.length >= 4"),
            timeout=5000 * MS,
            what="four points on the charts",
        )

        # Steady traffic for a few seconds, and the screenshot in the middle of it.
        batch = [*jobs[:4], *jobs[6:], ("bad", "xx", "yy")]
        traffic = asyncio.create_task(_traffic(ws, batch, rounds=8))
        await wait_for(lambda: traffic.done() or page.evaluate(
            "Number(document.body.dataset.finished) >= 30 && "
            "document.querySelector('#nodes tr[data-node=\"demo-1\"]').dataset.running > 1"),
            timeout=20_000 * MS, interval=20 * MS)  # fmt: skip
        await page.screenshot(tmp_path / "dashboard.png", 1440, 1000)
        wanted = os.environ.get("HUB_DASHBOARD_SCREENSHOT")
        if wanted:
            await page.screenshot(Path(wanted), 1440, 1000)
        assert (tmp_path / "dashboard.png").read_bytes().startswith(b"\x89PNG")
        await traffic
        await wait_for(
            lambda: page.evaluate("document.body.dataset.finished === String(8 + 8 * 6)"),
            timeout=5000 * MS,
            what="every finished job on the page",
        )
        # A chart got the rates: some point shows jobs finishing (a late tick
        # may fold the first jobs into the page's first point: steady traffic does not).
        await wait_for(
            lambda: page.evaluate("series.finished.some(v => v > 0)"),
            timeout=5000 * MS,
            what="a finished rate above 0 in the chart",
        )

        # A killed node: marked lost, then gone; the other stays.
        demo_2.kill()
        await wait_for(
            lambda: _when(nodes_on_page(page), lambda n: n["demo-2"]["state"] == "lost"),
            timeout=5000 * MS,
            what="demo-2 marked lost",
        )
        nodes = await wait_for(
            lambda: _when(nodes_on_page(page), lambda n: "demo-2" not in n),
            timeout=10_000 * MS,
            what="demo-2 gone from the table",
        )
        assert list(nodes) == ["demo-1"]
        assert nodes["demo-1"]["state"] == "live"
        await ws.close()
    assert demo_1.registered


async def _traffic(ws: ClientConnection, batch: list[tuple[str, str, str]], rounds: int) -> None:
    for n in range(rounds):
        jobs = [(f"{ref}-{n}", src, tgt) for ref, src, tgt in batch]
        outcomes = await run_jobs(ws, jobs)
        assert sorted(set(outcomes.values())) == ["NO_POOL_FOR_LANG_PAIR", "finished"]
        await asyncio.sleep(100 * MS)


async def _when(value: Any, check: Any) -> Any:
    """``await value`` when ``check`` holds for it, else None (for :func:`wait_for`)."""
    result = await value
    return result if check(result) else None


async def test_the_page_says_when_its_token_has_expired(
    processes: Processes, tmp_path: Path
) -> None:
    hub = await processes.hub("hub-dash")
    # Expired, but within the hub's 60 s of clock leeway: the page opens.
    token = mint_admin_token(ADMIN_KEY, ttl_s=-20)
    async with chromium(tmp_path) as page:
        await page.goto(f"http://127.0.0.1:{hub.port}/dashboard?token={token}")
        await wait_for(
            lambda: page.evaluate("document.querySelector('#link').textContent === 'live'"),
            timeout=5000 * MS,
            what="the watch stream to open",
        )
        await hub.stop()
        link = await wait_for(
            lambda: _when(text(page, "#link"), lambda t: "expired" in t),
            timeout=5000 * MS,
            what="the page to say why it cannot reconnect",
        )
        assert link == (
            "admin token expired: open /dashboard?token= with a new one (hub token --admin)"
        )
