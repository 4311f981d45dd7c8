"""What both SDK clients share: one WebSocket to a hub, opened again and again.

:class:`Link` connects, lets the client greet the hub (a node registers, a
session waits for ``welcome``), feeds each decoded frame to the client, and
after a drop connects again with exponential backoff and full jitter, until
the client stops or the hub refuses it for good (protocol.md §7).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable
from typing import Any, Generic, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ..errors import ProtocolError
from ..protocol import CloseCode
from .backoff import Backoff
from .errors import ConnectionRejected
from .transport import auth_headers, close_of, handshake_status

__all__ = ["FATAL_CLOSE_CODES", "Link"]

FATAL_CLOSE_CODES = frozenset(
    {CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG, CloseCode.REPLACED}
)
"""protocol.md §7: do not reconnect unchanged after these."""
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
        url: the hub's endpoint URL.
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
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None,
        backoff: Backoff | None,
        open_timeout_s: float,
        max_frame_bytes: int,
        logger: logging.Logger,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
    ) -> None:
        self.url = url
        """The hub's endpoint."""
        self.backoff = backoff or Backoff()
        self.open_timeout_s = open_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
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
        self._rng = random.Random()

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
        return ws

    async def _reconnect(self, ws: ClientConnection | None = None) -> None:
        """Serve connections until :attr:`_stopping` is set or :meth:`_done` says so.

        Args:
            ws: a connection the hub already greeted, served first.

        Raises:
            ConnectionRejected: when the hub refuses the client for good.
        """
        failures = 0
        while not self._stopping.is_set():
            greeted_before = self.connections
            code = await (self._connect_once() if ws is None else self._connect_once(ws))
            ws = None
            if self._stopping.is_set() or self._done(code):
                return
            failures = 1 if self.connections > greeted_before else failures + 1
            delay = self.backoff.delay_s(failures, self._rng)
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
                return None
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
