"""The hub: websockets glue between nodes, sessions and the Scheduler.

Each connection is a thin adapter around its Sans-I/O state machine
(:mod:`hub.protocol`): receive a message, feed it in, act on the frame
(one script call), push the frames to send. Frames go out with
``websockets.broadcast`` into each connection's write buffer, never with an
``await send`` loop; a connection whose buffer grows past
``send_buffer_bytes`` is too slow and is closed (protocol.md §7, 4005).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import http
import ipaddress
import logging
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import protocol as proto
from .auth import OPEN_NODE, OPEN_SESSION, Authenticator, NodeGrant, SessionGrant
from .bus import Bus, decode_envelope, encode_envelope
from .config import ConfigError, RedisDSN, Settings
from .errors import ClientError, ErrorCode, RedisUnavailable, SchedulingError, Unauthorized
from .keys import Keys
from .metrics import Metrics
from .protocol import CloseCode, JobId, NodeId, SessionId
from .redisconn import client_from_url
from .scheduler import (
    Beat,
    CancelAttempt,
    Dispatch,
    Event,
    JobEnded,
    NodeLost,
    NodeReplaced,
    Queued,
    Scheduler,
    new_job_id,
)

__all__ = ["Hub", "redis_client"]

logger = logging.getLogger("hub.server")


def redis_client(url: str, settings: Settings, *, pubsub: bool = False) -> Redis:
    """A redis-py client with timeouts and retries set on purpose.

    Command clients get ``redis_timeout_s`` and no automatic retry (a retried
    script could run twice); the pub/sub client waits without a read timeout.
    """
    RedisDSN.parse(url)  # ConfigError on a bad URL, with the password redacted
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_timeout": None if pubsub else settings.redis_timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
        "health_check_interval": 0,
    }
    if not pubsub:
        kwargs["max_connections"] = 64
    # Connections that pack commands with hiredis (hub/redisconn.py).
    return client_from_url(url, **kwargs)


@dataclasses.dataclass(slots=True)
class _Route:
    """What a node's hub knows of a job attempt it delivered (for partials)."""

    attempt: int
    session_id: str
    session_hub: str
    ref: str


class NodeLink:
    """One node connection on this hub."""

    def __init__(self, ws: ServerConnection, limits: proto.Limits) -> None:
        self.ws = ws
        self.conn = proto.NodeConnection(limits)
        self.node_id: NodeId | None = None
        self.epoch = 0
        self.max_jobs = 0
        self.jobs: dict[str, _Route] = {}
        self.load: bytes | None = None
        self.ping_at: float | None = None
        self.closing = False
        self.pending = 0
        self.slice = secrets.randbelow(10)
        """Which tenth of the heartbeat interval this node is pinged in."""
        self.backlog: list[tuple[str | bytes, tuple[str, _Route] | None, str | None]] = []
        """Frames that arrived for the node before its registration finished here."""


class SessionLink:
    """One session connection on this hub."""

    def __init__(
        self,
        ws: ServerConnection,
        session_id: SessionId,
        settings: Settings,
        limits: proto.Limits,
        grant: SessionGrant,
    ) -> None:
        self.ws = ws
        self.session_id = session_id
        self.grant = grant
        self.conn = proto.SessionConnection(
            limits,
            max_inflight=grant.max_inflight or settings.max_inflight_per_session,
            rate_per_s=grant.rate_per_s or settings.session_rate_per_s,
            burst=grant.burst or settings.session_burst,
        )
        self.last_active = time.monotonic()
        self.pending = 0
        self.closing = False
        self.ended_early: set[str] = set()
        """Jobs whose result came before their dispatch reply was handled."""
        self.abandoned: set[str] = set()
        """Jobs refused with UNAVAILABLE whose script may have run after all."""


