"""HTTP/1.1 on the hub's port, beside the WebSockets: the switch and the connections.

websockets answers HTTP only as far as a handshake needs: one ``GET``
without a body, then the connection is closed unless it upgrades. The job
API (protocol.md §11) needs ``POST`` with a body, ``DELETE`` and keep-alive,
so a connection is switched before websockets parses anything:
:class:`HttpServer.connection_class` is a :class:`~hub.wsconn.HubConnection`
that reads the request line first. A request for ``/v1/jobs...``, or any
method other than ``GET``, hands the transport to an :class:`HttpConnection`;
everything else goes to websockets as before (the WebSocket endpoints, the
status and health routes of :mod:`hub.gate`).

:class:`HttpConnection` is built on h11, a Sans-I/O HTTP/1.1 parser (the one
under uvicorn, httpcore and httpx): the same shape as the hub's own
protocol layer (bytes in, events out), strict about the grammar, and
bounded (``max_incomplete_event_size`` caps a request head). The hub adds
the rest:

- one request at a time: reading stops while a request is being answered,
  so a pipelining client buffers at most one read of the socket here;
- a body larger than ``max_body_bytes`` is refused ``413`` as soon as its
  length is known, and its bytes are read and dropped (a short lingering
  close) so that the client reads the answer instead of a reset;
- a request whose head and body are not whole within ``idle_timeout_s``,
  or a keep-alive connection silent for as long, is closed;
- a client that does not read its responses stops being read.

A second port would have needed none of this, but also a second listener,
port setting, firewall and load balancer rule per hub: on one port, a
deployment that reaches the WebSockets reaches the job API.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import h11
import orjson

from .errors import Code
from .wsconn import HubConnection

__all__ = [
    "HTTP_STATUS",
    "HttpConnection",
    "HttpRequest",
    "HttpResponse",
    "HttpServer",
    "error_response",
]

logger = logging.getLogger("hub.httpconn")

_MAX_HEAD_BYTES = 16 * 1024
"""Largest request line plus headers (h11's ``max_incomplete_event_size``)."""
_LINGER_S = 2.0
"""How long the bytes of a refused body are read and dropped before closing."""
_JOBS_PATH = b"/v1/jobs"


HTTP_STATUS: dict[Code, http.HTTPStatus] = {
    # The request itself is wrong: sending it again unchanged cannot help.
    Code.BAD_FRAME: http.HTTPStatus.BAD_REQUEST,
    Code.UNKNOWN_TYPE: http.HTTPStatus.BAD_REQUEST,
    Code.TOO_LARGE: http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    Code.UNAUTHORIZED: http.HTTPStatus.UNAUTHORIZED,
    Code.UNKNOWN_JOB: http.HTTPStatus.NOT_FOUND,
    Code.UNKNOWN_CELL: http.HTTPStatus.NOT_FOUND,
    Code.NO_POOL_FOR_LANG_PAIR: http.HTTPStatus.UNPROCESSABLE_ENTITY,
    # The state of the job or of the client's connection forbids it.
    Code.STALE_ATTEMPT: http.HTTPStatus.CONFLICT,
    Code.DUPLICATE_REF: http.HTTPStatus.CONFLICT,
    Code.NODE_MISMATCH: http.HTTPStatus.CONFLICT,
    Code.NOT_REGISTERED: http.HTTPStatus.CONFLICT,
    Code.ALREADY_REGISTERED: http.HTTPStatus.CONFLICT,
    # The client goes too fast: Retry-After.
    Code.RATE_LIMITED: http.HTTPStatus.TOO_MANY_REQUESTS,
    Code.TOO_MANY_JOBS: http.HTTPStatus.TOO_MANY_REQUESTS,
    # The fleet or the hub cannot take the job now: Retry-After.
    Code.EMPTY_POOL: http.HTTPStatus.SERVICE_UNAVAILABLE,
    Code.NO_AVAILABLE_NODE: http.HTTPStatus.SERVICE_UNAVAILABLE,
    Code.QUEUE_FULL: http.HTTPStatus.SERVICE_UNAVAILABLE,
    Code.OVERLOADED: http.HTTPStatus.SERVICE_UNAVAILABLE,
    Code.UNAVAILABLE: http.HTTPStatus.SERVICE_UNAVAILABLE,
    Code.INTERNAL: http.HTTPStatus.INTERNAL_SERVER_ERROR,
    # Outcomes of a job, never a refusal: the job's "error" in a 200 body.
    Code.JOB_TIMEOUT: http.HTTPStatus.OK,
    Code.NODE_LOST: http.HTTPStatus.OK,
    Code.CANCELLED: http.HTTPStatus.OK,
    Code.AUDIO_LOST: http.HTTPStatus.OK,
    Code.JOB_LOST: http.HTTPStatus.OK,
}
"""The HTTP status of each protocol code (protocol.md §11.5)."""

_DEFAULT_RETRY_AFTER_MS = 1000
"""Retry-After of a 429 or 503 that names no time of its own."""


@dataclasses.dataclass(frozen=True, slots=True)
class HttpRequest:
    """A whole request read from an :class:`HttpConnection`."""

    method: str
    target: str
    """The request target as sent: path and query."""
    headers: dict[str, str]
    """Header values by lowercased name (the last of repeated headers)."""
    body: bytes
    peer: str
    """The client's address (IP, or ``"local"``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class HttpResponse:
    """An answer for :meth:`HttpConnection` to send."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False
    """Close the connection after this response."""


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
"""Answers one request; it may wait (a job's result), never raises on purpose."""


def error_response(
    code: Code,
    message: str,
    *,
    status: http.HTTPStatus | None = None,
    retry_after_ms: int | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    close: bool = False,
) -> HttpResponse:
    """The JSON error of protocol.md §11.5: ``{"code", "message"}`` and its status.

    A ``429`` or ``503`` carries ``Retry-After`` (whole seconds, at least 1);
    an ``OVERLOADED`` refusal also ``retry_after_ms`` in its body, as its
    error frame does (§4.9).

    Args:
        code: the protocol code.
        message: English text for humans.
        status: instead of the code's own (:data:`HTTP_STATUS`).
        retry_after_ms: how long the client should wait before trying again.
        headers: more headers.
        close: close the connection after the response.
    """
    status = status or HTTP_STATUS[code]
    body: dict[str, object] = {"code": code, "message": message}
    if code is Code.OVERLOADED and retry_after_ms is not None:
        body["retry_after_ms"] = retry_after_ms
    if status in (http.HTTPStatus.TOO_MANY_REQUESTS, http.HTTPStatus.SERVICE_UNAVAILABLE):
        seconds = max(1, math.ceil((retry_after_ms or _DEFAULT_RETRY_AFTER_MS) / 1000))
        headers = (*headers, ("Retry-After", str(seconds)))
    return HttpResponse(status.value, orjson.dumps(body), headers=headers, close=close)


class HttpServer:
    """The HTTP connections of one hub: their limits, their handler, their shutdown.

    Args:
        handler: answers each request.
        max_body_bytes: largest request body; a larger one gets ``413``.
        idle_timeout_s: how long a request may take to arrive whole, and a
            keep-alive connection may stay silent.
        switch_timeout_s: how long a new connection may take to send its
            request line before it is dropped (websockets' open timeout).
        max_connections: most HTTP connections open at once (``None``:
            unlimited); past it a request gets ``503``.
        max_connections_per_ip: most per client address; past it ``429``.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        idle_timeout_s: float,
        switch_timeout_s: float,
        max_connections: int | None,
        max_connections_per_ip: int | None,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.switch_timeout_s = switch_timeout_s
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.connections: set[HttpConnection] = set()
        """HTTP connections open now."""
        self.closing = False
        """Set by :meth:`close`: each connection closes after its current answer."""
        self._per_ip: dict[str, int] = {}

    # Public methods

    def connection_class(self) -> type[HubConnection]:
        """The connection class for ``websockets.serve(create_connection=...)``.

        A :class:`~hub.wsconn.HubConnection` that reads the request line
        before websockets does, and hands job API requests to this server.
        """
        return _switching(self)

    def accept(self, transport: asyncio.Transport, head: bytes) -> None:
        """Serve a connection switched away from websockets, with the bytes read so far."""
        peer = _peer_ip(transport)
        refusal = self._refusal(peer)
        conn = HttpConnection(self, peer, refusal)
        self.connections.add(conn)
        self._per_ip[peer] = self._per_ip.get(peer, 0) + 1
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if head:  # (empty bytes would mean the end of the stream to h11)
            conn.data_received(head)

    def forget(self, conn: HttpConnection) -> None:
        """Drop a connection that closed."""
        if conn in self.connections:
            self.connections.discard(conn)
            left = self._per_ip[conn.peer] - 1
            if left:
                self._per_ip[conn.peer] = left
            else:
                del self._per_ip[conn.peer]

    async def close(self, timeout_s: float) -> None:
        """Close idle connections, let busy ones answer, abort what is left after ``timeout_s``."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                # Bounded by the timeout; each answer closes its connection.
                while self.connections:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()

    # Private methods

    def _refusal(self, peer: str) -> HttpResponse | None:
        if self.max_connections is not None and len(self.connections) >= self.max_connections:
            return error_response(
                Code.OVERLOADED, "too many HTTP connections to this hub", close=True
            )
        limit = self.max_connections_per_ip
        if limit is not None and self._per_ip.get(peer, 0) >= limit:
            return error_response(
                Code.RATE_LIMITED,
                "too many HTTP connections from this address",
                status=http.HTTPStatus.TOO_MANY_REQUESTS,
                close=True,
            )
        return None


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection, read with h11, answered by its server's handler.

    Args:
        server: its server (handler, limits, shutdown).
        peer: the client's address.
        refusal: the answer to every request (a connection over the limits).
    """

    def __init__(self, server: HttpServer, peer: str, refusal: HttpResponse | None) -> None:
        self.peer = peer
        self._server = server
        self._refusal = refusal
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)
        self._transport: asyncio.Transport | None = None
        self._request: h11.Request | None = None
        self._body = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._paused_writing = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance.
        self._transport = cast(asyncio.Transport, transport)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a refused body
        try:
            self._h11.receive_data(data)
        except RuntimeError:
            return  # h11 already closed its side: the transport is closing
        self._next()

    def eof_received(self) -> bool | None:
        if self._lingering:
            return None
        try:
            self._h11.receive_data(b"")
        except RuntimeError:
            return None
        self._next()
        # Keep the transport open while a request is answered (a half-close).
        return True if self._task is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_timer()
        if self._task is not None:
            # The client went away: stop waiting for the job (it runs on).
            self._task.cancel()
        self._server.forget(self)

    def pause_writing(self) -> None:
        # A client that does not read its answers is not read either.
        self._paused_writing = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._task is None and self._transport is not None:
            self._transport.resume_reading()
            self._next()

    # Public methods

    def close_when_idle(self) -> None:
        """Close now if no request is being answered, else after its answer."""
        if self._task is None and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        if self._transport is not None:
            self._transport.abort()

    # Private methods

    def _next(self) -> None:
        """Read the events h11 has, up to the next whole request, and answer it."""
        h = self._h11
        while self._task is None and not self._paused_writing and not self._lingering:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                code = (
                    Code.TOO_LARGE
                    if status == http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
                    else Code.BAD_FRAME
                )
                message = f"bad HTTP request: {exc}"
                self._fail(error_response(code, message, status=http.HTTPStatus(status)))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            kind = type(event)
            if kind is h11.Request:
                assert isinstance(event, h11.Request)
                self._request = event
                self._body.clear()
                if sum(len(n) + len(v) + 4 for n, v in event.headers) > _MAX_HEAD_BYTES:
                    # h11 bounds a head that comes in pieces; one read can bring more.
                    status = http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
                    message = "the request head is too large"
                    self._fail(error_response(Code.TOO_LARGE, message, status=status))
                    return
                if self._too_large(_content_length(event.headers)):
                    return
                if h.they_are_waiting_for_100_continue:
                    self._write(h.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif kind is h11.Data:
                assert isinstance(event, h11.Data)
                self._body += event.data
                if self._too_large(len(self._body)):
                    return
            elif kind is h11.EndOfMessage:
                self._dispatch()
            elif kind is h11.ConnectionClosed:
                self._close()
                return

    def _too_large(self, size: int | None) -> bool:
        """Refuse the request (413) when its body is over the limit."""
        limit = self._server.max_body_bytes
        if size is None or size <= limit:
            return False
        self._fail(error_response(Code.TOO_LARGE, f"the body is larger than {limit} bytes"))
        return True

    def _dispatch(self) -> None:
        request = self._request
        assert request is not None and self._transport is not None
        self._disarm_timer()
        self._transport.pause_reading()
        req = HttpRequest(
            request.method.decode("ascii", "replace"),
            request.target.decode("latin-1"),
            {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers},
            bytes(self._body),
            self.peer,
        )
        self._body.clear()
        self._task = asyncio.get_running_loop().create_task(self._answer(req))

    async def _answer(self, request: HttpRequest) -> None:
        try:
            response = self._refusal
            if response is None:
                response = await self._server.handler(request)
        except Exception:
            # The only catch-all of an HTTP request: our bug, logged, never sent.
            logger.error("! HTTP handler failed", exc_info=True)
            response = error_response(Code.INTERNAL, "internal error")
        self._task = None
        self._respond(response, head_only=request.method == "HEAD")
        if self._h11.our_state is h11.MUST_CLOSE or self._server.closing:
            self._close()
            return
        self._h11.start_next_cycle()
        self._arm_timer()
        transport = self._transport
        if transport is not None and not transport.is_closing() and not self._paused_writing:
            transport.resume_reading()
            self._next()

    def _respond(self, response: HttpResponse, *, head_only: bool = False) -> None:
        h = self._h11
        if h.our_state is not h11.SEND_RESPONSE and h.our_state is not h11.IDLE:
            return  # IDLE: the request could not be read (h11 allows an answer)
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            *response.headers,
        ]
        if response.close or self._server.closing:
            headers.append(("Connection", "close"))
        try:
            reason = http.HTTPStatus(response.status).phrase.encode()
            data = h.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
            if response.body and not head_only:
                data = (data or b"") + (h.send(h11.Data(data=response.body)) or b"")
            data = (data or b"") + (h.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            logger.warning("! could not answer an HTTP request", exc_info=True)
            self.abort()
            return
        self._write(data)

    def _fail(self, response: HttpResponse) -> None:
        """Answer a request that cannot be read on, then close (lingering)."""
        self._respond(dataclasses.replace(response, close=True))
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        # Read and drop what the client still sends, so that it reads the answer
        # rather than a reset; at most _LINGER_S.
        self._lingering = True
        self._disarm_timer()
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(_LINGER_S, transport.close)

    def _write(self, data: bytes | None) -> None:
        transport = self._transport
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def _close(self) -> None:
        self._disarm_timer()
        if self._transport is not None:
            self._transport.close()

    def _arm_timer(self) -> None:
        self._disarm_timer()
        self._timer = asyncio.get_running_loop().call_later(
            self._server.idle_timeout_s, self._timed_out
        )

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._task is not None:
            return
        if self._h11.their_state is h11.IDLE and not self._h11.trailing_data[0]:
            self._close()  # keep-alive, silent: nothing to answer
            return
        self._fail(
            error_response(
                Code.BAD_FRAME,
                "the request did not arrive in time",
                status=http.HTTPStatus.REQUEST_TIMEOUT,
            )
        )


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _peer_ip(transport: asyncio.BaseTransport) -> str:
    address = transport.get_extra_info("peername")
    if isinstance(address, tuple) and address:
        try:
            return str(ipaddress.ip_address(address[0]))
        except ValueError:
            return str(address[0])
    return "local"


def _is_job_api(line: bytes) -> bool:
    """Whether a request line goes to the HTTP server rather than to websockets."""
    method, _, rest = line.partition(b" ")
    target = rest.partition(b" ")[0]
    path = target.partition(b"?")[0]
    return method != b"GET" or path == _JOBS_PATH or path.startswith(_JOBS_PATH + b"/")


_MAX_REQUEST_LINE = 8 * 1024
"""Bytes read for a request line before the switch gives up looking for its end
(h11 then refuses the request)."""


def _switching(server: HttpServer) -> type[HubConnection]:
    class SwitchingConnection(HubConnection):
        """A hub connection that reads the request line before websockets parses.

        Until the line is whole, websockets has not seen the connection at all
        (its ``connection_made`` is deferred, so no handler task exists); a
        client silent for ``switch_timeout_s`` is dropped, as websockets'
        open timeout would.
        """

        _head: bytearray | None = None
        _switch_transport: asyncio.Transport | None = None
        _switch_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self._head = bytearray()
            self._switch_transport = t = cast(asyncio.Transport, transport)
            self._switch_timer = self.loop.call_later(server.switch_timeout_s, t.abort)

        def data_received(self, data: bytes) -> None:
            head = self._head
            if head is None:
                super().data_received(data)
                return
            head += data
            end = head.find(b"\n")
            if end < 0 and len(head) < _MAX_REQUEST_LINE:
                return
            transport = self._switch_transport
            assert transport is not None and self._switch_timer is not None
            self._switch_timer.cancel()
            self._head = self._switch_transport = self._switch_timer = None
            if _is_job_api(bytes(head[:end]).rstrip(b"\r")):
                server.accept(transport, bytes(head))
                return
            # websockets' own from here on: the handshake, then frames.
            super().connection_made(transport)
            super().data_received(bytes(head))

        def eof_received(self) -> None:
            if self._head is not None:
                return  # closed before a request line: close our side too
            super().eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head is not None:
                if self._switch_timer is not None:
                    self._switch_timer.cancel()
                self._head = self._switch_transport = self._switch_timer = None
                return
            super().connection_lost(exc)

    return SwitchingConnection
