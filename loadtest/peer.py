"""What simulated nodes and sessions share: one connection, open once the hub greets it."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from . import wsclient

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["SimPeer"]

GREETING_TIMEOUT_S = 10.0


class SimPeer:
    """One simulated peer; subclasses read frames and send what they have to say.

    Args:
        worker: the worker process that holds the peer.
        url: the hub's endpoint.
        kind: ``node`` or ``session``, in counters and checks.
    """

    def __init__(self, worker: Worker, url: str, kind: str) -> None:
        self.w = worker
        self.url = url
        self.kind = kind
        self.conn: wsclient.Connection | None = None
        self.greeted: asyncio.Future[None] | None = None
        """Set once the hub answered ``register`` or sent ``welcome``."""
        self.leaving = False
        """We are closing on purpose (churn or the end): not an error."""

    async def connect(self) -> None:
        """Connect, send :meth:`hello` and await the greeting; the caller retries on failure."""
        started = time.perf_counter()
        self.leaving = False
        self.greeted = asyncio.get_running_loop().create_future()
        w = self.w
        conn = await wsclient.connect(
            self.url,
            self.on_message,
            self.on_close,
            flusher=w.flusher,
            headers=w.access.headers(self.kind),
            ssl=w.access.tls,
        )
        self.conn = conn
        hello = self.hello()
        if hello is not None:
            conn.send_text(hello)
        try:
            async with asyncio.timeout(GREETING_TIMEOUT_S):
                await self.greeted
        except BaseException:
            conn.abort()
            raise
        self.w.stats.hists["connect"].record(int((time.perf_counter() - started) * 1e6))

    @property
    def is_open(self) -> bool:
        return self.conn is not None and self.conn.is_open

    def leave(self) -> None:
        """Disconnect on purpose."""
        self.leaving = True
        if self.conn is not None:
            self.conn.close()

    def hello(self) -> bytes | None:
        """The first frame to send, if any."""
        return None

    def on_message(self, binary: bool, data: bytes) -> None:
        raise NotImplementedError

    def on_close(self, code: int | None) -> None:
        """Count a drop and reconnect, or reconnect after churn."""
        w = self.w
        greeted = self.greeted
        if greeted is not None and not greeted.done():
            greeted.set_exception(ConnectionError(f"closed with {code} before the greeting"))
            greeted.exception()
        if w.closing:
            return
        if not self.leaving:
            w.stats.disconnects[f"{self.kind}:{code}"] += 1
            self.dropped()
            w.reconnect_later(self)
        elif w.plan.churn:
            w.reconnect_later(self)

    def dropped(self) -> None:
        """Act on a connection the hub dropped, before reconnecting."""

    def greet(self) -> None:
        """Record the hub's greeting."""
        if self.greeted is not None and not self.greeted.done():
            self.greeted.set_result(None)
