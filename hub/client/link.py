"""What both SDK clients share: one WebSocket to a hub, opened again and again.

:class:`Link` connects, lets the client greet the hub (a node registers, a
session waits for ``welcome``), feeds each decoded frame to the client, and
after a drop connects again with exponential backoff and full jitter, until
the client stops or the hub refuses it for good (protocol.md §7).

A client given several hub URLs walks them in its own order
(:func:`~hub.client.transport.hub_order`). It stays on its hub while that
hub serves it, and moves to the next URL when the hub cannot be reached or
is going away (:data:`FAILOVER_CLOSE_CODES`, or no close frame at all: the
hub died or the network cut). Every other close is retried on the same hub.
Attempts within one round of the URLs wait a first backoff delay; each
round that failed entirely raises the bound, as one failed attempt does for
a single URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import CloseCode as WsCloseCode

from ..errors import ProtocolError
from ..protocol import CloseCode
from .backoff import Backoff
from .errors import ConnectionRejected
from .transport import auth_headers, close_of, handshake_status, hub_order

__all__ = ["FAILOVER_CLOSE_CODES", "FATAL_CLOSE_CODES", "Link"]

FATAL_CLOSE_CODES = frozenset(
    {
        CloseCode.POLICY_VIOLATION,
        CloseCode.MESSAGE_TOO_BIG,
        CloseCode.REPLACED,
        CloseCode.UNKNOWN_CELL,
    }
)
"""protocol.md §7: do not reconnect unchanged after these."""
FAILOVER_CLOSE_CODES = frozenset(
    {
        CloseCode.GOING_AWAY,  # the hub shuts down
        WsCloseCode.ABNORMAL_CLOSURE,  # no close frame: the hub died, or the network cut
        CloseCode.INTERNAL_ERROR,  # a bug on that hub
        WsCloseCode.SERVICE_RESTART,  # a proxy or the hub restarts
        CloseCode.TRY_AGAIN_LATER,  # that hub cannot reach Redis right now
        WsCloseCode.BAD_GATEWAY,  # a proxy cannot reach the hub
    }
)
"""protocol.md §8: close codes after which a client given several hubs tries the next.

``4007`` (bad resume token) is not one: the token is refused by every hub
of the cell, so the session starts afresh instead (on the same hub).
"""
_FATAL_HTTP_STATUSES = frozenset({401, 403})
_CLOSE_TIMEOUT_S = 2.0
"""How long a closing connection waits for the hub's close before dropping the socket."""

FrameT = TypeVar("FrameT")


