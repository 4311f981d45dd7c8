"""Sending frames: to connections here, or to other hubs over the bus.

Frames go out with ``websockets.broadcast`` into each connection's write
buffer, never with an ``await send`` loop; a connection whose buffer grows
past ``send_buffer_bytes`` is too slow and is closed (protocol.md §7, 4005).
A frame for a node or session connected to another hub goes to that hub's
channel (:mod:`hub.bus`), which hands it to :meth:`Outbox.receive_bus` there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast

from .audio import AudioStore
from .bus import Bus, decode_envelope, encode_envelope
from .events import Dispatch
from .health import Health
from .keys import Keys
from .latency import Latencies
from .metrics import Metrics
from .protocol import CloseCode, JobId
from .registry import NodeLink, Registry, Route, SessionLink
from .tasks import Tasks
from .wsconn import HubConnection

__all__ = ["Outbox"]

logger = logging.getLogger("hub.outbox")

_MAX_ATTEMPTS_KEPT = 4096
"""Most jobs per session connection whose newest announced attempt is kept."""

_CLOSE_REASONS = {
    CloseCode.GOING_AWAY: "hub shutting down",
    CloseCode.REPLACED: "replaced by a newer connection",
    CloseCode.DRAINED: "drained",
    CloseCode.LOST: "lost: register again",
    CloseCode.IDLE_TIMEOUT: "idle timeout",
}


class Outbox:
    """Delivers frames to nodes and sessions, wherever they are connected.

    Args:
        hub_id: this hub's id (frames for other hubs go over the bus).
        registry: the connections here.
        bus: the channels between hubs.
        keys: key and channel names.
        metrics: counters of dropped frames and slow connections.
        health: whether the hub is shutting down (drained nodes then get 1001).
        tasks: owner of the closing tasks.
        audio: the audio of jobs accepted here (dropped when their result goes out).
        send_buffer_bytes: a connection whose write buffer is larger is closed.
        max_backlog: most frames held for a node that is still registering.
    """

    def __init__(
        self,
        hub_id: str,
        registry: Registry,
        bus: Bus,
        keys: Keys,
        metrics: Metrics,
        health: Health,
        tasks: Tasks,
        audio: AudioStore,
        *,
        send_buffer_bytes: int,
        max_backlog: int,
    ) -> None:
        self.hub_id = hub_id
        self._registry = registry
        self._bus = bus
        self._keys = keys
        self._metrics = metrics
        self._health = health
        self._tasks = tasks
        self._audio = audio
        self.on_dispatch: Callable[[Dispatch], None] | None = None
        """Sends the job frame of a dispatch forwarded here (set by the router)."""
        self.on_ended: Callable[[str, str, str | bytes], None] | None = None
        """Told of each job result for a session of this hub, connected or not: the
        session, the job and its ``result`` frame (set by the HTTP job API, :mod:`hub.jobsapi`)."""
        self.on_accepted: Callable[[str, str], None] | None = None
        """Told of each ``accepted`` frame for a session of this hub, connected or not:
        the session and the job (set by the HTTP job API, for its latencies)."""
        self._send_limit = send_buffer_bytes
        self._max_backlog = max_backlog
        self._too_slow: set[ServerConnection] = set()
        self.latencies: Latencies | None = None
        """Measures the jobs' time to accepted and end to end (set by the hub)."""

    # Public methods

    def push(self, ws: ServerConnection, frame: str | bytes) -> bool:
        """Queue a frame on a connection here; close it if its buffer is over the limit.

        Returns:
            False if the frame was not queued (closing, or too slow).
        """
        if self.blocked(ws):
            return False
        if type(ws) is HubConnection:
            ws.write_soon(frame)  # with the others due to it in this iteration
        else:
            broadcast((ws,), frame)
        return True

    def blocked(self, ws: ServerConnection) -> bool:
        """Whether a connection takes no more frames: closing, or too slow.

        A connection whose write buffer is over ``send_buffer_bytes`` is
        closed (4005) the first time it is found so.
        """
        transport = ws.transport
        if transport is None or transport.is_closing() or ws in self._too_slow:
            return True
        if transport.get_write_buffer_size() > self._send_limit:
            # Once: the close frame waits behind the full buffer, and frames
            # keep coming meanwhile.
            self._too_slow.add(ws)
            self._metrics.slow_closed.inc()
            logger.warning("! closing a connection whose send buffer is full")
            self._tasks.spawn(self.close(ws, CloseCode.TOO_SLOW, "too slow: send buffer full"))
            return True
        return False

    def forget(self, ws: ServerConnection) -> None:
        """Drop what the outbox remembers of a connection that ended."""
        self._too_slow.discard(ws)

    def shut(self, link: NodeLink | SessionLink, code: CloseCode) -> None:
        """Close a node or session connection in the background (protocol.md §7)."""
        link.closing = True
        self._tasks.spawn(self.close(link.ws, code, _CLOSE_REASONS[code]))

    def shut_drained(self, link: NodeLink) -> None:
        """Close a node that finished draining: 4003, or 1001 when the hub shuts down."""
        # protocol.md §7: a node the hub drained for its shutdown gets 1001, not 4003.
        self.shut(link, CloseCode.GOING_AWAY if self._health.closing else CloseCode.DRAINED)

    async def close(self, ws: ServerConnection, code: int, reason: str) -> None:
        """Close a connection whose peer may not read: abort it after ``close_timeout``.

        websockets' ``close()`` first waits, without a timeout, for the write
        buffer to drain; its ``close_timeout`` starts only after that. A peer
        that never reads would keep the connection (and its buffer) forever.
        """
        try:
            async with asyncio.timeout(ws.close_timeout):
                await ws.close(code, reason)
        except TimeoutError:
            ws.transport.abort()

    def send_node(
        self,
        hub: str,
        node_id: str,
        frame: str | bytes,
        route: tuple[str, Route] | None = None,
        untrack: str | None = None,
    ) -> None:
        """Send a frame to a node on hub ``hub``.

        Args:
            hub: the node's hub (empty: nowhere; the node is gone).
            node_id: the node.
            frame: the encoded frame.
            route: a job the frame starts, and its route for partials.
            untrack: a job the frame ends on the node (a cancel).
        """
        if hub == self.hub_id:
            link = self._registry.nodes.get(node_id)
            if link is None:
                early = self._registry.registering.get(node_id)
                if early is not None and len(early.backlog) < self._max_backlog:
                    # Dispatched before this hub saw its register reply: hold it.
                    early.backlog.append((frame, route, untrack))
                else:
                    self._metrics.dropped.labels("node").inc()
                    logger.warning("! dropped a frame for node %s: not connected here", node_id)
                return
            if route is not None:
                link.jobs[route[0]] = route[1]
            if untrack is not None:
                link.jobs.pop(untrack, None)
            self.push(link.ws, frame)
        elif hub:
            meta: dict[str, Any] = {"n": node_id}
            if route is not None:
                r = route[1]
                meta["j"] = route[0]
                meta["r"] = [r.attempt, r.session_id, r.session_hub, r.ref]
            if untrack is not None:
                meta["u"] = untrack
            self._bus.publish(self._keys.channel(hub), encode_envelope(b"N", meta, frame))

    def send_session(
        self,
        hub: str,
        session_id: str,
        frame: str | bytes,
        ended: str | None = None,
        job_id: str | None = None,
        attempt: int = 0,
    ) -> None:
        """Send a frame about a job to its session on hub ``hub``.

        Args:
            hub: the session's hub (empty: nowhere).
            session_id: the session.
            frame: the encoded frame.
            ended: the job, when the frame is its result.
            job_id: the job, for any other frame about one.
            attempt: the attempt an ``accepted`` frame announces: one older
                than an attempt already announced is not sent (a dispatch
                reply handled after the re-dispatch that followed it).
        """
        if hub == self.hub_id:
            if ended is not None:
                self._audio.drop(ended)
                if self.on_ended is not None:
                    self.on_ended(session_id, ended, frame)
            elif attempt and job_id is not None and self.on_accepted is not None:
                self.on_accepted(session_id, job_id)
            link = self._registry.sessions.get(session_id)
            if link is None:
                return  # gone: results wait in Redis for its resume
            jid = ended or job_id
            if ended is not None:
                link.attempts.pop(ended, None)
            elif attempt and jid is not None:
                if attempt <= link.attempts.get(jid, 0):
                    return  # protocol.md §9.2: accepted frames in attempt order
                if len(link.attempts) < _MAX_ATTEMPTS_KEPT:
                    link.attempts[jid] = attempt
            if jid is not None and jid in link.abandoned:
                # The session was told UNAVAILABLE for this job (protocol.md §6).
                if ended is not None:
                    link.abandoned.discard(jid)
                return
            if jid is not None and link.conn.ref_for(JobId(jid)) is None:
                if jid not in link.submitting:
                    # protocol.md §9.2: nothing about a job follows its result. A job
                    # Redis ended twice (it came back without the first end, §8) or
                    # one this connection never had gets nothing.
                    return
                if ended is not None and len(link.ended_early) < 1024:
                    # Ended before this hub handled the dispatch reply (another hub was faster).
                    link.ended_early.add(ended)
            elif ended is not None:
                link.conn.job_ended(JobId(ended))
            if jid is not None and (ended is not None or attempt) and self.latencies is not None:
                self.latencies.sent(link.started, jid, ended=ended is not None)
            self.push(link.ws, frame)
        elif hub:
            meta: dict[str, Any] = {"s": session_id}
            if ended is not None:
                meta["e"] = ended
            if job_id is not None:
                meta["j"] = job_id
            if attempt:
                meta["a"] = attempt
            self._bus.publish(self._keys.channel(hub), encode_envelope(b"S", meta, frame))

    def forward_dispatch(self, hub: str, d: Dispatch) -> None:
        """Hand a started attempt to the hub that keeps the job's audio (it sends the job)."""
        meta = {
            "d": [
                d.node_hub,
                d.node_id,
                d.job_id,
                d.attempt,
                d.session_id,
                d.src_lang,
                d.tgt_lang,
                d.deadline_ms,
                d.session_hub,
                d.ref,
            ]
        }
        self._bus.publish(self._keys.channel(hub), encode_envelope(b"D", meta, d.payload))

    def close_node(self, hub: str, node_id: str, epoch: int, code: CloseCode) -> None:
        """Close a node's connection of registration ``epoch`` on hub ``hub`` (4002 or 4004)."""
        if hub == self.hub_id:
            link = self._registry.node_link(node_id, epoch)
            if link is not None:
                self.shut(link, code)
        elif hub:
            meta: dict[str, Any] = {"n": node_id, "e": epoch}
            if code is CloseCode.LOST:
                meta["c"] = CloseCode.LOST
            self._bus.publish(self._keys.channel(hub), encode_envelope(b"C", meta, b""))

    def receive_bus(self, message: bytes) -> None:
        """Deliver a message another hub published on this hub's channel."""
        try:
            kind, meta, frame = decode_envelope(message)
        except ValueError:
            logger.warning("! dropped a malformed bus message")
            return
        if kind == b"N":
            route = None
            if "j" in meta:
                a, sid, shub, ref = meta["r"]
                route = (meta["j"], Route(int(a), sid, shub, ref))
            self.send_node(self.hub_id, meta["n"], frame, route, meta.get("u"))
        elif kind == b"S":
            self.send_session(
                self.hub_id, meta["s"], frame, meta.get("e"), meta.get("j"), int(meta.get("a", 0))
            )
        elif kind == b"D":
            if self.on_dispatch is not None and isinstance(frame, bytes):
                nhub, nid, jid, attempt, sid, src, tgt, deadline, shub, ref = meta["d"]
                d = Dispatch(nhub, nid, jid, int(attempt), sid, src, tgt, int(deadline), frame,
                             self.hub_id, shub, ref)  # fmt: skip
                self.on_dispatch(d)
        elif kind == b"C":
            lost = meta.get("c") == CloseCode.LOST
            self.close_node(
                self.hub_id, meta["n"], meta["e"], CloseCode.LOST if lost else CloseCode.REPLACED
            )