class Hub:
    """A hub process: accepts nodes and sessions, runs their jobs through Redis.

    Args:
        settings: everything configurable.
        redis_url: the Redis server (``settings.redis_url`` when omitted).
    """

    def __init__(self, settings: Settings, redis_url: str | None = None) -> None:
        self.settings = settings
        self.redis_url = redis_url or settings.redis_url
        if self.redis_url is None:
            raise ValueError("Hub needs a Redis URL (hub.cli starts an embedded server)")
        self.hub_id = settings.hub_id or secrets.token_hex(6)
        """This hub's id: names its channel and is recorded with its nodes and sessions."""
        self.keys = Keys(settings.cell)
        self.limits = proto.Limits.from_settings(settings)
        self.redis = redis_client(self.redis_url, settings)
        self.subscriber = redis_client(self.redis_url, settings, pubsub=True)
        self.scheduler = Scheduler(self.redis, settings, hub_id=self.hub_id, keys=self.keys)
        self.bus = Bus(
            self.redis, self.subscriber, self.keys.channel(self.hub_id), self._on_bus_message
        )
        self.bus.on_subscribed = self._bus_subscribed
        self.metrics = Metrics(self.hub_id)
        self.auth = Authenticator(settings)
        self._grants: dict[ServerConnection, NodeGrant | SessionGrant] = {}
        self._registering: dict[str, NodeLink] = {}
        self._abandoning = 0
        self._abandoned: dict[str, float] = {}
        self.nodes: dict[str, NodeLink] = {}
        self.sessions: dict[str, SessionLink] = {}
        self.ready = False
        """True while Redis answers and the scripts are loaded (``/readyz``)."""
        self._ready_at = 0.0
        self.server: Server | None = None
        self.port: int = settings.port
        self._secret = b""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._gone: dict[str, asyncio.TimerHandle] = {}
        self._beats: dict[str, Beat] = {}
        self._per_ip: dict[str, int] = {}
        self._connections = 0
        self._closing = False
        self._stopping = False
        self._send_limit = settings.send_buffer_bytes
        self._too_slow: set[ServerConnection] = set()
        self.debug = logger.isEnabledFor(logging.DEBUG)

    # Public methods

    async def start(self) -> None:
        """Connect to Redis (waiting with backoff while it is down) and start listening.

        Raises:
            OSError: if the port cannot be bound.
        """
        self._loops.append(asyncio.create_task(self._redis_watch(), name="redis-watch"))
        self.bus.start()
        s = self.settings
        ssl_context = None
        if s.tls_cert and s.tls_key:
            import ssl

            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(s.tls_cert, s.tls_key)
        self.server = await serve(
            self._handle,
            s.host,
            s.port,
            process_request=self._process_request,
            max_size=s.max_frame_bytes,
            max_queue=16,
            compression=None,
            ping_interval=None,
            ping_timeout=None,
            open_timeout=s.register_timeout_s,
            close_timeout=2,
            ssl=ssl_context,
            server_header=None,
            logger=_RedactingLogger(logging.getLogger("websockets.server")),
        )
        sockets = list(self.server.sockets)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._loops.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
        self._loops.append(asyncio.create_task(self._sweep_loop(), name="sweep"))
        logger.info("= hub %s listening on %s:%d", self.hub_id, s.host, self.port)

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Wait until Redis answered and the scripts are loaded."""
        async with asyncio.timeout(timeout_s):
            # Polling is fine here: a startup helper, bounded by the timeout.
            while not (self.ready and self.bus.subscribed.is_set()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Shut down: stop accepting, drain nodes, close everything, release Redis state.

        Order: stop accepting; ask nodes to finish (drain, up to
        ``shutdown_grace_s``); close sessions with 1001; close nodes with 1001
        and run node_lost for each; cancel what is left.
        """
        if self._closing:
            return
        self._closing = True
        logger.info("= hub %s shutting down", self.hub_id)
        if self.server is not None:
            self.server.close(close_connections=False)
        # Tell nodes to finish: no new jobs, wait for running ones within the grace.
        for link in list(self.nodes.values()):
            if link.node_id is not None:
                with contextlib.suppress(RedisUnavailable, SchedulingError):
                    await self.scheduler.drain_node(link.node_id, epoch=link.epoch)
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        # Bounded by the grace period; jobs end on the nodes' own tasks.
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            link.jobs for link in self.nodes.values()
        ):
            await asyncio.sleep(0.05)
        for slink in list(self.sessions.values()):
            self._shut(slink, CloseCode.GOING_AWAY)
        for link in list(self.nodes.values()):
            self._shut(link, CloseCode.GOING_AWAY)
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_grace_s + 3):
                    await self.server.wait_closed()
        for handle in self._gone.values():
            handle.cancel()
        self._gone.clear()
        self._stopping = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3):
                    await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await self.bus.close()
        await self.scheduler.close()
        await self.redis.aclose()
        await self.subscriber.aclose()
        logger.info("= hub %s stopped", self.hub_id)

    def install_signal_handlers(self, stop: asyncio.Event) -> None:
        """Make SIGTERM and SIGINT set ``stop`` (the caller then awaits :meth:`close`)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    # HTTP endpoints and admission

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == "/healthz":
            return _respond(http.HTTPStatus.OK, b"ok\n")
        if path == "/readyz":
            if self.ready and not self._closing:
                return _respond(http.HTTPStatus.OK, b"ready\n")
            return _respond(http.HTTPStatus.SERVICE_UNAVAILABLE, b"not ready\n")
        if path == "/metrics":
            body, content_type = self.metrics.render(self)
            return _respond(http.HTTPStatus.OK, body, content_type)
        if path == "/v1/status":
            return await self._status_response()
        if path in ("/", "/demo", "/demo/"):
            return _static_page()
        if path not in ("/v1/node", "/v1/session"):
            return _respond(http.HTTPStatus.NOT_FOUND, b"not found\n")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return _respond(http.HTTPStatus.UPGRADE_REQUIRED, b"websocket endpoint\n")
        if self._closing:
            return _respond(http.HTTPStatus.SERVICE_UNAVAILABLE, b"shutting down\n")
        s = self.settings
        if s.max_connections is not None and self._connections >= s.max_connections:
            self.metrics.refused.labels("max_connections").inc()
            return _respond(http.HTTPStatus.SERVICE_UNAVAILABLE, b"too many connections\n")
        ip = _peer_ip(ws)
        if (
            s.max_connections_per_ip is not None
            and self._per_ip.get(ip, 0) >= s.max_connections_per_ip
        ):
            self.metrics.refused.labels("max_connections_per_ip").inc()
            return _respond(
                http.HTTPStatus.TOO_MANY_REQUESTS, b"too many connections from this address\n"
            )
        if path == "/v1/node" and "Origin" in request.headers:
            # Nodes are never browsers: a web page must not reach the node endpoint.
            self.metrics.refused.labels("ORIGIN").inc()
            return _respond(http.HTTPStatus.FORBIDDEN, b"browsers cannot connect as nodes\n")
        if path == "/v1/session" and s.allowed_origins is not None:
            origin = request.headers.get("Origin")
            if origin is not None and origin not in s.allowed_origins:
                self.metrics.refused.labels("ORIGIN").inc()
                return _respond(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n")
        try:
            if path == "/v1/node":
                grant: NodeGrant | SessionGrant = self.auth.node(request.headers)
            else:
                grant = self.auth.session(request.headers, parse_qs(urlsplit(request.path).query))
        except Unauthorized as exc:
            self.metrics.refused.labels("UNAUTHORIZED").inc()
            return _respond(
                http.HTTPStatus.UNAUTHORIZED,
                f"unauthorized: {exc.message}\n".encode(),
                extra=[("WWW-Authenticate", "Bearer")],
            )
        self._grants[ws] = grant
        return None

    async def _status_response(self) -> Response:
        try:
            snapshot = await self.scheduler.status()
        except RedisUnavailable:
            return _respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                orjson.dumps({"hub_id": self.hub_id, "error": "UNAVAILABLE"}),
                "application/json",
            )
        body = {
            "hub_id": self.hub_id,
            "ready": self.ready,
            "connections": {"nodes": len(self.nodes), "sessions": len(self.sessions)},
            **snapshot,
            "hub_counters": self.metrics.snapshot(),
        }
        return _respond(http.HTTPStatus.OK, orjson.dumps(body), "application/json")

    async def _handle(self, ws: ServerConnection) -> None:
        ip = _peer_ip(ws)
        grant = self._grants.pop(ws, None)
        self._connections += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        try:
            path = urlsplit(ws.request.path if ws.request else "/").path
            if path == "/v1/node":
                await self._serve_node(ws, grant if isinstance(grant, NodeGrant) else OPEN_NODE)
            else:
                await self._serve_session(
                    ws, grant if isinstance(grant, SessionGrant) else OPEN_SESSION
                )
        except ConnectionClosed:
            pass
        except Exception:
            # The only catch-all (STYLE §4): log it, close with 1011.
            logger.error("! connection handler failed", exc_info=True)
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self._too_slow.discard(ws)
            self._connections -= 1
            left = self._per_ip[ip] - 1
            if left:
                self._per_ip[ip] = left
            else:
                del self._per_ip[ip]

    # Sending

    def _push(self, ws: ServerConnection, frame: str | bytes) -> bool:
        """Queue a frame on a connection; close it if its buffer is over the limit."""
        transport = ws.transport
        if transport is None or transport.is_closing() or ws in self._too_slow:
            return False
        if transport.get_write_buffer_size() > self._send_limit:
            # Once: the close frame waits behind the full buffer, and frames
            # keep coming meanwhile.
            self._too_slow.add(ws)
            self.metrics.slow_closed.inc()
            logger.warning("! closing a connection whose send buffer is full")
            self._spawn(self._close(ws, CloseCode.TOO_SLOW, "too slow: send buffer full"))
            return False
        broadcast((ws,), frame)
        return True

    def _node_link(self, node_id: str, epoch: int) -> NodeLink | None:
        """This hub's connection of a node, if it is the registration ``epoch`` names."""
        link = self.nodes.get(node_id)
        return link if link is not None and link.epoch == epoch else None

    def _shut(self, link: NodeLink | SessionLink, code: CloseCode) -> None:
        """Close a node or session connection in the background (protocol.md §7)."""
        link.closing = True
        self._spawn(self._close(link.ws, code, _CLOSE_REASONS[code]))

    def _shut_drained(self, link: NodeLink) -> None:
        # protocol.md §7: a node the hub drained for its shutdown gets 1001, not 4003.
        self._shut(link, CloseCode.GOING_AWAY if self._closing else CloseCode.DRAINED)

    async def _close(self, ws: ServerConnection, code: int, reason: str) -> None:
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

    def _send_node(
        self,
        hub: str,
        node_id: str,
        frame: str | bytes,
        route: tuple[str, _Route] | None = None,
        untrack: str | None = None,
    ) -> None:
        if hub == self.hub_id:
            link = self.nodes.get(node_id)
            if link is None:
                early = self._registering.get(node_id)
                if early is not None and len(early.backlog) < 2 * self.limits.max_jobs_per_node:
                    # Dispatched before this hub saw its register reply: hold it.
                    early.backlog.append((frame, route, untrack))
                else:
                    self.metrics.dropped.labels("node").inc()
                    logger.warning("! dropped a frame for node %s: not connected here", node_id)
                return
            if route is not None:
                link.jobs[route[0]] = route[1]
            if untrack is not None:
                link.jobs.pop(untrack, None)
            self._push(link.ws, frame)
        elif hub:
            meta: dict[str, Any] = {"n": node_id}
            if route is not None:
                r = route[1]
                meta["j"] = route[0]
                meta["r"] = [r.attempt, r.session_id, r.session_hub, r.ref]
            if untrack is not None:
                meta["u"] = untrack
            self.bus.publish(self.keys.channel(hub), encode_envelope(b"N", meta, frame))

    def _send_session(
        self,
        hub: str,
        session_id: str,
        frame: str | bytes,
        ended: str | None = None,
        job_id: str | None = None,
    ) -> None:
        """Send a frame about a job to its session (``ended``: the job's result)."""
        if hub == self.hub_id:
            link = self.sessions.get(session_id)
            if link is None:
                return  # gone: results wait in Redis for its resume
            jid = ended or job_id
            if jid is not None and jid in link.abandoned:
                # The session was told UNAVAILABLE for this job (protocol.md §6).
                if ended is not None:
                    link.abandoned.discard(jid)
                return
            if (
                ended is not None
                and link.conn.job_ended(JobId(ended)) is None
                and len(link.ended_early) < 1024
            ):
                # Ended before this hub handled the dispatch reply (another hub was faster).
                link.ended_early.add(ended)
            self._push(link.ws, frame)
        elif hub:
            meta: dict[str, Any] = {"s": session_id}
            if ended is not None:
                meta["e"] = ended
            if job_id is not None:
                meta["j"] = job_id
            self.bus.publish(self.keys.channel(hub), encode_envelope(b"S", meta, frame))

    def _on_bus_message(self, message: bytes) -> None:
        try:
            kind, meta, frame = decode_envelope(message)
        except ValueError:
            logger.warning("! dropped a malformed bus message")
            return
        if kind == b"N":
            route = None
            if "j" in meta:
                a, sid, shub, ref = meta["r"]
                route = (meta["j"], _Route(int(a), sid, shub, ref))
            self._send_node(self.hub_id, meta["n"], frame, route, meta.get("u"))
        elif kind == b"S":
            self._send_session(self.hub_id, meta["s"], frame, meta.get("e"), meta.get("j"))
        elif kind == b"C":
            link = self._node_link(meta["n"], meta["e"])
            if link is not None:
                lost = meta.get("c") == CloseCode.LOST
                self._shut(link, CloseCode.LOST if lost else CloseCode.REPLACED)

    def _route(self, events: tuple[Event, ...]) -> None:
        for event in events:
            if type(event) is Dispatch:
                self._route_dispatch(event)
            elif type(event) is JobEnded:
                self._route_ended(event)
            elif type(event) is CancelAttempt:
                self._send_node(
                    event.node_hub,
                    event.node_id,
                    proto.encode_cancel(JobId(event.job_id), event.attempt, event.reason),
                    untrack=event.job_id,
                )
            elif type(event) is NodeReplaced:
                if event.hub == self.hub_id:
                    link = self._node_link(event.node_id, event.epoch)
                    if link is not None:
                        self._shut(link, CloseCode.REPLACED)
                elif event.hub:
                    self.bus.publish(
                        self.keys.channel(event.hub),
                        encode_envelope(b"C", {"n": event.node_id, "e": event.epoch}, b""),
                    )
            elif type(event) is NodeLost:
                if event.hub == self.hub_id:
                    link = self._node_link(event.node_id, event.epoch)
                    if link is not None:
                        self._shut(link, CloseCode.LOST)
                elif event.hub:
                    # The sweep ran here; the node's socket is on another hub.
                    self.bus.publish(
                        self.keys.channel(event.hub),
                        encode_envelope(
                            b"C", {"n": event.node_id, "e": event.epoch, "c": CloseCode.LOST}, b""
                        ),
                    )

    def _route_dispatch(self, d: Dispatch) -> None:
        frame = proto.encode_job(
            JobId(d.job_id),
            d.attempt,
            SessionId(d.session_id),
            d.src_lang,
            d.tgt_lang,
            d.payload,
            d.deadline_ms,
            d.audio,
        )
        self._send_node(
            d.node_hub,
            d.node_id,
            frame,
            route=(d.job_id, _Route(d.attempt, d.session_id, d.session_hub, d.ref)),
        )
        self._send_session(
            d.session_hub,
            d.session_id,
            proto.encode_accepted(d.ref, JobId(d.job_id), NodeId(d.node_id), d.attempt),
            job_id=d.job_id,
        )
        self.metrics.dispatched.inc()

    def _route_ended(self, e: JobEnded) -> None:
        frame = proto.encode_result(e.ref, JobId(e.job_id), e.status, e.result, e.error)
        self._send_session(e.session_hub, e.session_id, frame, ended=e.job_id)
        self.metrics.job_ended(e.status, e.error or "")

    async def _bounded(
        self, link: NodeLink | SessionLink, limit: int, coro: Coroutine[Any, Any, None]
    ) -> None:
        """Run a frame's script call in the background, at most ``limit`` per connection.

        Frames of many connections then share pipelines; past the limit the
        connection's reader waits (backpressure) instead of piling up tasks.
        The coroutine decrements ``link.pending`` when it ends.
        """
        link.pending += 1
        if link.pending > limit:
            await coro
        else:
            self._spawn(coro)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, ConnectionClosed):
                logger.error("! background task failed", exc_info=exc)

    # Nodes

    async def _serve_node(self, ws: ServerConnection, grant: NodeGrant) -> None:
        link = NodeLink(ws, self.limits)
        register = await self._await_register(link, grant)
        if register is None:
            return
        try:
            await self._node_loop(link)
        finally:
            link.conn.close()
            await self._node_gone(link)

    async def _await_register(self, link: NodeLink, grant: NodeGrant) -> proto.Register | None:
        ws = link.ws
        deadline = time.monotonic() + self.settings.register_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                async with asyncio.timeout(max(remaining, 0)):
                    message = await ws.recv()
            except TimeoutError:
                await ws.close(CloseCode.REGISTER_TIMEOUT, "no register in time")
                return None
            try:
                frame = link.conn.receive(message)
            except ClientError as exc:
                self._push(ws, proto.encode_error(exc.ref, exc.code, exc.message))
                continue
            assert type(frame) is proto.Register
            if not grant.allows(frame.node_id):
                # protocol.md §10: a token names the node ids it may use.
                self.metrics.refused.labels("UNAUTHORIZED").inc()
                self._push(
                    ws,
                    proto.encode_error(
                        None, "UNAUTHORIZED", "the token does not allow this node id"
                    ),
                )
                await ws.close(CloseCode.POLICY_VIOLATION, "unauthorized node id")
                return None
            if not self.ready:
                self._push(ws, proto.encode_error(None, "UNAVAILABLE", "redis is unavailable"))
                await ws.close(CloseCode.TRY_AGAIN_LATER, "redis unavailable")
                return None
            self._registering[frame.node_id] = link
            try:
                reg = await self.scheduler.register_node(
                    frame.node_id,
                    services=frame.services,
                    lang_pairs=frame.lang_pairs,
                    max_jobs=frame.max_jobs,
                    pools=frame.pools,
                    resume=frame.resume,
                )
            except RedisUnavailable:
                if self._registering.get(frame.node_id) is link:
                    del self._registering[frame.node_id]
                await ws.close(CloseCode.TRY_AGAIN_LATER, "redis unavailable")
                return None
            if self._registering.get(frame.node_id) is link:
                del self._registering[frame.node_id]
            link.node_id = frame.node_id
            link.epoch = reg.epoch
            link.max_jobs = frame.max_jobs
            link.conn.registered(frame.node_id)
            old = self.nodes.get(frame.node_id)
            self.nodes[frame.node_id] = link
            if old is not None and old is not link:
                self._shut(old, CloseCode.REPLACED)
            for jid in reg.resumed:
                # Routes of resumed jobs are fetched lazily on their first partial.
                link.jobs.setdefault(jid, _Route(0, "", "", ""))
            self._push(
                ws,
                proto.encode_registered(
                    frame.node_id,
                    self.hub_id,
                    self.settings.heartbeat_interval_ms,
                    [JobId(j) for j in reg.resumed],
                    [JobId(j) for j in reg.dropped],
                ),
            )
            logger.info(
                "= node %s registered (epoch %d, %d slots)",
                frame.node_id,
                reg.epoch,
                frame.max_jobs,
            )
            backlog, link.backlog = link.backlog, []
            for held, route, untrack in backlog:
                self._send_node(self.hub_id, frame.node_id, held, route, untrack)
            self._route(
                tuple(
                    e for e in reg.events if not (type(e) is NodeReplaced and e.hub == self.hub_id)
                )
            )
            return frame

    async def _node_loop(self, link: NodeLink) -> None:
        ws = link.ws
        limit = 2 * link.max_jobs + 8
        async for message in ws:
            try:
                frame = link.conn.receive(message)
            except ClientError as exc:
                self.metrics.bad_frames.labels("node", exc.code).inc()
                self._push(ws, proto.encode_error(exc.ref, exc.code, exc.message))
                continue
            kind = type(frame)
            if kind is proto.NodeResult:
                assert isinstance(frame, proto.NodeResult)
                await self._bounded(link, limit, self._complete(link, frame))
            elif kind is proto.NodePartial:
                assert isinstance(frame, proto.NodePartial)
                if not self._partial(link, frame):
                    await self._bounded(link, limit, self._partial_lookup(link, frame))
            elif kind is proto.Load:
                assert isinstance(frame, proto.Load)
                link.load = frame.load
            elif kind is proto.Drain:
                await self._drain(link)

    async def _complete(self, link: NodeLink, frame: proto.NodeResult) -> None:
        assert link.node_id is not None
        try:
            done = await self.scheduler.complete_task(
                frame.job_id,
                link.node_id,
                frame.attempt,
                frame.status,
                result=frame.result,
                error=frame.error,
            )
        except SchedulingError as exc:
            self._push(link.ws, proto.encode_error(frame.job_id, exc.code, exc.message))
            return
        except RedisUnavailable:
            # The node keeps the result; protocol.md §8: it retries after UNAVAILABLE.
            self._push(
                link.ws,
                proto.encode_error(
                    frame.job_id, "UNAVAILABLE", "redis is unavailable; send the result again"
                ),
            )
            return
        finally:
            link.pending = max(0, link.pending - 1)
        link.jobs.pop(frame.job_id, None)
        self._route_ended(done.ended)
        self._route(done.events)
        if done.drained:
            self._shut_drained(link)

    def _partial(self, link: NodeLink, frame: proto.NodePartial) -> bool:
        """Relay a partial whose route this hub knows; False when Redis must be asked."""
        route = link.jobs.get(frame.job_id)
        if route is None or not route.session_id:
            return False
        if route.attempt != frame.attempt:
            self._push(
                link.ws,
                proto.encode_error(frame.job_id, "STALE_ATTEMPT", "not the job's current attempt"),
            )
            return True
        self._send_session(
            route.session_hub,
            route.session_id,
            proto.encode_partial(route.ref, JobId(frame.job_id), frame.result),
            job_id=frame.job_id,
        )
        return True

    async def _partial_lookup(self, link: NodeLink, frame: proto.NodePartial) -> None:
        """A partial for a job this connection has no route for: a job resumed after a
        reconnection, or one that is not (or no longer) this node's (protocol.md §6)."""
        try:
            job = await self.scheduler.job(frame.job_id)
            session = await self.redis.hget(self.keys.session(job.get("session", "")), "hub")
        except (redis_errors.RedisError, OSError):
            return
        finally:
            link.pending = max(0, link.pending - 1)
        code = None
        if not job:
            code, message = "UNKNOWN_JOB", "no such job"
        elif job.get("node") != link.node_id:
            if f",{link.node_id}@" in job.get("hist", ""):
                code, message = "STALE_ATTEMPT", "the job moved to another node"
            else:
                code, message = "NODE_MISMATCH", "the job was not dispatched to this node"
        elif job.get("status") != "running" or job.get("attempt") != str(frame.attempt):
            code, message = "STALE_ATTEMPT", "the attempt is stale or the job has ended"
        if code is not None:
            self._push(link.ws, proto.encode_error(frame.job_id, code, message))
            return
        session_hub = session.decode() if isinstance(session, bytes) else job.get("shub", "")
        link.jobs[frame.job_id] = _Route(
            frame.attempt, job.get("session", ""), session_hub, job.get("ref", "")
        )
        self._partial(link, frame)

    async def _drain(self, link: NodeLink) -> None:
        assert link.node_id is not None
        try:
            running = await self.scheduler.drain_node(link.node_id, epoch=link.epoch)
        except (SchedulingError, RedisUnavailable):
            return
        logger.info("= node %s draining (%d jobs left)", link.node_id, running)
        if running == 0:
            self._shut_drained(link)

    async def _node_gone(self, link: NodeLink) -> None:
        node_id = link.node_id
        if node_id is None:
            return
        if self.nodes.get(node_id) is link:
            del self.nodes[node_id]
        self._beats.pop(node_id, None)
        logger.info("= node %s disconnected", node_id)
        try:
            events = await self.scheduler.node_lost(node_id, epoch=link.epoch)
        except SchedulingError:
            return  # replaced by a newer connection, or already lost
        except RedisUnavailable:
            logger.warning("! node %s lost while Redis is down: the lease will expire it", node_id)
            return
        self._route(events)

    # Sessions

    async def _serve_session(self, ws: ServerConnection, grant: SessionGrant) -> None:
        session_id, resumed = await self._welcome(ws, grant)
        if session_id is None:
            return
        link = SessionLink(ws, session_id, self.settings, self.limits, grant)
        # Every session is recorded when it opens (its hub, for results), so a
        # resume can tell an expired session from one that never sent a job.
        try:
            known, open_jobs, missed = await self.scheduler.resume_session(session_id)
        except RedisUnavailable:
            await ws.close(CloseCode.TRY_AGAIN_LATER, "redis unavailable")
            return
        if resumed and not known and grant.session_id is None:
            # protocol.md §8: nothing is left of the session; it must start afresh.
            await ws.close(CloseCode.BAD_RESUME_TOKEN, "session expired")
            return
        for jid, ref, _status in open_jobs:
            link.conn.reopen(ref, JobId(jid))
        old = self.sessions.get(session_id)
        self.sessions[session_id] = link
        if old is not None:
            self._shut(old, CloseCode.REPLACED)
        handle = self._gone.pop(session_id, None)
        if handle is not None:
            handle.cancel()
        self._push(
            ws, proto.encode_welcome(session_id, self.hub_id, self._resume_token(session_id))
        )
        for e in missed:
            self._push(ws, proto.encode_result(e.ref, JobId(e.job_id), e.status, e.result, e.error))
        try:
            await self._session_loop(link)
        finally:
            link.conn.close()
            if self.sessions.get(session_id) is link:
                del self.sessions[session_id]
                if not self._closing:
                    self._session_gone(session_id)

    async def _welcome(
        self, ws: ServerConnection, grant: SessionGrant
    ) -> tuple[SessionId | None, bool]:
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        wanted = query.get("session_id", [None])[0]
        if grant.session_id is not None:
            # The token names the session: presenting it again resumes it.
            if wanted is not None and wanted != grant.session_id:
                await ws.close(CloseCode.POLICY_VIOLATION, "session_id differs from the token")
                return None, False
            return SessionId(grant.session_id), True
        if wanted is None:
            return SessionId(secrets.token_urlsafe(12)), False
        token = query.get("resume_token", [""])[0]
        # Bytes: compare_digest raises TypeError on non-ASCII str.
        if not hmac.compare_digest(token.encode(), self._resume_token(wanted).encode()):
            await ws.close(CloseCode.BAD_RESUME_TOKEN, "bad resume token")
            return None, False
        return SessionId(wanted), True

    async def _session_loop(self, link: SessionLink) -> None:
        ws = link.ws
        limit = 2 * self.settings.max_inflight_per_session
        async for message in ws:
            now = time.monotonic()
            link.last_active = now
            try:
                frame = link.conn.receive(message, now)
            except ClientError as exc:
                self.metrics.bad_frames.labels("session", exc.code).inc()
                self._push(ws, proto.encode_error(exc.ref, exc.code, exc.message))
                continue
            kind = type(frame)
            if kind is proto.SubmitJob:
                assert isinstance(frame, proto.SubmitJob)
                await self._bounded(link, limit, self._submit(link, frame))
            elif kind is proto.CancelJob:
                assert isinstance(frame, proto.CancelJob)
                await self._cancel(link, frame)
            elif kind is proto.Ack:
                assert isinstance(frame, proto.Ack)
                with contextlib.suppress(RedisUnavailable):
                    await self.scheduler.ack_results(link.session_id, frame.job_ids)

    async def _submit(self, link: SessionLink, frame: proto.SubmitJob) -> None:
        ref = frame.ref
        if not link.grant.allows_pair(frame.src_lang, frame.tgt_lang):
            link.pending = max(0, link.pending - 1)
            link.conn.job_refused(ref)
            self.metrics.refused.labels("UNAUTHORIZED").inc()
            self._push(
                link.ws,
                proto.encode_error(
                    ref, "UNAUTHORIZED", "the token does not allow this language pair"
                ),
            )
            return
        jid = JobId(new_job_id())
        if not self.ready:
            link.pending = max(0, link.pending - 1)
            self._refuse_unavailable(link, ref)
            return
        try:
            reply = await self.scheduler.dispatch_task(
                link.session_id,
                frame.src_lang,
                frame.tgt_lang,
                frame.payload,
                ref=ref,
                audio=frame.audio,
                timeout_ms=frame.timeout_ms,
                job_id=jid,
            )
        except SchedulingError as exc:
            link.conn.job_refused(ref)
            self.metrics.job_refused(exc.code)
            self._push(link.ws, proto.encode_error(ref, exc.code, exc.message))
            return
        except RedisUnavailable:
            self._refuse_unavailable(link, ref)
            # The script may have run before the connection failed: take the job back.
            if len(link.abandoned) < 1024:
                link.abandoned.add(jid)
            # Bounded: past it, such a job ends by its deadline (the sweep) instead.
            if self._abandoning < 1000:
                self._abandoning += 1
                self._spawn(self._abandon(link.session_id, jid))
            return
        finally:
            link.pending = max(0, link.pending - 1)
        if jid in link.ended_early:
            # Its result is already sent; §9.2 wants nothing after it.
            link.ended_early.discard(jid)
            link.conn.job_refused(ref)
            return
        link.conn.job_started(ref, jid)
        if type(reply) is Queued:
            self._push(link.ws, proto.encode_queued(ref, jid))
            self.metrics.queued.inc()
            return
        assert not isinstance(reply, Queued)
        job = proto.encode_job(
            jid,
            reply.attempt,
            link.session_id,
            frame.src_lang.lower(),
            frame.tgt_lang.lower(),
            frame.payload,
            reply.deadline_ms,
            frame.audio,
        )
        self._send_node(
            reply.node_hub,
            reply.node_id,
            job,
            route=(jid, _Route(reply.attempt, link.session_id, self.hub_id, ref)),
        )
        self._push(link.ws, proto.encode_accepted(ref, jid, NodeId(reply.node_id), reply.attempt))
        self.metrics.dispatched.inc()

    def _refuse_unavailable(self, link: SessionLink, ref: str) -> None:
        link.conn.job_refused(ref)
        self.metrics.job_refused("UNAVAILABLE")
        self._push(
            link.ws,
            proto.encode_error(ref, "UNAVAILABLE", "the scheduler is unavailable; try again"),
        )

    async def _abandon(self, session_id: str, job_id: str) -> None:
        """End a job whose dispatch reply was lost, once Redis answers again (bounded)."""
        try:
            await self._take_back(session_id, job_id)
        finally:
            self._abandoning -= 1

    async def _take_back(self, session_id: str, job_id: str) -> None:
        delay = 0.1
        for _ in range(40):
            try:
                done = await self.scheduler.cancel_task(job_id, session_id, reason="UNAVAILABLE")
            except SchedulingError:
                pass  # it never ran (UNKNOWN_JOB) or already ended
            except RedisUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            else:
                self._route(tuple(e for e in done.events if type(e) is not JobEnded))
            with contextlib.suppress(RedisUnavailable):
                await self.scheduler.ack_results(session_id, [job_id])
            return
        logger.warning("! could not take back job %s after a Redis failure", job_id)

    async def _cancel(self, link: SessionLink, frame: proto.CancelJob) -> None:
        jid = link.conn.job_for(frame.ref)
        if jid is None:
            self._push(
                link.ws, proto.encode_error(frame.ref, "UNKNOWN_JOB", "the job is not accepted yet")
            )
            return
        try:
            done = await self.scheduler.cancel_task(jid, link.session_id)
        except SchedulingError as exc:
            self._push(link.ws, proto.encode_error(frame.ref, exc.code, exc.message))
            return
        except RedisUnavailable:
            self._push(
                link.ws,
                proto.encode_error(
                    frame.ref, "UNAVAILABLE", "the scheduler is unavailable; try again"
                ),
            )
            return
        self._route_ended(done.ended)
        self._route(done.events)

    def _session_gone(self, session_id: str) -> None:
        window = self.settings.resume_window_s

        def expire() -> None:
            self._gone.pop(session_id, None)
            self._spawn(self._close_session_jobs(session_id))

        if window <= 0:
            expire()
        else:
            self._gone[session_id] = asyncio.get_running_loop().call_later(window, expire)

    async def _close_session_jobs(self, session_id: str) -> None:
        for _ in range(64):  # bounded: 256 jobs per call
            try:
                done, events = await self.scheduler.session_closed(session_id)
            except RedisUnavailable:
                logger.warning("! could not cancel jobs of gone session %s", session_id)
                return
            self._route(events)
            if not done or not any(type(e) is JobEnded for e in events):
                return

    def _bus_subscribed(self) -> None:
        if self.sessions and not self._stopping:
            self._spawn(self._resend_lost_results())

    async def _resend_lost_results(self) -> None:
        """After the bus was down (Redis restart): send results published here meanwhile.

        protocol.md §8: the bus is at most once, the outcome stays in Redis.
        Only jobs still open on the connection, so each result goes once per
        connection.
        """
        for session_id, link in list(self.sessions.items()):
            if link.conn.open_refs == 0:
                continue
            # Bounded: the pool may still hold connections that died with Redis.
            for delay in (0.05, 0.1, 0.2, 0.5, 1.0, 0):
                try:
                    ended = await self.scheduler.ended_results(session_id)
                    break
                except RedisUnavailable:
                    if not delay:
                        return  # Redis is gone again: the next subscription retries
                    await asyncio.sleep(delay)
            for e in ended:
                jid = JobId(e.job_id)
                if self.sessions.get(session_id) is link and link.conn.job_ended(jid) is not None:
                    self._push(
                        link.ws, proto.encode_result(e.ref, jid, e.status, e.result, e.error)
                    )

    def _resume_token(self, session_id: str) -> str:
        return hmac.new(self._secret, session_id.encode(), hashlib.sha256).hexdigest()[:32]

    # Background loops

    async def _redis_watch(self) -> None:
        """Keep ``ready`` true exactly while Redis answers and the scripts are loaded."""
        delay = 0.05
        slow_pings = 0
        # Not "while True": on Python 3.11, redis-py's asyncio.wait_for() can swallow
        # the cancel of close(), and this loop would outlive the hub.
        while not self._stopping:
            try:
                if not self.ready:
                    await self._load_secret()
                    await self.scheduler.load_scripts()
                    if not self.ready:
                        logger.info(
                            "= redis ready at %s", RedisDSN.parse(str(self.redis_url)).redacted()
                        )
                    self._ready_at = time.monotonic()
                    self.ready = True
                    delay = 0.05
                else:
                    await self.redis.ping()
                    slow_pings = 0
                await asyncio.sleep(0.5)
            except asyncio.CancelledError:
                raise
            except (redis_errors.RedisError, OSError, RedisUnavailable) as exc:
                if self.ready and isinstance(exc, redis_errors.TimeoutError) and slow_pings < 2:
                    # A slow answer under load (a busy event loop reads late) is not
                    # an outage: refusing every job for it would only add load.
                    slow_pings += 1
                    continue
                if self.ready:
                    logger.warning("! redis unavailable: %s", exc)
                self.ready = False
                await asyncio.sleep(delay)
                # Capped low: every job is refused until ready again.
                delay = min(delay * 2, 0.5)

    async def _load_secret(self) -> None:
        if self._secret:
            return
        if self.settings.resume_secret:
            self._secret = self.settings.resume_secret.encode()
            return
        key = self.keys.prefix + "secret"
        await self.redis.set(key, secrets.token_hex(32), nx=True)
        value = await self.redis.get(key)
        if not isinstance(value, bytes):
            raise RedisUnavailable("load secret")
        self._secret = value

    async def _heartbeat_loop(self) -> None:
        """Ping every node once per interval, a slice of the fleet at a time.

        Pinging all nodes at once makes a burst of pongs and one large
        heartbeat call every interval (a latency spike for everyone); slices
        spread that work evenly. Pongs of each slice go to Redis in one call.
        """
        interval = self.settings.heartbeat_interval_ms / 1000
        slices = 10
        tick = 0
        while not self._stopping:
            await asyncio.sleep(interval / slices)
            tick = (tick + 1) % slices
            for link in list(self.nodes.values()):
                if link.node_id is None or link.closing or link.slice != tick:
                    continue
                self._ping(link)
            await self._flush_beats()

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
            self.metrics.rtt.observe(rtt_ms / 1000)

        self._spawn(ping())

    async def _flush_beats(self) -> None:
        if not self._beats:
            return
        beats, self._beats = list(self._beats.values()), {}
        try:
            codes = await self.scheduler.heartbeat(beats)
        except RedisUnavailable:
            return
        self._route(codes.events)
        for beat, code in zip(beats, codes, strict=True):
            if code < 0:
                link = self._node_link(beat.node_id, beat.epoch)
                if link is not None:
                    # protocol.md §7: when a newer connection holds the id, 4004
                    # would make the old one reconnect and take it back.
                    stale = code == ErrorCode.STALE_EPOCH
                    self._shut(link, CloseCode.REPLACED if stale else CloseCode.LOST)

    async def _sweep_loop(self) -> None:
        interval = self.settings.sweep_interval_ms / 1000
        idle = self.settings.session_idle_timeout_s
        next_idle_check = time.monotonic() + 1
        while not self._stopping:
            await asyncio.sleep(interval)
            if self.ready:
                try:
                    # No heartbeat could be recorded while Redis was away: the
                    # nodes get one lease to send one before any is expired.
                    grace = time.monotonic() - self._ready_at < self.settings.lease_ms / 1000
                    for _ in range(16):  # bounded catch-up after an outage
                        report = await self.scheduler.sweep(expire_nodes=not grace)
                        self._route(report.events)
                        if not report.ran or len(report.events) == 0:
                            break
                except RedisUnavailable:
                    pass
            now = time.monotonic()
            if idle is not None and now >= next_idle_check:
                next_idle_check = now + 1
                for slink in list(self.sessions.values()):
                    if now - slink.last_active > idle and not slink.closing:
                        self._shut(slink, CloseCode.IDLE_TIMEOUT)


