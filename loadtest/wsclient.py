"""A light callback-based WebSocket client for simulated peers.

Thousands of simulated sessions share one worker process, so each message
must cost the harness as little as possible, or the load test measures
itself rather than the hub. This client is a plain :class:`asyncio.Protocol`
that speaks RFC 6455 itself: bytes in, ``on_message(binary, data)`` out,
with no task, future, queue or generator per connection or per message (the
handshake alone uses a future, to let :func:`connect` wait for it). Pings
from the hub are answered at once; close frames are answered as the RFC asks.

What it saves per message, compared with driving a general-purpose protocol:

- frames are parsed in place from the bytes the transport hands over: one
  slice per payload, no buffering unless a frame spans reads;
- frames are masked with one random key per process (see :data:`MASK_KEY`),
  so a payload that every message repeats (the jobs' audio) is masked once,
  in advance (:class:`MaskedTail`), and written as it is: sending a 16 KB job
  copies and masks only its few dozen bytes of header;
- writes are coalesced: frames sent to one connection while the loop handles
  a read or a timer go out together, in one ``writelines`` (one ``writev``)
  at the end (:class:`Flusher`).

Usage::

    conn = await connect("ws://127.0.0.1:8765/v1/session", on_message, on_close)
    conn = await connect("wss://hub.example/v1/node", on_message, on_close,
                         headers=[("Authorization", "Bearer ...")], ssl=context)
    conn.send_text(encode_submit_job("1", "en", "zh", {"text": "hi"}))
    conn.close()
"""

from __future__ import annotations

import asyncio
import os
import ssl as ssl_module
import struct
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import urlsplit

from websockets.utils import accept_key, generate_key

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = [
    "MASK_KEY",
    "Connection",
    "Flusher",
    "HandshakeFailed",
    "MaskedTail",
    "connect",
]

CLOSE_TIMEOUT_S = 2.0
"""How long to wait for the server to close TCP after the closing handshake."""

MAX_HANDSHAKE_BYTES = 16 * 1024
"""Largest HTTP response to the upgrade request we read."""

MAX_REASON_CHARS = 200
"""Most characters of a refusal's body (``unauthorized: token expired``) kept in its error."""

MASK_KEY = os.urandom(4)
"""The masking key of every frame this process sends.

RFC 6455 §5.3 asks for a fresh, unpredictable key per frame, so that a
hostile script in a browser cannot choose the bytes a proxy on the path
sees. A load generator runs no foreign script: every byte it sends is its
own, whether it talks to a hub on loopback or to a deployment through load
balancers (``hub bench``), so one random key per process is as safe here,
and it lets the audio every job repeats be masked once and reused
(:class:`MaskedTail`) instead of masked again for each job. Frames are
still masked, as the RFC requires of every client frame (the hub refuses
unmasked ones).
"""

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_LEN16 = struct.Struct(">BBH4s")
_LEN64 = struct.Struct(">BBQ4s")
_CLOSE_CODE = struct.Struct(">H")

# Connection states.
_CONNECTING, _OPEN, _CLOSING, _CLOSED = range(4)


class HandshakeFailed(Exception):
    """The server refused the WebSocket upgrade (e.g. 503 too many connections)."""


OnMessage = Callable[[bool, bytes], None]
"""Called with (binary, data) for each complete message."""
OnClose = Callable[[int | None], None]
"""Called once when the connection is gone, with the close code received, if any."""


def frame_header(opcode: int, length: int) -> bytes:
    """The header of a final, masked frame of ``length`` payload bytes, key included."""
    if length < 126:
        return bytes((0x80 | opcode, 0x80 | length)) + MASK_KEY
    if length < 65536:
        return _LEN16.pack(0x80 | opcode, 0xFE, length, MASK_KEY)
    return _LEN64.pack(0x80 | opcode, 0xFF, length, MASK_KEY)


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """A whole final frame, masked with :data:`MASK_KEY`."""
    return frame_header(opcode, len(payload)) + apply_mask(payload, MASK_KEY)


