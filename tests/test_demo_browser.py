"""The browser demo (/demo) driven in headless Chromium against a real hub and node.

Chromium is driven over the DevTools protocol (:mod:`tests.browser`):
navigate, click, poll the DOM. Skipped without ``/usr/bin/chromium``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hub.app import Hub
from hub.client import NodeClient
from hub.client.demo import ServiceTime, demo_handler
from hub.keys import Keys
from loadtest.procs import RedisProcess
from tests.browser import Page, chromium, needs_chromium
from tests.helpers import MS, wait_for
from tests.sdktools import FAST_BACKOFF, running_hub

pytestmark = needs_chromium


@pytest.fixture
async def hub(redis_server: RedisProcess, keys: Keys) -> AsyncIterator[Hub]:
    async with running_hub(redis_server.url, keys.cell) as hub:
        yield hub


@pytest.fixture
async def demo_node(hub: Hub) -> AsyncIterator[NodeClient]:
    node = NodeClient(
        f"ws://127.0.0.1:{hub.port}",
        node_id="browser-node",
        languages=["zh", "en", "ja"],
        max_jobs=2,
        handler=demo_handler("browser-node", ServiceTime(30, 60)),
        backoff=FAST_BACKOFF,
    )
    async with node:
        node.start()
        await node.wait_registered()
        yield node


async def finished_job(page: Page) -> dict[str, Any]:
    found = await wait_for(
        lambda: page.evaluate(
            """(() => {
                const job = document.querySelector('.job');
                if (!job || job.dataset.status === 'sent') return null;
                return {status: job.dataset.status, node: job.querySelector('.node').textContent,
                        state: job.querySelector('.state').textContent,
                        final: job.querySelector('.final').textContent,
                        header: job.querySelector('header').textContent};
            })()"""
        ),
        timeout=15_000 * MS,
        interval=50 * MS,
        what="a result on the page",
    )
    assert isinstance(found, dict)
    return found


async def test_demo_page_sends_a_test_tone_and_shows_the_result_and_node(
    hub: Hub, demo_node: NodeClient, tmp_path: Path
) -> None:
    async with chromium(tmp_path) as page:
        await page.goto(f"http://127.0.0.1:{hub.port}/demo")
        await page.evaluate("document.querySelector('#source').value = 'tone'")
        await page.evaluate("document.querySelector('#tgt').value = 'ja'")
        await page.evaluate("document.querySelector('#start').click()")
        job = await finished_job(page)
    assert job == {
        "status": "finished",
        "node": "browser-node",
        "state": "finished on node browser-node",
        "final": "HELLO FROM THE BROWSER  (32000 audio bytes)",
        "header": "zh → ja · test tone, 32000 bytesnode browser-node",
    }


async def test_demo_page_records_the_microphone(
    hub: Hub, demo_node: NodeClient, tmp_path: Path
) -> None:
    # Chromium's fake device plays a beep; one second at 16 kHz, 16 bits.
    async with chromium(tmp_path) as page:
        await page.goto(f"http://127.0.0.1:{hub.port}/")
        await page.evaluate("document.querySelector('#start').click()")
        job = await finished_job(page)
    assert job["status"] == "finished"
    assert job["node"] == "browser-node"
    assert job["final"] == "HELLO FROM THE BROWSER  (32000 audio bytes)"
    assert "microphone, 32000 bytes" in job["header"]


async def test_demo_page_shows_a_refused_job(hub: Hub, tmp_path: Path) -> None:
    # No node at all: the hub refuses the job and the page says why.
    async with chromium(tmp_path) as page:
        await page.goto(f"http://127.0.0.1:{hub.port}/demo")
        await page.evaluate("document.querySelector('#source').value = 'tone'")
        await page.evaluate("document.querySelector('#start').click()")
        job = await finished_job(page)
    assert job["status"] == "refused"
    assert job["final"] == "NO_POOL_FOR_LANG_PAIR: no pool serves this language pair"
