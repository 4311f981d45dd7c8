"""What each client owes the hub until it counts (protocol.md §3.5, §8).

A node keeps each result frame it sent a while, in case the hub answers
``UNAVAILABLE`` (:class:`Results`); a session acknowledges
the results it received, in batches, and delivers each one once
(:class:`Acks`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any

from websockets.asyncio.client import ClientConnection

from ..protocol import encode_ack
from .link import Link

__all__ = ["MAX_ACK_IDS", "Acks", "Results", "Sent"]

_RESULT_RETRY_S = 120.0
"""How long a result refused with ``UNAVAILABLE`` is sent again: as long as Redis
may plausibly be down (a count of tries would depend on the backoff)."""
_RECENT_RESULTS_S = 60.0
"""How long a sent result is kept, in case the hub answers ``UNAVAILABLE``."""
MAX_ACK_IDS = 256
"""protocol.md §4.4: most job ids in one ``ack``."""
_SEEN_RESULTS = 10000
"""Job ids whose results were delivered, remembered to drop repeats after a resume."""


@dataclasses.dataclass(slots=True)
class Sent:
    """A result frame that went out."""

    frame: bytes
    sent_at: float
    tries: int = 0
    refused_at: float | None = None
    """When the hub first answered ``UNAVAILABLE`` for it."""


class Results:
    """A node's sent result frames, kept a while in case the hub refuses them."""

    def __init__(self) -> None:
        self._recent: dict[str, Sent] = {}

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._recent

    def sent(self, job_id: str, frame: bytes) -> None:
        """Record that ``frame`` went out."""
        now = time.monotonic()
        while self._recent:
            oldest = next(iter(self._recent))
            if now - self._recent[oldest].sent_at < _RECENT_RESULTS_S:
                break
            del self._recent[oldest]
        previous = self._recent.pop(job_id, None)
        self._recent[job_id] = Sent(
            frame, now, previous.tries if previous else 0, previous.refused_at if previous else None
        )

    def refused(self, job_id: str) -> Sent | None:
        """Record that the hub answered ``UNAVAILABLE`` for a sent result.

        Returns:
            The sent result, to send again; ``None`` when it was refused for
            too long, and is forgotten.
        """
        sent = self._recent[job_id]
        sent.tries += 1
        now = time.monotonic()
        if sent.refused_at is None:
            sent.refused_at = now
        if now - sent.refused_at > _RESULT_RETRY_S:
            del self._recent[job_id]
            return None
        return sent

    def frame(self, job_id: str) -> bytes | None:
        """The result frame sent lately for ``job_id``, if it is still kept."""
        sent = self._recent.get(job_id)
        return None if sent is None else sent.frame

    def forget(self, job_id: str) -> None:
        """Drop a result the hub no longer wants."""
        self._recent.pop(job_id, None)


class Acks:
    """Results a session received: each delivered once, acknowledged in batches (protocol.md §8).

    Args:
        link: the session that sends the ``ack`` frames.
        batch: ids that make an ``ack`` go out at once.
        interval_s: how late an id may be acknowledged.
    """

    def __init__(self, link: Link[Any], batch: int, interval_s: float) -> None:
        self.batch = batch
        self.interval_s = interval_s
        self._link = link
        self._ids: list[str] = []
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._timer: asyncio.TimerHandle | None = None

    def received(self, ws: ClientConnection, job_id: str) -> bool:
        """Acknowledge a result, soon.

        Returns:
            Whether it is new; ``False`` for one sent again after a resume.
        """
        self._ids.append(job_id)
        if len(self._ids) >= self.batch:
            self._link._spawn(self.flush(ws))
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._due)
        if job_id in self._seen:
            return False
        self._seen[job_id] = None
        if len(self._seen) > _SEEN_RESULTS:
            self._seen.popitem(last=False)
        return True

    async def flush(self, ws: ClientConnection) -> None:
        """Send every waiting id; those that could not go wait for the next connection."""
        self.cancel()
        while self._ids:
            batch, self._ids = self._ids[:MAX_ACK_IDS], self._ids[MAX_ACK_IDS:]
            if not await self._link._send(encode_ack(batch), ws):
                self._ids[:0] = batch
                return

    def cancel(self) -> None:
        """Stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def clear(self) -> None:
        """Forget the waiting ids: they belong to a session that is gone."""
        self._ids.clear()

    def _due(self) -> None:
        self._timer = None
        ws = self._link._ws
        if ws is not None:
            self._link._spawn(self.flush(ws))
