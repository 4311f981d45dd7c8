"""WebSocket server connections that hand each message to a callback at once.

websockets' asyncio connection queues every received message in an
assembler, and a reader coroutine takes it out again: a future, a wake-up
and a resumed ``async for`` per frame. At thousands of frames a second that
is a large share of a hub's CPU. :class:`HubConnection` calls
:attr:`HubConnection.on_message` from ``data_received`` instead, for every
message that comes in one frame (all of them, in practice). A fragmented
message still goes through the assembler, and so does every message after
it until the assembler is empty again, so messages are handled in order
whichever way they come.

Reading: once the connection is open and has a handler, the common frame
(a whole, masked text or binary message within the size limit, no
extension bits) is parsed here, straight from the bytes read: websockets'
parser would copy the payload twice and resume a generator per field.
Every other frame (ping, pong, close, fragments, anything malformed or too
large) is handed to websockets whole, so its parser is always between two
frames when the fast path takes over again, and it answers, closes and
fails the connection exactly as it would. A frame cut by the end of a read
waits for the rest (at most ``max_size`` plus its header); a frame over the
size limit is handed over as it is, and websockets closes with 1009.

Writing: :meth:`HubConnection.write_soon` queues a message; every message
queued for one connection in one event-loop iteration goes out in one write
(one system call), header and payload side by side with no copy, as
websockets' ``broadcast`` would send them one write each, copied into a
frame. Closing writes what is queued first. The handshake, pings and
closing are websockets' own.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import OPEN, Event

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = ["HubConnection", "MessageHandler"]

logger = logging.getLogger("hub.wsconn")

MessageHandler = Callable[[str | bytes], None]
"""Handles one message: ``str`` for a text frame, ``bytes`` for a binary one."""

_TEXT = 0x81
"""First header byte of a whole text message (FIN, no RSV bits, opcode 1)."""
_BINARY = 0x82
_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")


class HubConnection(ServerConnection):
    """A server connection with :attr:`on_message`, called once per whole message."""

    on_message: MessageHandler | None = None
    """Set by the connection's handler once it is ready for messages; ``None``:
    messages wait in the assembler for ``recv()`` (the register phase)."""

    _fragmented = False
    _out: list[str | bytes] | None = None
    _partial: bytearray | None = None
    """The start of a frame cut by the end of a read."""
    _need = 0
    """Bytes :attr:`_partial` must hold before it is worth parsing again."""
    _handed_over = False
    """websockets parses everything from now on (a frame too large, or unmasked)."""

    def data_received(self, data: bytes) -> None:
        partial = self._partial
        if partial is not None:
            partial += data
            if len(partial) < self._need:
                return
            data, self._partial = bytes(partial), None
        if self._handed_over or self.on_message is None:
            super().data_received(data)
            return
        protocol = self.protocol
        limit = protocol.max_message_size
        size = len(data)
        pos = 0
        while pos < size:
            if protocol.state is not OPEN:
                super().data_received(data[pos:])
                return
            # Header: 2 bytes, then 2 or 8 of extended length, then 4 of mask.
            start = pos + 2
            if size < start:
                break
            first = data[pos]
            second = data[pos + 1]
            length = second & 0x7F
            if length == 126:
                start = pos + 8
                if size < start:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4])
            elif length == 127:
                start = pos + 14
                if size < start:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10])
            else:
                start = pos + 6
            if not second & 0x80 or (limit is not None and length > limit):
                # Unmasked, or too large: websockets fails the connection.
                self._handed_over = True
                super().data_received(data[pos:])
                return
            if size < start:
                break
            end = start + length
            if end > size:
                start = end
                break
            if (first != _TEXT and first != _BINARY) or not self._whole_messages_now():
                super().data_received(data[pos:end])  # one whole frame
            else:
                self._deliver(apply_mask(data[start:end], data[start - 4 : start]), first == _TEXT)
            pos = end
        else:
            return
        # A frame cut by the end of the read: ``start`` is how far it must reach
        # before parsing again (its header, or its end).
        self._partial = bytearray(data[pos:])
        self._need = start - pos

    def write_soon(self, message: str | bytes) -> None:
        """Send a message (text if ``str``) at the end of this loop iteration."""
        out = self._out
        if out is None:
            self._out = [message]
            self.loop.call_soon(self._write_out)
        else:
            out.append(message)

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Write what is queued, then close (websockets' closing handshake)."""
        self._write_out()
        await super().close(code, reason)

    def _write_out(self) -> None:
        out, self._out = self._out, None
        protocol = self.protocol
        if not out or protocol.state is not OPEN:
            return
        # Control frames websockets queued first (none, in practice), then ours;
        # data frames only, so no end of stream (b"") among them.
        chunks = protocol.data_to_send()
        for message in out:
            if isinstance(message, str):
                message = message.encode()
                first = _TEXT
            else:
                first = _BINARY
            length = len(message)
            if length < 126:
                chunks.append(bytes((first, length)))
            elif length < 65536:
                chunks.append(_H16.pack(first, 126, length))
            else:
                chunks.append(_H64.pack(first, 127, length))
            chunks.append(message)
        self.transport.writelines(chunks)

    def _whole_messages_now(self) -> bool:
        """Whether a whole message may go to the handler now: no fragmented or
        received message is waiting in the assembler before it. (The reader
        loop always waits in the assembler's ``get``: that alone is no message.)"""
        return not (self._fragmented or len(self.recv_messages.frames))

    def _deliver(self, payload: bytes, text: bool) -> None:
        handler = self.on_message
        assert handler is not None
        if text:
            try:
                message: str | bytes = payload.decode()
            except UnicodeDecodeError:
                self.protocol.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text frame")
                self.send_data()
                return
        else:
            message = payload
        try:
            handler(message)
        except Exception:
            # A bug in the hub: this connection cannot go on, the others can.
            logger.error("! message handler failed", exc_info=True)
            self.protocol.fail(CloseCode.INTERNAL_ERROR, "internal error")
            self.send_data()

    def process_event(self, event: Event) -> None:
        # Only what data_received handed over comes here: control frames,
        # fragments, and frames before the handler was set. Messages go to
        # the assembler, in order, for the connection's reader loop.
        if type(event) is Frame and event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            self._fragmented = not event.fin
        super().process_event(event)
