"""A light callback-based WebSocket client for simulated peers.

Thousands of simulated sessions share one worker process, so each message
must cost the harness as little as possible. This client drives websockets'
Sans-I/O :class:`~websockets.client.ClientProtocol` from a plain
:class:`asyncio.Protocol`: bytes in, ``on_message(opcode_is_binary, data)``
out, with no task, future or queue per connection or per message (the
``websockets.asyncio`` client keeps an assembler and awaits per ``recv()``).
Pings from the hub are answered by the protocol itself.

Usage::

    conn = await connect("ws://127.0.0.1:8765/v1/session", on_message, on_close)
    conn.send_text(encode_submit_job("1", "en", "zh", {"text": "hi"}))
    conn.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

__all__ = ["Connection", "HandshakeFailed", "connect"]

CLOSE_TIMEOUT_S = 2.0
"""How long to wait for the server to close TCP after the closing handshake."""


class HandshakeFailed(Exception):
    """The server refused the WebSocket upgrade (e.g. 503 too many connections)."""


OnMessage = Callable[[bool, bytes], None]
"""Called with (binary, data) for each complete message."""
OnClose = Callable[[int | None], None]
"""Called once when the connection is gone, with the close code received, if any."""


class Connection(asyncio.Protocol):
    """One client connection. Create it with :func:`connect`."""

    def __init__(self, uri: str, on_message: OnMessage, on_close: OnClose) -> None:
        self.protocol = ClientProtocol(parse_uri(uri), max_size=None)
        self.on_message = on_message
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        """The close code the server sent, once it did."""
        self._fragments: list[bytes] = []
        self._fragment_binary = False
        self._closed = False
        self._close_timer: asyncio.TimerHandle | None = None

    # Public methods

    @property
    def is_open(self) -> bool:
        """Whether messages can be sent."""
        return self.protocol.state is State.OPEN and not self._closed

    def send_text(self, data: bytes) -> None:
        """Send a text message (``data`` is UTF-8); silently dropped unless open."""
        if self.is_open:
            self.protocol.send_text(data)
            self._flush()

    def send_binary(self, data: bytes) -> None:
        """Send a binary message; silently dropped unless open."""
        if self.is_open:
            self.protocol.send_binary(data)
            self._flush()

    def write_buffer_size(self) -> int:
        """Bytes waiting in the transport."""
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (or drop the socket if it isn't open)."""
        if self._closed:
            return
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
            self._expect_close()
        elif self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection at once, without a closing handshake."""
        if self.transport is not None:
            self.transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio.Transport: no isinstance().
        self.transport = cast(asyncio.Transport, transport)
        self.protocol.send_request(self.protocol.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        self._flush()  # pongs and close replies
        for event in protocol.events_received():
            if type(event) is Frame:
                self._frame(event)
            elif isinstance(event, Response):
                self._handshake_done()
        if protocol.close_expected():
            self._expect_close()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._flush()
        for event in self.protocol.events_received():
            if type(event) is Frame:
                self._frame(event)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.opened.done():
            self.opened.set_exception(
                self.protocol.handshake_exc
                or ConnectionError(f"connection lost during the handshake: {exc}")
            )
            self.opened.exception()  # handled by connect(); don't warn when nobody awaits
        close = self.protocol.close_rcvd
        self.close_code = close.code if close is not None else None
        self.on_close(self.close_code)

    # Private methods

    def _handshake_done(self) -> None:
        if self.opened.done():
            return
        exc = self.protocol.handshake_exc
        if exc is None:
            self.opened.set_result(None)
        else:
            self.opened.set_exception(HandshakeFailed(str(exc)))
            self.opened.exception()
            self._expect_close()

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self.on_message(opcode is Opcode.BINARY, bytes(frame.data))
            else:
                self._fragments = [bytes(frame.data)]
                self._fragment_binary = opcode is Opcode.BINARY
        elif opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), []
                self.on_message(self._fragment_binary, data)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()

    def _expect_close(self) -> None:
        if self._close_timer is None and self.transport is not None:
            self._close_timer = asyncio.get_running_loop().call_later(
                CLOSE_TIMEOUT_S, self.transport.close
            )


async def connect(
    uri: str, on_message: OnMessage, on_close: OnClose, *, timeout_s: float = 10.0
) -> Connection:
    """Open a WebSocket connection to a ``ws://`` URI on a loopback address.

    Raises:
        HandshakeFailed: the server refused the upgrade.
        OSError, TimeoutError, ConnectionError: the connection failed.
    """
    parsed = parse_uri(uri)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        _, conn = await loop.create_connection(
            lambda: Connection(uri, on_message, on_close), parsed.host, parsed.port
        )
        try:
            await conn.opened
        except BaseException:
            conn.abort()
            raise
    return conn
