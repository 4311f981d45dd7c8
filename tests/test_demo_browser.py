"""The browser demo (/demo) driven in headless Chromium against a real hub and node.

Chromium is driven over the DevTools protocol with ``websockets`` (no
Selenium or Playwright): navigate, click, poll the DOM. Needs the Debian
package ``chromium`` (``/usr/bin/chromium``); the tests are skipped without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

from hub.app import Hub
from hub.client import NodeClient
from hub.client.demo import ServiceTime, demo_handler
from hub.keys import Keys
from loadtest.procs import RedisProcess
from tests.helpers import MS, wait_for
from tests.sdktools import FAST_BACKOFF, running_hub

CHROMIUM = os.environ.get("HUB_TESTS_CHROMIUM", "/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"{CHROMIUM} is missing: apt-get install chromium",
)


class Page:
    """One browser tab, spoken to with DevTools protocol commands."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def command(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a command and return its result (events in between are skipped)."""
        message_id = next(self.ids)
        frame = {"id": message_id, "method": method, "params": params}
        await self.ws.send(orjson.dumps(frame).decode())  # DevTools takes text frames only
        async with asyncio.timeout(10):
            while True:
                reply = orjson.loads(await self.ws.recv())
                if reply.get("id") == message_id:
                    if "error" in reply:
                        raise AssertionError(f"{method} failed: {reply['error']}")
                    result: dict[str, Any] = reply["result"]
                    return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        reply = await self.command("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} raised {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.command("Page.navigate", url=url)
        await wait_for(
            lambda: self.evaluate(
                "document.readyState === 'complete' && typeof window.start === 'function'"
            ),
            timeout=5000 * MS,
            what=f"{url} to load",
        )


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Page]:
    """Headless Chromium with a fake microphone, stopped afterwards."""
    profile = tmp_path / "chromium-profile"
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--no-default-browser-check",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,  # its helper processes go with it
    )
    try:
        port_file = profile / "DevToolsActivePort"
        await wait_for(
            lambda: port_file.exists() and port_file.read_text().strip(),
            timeout=20_000 * MS,
            interval=20 * MS,
            what="Chromium's DevTools port",
        )
        port = int(port_file.read_text().split()[0])
        targets = await asyncio.to_thread(_get_json, f"http://127.0.0.1:{port}/json/list")
        page = next(t for t in targets if t.get("type") == "page")
        async with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
            yield Page(ws)
    finally:
        # SIGTERM lets Chromium reap its helpers; SIGKILL the group if it lingers.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await asyncio.wait_for(process.wait(), 5)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return orjson.loads(response.read())


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