class Link(Generic[FrameT]):
    """The connection machinery of a client; subclasses say what to send and read.

    A subclass implements :meth:`_greet` (the first frames of each
    connection), :meth:`_decode` and :meth:`_on_frame` (every later frame),
    and may implement :meth:`_label`, :meth:`_done` and :meth:`_closed`.

    Args:
        urls: the hubs' endpoint URLs (at least one, no repeats).
        token: sent as ``Authorization: Bearer <token>`` when not ``None``.
        backoff: delays between reconnection attempts (default :class:`Backoff`()).
        open_timeout_s: timeout of the WebSocket handshake.
        max_frame_bytes: largest message accepted from the hub.
        logger: where the client logs its connections.
        ping_interval_s: the client pings the hub this often (``None``: never).
        ping_timeout_s: a ping unanswered this long ends the connection, which
            is then opened again (``None``: wait for ever). A dead link (no
            FIN, no RST) is noticed within ``ping_interval_s + ping_timeout_s``
            plus the 2 s close timeout.
        spread: walk ``urls`` in an order of the client's own
            (:func:`~hub.client.transport.hub_order` with ``spread_key``);
            ``False`` tries them in the order given (a preferred hub first).
        spread_key: the key of that order; ``None`` for a random one.
        on_connected: called with the client after each greeted connection.
        on_frame: called with the client and each frame it reads after the
            greeting, before the client acts on it (tracing, tests).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        token: str | None,
        backoff: Backoff | None,
        open_timeout_s: float,
        max_frame_bytes: int,
        logger: logging.Logger,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        spread: bool = True,
        spread_key: str | None = None,
        on_connected: Callable[[Any], None] | None = None,
        on_frame: Callable[[Any, FrameT], None] | None = None,
    ) -> None:
        self._rng = random.Random()
        self.urls = hub_order(urls, spread_key, self._rng) if spread else list(urls)
        """The hubs' endpoints, in the order this client tries them."""
        self._at = 0  # index in urls of the current (or next) hub
        self.backoff = backoff or Backoff()
        self.open_timeout_s = open_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.on_connected = on_connected
        """Called with the client after each greeted connection."""
        self.on_frame = on_frame
        """Called with the client and each frame read after the greeting."""
        self.hub_id: str | None = None
        """Id of the hub of the current (or last) connection."""
        self.connections = 0
        """How many connections the hub greeted so far."""
        self._token = token
        self._logger = logger
        self._ws: ClientConnection | None = None  # set while greeted
        self._up = asyncio.Event()  # set while greeted
        self._stopping = asyncio.Event()
        self._run_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        """The endpoint of the current hub (or of the next one tried)."""
        return self.urls[self._at]

    async def close(self) -> None:
        """Stop the client and close its connection."""
        raise NotImplementedError

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # Hooks

    async def _greet(self, ws: ClientConnection) -> None:
        """Exchange the first frames of a connection; set :attr:`_ws` and :attr:`_up` once done.

        Raises:
            ConnectionRejected: when the hub refuses the client for good.
            TimeoutError: when the hub does not answer in time.
        """
        raise NotImplementedError

    def _decode(self, message: str | bytes) -> FrameT:
        """Read one message from the hub.

        Raises:
            ProtocolError: for a malformed frame, which is logged and dropped.
        """
        raise NotImplementedError

    def _on_frame(self, ws: ClientConnection, frame: FrameT) -> None:
        """Act on one frame from the hub, after the greeting."""
        raise NotImplementedError

    def _label(self) -> str:
        """Who the client is, in log lines."""
        return type(self).__name__

    def _done(self, code: int | None) -> bool:
        """Whether to stop rather than reconnect after a close with ``code``."""
        return False

    def _closed(self, code: int | None) -> None:
        """Act on a close with ``code`` that is not fatal, before reconnecting."""

    def _endpoint(self) -> str:
        """The URL of the next connection."""
        return self.url

    # Connections

    async def _dial(self) -> ClientConnection:
        """Open a WebSocket to the hub.

        Raises:
            ConnectionRejected: for a bad URL, or a handshake refused with 401 or 403.
            OSError, TimeoutError, InvalidHandshake: when retrying may help.
        """
        try:
            return await connect(
                self._endpoint(),
                additional_headers=auth_headers(self._token),
                open_timeout=self.open_timeout_s,
                max_size=self.max_frame_bytes,
                compression=None,
                close_timeout=_CLOSE_TIMEOUT_S,
                ping_interval=self.ping_interval_s,
                ping_timeout=self.ping_timeout_s,
            )
        except InvalidURI as exc:
            raise ConnectionRejected("URL", str(exc)) from exc
        except InvalidHandshake as exc:
            status = handshake_status(exc)
            if status in _FATAL_HTTP_STATUSES:
                raise ConnectionRejected(status or 0, str(exc)) from exc
            raise

    async def _open(self) -> ClientConnection:
        """Open a WebSocket to the hub and greet it.

        Raises:
            ConnectionRejected: when the hub refuses the client for good.
            OSError, TimeoutError, InvalidHandshake, ConnectionClosed: when
                retrying may help.
        """
        ws = await self._dial()
        try:
            await self._greet(ws)
        except BaseException:
            await ws.close()
            raise
        if self.on_connected is not None:
            self.on_connected(self)
        return ws

    async def _open_any(self) -> ClientConnection:
        """Open and greet a connection to the first hub that answers, in one round of the URLs.

        Raises:
            ConnectionRejected: when a hub refuses the client for good.
            OSError, TimeoutError, InvalidHandshake, ConnectionClosed: what
                the last hub tried raised, when none answered; a close that
                does not call for another hub is raised at once.
        """
        for tries_left in range(len(self.urls) - 1, -1, -1):
            try:
                return await self._open()
            except ConnectionClosed as exc:
                code = close_of(exc)[0]
                if tries_left == 0 or not _fails_over(code):
                    raise
                self._logger.warning(
                    "! %s: %s closed the connection (%s)", self._label(), self.url, code
                )
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                if tries_left == 0:
                    raise
                self._logger.warning(
                    "! %s cannot connect to %s: %s", self._label(), self.url, exc or "timeout"
                )
            self._next_hub()
        raise AssertionError("unreachable: the last try returns or raises")

    def _next_hub(self) -> None:
        """Move on to the next URL (protocol.md §8)."""
        if len(self.urls) > 1:
            self._at = (self._at + 1) % len(self.urls)
            self._logger.info("= %s trying hub %s next", self._label(), self.url)

    async def _reconnect(self, ws: ClientConnection | None = None) -> None:
        """Serve connections until :attr:`_stopping` is set or :meth:`_done` says so.

        Args:
            ws: a connection the hub already greeted, served first.

        Raises:
            ConnectionRejected: when the hub refuses the client for good.
        """
        failures = 0  # attempts since the last greeted connection
        while not self._stopping.is_set():
            greeted_before = self.connections
            code = await (self._connect_once() if ws is None else self._connect_once(ws))
            ws = None
            if self._stopping.is_set() or self._done(code):
                return
            failures = 1 if self.connections > greeted_before else failures + 1
            if _fails_over(code):
                self._next_hub()
            # Bounded: each round of the URLs that failed raises the bound once.
            rounds = -(-failures // len(self.urls))
            delay = self.backoff.delay_s(rounds, self._rng)
            self._logger.info("= %s reconnecting in %.2f s", self._label(), delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

    async def _connect_once(self, ws: ClientConnection | None = None) -> int | None:
        """One connection from handshake to close.

        Args:
            ws: a connection the hub already greeted, or ``None`` to open one.

        Returns:
            The close code, or ``None`` when no connection opened.

        Raises:
            ConnectionRejected: when the hub refuses the client for good.
        """
        if ws is None:
            try:
                ws = await self._open()
            except ConnectionClosed as exc:  # during the greeting
                return self._after_close(*close_of(exc))
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                self._logger.warning(
                    "! %s cannot connect to %s: %s", self._label(), self.url, exc or "timeout"
                )
                return None  # fails over, as a hub that died
        try:
            await self._serve(ws)
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._up.clear()
            await ws.close()
        return self._after_close(ws.close_code, ws.close_reason or "")

    def _after_close(self, code: int | None, reason: str) -> int | None:
        if self._stopping.is_set():
            return code
        self._logger.info("= %s disconnected (%s %s)", self._label(), code, reason)
        if code in FATAL_CLOSE_CODES:
            raise ConnectionRejected(code or 0, reason)
        self._closed(code)
        return code

    async def _serve(self, ws: ClientConnection) -> None:
        while True:
            message = await ws.recv()
            try:
                frame = self._decode(message)
            except ProtocolError as exc:  # a bad frame is logged, not fatal
                self._logger.warning("! %s dropped a bad frame: %s", self._label(), exc)
                continue
            if self.on_frame is not None:
                self.on_frame(self, frame)
            self._on_frame(ws, frame)

    async def _send(self, frame: bytes, ws: ClientConnection | None = None) -> bool:
        """Send a text frame (UTF-8 JSON) on ``ws``, by default the greeted connection.

        Returns:
            Whether it was sent: ``False`` without a connection or when it closed.
        """
        return await self._send_message(frame, ws, text=True)

    async def _send_binary(self, frame: bytes, ws: ClientConnection | None = None) -> bool:
        """Send a binary frame; returns as :meth:`_send`."""
        return await self._send_message(frame, ws, text=False)

    async def _send_message(self, frame: bytes, ws: ClientConnection | None, *, text: bool) -> bool:
        if ws is None:
            ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(frame, text=text)
        except ConnectionClosed:
            return False
        return True

    # Tasks

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shut_down(self, timeout_s: float) -> None:
        """Close the connection and wait for the background task; cancel the rest."""
        self._stopping.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
        task = self._run_task
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
        for t in list(self._tasks):
            t.cancel()


def _fails_over(code: int | None) -> bool:
    """Whether a connection that ended with ``code`` calls for the next hub.

    ``None``: no connection opened, or it closed without a close frame.
    """
    return code is None or code in FAILOVER_CLOSE_CODES
