"""Headless Chromium driven over the DevTools protocol with ``websockets``.

No Selenium or Playwright: navigate, evaluate, poll the DOM, take a
screenshot. Needs the Debian package ``chromium`` (``/usr/bin/chromium``,
or ``HUB_TESTS_CHROMIUM``); tests that use it are skipped without it
(``pytestmark = needs_chromium``).

Import as ``from tests.browser import chromium, needs_chromium``.
"""

from __future__ import annotations

import asyncio
import base64
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

from tests.helpers import MS, wait_for

__all__ = ["CHROMIUM", "Page", "chromium", "needs_chromium"]

CHROMIUM = os.environ.get("HUB_TESTS_CHROMIUM", "/usr/bin/chromium")

needs_chromium = pytest.mark.skipif(
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

    async def screenshot(self, path: Path, width: int, height: int) -> None:
        """Write a PNG of the page at ``width`` x ``height`` CSS pixels."""
        await self.command(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = await self.command("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        await asyncio.to_thread(path.write_bytes, png)


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
