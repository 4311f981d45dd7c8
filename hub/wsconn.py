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

Writing: :meth:`HubConnection.write_soon` queues a message; every message
queued for one connection in one event-loop iteration goes out in one write
(one system call), as websockets' ``broadcast`` would send them one write
each. Closing writes what is queued first. The handshake, pings and
closing are websockets' own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import OPEN, Event

__all__ = ["HubConnection", "MessageHandler"]

logger = logging.getLogger("hub.wsconn")

MessageHandler = Callable[[str | bytes], None]
"""Handles one message: ``str`` for a text frame, ``bytes`` for a binary one."""


class HubConnection(ServerConnection):
    """A server connection with :attr:`on_message`, called once per whole message."""

    on_message: MessageHandler | None = None
    """Set by the connection's handler once it is ready for messages; ``None``:
    messages wait in the assembler for ``recv()`` (the register phase)."""

    _fragmented = False
    _out: list[str | bytes] | None = None

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
        for message in out:
            if isinstance(message, str):
                protocol.send_text(message.encode())
            else:
                protocol.send_binary(message)
        # Data frames only: no end of stream (b"") among them.
        self.transport.writelines(protocol.data_to_send())

    def process_event(self, event: Event) -> None:
        handler = self.on_message
        if (
            handler is None
            or type(event) is not Frame
            or not event.fin
            or self._fragmented
            or self.recv_messages.get_in_progress
            or len(self.recv_messages.frames)
        ):
            if type(event) is Frame and event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                self._fragmented = not event.fin
            super().process_event(event)
            return
        opcode = event.opcode
        if opcode is Opcode.TEXT:
            try:
                message: str | bytes = bytes(event.data).decode()
            except UnicodeDecodeError:
                self.protocol.fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text frame")
                self.send_data()
                return
        elif opcode is Opcode.BINARY:
            message = bytes(event.data)
        else:
            super().process_event(event)  # ping, pong, close
            return
        try:
            handler(message)
        except Exception:
            # A bug in the hub: this connection cannot go on, the others can.
            logger.error("! message handler failed", exc_info=True)
            self.protocol.fail(CloseCode.INTERNAL_ERROR, "internal error")
            self.send_data()
