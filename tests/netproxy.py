"""A TCP proxy for fault tests: pass, blackhole, delay or cut traffic on loopback.

Import as ``from tests.netproxy import Flow, NetProxy``::

    async with NetProxy(target_port) as proxy:      # listens on 127.0.0.1:proxy.port
        ...                                          # clients connect to proxy.port
        proxy.blackhole()                            # a partition: nothing passes,
        ...                                          # no FIN, no RST
        proxy.heal()                                 # held bytes go through, in order
        proxy.delay(100)                             # 100 ms each way
        proxy.cut()                                  # RST to both ends of every connection

Each connection has two flows, :attr:`Flow.TO_TARGET` (client to target) and
:attr:`Flow.TO_CLIENT`; each flow is in one mode at any time:

- **pass**: bytes go through, each chunk ``delay_ms`` after it was read;
- **blackhole, held** (the default blackhole, as a real partition: TCP
  retransmits until the path heals): nothing is written, and an end of stream
  (FIN or RST) read meanwhile is held too; the flow stops reading once
  :data:`MAX_HELD_CHUNKS` chunks wait, so the sender's kernel buffers fill
  and it blocks, as with a real peer that does not acknowledge;
- **blackhole, dropped**: what is read is thrown away, ends of stream too.

Bytes that pass towards an end whose socket is gone (it was reset, or it
closed and a dropping blackhole swallowed its FIN) reset the connection
instead, as the far end's kernel would answer them with an RST.

A method of the proxy applies to every open connection and to those opened
later; the same method of one :class:`Connection` (``proxy.connections``)
applies to that connection only, which makes a half-open connection while new
connections pass (a middlebox that lost one connection's state).
:attr:`NetProxy.target` may change at any time: later connections go to the
new target, as behind a load balancer.

Only loopback: the proxy listens on 127.0.0.1 and refuses another target
host. Every buffer is bounded and every task ends with :meth:`NetProxy.close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Self

__all__ = ["MAX_HELD_CHUNKS", "Connection", "Flow", "Mode", "NetProxy"]

CHUNK_BYTES = 64 * 1024
"""Largest read of one flow."""
MAX_HELD_CHUNKS = 16
"""Chunks a flow keeps while held or delayed (at most 1 MiB); then it stops reading."""

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Flow(enum.Flag):
    """Which way bytes go; ``BOTH`` for both."""

    TO_TARGET = enum.auto()
    TO_CLIENT = enum.auto()
    BOTH = TO_TARGET | TO_CLIENT


class Mode(enum.Enum):
    PASS = "pass"
    HOLD = "hold"
    """Blackhole: keep everything (bytes, FIN, RST) until healed."""
    DROP = "drop"
    """Blackhole: throw everything away (bytes, FIN, RST)."""


@dataclasses.dataclass
class _Settings:
    mode: Mode = Mode.PASS
    delay_ms: float = 0.0


class _End(enum.Enum):
    EOF = "eof"
    RESET = "reset"


class _Pipe:
    """One flow of one connection: a reader task and a writer task, a bounded queue."""

    def __init__(
        self,
        settings: _Settings,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_end: asyncio.Event,
        on_dead: Callable[[], None],
    ) -> None:
        self.settings = dataclasses.replace(settings)
        self._reader = reader
        self._writer = writer
        self._queue: deque[tuple[float, bytes | _End]] = deque()
        self._changed = asyncio.Event()
        self._on_end = on_end
        self._on_dead = on_dead
        self.back: _Pipe | None = None
        """The other flow of the connection."""
        self.swallowed_end = False
        """Whether a dropping blackhole threw away the end (FIN, RST) of this flow's source."""
        self.forwarded = 0
        """Bytes written to the far end."""
        self.dropped = 0
        """Bytes thrown away by a dropping blackhole."""

    def set(self, mode: Mode | None = None, delay_ms: float | None = None) -> None:
        if mode is not None:
            self.settings.mode = mode
        if delay_ms is not None:
            self.settings.delay_ms = delay_ms
        self._changed.set()

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data: bytes | _End = await self._reader.read(CHUNK_BYTES) or _End.EOF
            except (ConnectionResetError, BrokenPipeError):
                data = _End.RESET
            if self.settings.mode is Mode.DROP:
                self.dropped += len(data) if isinstance(data, bytes) else 0
                if isinstance(data, _End):
                    self.swallowed_end = True  # the far end never learns
                    return
                continue
            while len(self._queue) >= MAX_HELD_CHUNKS:
                await self._wait_change()
            self._queue.append((loop.time(), data))
            self._changed.set()
            if isinstance(data, _End):
                return

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or self.settings.mode is Mode.HOLD:
                await self._wait_change()
                continue
            read_at, data = self._queue[0]
            if self.settings.mode is Mode.DROP:
                self._queue.popleft()
                self.dropped += len(data) if isinstance(data, bytes) else 0
                continue
            due = read_at + self.settings.delay_ms / 1000
            if due > loop.time():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(due):
                        await self._wait_change()
                continue  # the mode or the delay may have changed meanwhile
            self._queue.popleft()
            self._changed.set()  # room for the reader
            if data is _End.EOF:
                if self._writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        self._writer.write_eof()
                self._on_end.set()
                return
            if data is _End.RESET:
                reset(self._writer)
                self._on_end.set()
                return
            assert isinstance(data, bytes)
            if self._writer.transport.is_closing() or (
                self.back is not None and self.back.swallowed_end
            ):
                # The far end is gone: as its kernel would, answer with an RST.
                self._on_dead()
                return
            self._writer.write(data)
            self.forwarded += len(data)
            try:
                await self._writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                self._on_end.set()
                return

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()