_CLOSE_REASONS = {
    CloseCode.GOING_AWAY: "hub shutting down",
    CloseCode.REPLACED: "replaced by a newer connection",
    CloseCode.DRAINED: "drained",
    CloseCode.LOST: "lost: register again",
    CloseCode.IDLE_TIMEOUT: "idle timeout",
}


def check_exposure(settings: Settings) -> None:
    """Refuse open mode (no auth) on a non-loopback address unless ``insecure``.

    Raises:
        ConfigError: when the hub would face the network without authentication.
    """
    auth = Authenticator(settings)
    if auth.node_auth and auth.session_auth:
        return
    host = settings.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    if not settings.insecure:
        raise ConfigError(
            "host",
            host,
            "nodes and sessions are not both authenticated: listening "
            "beyond loopback needs node_secret or node_token_key, and "
            "session_jwt_key, or --insecure",
        )
    logger.warning("! open mode on %s: anyone who can reach this port can use the hub", host)


def _respond(
    status: http.HTTPStatus,
    body: bytes,
    content_type: str = "text/plain",
    extra: list[tuple[str, str]] | None = None,
) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *(extra or []),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


class _RedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets' logger minus credentials: at DEBUG it logs request lines and headers."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level == logging.DEBUG and msg == "< %s: %s" and len(args) == 2:
            if str(args[0]).lower() in ("authorization", "cookie"):
                args = (args[0], "***")
        elif level == logging.DEBUG and msg == "< %s %s %s" and len(args) == 3:
            args = (args[0], _TOKEN_IN_QUERY.sub(r"\1***", str(args[1])), args[2])
        super().log(level, msg, *args, **kwargs)


_TOKEN_IN_QUERY = re.compile(r"([?&](?:token|resume_token)=)[^&]*")


def _peer_ip(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and address:
        try:
            return str(ipaddress.ip_address(address[0]))
        except ValueError:
            return str(address[0])
    return "local"


def _static_page() -> Response:
    from importlib import resources

    try:
        body = resources.files("hub.static").joinpath("demo.html").read_bytes()
    except (FileNotFoundError, ModuleNotFoundError):
        return _respond(http.HTTPStatus.NOT_FOUND, b"demo page not installed\n")
    return _respond(http.HTTPStatus.OK, body, "text/html; charset=utf-8")


async def run(
    settings: Settings, redis_url: str, *, on_ready: Callable[[Hub], Awaitable[None]] | None = None
) -> None:
    """Run a hub until SIGTERM/SIGINT, then shut it down in order."""
    hub = Hub(settings, redis_url)
    stop = asyncio.Event()
    hub.install_signal_handlers(stop)
    await hub.start()
    if on_ready is not None:
        await on_ready(hub)
    try:
        await stop.wait()
    finally:
        await hub.close()
