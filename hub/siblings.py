"""A worker's metrics in Redis, for the ``/metrics`` of its siblings.

The workers of one ``hub serve --workers N`` share a port: a Prometheus
scrape reaches one of them at random. So every ``watch_interval_s`` each
worker writes its own ``/metrics`` text into ``hubmetrics:<hub_id>`` (a
string that expires after five intervals unless renewed, and is deleted
when the worker stops), and any worker answers ``/metrics`` with its own
samples and its siblings' (read from their keys), each sample labelled
``hub="<worker id>"`` (:func:`hub.metrics.merge_expositions`). The
siblings' part is at most one interval old. A hub without siblings writes
nothing here and serves its ``/metrics`` as before.

Like the cell's counters and the hubs' records (:mod:`hub.watch`), these
keys schedule nothing: the hubs write them with plain commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from .keys import Keys
from .reads import redis_unavailable_as

__all__ = ["Siblings"]

logger = logging.getLogger("hub.siblings")

_TTL_INTERVALS = 5
"""A worker's metrics expire after this many intervals without renewal."""

_REDIS_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)


class Siblings:
    """This worker's metrics text in Redis, and its siblings'.

    Args:
        redis: the hub's Redis client.
        keys: the cell's key names.
        hub_id: this hub's id.
        siblings: the ids of every worker of this ``hub serve`` (this one
            included or not); empty for a hub of its own.
        interval_s: how often :meth:`run` writes the text.
        render_metrics: this hub's ``/metrics`` text now.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        hub_id: str,
        siblings: Sequence[str],
        *,
        interval_s: float,
        render_metrics: Callable[[], bytes],
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.hub_id = hub_id
        self.ids = tuple(s for s in siblings if s != hub_id)
        """The other workers whose metrics this hub's ``/metrics`` includes."""
        self.interval_s = interval_s
        self._render_metrics = render_metrics
        self._ttl_ms = int(_TTL_INTERVALS * interval_s * 1000)

    # Public methods

    async def run(self) -> None:
        """Write this worker's metrics every interval until cancelled (owned by the hub)."""
        while True:
            try:
                await self.publish()
            except _REDIS_ERRORS as exc:
                logger.debug("! metrics not written: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def publish(self) -> None:
        """Write this worker's ``/metrics`` text, with its TTL.

        Raises:
            redis.exceptions.ConnectionError, TimeoutError, OSError: Redis did not answer.
        """
        await self.redis.set(
            self.keys.hub_metrics(self.hub_id), self._render_metrics(), px=self._ttl_ms
        )

    async def remove(self) -> None:
        """Delete this worker's metrics at once (at shutdown); Redis errors are ignored."""
        if self.ids:
            with contextlib.suppress(*_REDIS_ERRORS):
                await self.redis.delete(self.keys.hub_metrics(self.hub_id))

    async def metrics(self) -> list[tuple[str, bytes]]:
        """The ``/metrics`` text each live sibling wrote last, by worker id.

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        if not self.ids:
            return []
        with redis_unavailable_as("sibling metrics"):
            texts = await self.redis.mget([self.keys.hub_metrics(h) for h in self.ids])
        return [(h, t) for h, t in zip(self.ids, texts, strict=True) if isinstance(t, bytes)]