class Connection:
    """One proxied TCP connection: a client's socket and the target's."""

    def __init__(
        self,
        settings: dict[Flow, _Settings],
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._client = client[1]
        self._target = target[1]
        self._ended = asyncio.Event()
        self.pipes = {
            Flow.TO_TARGET: _Pipe(
                settings[Flow.TO_TARGET], client[0], target[1], self._ended, self.cut
            ),
            Flow.TO_CLIENT: _Pipe(
                settings[Flow.TO_CLIENT], target[0], client[1], self._ended, self.cut
            ),
        }
        self.pipes[Flow.TO_TARGET].back = self.pipes[Flow.TO_CLIENT]
        self.pipes[Flow.TO_CLIENT].back = self.pipes[Flow.TO_TARGET]
        self._tasks = [
            asyncio.get_running_loop().create_task(coro)
            for pipe in self.pipes.values()
            for coro in (pipe.read(), pipe.write())
        ]

    @property
    def closed(self) -> bool:
        """Whether both sockets are closed (after a cut, or both flows ended)."""
        return self._client.is_closing() and self._target.is_closing()

    def blackhole(self, flow: Flow = Flow.BOTH, *, drop: bool = False) -> None:
        """Stop forwarding ``flow``: hold what comes (``drop``: throw it away)."""
        self._set(flow, mode=Mode.DROP if drop else Mode.HOLD)

    def delay(self, delay_ms: float, flow: Flow = Flow.BOTH) -> None:
        """Forward ``flow`` with each chunk ``delay_ms`` late (0: no delay)."""
        self._set(flow, mode=Mode.PASS, delay_ms=delay_ms)

    def heal(self, flow: Flow = Flow.BOTH) -> None:
        """Forward ``flow`` again, without delay; held bytes go first, in order."""
        self._set(flow, mode=Mode.PASS, delay_ms=0)

    def lose_target(self) -> None:
        """The target's end goes away (as when Redis closes a client it thinks dead).

        Its socket is closed; the client hears of it only through the flow
        towards it: at once if it passes, when healed if it is held, and
        only when the client sends again if it is dropped (then with an RST).
        """
        self._target.transport.abort()

    def cut(self) -> None:
        """Reset both sockets now (RST to the client and to the target)."""
        reset(self._client)
        reset(self._target)
        self._ended.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in (self._client, self._target):
            writer.transport.abort()

    def _set(self, flow: Flow, *, mode: Mode, delay_ms: float | None = None) -> None:
        for which, pipe in self.pipes.items():
            if which in flow:
                pipe.set(mode, delay_ms)

    async def _ends(self) -> None:
        """Wait until both flows ended (EOF both ways, a reset, or a cut)."""
        await self._ended.wait()
        # One flow ended; the other ends when its source sends EOF or is reset.
        await asyncio.gather(*self._tasks, return_exceptions=True)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close a socket with an RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class NetProxy:
    """A loopback TCP proxy to ``target_port`` whose flows can be held, dropped,
    delayed or cut at any time.

    Args:
        target_port: where connections go (on ``target_host``).
        target_host: a loopback address.
        connect_timeout_s: bound of the connection to the target; past it the
            client's connection is reset.
    """

    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        connect_timeout_s: float = 2.0,
    ) -> None:
        if target_host not in _LOOPBACK:
            raise ValueError(f"the test proxy only forwards to loopback, not {target_host!r}")
        self.target = (target_host, target_port)
        """Where the next connections go; change it to move later connections."""
        self.connect_timeout_s = connect_timeout_s
        self.port = 0
        """The port listened on (127.0.0.1), once started."""
        self.connections: list[Connection] = []
        """Open connections, oldest first."""
        self.accepted = 0
        """Connections accepted so far."""
        self.connected = 0
        """Connections accepted and connected to their target so far."""
        self._settings = {Flow.TO_TARGET: _Settings(), Flow.TO_CLIENT: _Settings()}
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url_host(self) -> str:
        """``127.0.0.1:<port>``: the address clients use."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen on a free loopback port (:attr:`port`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for conn in self.connections:
            await conn.close()
        self.connections.clear()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # Faults: every open connection, and the later ones

    def blackhole(self, flow: Flow = Flow.BOTH, *, drop: bool = False) -> None:
        """As :meth:`Connection.blackhole`, for every connection, open or to come."""
        self._set(flow, Mode.DROP if drop else Mode.HOLD, None)
        for conn in self.connections:
            conn.blackhole(flow, drop=drop)

    def delay(self, delay_ms: float, flow: Flow = Flow.BOTH) -> None:
        """As :meth:`Connection.delay`, for every connection, open or to come."""
        self._set(flow, Mode.PASS, delay_ms)
        for conn in self.connections:
            conn.delay(delay_ms, flow)

    def heal(self, flow: Flow = Flow.BOTH) -> None:
        """As :meth:`Connection.heal`, for every connection, open or to come."""
        self._set(flow, Mode.PASS, 0)
        for conn in self.connections:
            conn.heal(flow)

    def cut(self) -> None:
        """Reset every open connection (later ones are not affected)."""
        for conn in list(self.connections):
            conn.cut()

    # Private methods

    def _set(self, flow: Flow, mode: Mode, delay_ms: float | None) -> None:
        for which, settings in self._settings.items():
            if which in flow:
                settings.mode = mode
                if delay_ms is not None:
                    settings.delay_ms = delay_ms

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                target = await asyncio.open_connection(*self.target, limit=CHUNK_BYTES)
        except (OSError, TimeoutError):
            reset(writer)
            return
        conn = Connection(self._settings, (reader, writer), target)
        self.connections.append(conn)
        self.connected += 1
        try:
            await conn._ends()
        finally:
            await conn.close()
            with contextlib.suppress(ValueError):
                self.connections.remove(conn)
