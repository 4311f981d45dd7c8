"""A node connection, from register to gone.

What happens when a node's socket closes is :meth:`Nodes.serve`'s
``finally``: the connection leaves the registry, and ``node_lost.lua``
re-dispatches or fails the jobs it ran (their events go through the router).
If Redis is down then, the node's lease expires it later (the sweep).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from websockets.asyncio.server import ServerConnection

from . import protocol as proto
from .auth import NodeGrant
from .cells import Cells
from .config import Settings
from .errors import ClientError, Code, RedisUnavailable, SchedulingError
from .events import NodeReplaced
from .health import Health
from .metrics import Metrics
from .outbox import Outbox
from .protocol import CloseCode, JobId
from .registry import NodeLink, Registry, Route
from .router import Router
from .tasks import Tasks
from .wsconn import HubConnection

__all__ = ["Nodes"]

logger = logging.getLogger("hub.nodes")

_RESULT_RETRY_FIRST_S = 0.05
"""First wait before recording a held result again; it doubles up to the max."""

_RESULT_RETRY_MAX_S = 1.0


class Nodes:
    """Serves node connections: register, results and partials in, drain, gone.

    Args:
        hub_id: this hub's id, sent in ``registered``.
        settings: register timeout and heartbeat interval.
        limits: frame limits for the node state machines.
        cells: the cells served, each with its scheduler: the script calls.
        registry: where connections are recorded.
        outbox: sending and closing.
        router: acts on the events of script replies.
        metrics: counters.
        health: whether Redis is usable.
        tasks: owner of background frame handling.
    """

    def __init__(
        self,
        hub_id: str,
        settings: Settings,
        limits: proto.Limits,
        cells: Cells,
        registry: Registry,
        outbox: Outbox,
        router: Router,
        metrics: Metrics,
        health: Health,
        tasks: Tasks,
    ) -> None:
        self.hub_id = hub_id
        self._settings = settings
        self._limits = limits
        self._cells = cells
        self._registry = registry
        self._outbox = outbox
        self._router = router
        self._metrics = metrics
        self._health = health
        self._tasks = tasks

    # Public methods

    async def serve(self, ws: ServerConnection, grant: NodeGrant) -> None:
        """Serve one node connection until it closes, then release its jobs."""
        link = NodeLink(ws, self._limits, self._cells.default)
        try:
            if not await self._register(link, grant):
                return
            try:
                await self._receive_frames(link)
            finally:
                link.conn.close()
                await self._gone(link)
        finally:
            self._outbox.forget(ws)

    async def drain_all(self) -> None:
        """Ask every node here to finish its jobs and take no more (hub shutdown)."""
        for link in list(self._registry.nodes.values()):
            if link.node_id is not None:
                try:
                    await self._cells[link.cell].drain_node(link.node_id, epoch=link.epoch)
                except (RedisUnavailable, SchedulingError):
                    continue

    # Private methods

    async def _register(self, link: NodeLink, grant: NodeGrant) -> bool:
        """Wait for ``register`` (frames before it get errors), then run register_node."""
        ws = link.ws
        deadline = time.monotonic() + self._settings.register_timeout_s
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                    message = await ws.recv()
            except TimeoutError:
                await ws.close(CloseCode.REGISTER_TIMEOUT, "no register in time")
                return False
            try:
                frame = link.conn.receive(message)
            except ClientError as exc:
                self._outbox.push(ws, proto.encode_error(exc.ref, exc.code, exc.message))
                continue
            assert type(frame) is proto.Register
            break
        if not grant.allows(frame.node_id):
            # protocol.md §10: a token names the node ids it may use.
            self._metrics.job_refused(Code.UNAUTHORIZED)
            self._outbox.push(
                ws,
                proto.encode_error(
                    None, Code.UNAUTHORIZED, "the token does not allow this node id"
                ),
            )
            await ws.close(CloseCode.POLICY_VIOLATION, "unauthorized node id")
            return False
        cell = await self._cell(link, frame, grant)
        if cell is None:
            return False
        link.cell = cell
        if not self._health.ready:
            self._outbox.push(
                ws, proto.encode_error(None, Code.UNAVAILABLE, "redis is unavailable")
            )
            await ws.close(CloseCode.TRY_AGAIN_LATER, "redis unavailable")
            return False
        self._registry.begin_registering(frame.node_id, link)
        try:
            reg = await self._cells[cell].register_node(
                frame.node_id,
                services=frame.services,
                lang_pairs=frame.lang_pairs,
                max_jobs=frame.max_jobs,
                pools=frame.pools,
                resume=frame.resume,
            )
        except RedisUnavailable:
            await ws.close(CloseCode.TRY_AGAIN_LATER, "redis unavailable")
            return False
        finally:
            self._registry.end_registering(frame.node_id, link)
        link.node_id = frame.node_id
        link.epoch = reg.epoch
        link.max_jobs = frame.max_jobs
        link.registration = frame
        link.conn.registered(frame.node_id)
        old = self._registry.add_node(link)
        if old is not None:
            self._outbox.shut(old, CloseCode.REPLACED)
        for jid in reg.resumed:
            # Routes of resumed jobs are fetched on their first partial.
            link.jobs.setdefault(jid, Route(0, "", "", ""))
        self._outbox.push(
            ws,
            proto.encode_registered(
                frame.node_id,
                self.hub_id,
                self._settings.heartbeat_interval_ms,
                [JobId(j) for j in reg.resumed],
                [JobId(j) for j in reg.dropped],
            ),
        )
        logger.info(
            "= node %s registered (epoch %d, %d slots)", frame.node_id, reg.epoch, frame.max_jobs
        )
        backlog, link.backlog = link.backlog, []
        for held, route, untrack in backlog:
            self._outbox.send_node(self.hub_id, frame.node_id, held, route, untrack)
        # The replaced connection here was closed above.
        self._router.route(
            e for e in reg.events if not (type(e) is NodeReplaced and e.hub == self.hub_id)
        )
        return True

    async def _cell(self, link: NodeLink, frame: proto.Register, grant: NodeGrant) -> str | None:
        """The node's cell: its register's, its token's, else the hub's; None after closing."""
        cell = frame.cell or grant.cell or self._cells.default
        if grant.cell is not None and cell != grant.cell:
            # protocol.md §10: a token that names a cell puts the node there.
            self._metrics.job_refused(Code.UNAUTHORIZED)
            self._outbox.push(
                link.ws,
                proto.encode_error(None, Code.UNAUTHORIZED, "the token does not allow this cell"),
            )
            await link.ws.close(CloseCode.POLICY_VIOLATION, "unauthorized cell")
            return None
        if cell not in self._cells:
            # protocol.md §6: a cell this hub does not serve.
            self._metrics.job_refused(Code.UNKNOWN_CELL)
            self._outbox.push(
                link.ws,
                proto.encode_error(None, Code.UNKNOWN_CELL, "this hub does not serve the cell"),
            )
            await link.ws.close(CloseCode.UNKNOWN_CELL, "unknown cell")
            return None
        return cell

    async def _receive_frames(self, link: NodeLink) -> None:
        """Handle the node's messages until its connection closes.

        Each message is handled in ``data_received`` (:class:`HubConnection`);
        only a fragmented one comes through this loop.
        """
        ws = link.ws
        handle = functools.partial(self._on_message, link, 2 * link.max_jobs + 8)
        if isinstance(ws, HubConnection):
            ws.on_message = handle
        try:
            async for message in ws:
                handle(message)
        finally:
            if isinstance(ws, HubConnection):
                ws.on_message = None

    def _on_message(self, link: NodeLink, limit: int, message: str | bytes) -> None:
        try:
            frame = link.conn.receive(message)
        except ClientError as exc:
            self._metrics.bad_frames.labels("node", exc.code).inc()
            self._outbox.push(link.ws, proto.encode_error(exc.ref, exc.code, exc.message))
            return
        kind = type(frame)
        if kind is proto.NodeResult:
            assert isinstance(frame, proto.NodeResult)
            self._tasks.start(link, limit, self._complete(link, frame))
        elif kind is proto.NodePartial:
            assert isinstance(frame, proto.NodePartial)
            if not self._relay_partial(link, frame):
                self._tasks.start(link, limit, self._route_partial(link, frame))
        elif kind is proto.Load:
            assert isinstance(frame, proto.Load)
            link.load = frame.load
        elif kind is proto.Drain:
            self._tasks.start(link, limit, self._drain(link))

    async def _complete(self, link: NodeLink, frame: proto.NodeResult) -> None:
        """Record a result; while Redis is unavailable, hold it and try again.

        The result is held in this task, so a node's held results count
        against its frames in flight (:meth:`Tasks.bounded`): past the limit
        its reader waits, and memory stays bounded. The node is never asked
        to send a result again.
        """
        assert link.node_id is not None
        delay = _RESULT_RETRY_FIRST_S
        give_up = time.monotonic() + self._settings.max_job_timeout_ms / 1000
        while True:
            try:
                done = await self._cells[link.cell].complete_task(
                    frame.job_id,
                    link.node_id,
                    frame.attempt,
                    frame.status,
                    result=frame.result,
                    error=frame.error,
                    repeat=delay > _RESULT_RETRY_FIRST_S,
                )
                break
            except SchedulingError as exc:
                if delay == _RESULT_RETRY_FIRST_S:
                    self._outbox.push(
                        link.ws, proto.encode_error(frame.job_id, exc.code, exc.message)
                    )
                return  # after a retry: the job ended meanwhile (its deadline, a cancel)
            except RedisUnavailable:
                if self._health.stopping or time.monotonic() > give_up:
                    logger.warning("! gave up recording the result of job %s", frame.job_id)
                    return
                self._metrics.results_held.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RESULT_RETRY_MAX_S)
        link.jobs.pop(frame.job_id, None)
        self._router.ended(done.ended)
        self._router.route(done.events)
        if done.drained:
            self._outbox.shut_drained(link)

    def _relay_partial(self, link: NodeLink, frame: proto.NodePartial) -> bool:
        """Relay a partial whose route this hub knows; False when Redis must be asked."""
        route = link.jobs.get(frame.job_id)
        if route is None or not route.session_id:
            return False
        if route.attempt != frame.attempt:
            self._outbox.push(
                link.ws,
                proto.encode_error(
                    frame.job_id, Code.STALE_ATTEMPT, "not the job's current attempt"
                ),
            )
            return True
        self._outbox.send_session(
            route.session_hub,
            route.session_id,
            proto.encode_partial(route.ref, JobId(frame.job_id), frame.result),
            job_id=frame.job_id,
        )
        return True

    async def _route_partial(self, link: NodeLink, frame: proto.NodePartial) -> None:
        """A partial for a job this connection has no route for: a job resumed after a
        reconnection, or one that is not (or no longer) this node's (protocol.md §6)."""
        assert link.node_id is not None
        try:
            found = await self._cells[link.cell].route_partial(
                frame.job_id, link.node_id, frame.attempt
            )
        except SchedulingError as exc:
            self._outbox.push(link.ws, proto.encode_error(frame.job_id, exc.code, exc.message))
            return
        except RedisUnavailable:
            return
        link.jobs[frame.job_id] = Route(
            frame.attempt, found.session_id, found.session_hub, found.ref
        )
        self._relay_partial(link, frame)

    async def _drain(self, link: NodeLink) -> None:
        assert link.node_id is not None
        try:
            running = await self._cells[link.cell].drain_node(link.node_id, epoch=link.epoch)
        except (SchedulingError, RedisUnavailable):
            return
        logger.info("= node %s draining (%d jobs left)", link.node_id, running)
        if running == 0:
            self._outbox.shut_drained(link)

    async def _gone(self, link: NodeLink) -> None:
        """The socket closed: forget the connection and release its jobs (node_lost)."""
        node_id = link.node_id
        if node_id is None:
            return
        self._registry.remove_node(link)
        logger.info("= node %s disconnected", node_id)
        try:
            events = await self._cells[link.cell].node_lost(node_id, epoch=link.epoch)
        except SchedulingError:
            return  # replaced by a newer connection, or already lost
        except RedisUnavailable:
            logger.warning("! node %s lost while Redis is down: the lease will expire it", node_id)
            return
        self._router.route(events)
