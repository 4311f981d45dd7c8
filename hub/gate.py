"""The way in: HTTP routes, admission, origin and auth checks.

Every request reaches :meth:`Gate.process_request` first, but those of the
HTTP job API, which :mod:`hub.httpconn` switches away before websockets
parses them. Plain HTTP routes
(``/healthz``, ``/readyz``, ``/metrics``, ``/v1/status``, the demo page, the
dashboard) are answered there; a WebSocket handshake on ``/v1/node``,
``/v1/session`` or ``/v1/watch`` is let through only within the connection
limits, from an allowed origin, with valid credentials. :meth:`Gate.handle`
then hands the connection to :class:`~hub.nodes.Nodes`,
:class:`~hub.sessions.Sessions` or :class:`~hub.watch.Watch`, and is the one
catch-all: a bug closes that connection with 1011 and nothing else.
"""

from __future__ import annotations

import http
import ipaddress
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .auth import OPEN_NODE, OPEN_SESSION, Authenticator, NodeGrant, SessionGrant
from .cells import Cells
from .config import ConfigError, Settings
from .errors import Code, RedisUnavailable, Unauthorized
from .health import Health
from .metrics import Metrics, Snapshot, merge_expositions
from .nodes import Nodes
from .protocol import CloseCode
from .registry import Registry
from .sessions import Sessions
from .siblings import Siblings
from .watch import Watch

__all__ = ["Gate", "RedactingLogger", "check_exposure"]

logger = logging.getLogger("hub.gate")

_NODE_PATH = "/v1/node"
_SESSION_PATH = "/v1/session"
_WATCH_PATH = "/v1/watch"
_DASHBOARD_HINT = b"open /dashboard?token=TOKEN with a token from `hub token --admin`\n"
"""Said after why ``/dashboard`` was refused ``401``: a browser shows the body."""

