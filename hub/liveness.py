"""Background loops that keep the hub's view of Redis and of its nodes true.

- the Redis watch sets ``Health.ready`` while Redis answers and the scripts
  are loaded;
- the heartbeat loop pings nodes a slice at a time and records the pongs in
  one heartbeat call per slice;
- the sweep loop expires overdue jobs and silent nodes (whichever hub holds
  the sweep lease does the work).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from websockets.exceptions import ConnectionClosed

from .cells import Cells
from .config import Settings
from .errors import ErrorCode, RedisUnavailable
from .events import Beat, Event, Heartbeats
from .health import Health
from .metrics import Metrics
from .outbox import Outbox
from .protocol import CloseCode
from .registry import NodeLink, Registry
from .router import Router
from .tasks import Tasks

__all__ = ["Liveness"]

logger = logging.getLogger("hub.liveness")

_SLICES = 10
"""The heartbeat interval is cut in this many slices; each node is pinged in one."""


class Liveness:
    """The Redis watch, heartbeat and sweep loops of one hub.

    Args:
        settings: intervals and the lease.
        redis: the command client (for pings).
        redis_name: the Redis address with the password redacted, for logs.
        cells: the cells served, each with its scheduler: the script calls.
        registry: the nodes to ping.
        outbox: closes nodes whose heartbeat was refused.
        router: acts on the events of heartbeat and sweep replies.
        metrics: ping round trips.
        health: the ``ready`` flag this part keeps.
        tasks: owner of the ping tasks.
        prepare: called in order each time Redis comes back, before ``ready``.
        restarted: asked before closing nodes whose heartbeat Redis refused:
            True when Redis restarted (it may have lost their registration,
            and they are registered again instead, :mod:`hub.reconcile`).
    """

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        redis_name: str,
        cells: Cells,
        registry: Registry,
        outbox: Outbox,
        router: Router,
        metrics: Metrics,
        health: Health,
        tasks: Tasks,
        prepare: Sequence[Callable[[], Awaitable[None]]],
        restarted: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._settings = settings
        self._redis = redis
        self._redis_name = redis_name
        self._cells = cells
        self._scheduler = cells.main
        self._registry = registry
        self._outbox = outbox
        self._router = router
        self._metrics = metrics
        self._health = health
        self._tasks = tasks
        self._prepare = prepare
        self._restarted = restarted
        self._beats: dict[str, Beat] = {}

    async def watch_redis(self) -> None:
        """Keep ``ready`` true exactly while Redis answers and the scripts are loaded."""
        health = self._health
        delay = 0.05
        slow_pings = 0
        # Not "while True": on Python 3.11, redis-py's asyncio.wait_for() can swallow
        # the cancel of close(), and this loop would outlive the hub.
        while not health.stopping:
            try:
                if not health.ready:
                    for step in self._prepare:
                        await step()
                    logger.info("= redis ready at %s", self._redis_name)
                    health.ready_at = time.monotonic()
                    health.ready = True
                    delay = 0.05
                else:
                    # Each server of the cells served (one on a single Redis).
                    for server in self._cells.servers():
                        await server.redis.ping()
                    slow_pings = 0
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise
            except (redis_errors.RedisError, OSError, RedisUnavailable) as exc:
                if health.ready and isinstance(exc, redis_errors.TimeoutError) and slow_pings < 2:
                    # A slow answer under load (a busy event loop reads late) is not
                    # an outage: refusing every job for it would only add load.
                    slow_pings += 1
                    continue
                if health.ready:
                    logger.warning("! redis unavailable: %s", exc)
                health.ready = False
                await asyncio.sleep(delay)
                # Capped low: every job is refused until ready again.
                delay = min(delay * 2, 0.5)

    async def heartbeat(self) -> None:
        """Ping every node once per interval, a slice of the fleet at a time.

        Pinging all nodes at once makes a burst of pongs and one large
        heartbeat call every interval (a latency spike for everyone); slices
        spread that work evenly. Pongs of each slice go to Redis in one call.
        """
        interval = self._settings.heartbeat_interval_ms / 1000
        tick = 0
        while not self._health.stopping:
            await asyncio.sleep(interval / _SLICES)
            tick = (tick + 1) % _SLICES
            for link in list(self._registry.nodes.values()):
                if link.node_id is not None and not link.closing and link.slice == tick:
                    self._ping(link)
            await self._flush_beats()

    async def sweep(self) -> None:
        """Run the sweep every ``sweep_interval_ms`` while Redis is ready."""
        interval = self._settings.sweep_interval_ms / 1000
        while not self._health.stopping:
            await asyncio.sleep(interval)
            if not self._health.ready:
                continue
            # No heartbeat could be recorded while Redis was away: the nodes
            # get one lease to send one before any is expired.
            grace = time.monotonic() - self._health.ready_at < self._settings.lease_ms / 1000
            # Each cell has its own sweep lease: the hubs serving a cell share its sweep.
            for scheduler in self._cells:
                try:
                    for _ in range(16):  # bounded catch-up after an outage
                        report = await scheduler.sweep(expire_nodes=not grace)
                        self._router.route(report.events)
                        if not report.ran or len(report.events) == 0:
                            break
                except RedisUnavailable:
                    break

    # Private methods

    async def _beat_cells(self, beats: list[Beat]) -> tuple[list[Beat], Heartbeats]:
        """Record beats of nodes of several cells: one heartbeat call per cell, at once.

        Returns:
            The beats recorded and their codes, in the same order (a cell that
            Redis did not answer for leaves its beats out: their leases run).
        """
        by_cell: dict[str, list[Beat]] = {}
        for beat in beats:
            link = self._registry.node_link(beat.node_id, beat.epoch)
            if link is not None:
                by_cell.setdefault(link.cell, []).append(beat)
        cells = list(by_cell)
        replies = await asyncio.gather(
            *(self._cells[cell].heartbeat(by_cell[cell]) for cell in cells),
            return_exceptions=True,
        )
        done: list[Beat] = []
        codes: list[int] = []
        events: list[Event] = []
        for cell, reply in zip(cells, replies, strict=True):
            if isinstance(reply, RedisUnavailable):
                continue
            if isinstance(reply, BaseException):
                raise reply
            done += by_cell[cell]
            codes += reply
            events += reply.events
        return done, Heartbeats(codes, tuple(events))

    def _ping(self, link: NodeLink) -> None:
        if link.ping_at is not None:
            return  # the previous ping is unanswered: no heartbeat, the lease runs
        node_id = link.node_id
        assert node_id is not None
        sent = time.monotonic()
        link.ping_at = sent

        async def ping() -> None:
            try:
                waiter = await link.ws.ping()
                await waiter
            except ConnectionClosed:
                return
            link.ping_at = None
            rtt_ms = (time.monotonic() - sent) * 1000
            self._beats[node_id] = Beat(node_id, link.epoch, True, link.load, rtt_ms)
            link.load = None
            self._metrics.rtt.observe(rtt_ms / 1000)

        self._tasks.spawn(ping())

    async def _flush_beats(self) -> None:
        if not self._beats or not self._health.ready:
            # Kept until Redis is ready again: a restart is reconciled first, and
            # until then a heartbeat could be refused for an epoch Redis lost.
            return
        # Only nodes still connected here: a gone node's pong must not renew its lease.
        beats = [b for b in self._beats.values() if self._registry.node_link(b.node_id, b.epoch)]
        self._beats = {}
        if not beats:
            return
        if self._cells.several:
            beats, codes = await self._beat_cells(beats)
            if not beats:
                return
        else:
            try:
                codes = await self._scheduler.heartbeat(beats)
            except RedisUnavailable:
                return
        self._router.route(codes.events)
        if any(code < 0 for code in codes) and self._restarted is not None:
            try:
                if await self._restarted():
                    return  # the reconcile registers these nodes again
            except RedisUnavailable:
                return
        for beat, code in zip(beats, codes, strict=True):
            if code < 0:
                link = self._registry.node_link(beat.node_id, beat.epoch)
                if link is not None:
                    # protocol.md §7: when a newer connection holds the id, 4004
                    # would make the old one reconnect and take it back.
                    stale = code == ErrorCode.STALE_EPOCH
                    self._outbox.shut(link, CloseCode.REPLACED if stale else CloseCode.LOST)
