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

The handshake, pings, closing and writing are websockets' own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode, Frame, Opcode
from websockets.protocol import Event

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