_DASHBOARD_FILES = {
    "/dashboard/uPlot.iife.min.js": ("uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/dashboard/uPlot.min.css": ("uPlot.min.css", "text/css; charset=utf-8"),
    "/dashboard/uPlot.LICENSE.txt": ("uPlot.LICENSE.txt", "text/plain; charset=utf-8"),
}
"""The vendored charting library of the dashboard: public files, served without a token."""


class Gate:
    """Answers HTTP requests and admits WebSocket connections.

    Args:
        hub_id: this hub's id, in ``/v1/status``.
        settings: connection limits and allowed origins.
        auth: checks node and session credentials.
        cells: the cells served: each one's state for ``/v1/status?cell=``.
        registry: connection counts.
        nodes: serves admitted node connections.
        sessions: serves admitted session connections.
        metrics: counters, and the ``/metrics`` text.
        health: ready and closing flags.
        watch: serves ``/v1/watch`` connections.
        siblings: a worker's siblings' metrics, for ``/metrics``.
    """

    def __init__(
        self,
        hub_id: str,
        settings: Settings,
        auth: Authenticator,
        cells: Cells,
        registry: Registry,
        nodes: Nodes,
        sessions: Sessions,
        metrics: Metrics,
        health: Health,
        watch: Watch,
        siblings: Siblings,
    ) -> None:
        self.hub_id = hub_id
        self._settings = settings
        self._auth = auth
        self._cells = cells
        self._scheduler = cells.main
        self._registry = registry
        self._nodes = nodes
        self._sessions = sessions
        self._metrics = metrics
        self._health = health
        self._watch = watch
        self._siblings = siblings
        self._grants: dict[ServerConnection, NodeGrant | SessionGrant] = {}
        self._per_ip: dict[str, int] = {}
        self.connections = 0
        """WebSocket connections open now."""

    # Public methods

    def snapshot(self) -> Snapshot:
        """The hub's gauges now, for ``/metrics``."""
        return Snapshot(
            nodes=len(self._registry.nodes),
            sessions=len(self._registry.sessions),
            ready=self._health.ready,
            script_calls=self._scheduler.calls,
            pipelines=self._scheduler.batches,
        )

    async def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """websockets' ``process_request``: answer the request, or None to accept it."""
        path = urlsplit(request.path).path
        if path == "/healthz":
            return respond(http.HTTPStatus.OK, b"ok\n")
        if path == "/readyz":
            if self._health.ready and not self._health.closing:
                return respond(http.HTTPStatus.OK, b"ready\n")
            return respond(http.HTTPStatus.SERVICE_UNAVAILABLE, b"not ready\n")
        if path == "/metrics":
            return await self._render_metrics()
        if path == "/v1/status":
            return await self._status(parse_qs(urlsplit(request.path).query).get("cell"))
        if path in ("/", "/demo", "/demo/"):
            return _static_page()
        if path in ("/dashboard", "/dashboard/"):
            return self._admin(ws, request, hint=_DASHBOARD_HINT) or _static_page("dashboard.html")
        if path in _DASHBOARD_FILES:
            return _static_page(*_DASHBOARD_FILES[path])
        if path not in (_NODE_PATH, _SESSION_PATH, _WATCH_PATH):
            return respond(http.HTTPStatus.NOT_FOUND, b"not found\n")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return respond(http.HTTPStatus.UPGRADE_REQUIRED, b"websocket endpoint\n")
        refusal = self._admit(ws, path, request)
        if refusal is not None:
            return refusal
        if path == _WATCH_PATH:
            if self._watch.full():
                self._metrics.job_refused("max_watchers")
                return respond(http.HTTPStatus.SERVICE_UNAVAILABLE, b"too many watchers\n")
            return self._admin(ws, request)
        try:
            if path == _NODE_PATH:
                grant: NodeGrant | SessionGrant = self._auth.node(request.headers)
            else:
                query = parse_qs(urlsplit(request.path).query)
                grant = self._auth.session(request.headers, query)
        except Unauthorized as exc:
            self._metrics.job_refused(Code.UNAUTHORIZED)
            return respond(
                http.HTTPStatus.UNAUTHORIZED,
                f"unauthorized: {exc.message}\n".encode(),
                extra=[("WWW-Authenticate", "Bearer")],
            )
        self._grants[ws] = grant
        return None

    async def handle(self, ws: ServerConnection) -> None:
        """websockets' connection handler: serve a node or a session until it closes."""
        ip = _peer_ip(ws)
        grant = self._grants.pop(ws, None)
        self.connections += 1
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        try:
            path = urlsplit(ws.request.path if ws.request else "/").path
            if path == _NODE_PATH:
                await self._nodes.serve(ws, grant if isinstance(grant, NodeGrant) else OPEN_NODE)
            elif path == _WATCH_PATH:
                await self._watch.serve(ws)
            else:
                await self._sessions.serve(
                    ws, grant if isinstance(grant, SessionGrant) else OPEN_SESSION
                )
        except ConnectionClosed:
            pass
        except Exception:
            # The only catch-all: log it, close with 1011.
            logger.error("! connection handler failed", exc_info=True)
            await ws.close(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self.connections -= 1
            left = self._per_ip[ip] - 1
            if left:
                self._per_ip[ip] = left
            else:
                del self._per_ip[ip]

    # Private methods

    def _admit(self, ws: ServerConnection, path: str, request: Request) -> Response | None:
        """Connection limits and origin checks; a refusal, or None to go on."""
        if self._health.closing:
            return respond(http.HTTPStatus.SERVICE_UNAVAILABLE, b"shutting down\n")
        s = self._settings
        if s.max_connections is not None and self.connections >= s.max_connections:
            self._metrics.job_refused("max_connections")
            return respond(http.HTTPStatus.SERVICE_UNAVAILABLE, b"too many connections\n")
        ip = _peer_ip(ws)
        if (
            s.max_connections_per_ip is not None
            and self._per_ip.get(ip, 0) >= s.max_connections_per_ip
        ):
            self._metrics.job_refused("max_connections_per_ip")
            return respond(
                http.HTTPStatus.TOO_MANY_REQUESTS, b"too many connections from this address\n"
            )
        if path == _NODE_PATH and "Origin" in request.headers:
            # Nodes are never browsers: a web page must not reach the node endpoint.
            self._metrics.job_refused("ORIGIN")
            return respond(http.HTTPStatus.FORBIDDEN, b"browsers cannot connect as nodes\n")
        if path == _WATCH_PATH and not _same_origin(request.headers, s.allowed_origins):
            # Another site's page must not read the stream with the operator's access.
            self._metrics.job_refused("ORIGIN")
            return respond(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n")
        if path == _SESSION_PATH and s.allowed_origins is not None:
            origin = request.headers.get("Origin")
            if origin is not None and origin not in s.allowed_origins:
                self._metrics.job_refused("ORIGIN")
                return respond(http.HTTPStatus.FORBIDDEN, b"origin not allowed\n")
        return None

    def _admin(self, ws: ServerConnection, request: Request, hint: bytes = b"") -> Response | None:
        """The dashboard's access rule (SECURITY.md); a refusal, or None to go on.

        An admin token when ``admin_token_key`` is set; else nobody when
        nodes or sessions authenticate, and only loopback peers in open mode.
        ``hint`` follows the reason of a ``401`` (the page's: how to open it).
        """
        if self._auth.admin_auth:
            try:
                self._auth.admin(request.headers, parse_qs(urlsplit(request.path).query))
            except Unauthorized as exc:
                self._metrics.job_refused(Code.UNAUTHORIZED)
                return respond(
                    http.HTTPStatus.UNAUTHORIZED,
                    f"unauthorized: {exc.message}\n".encode() + hint,
                    extra=[("WWW-Authenticate", "Bearer")],
                )
            return None
        if self._auth.node_auth or self._auth.session_auth:
            self._metrics.job_refused("ADMIN")
            return respond(
                http.HTTPStatus.FORBIDDEN,
                b"the dashboard needs admin_token_key when auth is enabled\n",
            )
        if not _is_loopback(_peer_ip(ws)):
            self._metrics.job_refused("ADMIN")
            return respond(
                http.HTTPStatus.FORBIDDEN, b"open mode: the dashboard answers loopback only\n"
            )
        return None

    async def _render_metrics(self) -> Response:
        """This hub's metrics; a worker's merged with its siblings' (hub/siblings.py)."""
        body, content_type = self._metrics.render(self.snapshot())
        if self._siblings.ids:
            try:
                others = await self._siblings.metrics()
            except RedisUnavailable as exc:
                logger.warning("! /metrics without the sibling workers': %s", exc)
                others = []
            body = merge_expositions(sorted([(self.hub_id, body), *others]))
        return respond(http.HTTPStatus.OK, body, content_type)

    async def _status(self, wanted: list[str] | None) -> Response:
        cell = wanted[0] if wanted else self._cells.default
        if cell not in self._cells:
            return respond(
                http.HTTPStatus.NOT_FOUND,
                orjson.dumps({"hub_id": self.hub_id, "error": Code.UNKNOWN_CELL}),
                "application/json",
            )
        try:
            state = await self._cells[cell].status()
            view = await self._cells[cell].hub_view()
        except RedisUnavailable:
            return respond(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                orjson.dumps({"hub_id": self.hub_id, "error": Code.UNAVAILABLE}),
                "application/json",
            )
        body = {
            "hub_id": self.hub_id,
            "cell": cell,
            "cells": list(self._cells.names),
            "ready": self._health.ready,
            "connections": {
                "nodes": len(self._registry.nodes),
                "sessions": len(self._registry.sessions),
            },
            **state,
            "hubs": [_hub_entry(h, r) for h, r in sorted(view.records.items())],
            "hub_counters": self._metrics.snapshot(),
        }
        return respond(http.HTTPStatus.OK, orjson.dumps(body), "application/json")


def _hub_entry(hub_id: str, record: bytes) -> dict[str, Any]:
    """One live hub in ``/v1/status``, from its record (hub/watch.py)."""
    figures = orjson.loads(record)
    return {
        "hub_id": hub_id,
        "group": figures.get("group", hub_id),
        "pid": figures.get("pid"),
        "nodes": figures.get("nodes", 0),
        "sessions": figures.get("sessions", 0),
        "ready": bool(figures.get("ready")),
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


def respond(
    status: http.HTTPStatus,
    body: bytes,
    content_type: str = "text/plain",
    extra: list[tuple[str, str]] | None = None,
) -> Response:
    """An HTTP response that is never cached."""
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *(extra or []),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


class RedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets' logger minus credentials and minus a traceback any client can cause.

    At DEBUG websockets logs request lines and headers: tokens are redacted.

    websockets 17 logs "unexpected internal error" at ERROR with a traceback
    (an ``AssertionError`` in ``send_eof``) whenever a client sends bytes
    after its request line and headers before the server's HTTP response
    other than 101 (a pipelined second request, or anything sent while
    ``/v1/status`` waits for Redis). The library then closes the connection,
    and the hub is fine, but any client could fill the logs with tracebacks.
    Those records become one WARNING line on ``hub.gate`` per
    ``noise_window_s``, with the number of such clients since the last line.

    Args:
        logger: websockets' server logger.
        noise_window_s: at most one warning about those clients per this many seconds.
        clock: the clock of the window (``time.monotonic``; tests pass another).
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        noise_window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(logger)
        self.noise_window_s = noise_window_s
        self._clock = clock
        self._noise_logged_at: float | None = None
        self.noise_suppressed = 0
        """Such records since the last warning, not logged."""
        self.noise_total = 0
        """Such records since the hub started."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR and kwargs.get("exc_info") and _bytes_before_response():
            self._early_bytes()
            return
        if level == logging.DEBUG and msg == "< %s: %s" and len(args) == 2:
            if str(args[0]).lower() in ("authorization", "cookie"):
                args = (args[0], "***")
        elif level == logging.DEBUG and msg == "< %s %s %s" and len(args) == 3:
            args = (args[0], _TOKEN_IN_QUERY.sub(r"\1***", str(args[1])), args[2])
        super().log(level, msg, *args, **kwargs)

    def _early_bytes(self) -> None:
        self.noise_total += 1
        now = self._clock()
        last = self._noise_logged_at
        if last is not None and now - last < self.noise_window_s:
            self.noise_suppressed += 1
            return
        self._noise_logged_at = now
        suppressed, self.noise_suppressed = self.noise_suppressed, 0
        logger.warning(
            "! a client sent bytes before the hub's HTTP response; websockets closed "
            "its connection (%d more since the last such warning; at most one per %g s)",
            suppressed,
            self.noise_window_s,
        )


def _bytes_before_response() -> bool:
    """Whether the exception being handled is websockets' second ``send_eof``.

    It is an ``AssertionError`` raised in ``websockets/protocol.py``'s
    ``send_eof`` when a response follows a parse error on the same connection.
    """
    exc = sys.exc_info()[1]
    if type(exc) is not AssertionError or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return code.co_name == "send_eof" and "websockets" in code.co_filename


_TOKEN_IN_QUERY = re.compile(r"([?&](?:token|resume_token)=)[^&]*")


def _peer_ip(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and address:
        try:
            return str(ipaddress.ip_address(address[0]))
        except ValueError:
            return str(address[0])
    return "local"


def _same_origin(headers: Headers, allowed: tuple[str, ...] | None) -> bool:
    """Whether a request comes from no browser, the hub's own pages, or an allowed origin."""
    origin = headers.get("Origin")
    if origin is None:
        return True
    host = headers.get("Host", "")
    if origin in (f"http://{host}", f"https://{host}"):
        return True
    return allowed is not None and origin in allowed


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "local"  # a Unix socket


def _static_page(
    name: str = "demo.html", content_type: str = "text/html; charset=utf-8"
) -> Response:
    from importlib import resources

    try:
        body = resources.files("hub.static").joinpath(name).read_bytes()
    except (FileNotFoundError, ModuleNotFoundError):
        return respond(http.HTTPStatus.NOT_FOUND, b"page not installed\n")
    return respond(http.HTTPStatus.OK, body, content_type)