class MaskedTail:
    """Bytes that end many binary messages, masked once for every alignment.

    The byte at offset ``i`` of a payload is masked with ``MASK_KEY[i % 4]``,
    so the masked form of a tail depends only on where it starts modulo 4:
    four masked copies cover every message that ends with it.
    """

    __slots__ = ("data", "masked")

    def __init__(self, data: bytes) -> None:
        self.data = data
        """The tail, unmasked."""
        self.masked = tuple(
            apply_mask(data, MASK_KEY[phase:] + MASK_KEY[:phase]) for phase in range(4)
        )
        """The tail masked as if it started at payload offset ``phase`` (mod 4)."""

    def __len__(self) -> int:
        return len(self.data)


class Flusher:
    """Writes the frames connections of one loop queue, together, once a batch of work ends.

    The batches are what one wake-up of the loop does: a read
    (:meth:`Connection.data_received` and what it sets off) and a run of the
    worker's timer wheel each bracket their work with :meth:`begin` and
    :meth:`end`. A connection that is sent several frames in a batch (a node
    ending several jobs at one tick, a pong and a result) has them written
    with one system call. Frames queued outside any batch are written at the
    end of the loop iteration (``call_soon``).
    """

    __slots__ = ("_loop", "_scheduled", "depth", "dirty")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.dirty: list[Connection] = []
        """Connections with frames queued."""
        self.depth = 0
        """Batches begun and not ended (:meth:`Connection.data_received` counts inline)."""
        self._scheduled = False

    def add(self, conn: Connection) -> None:
        """Write ``conn``'s queued frames when the batch ends."""
        self.dirty.append(conn)
        if not self.depth and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_soon)

    def begin(self) -> None:
        """Start a batch; batches nest."""
        self.depth += 1

    def end(self) -> None:
        """End a batch; the outermost one writes every queued frame."""
        self.depth -= 1
        if not self.depth and self.dirty:
            self.flush()

    def flush(self) -> None:
        """Write every queued frame now."""
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            conn.flush()

    def _flush_soon(self) -> None:
        self._scheduled = False
        self.flush()


class Connection(asyncio.Protocol):
    """One client connection. Create it with :func:`connect`."""

    def __init__(
        self,
        uri: str,
        on_message: OnMessage,
        on_close: OnClose,
        flusher: Flusher | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        loop = asyncio.get_running_loop()
        parts = urlsplit(uri)
        self._host = parts.netloc
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = "".join(f"{name}: {value}\r\n" for name, value in headers)
        """Extra request header lines (``Authorization``), each ending with CRLF."""
        self._key = generate_key()
        self.on_message = on_message
        self.on_close = on_close
        self.flusher = flusher if flusher is not None else Flusher(loop)
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.close_code: int | None = None
        """The close code the server sent, once it did."""
        self.is_open = False
        """Whether messages can be sent (the handshake is done, no close sent or received)."""
        self._state = _CONNECTING
        self._buffer = b""
        """Bytes received that do not make a whole frame (or response) yet."""
        self._pending: list[bytes] | None = None
        """Frames queued for the end of this loop iteration."""
        self._fragments: list[bytes] = []
        self._fragment_binary = False
        self._close_sent = False
        self._close_timer: asyncio.TimerHandle | None = None

    # Public methods

    def send_text(self, data: bytes) -> None:
        """Send a text message (``data`` is UTF-8); silently dropped unless open."""
        if self.is_open:
            self._queue(frame_header(OP_TEXT, len(data)) + apply_mask(data, MASK_KEY))

    def send_binary(self, data: bytes) -> None:
        """Send a binary message; silently dropped unless open."""
        if self.is_open:
            self._queue(frame_header(OP_BINARY, len(data)) + apply_mask(data, MASK_KEY))

    def send_binary_with_tail(self, head: bytes, tail: MaskedTail) -> None:
        """Send the binary message ``head + tail.data``, copying and masking only ``head``."""
        if not self.is_open:
            return
        size = len(head)
        first = frame_header(OP_BINARY, size + len(tail.data)) + apply_mask(head, MASK_KEY)
        pending = self._pending
        if pending is None:
            self._pending = [first, tail.masked[size & 3]]
            self.flusher.add(self)
        else:
            pending.append(first)
            pending.append(tail.masked[size & 3])

    def write_buffer_size(self) -> int:
        """Bytes waiting in the transport."""
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (or drop the socket if it isn't open)."""
        if self._state == _CLOSED:
            return
        if self._state == _OPEN:
            self._send_close(code, reason)
            self.flush()
            self._expect_close()
        elif self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the TCP connection at once, without a closing handshake."""
        if self.transport is not None:
            self.transport.abort()

    def flush(self) -> None:
        """Write the frames queued in this iteration now."""
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        transport = self.transport
        if transport is not None and self._state != _CLOSED:
            transport.writelines(pending)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports don't subclass asyncio.Transport: no isinstance().
        self.transport = cast(asyncio.Transport, transport)
        request = (
            f"GET {self._path} HTTP/1.1\r\n"
            f"Host: {self._host}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"{self._headers}\r\n"
        )
        self.transport.write(request.encode())

    def data_received(self, data: bytes) -> None:
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if self._state != _OPEN:
            if self._state == _CONNECTING:
                data = self._handshake(data)
            if self._state == _CLOSED or not data:
                return
        flusher = self.flusher
        flusher.depth += 1  # a batch: what the frames make us send goes out at its end
        try:
            # Every whole frame in `data`; the rest waits for the next read.
            n = len(data)
            pos = 0
            while n - pos >= 2:
                b0 = data[pos]
                length = data[pos + 1]
                if length & 0x80 or b0 & 0x70:
                    self._fail("masked server frame" if length & 0x80 else "reserved bit set")
                    return
                start = pos + 2
                if length >= 126:
                    start = pos + (4 if length == 126 else 10)
                    if start > n:
                        break
                    length = int.from_bytes(data[pos + 2 : start], "big")
                end = start + length
                if end > n:
                    break
                pos = end
                opcode = b0 & 0x0F
                if b0 & 0x80 and OP_TEXT <= opcode <= OP_BINARY:
                    self.on_message(opcode == OP_BINARY, data[start:end])
                elif not self._control(opcode, b0 & 0x80, data[start:end]):
                    return
            if pos < n:
                self._buffer = data[pos:]
        finally:
            flusher.depth -= 1
            if not flusher.depth and flusher.dirty:
                flusher.flush()

    def _control(self, opcode: int, fin: int, payload: bytes) -> bool:
        """Handle a control frame or a fragment; False when the connection is done."""
        if OP_TEXT <= opcode <= OP_BINARY:
            self._fragments = [payload]
            self._fragment_binary = opcode == OP_BINARY
        elif opcode == OP_CONT:
            self._fragments.append(payload)
            if fin:
                message, self._fragments = b"".join(self._fragments), []
                self.on_message(self._fragment_binary, message)
        elif opcode == OP_PING:
            if not self._close_sent:
                self._queue(encode_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self._close_received(payload)
            return False
        elif opcode != OP_PONG:
            self._fail(f"unknown opcode {opcode}")
            return False
        return True

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _CLOSED
        self.is_open = False
        self._pending = None
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.opened.done():
            self.opened.set_exception(
                ConnectionError(f"connection lost during the handshake: {exc}")
            )
            self.opened.exception()  # handled by connect(); don't warn when nobody awaits
        self.on_close(self.close_code)

    # Private methods

    def _queue(self, frame: bytes) -> None:
        pending = self._pending
        if pending is None:
            self._pending = [frame]
            self.flusher.add(self)
        else:
            pending.append(frame)

    def _handshake(self, data: bytes) -> bytes:
        """Read the response to the upgrade; return the bytes after it (frames)."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HANDSHAKE_BYTES:
                self._refused("response headers too long")
            else:
                self._buffer = data
            return b""
        head, data = data[:end].decode("latin-1"), data[end + 4 :]
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) < 2 or parts[1] != "101":
            # The body of a refusal says why (the hub's: "unauthorized: token expired").
            body = data.decode("utf-8", "replace").strip().splitlines()
            reason = f": {body[0][:MAX_REASON_CHARS]}" if body else ""
            self._refused(
                f"server rejected WebSocket connection: HTTP {' '.join(parts[1:])}{reason}"
            )
            return b""
        if headers.get("upgrade", "").lower() != "websocket":
            self._refused("response has no Upgrade: websocket")
            return b""
        if headers.get("sec-websocket-accept") != accept_key(self._key):
            self._refused("wrong Sec-WebSocket-Accept")
            return b""
        if headers.get("sec-websocket-extensions"):
            self._refused("server chose an extension we did not offer")
            return b""
        self._state = _OPEN
        self.is_open = True
        self.opened.set_result(None)
        return data

    def _refused(self, message: str) -> None:
        self._state = _CLOSED
        if not self.opened.done():
            self.opened.set_exception(HandshakeFailed(message))
            self.opened.exception()
        if self.transport is not None:
            self.transport.close()

    def _send_close(self, code: int, reason: str = "") -> None:
        if not self._close_sent:
            self._close_sent = True
            self.is_open = False
            self._state = _CLOSING
            self._queue(encode_frame(OP_CLOSE, _CLOSE_CODE.pack(code) + reason.encode()))

    def _close_received(self, payload: bytes) -> None:
        if len(payload) >= 2:
            self.close_code = _CLOSE_CODE.unpack_from(payload)[0]
        elif not payload:
            self.close_code = 1005  # no status code in the close frame (RFC 6455 §7.1.5)
        else:
            self.close_code = 1002
        self.is_open = False
        if not self._close_sent:
            # Echo the code (RFC 6455 §5.5.1), then the server closes TCP.
            self._send_close(self.close_code if len(payload) >= 2 else 1000)
            self.flush()
        self._state = _CLOSING
        self._expect_close()

    def _fail(self, reason: str) -> None:
        """The server broke the protocol: close with 1002 and drop the connection."""
        self._send_close(1002, reason[:100])
        self.flush()
        self._state = _CLOSED
        self.is_open = False
        if self.transport is not None:
            self.transport.close()

    def _expect_close(self) -> None:
        if self._close_timer is None and self.transport is not None:
            self._close_timer = asyncio.get_running_loop().call_later(
                CLOSE_TIMEOUT_S, self.transport.close
            )


async def connect(
    uri: str,
    on_message: OnMessage,
    on_close: OnClose,
    *,
    timeout_s: float = 10.0,
    flusher: Flusher | None = None,
    headers: Sequence[tuple[str, str]] = (),
    ssl: ssl_module.SSLContext | None = None,
) -> Connection:
    """Open a WebSocket connection to a ``ws://`` or ``wss://`` URI.

    Args:
        flusher: where the connection's writes wait for the end of the loop
            iteration; share one between the connections of a loop.
        headers: extra request headers, e.g. ``Authorization``.
        ssl: the TLS context of ``wss://`` URIs (default: the system's CAs,
            hostname checked).

    Raises:
        HandshakeFailed: the server refused the upgrade.
        OSError, TimeoutError, ConnectionError: the connection failed
            (:class:`ssl.SSLError`, an OSError, when TLS did).
    """
    parts = urlsplit(uri)
    if parts.scheme not in ("ws", "wss") or parts.hostname is None:
        raise ValueError(f"not a ws:// or wss:// URI: {uri!r}")
    secure = parts.scheme == "wss"
    if secure and ssl is None:
        ssl = ssl_module.create_default_context()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        _, conn = await loop.create_connection(
            lambda: Connection(uri, on_message, on_close, flusher, headers),
            parts.hostname,
            parts.port or (443 if secure else 80),
            ssl=ssl if secure else None,
        )
        try:
            await conn.opened
        except BaseException:
            conn.abort()
            raise
    return conn
