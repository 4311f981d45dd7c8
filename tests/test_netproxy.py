"""The fault proxy of the partition tests (tests/netproxy.py), against an echo server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.helpers import MS, wait_for
from tests.netproxy import MAX_HELD_CHUNKS, Flow, NetProxy, reset

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Echo:
    """A TCP echo server that records what reached it and how each connection ended."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.ends: list[str] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
                await writer.drain()
            self.ends.append("eof")
        except ConnectionResetError:
            self.ends.append("reset")
        finally:
            writer.transport.abort()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    await server.start()
    try:
        yield server
    finally:
        assert server.server is not None
        server.server.close()


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[NetProxy]:
    async with NetProxy(echo.port) as p:
        yield p


@contextlib.asynccontextmanager
async def client(proxy: NetProxy) -> AsyncIterator[Stream]:
    connected = proxy.connected
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    await wait_for(lambda: proxy.connected > connected, what="the proxy reaching the target")
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def echoed(stream: Stream, data: bytes, within: float = 1000 * MS) -> bytes:
    reader, writer = stream
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(within):
        return await reader.readexactly(len(data))


async def nothing_within(reader: asyncio.StreamReader, duration: float) -> None:
    """Neither bytes nor an end of stream arrive for ``duration`` seconds."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(duration):
            data = await reader.read(1)
            raise AssertionError(f"expected silence, got {data!r}")


async def reset_within(reader: asyncio.StreamReader, within: float = 1000 * MS) -> None:
    """The connection is reset (RST) within ``within`` seconds."""
    with pytest.raises(ConnectionResetError):
        async with asyncio.timeout(within):
            await reader.read(1)


async def test_proxy_passes_bytes_both_ways(proxy: NetProxy, echo: Echo) -> None:
    async with client(proxy) as stream:
        assert await echoed(stream, b"hello") == b"hello"
        await wait_for(lambda: len(proxy.connections) == 1, what="one connection")
        stream[1].write_eof()
        async with asyncio.timeout(1000 * MS):
            assert await stream[0].read() == b""  # the echo server's FIN came through
    assert echo.ends == ["eof"]


@pytest.mark.parametrize("flow", [Flow.TO_TARGET, Flow.TO_CLIENT, Flow.BOTH])
async def test_held_blackhole_passes_nothing_then_everything_in_order_when_healed(
    proxy: NetProxy, echo: Echo, flow: Flow
) -> None:
    async with client(proxy) as stream:
        reader, writer = stream
        assert await echoed(stream, b"before") == b"before"
        proxy.blackhole(flow)
        writer.write(b"one,")
        writer.write(b"two")
        await writer.drain()
        writer.write_eof()  # a FIN is held too
        await nothing_within(reader, 300 * MS)
        assert bytes(echo.received) == (b"before" if Flow.TO_TARGET in flow else b"beforeone,two")
        assert echo.ends == ([] if Flow.TO_TARGET in flow else ["eof"])
        proxy.heal()
        async with asyncio.timeout(1000 * MS):
            assert await reader.read() == b"one,two"
    assert bytes(echo.received) == b"beforeone,two"


async def test_dropping_blackhole_loses_bytes_and_ends_of_stream(
    proxy: NetProxy, echo: Echo
) -> None:
    async with client(proxy) as stream:
        reader, writer = stream
        proxy.blackhole(drop=True)
        writer.write(b"lost")
        await writer.drain()
        await nothing_within(reader, 200 * MS)
        proxy.heal()
        assert await echoed(stream, b"found") == b"found"
        assert bytes(echo.received) == b"found"
        proxy.blackhole(Flow.TO_TARGET, drop=True)
        writer.transport.abort()  # an RST from the client: the target never learns
        await asyncio.sleep(200 * MS)
        assert echo.ends == []


async def test_blackhole_applies_to_one_connection_while_new_ones_pass(proxy: NetProxy) -> None:
    async with client(proxy) as old:
        await echoed(old, b"x")
        proxy.connections[0].blackhole()
        async with client(proxy) as new:
            assert await echoed(new, b"new") == b"new"
        old[1].write(b"y")
        await nothing_within(old[0], 200 * MS)


async def test_blackhole_applies_to_connections_opened_during_it(proxy: NetProxy) -> None:
    proxy.blackhole()
    async with client(proxy) as stream:
        stream[1].write(b"z")
        await nothing_within(stream[0], 200 * MS)
        proxy.heal()
        async with asyncio.timeout(1000 * MS):
            assert await stream[0].readexactly(1) == b"z"


async def test_held_flow_stops_reading_when_its_buffer_is_full(proxy: NetProxy) -> None:
    async with client(proxy) as (_, writer):
        proxy.blackhole(Flow.TO_TARGET)
        # Far more than the proxy holds plus the kernel's buffers: the sender blocks.
        blob = b"x" * (64 * 1024)
        sent = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1000 * MS):
                for _ in range(MAX_HELD_CHUNKS * 64):
                    writer.write(blob)
                    await writer.drain()
                    sent += len(blob)
        assert sent < MAX_HELD_CHUNKS * 64 * len(blob)
        pipe = proxy.connections[0].pipes[Flow.TO_TARGET]
        assert pipe.forwarded == 0


async def test_delay_holds_each_chunk_for_the_delay(proxy: NetProxy) -> None:
    async with client(proxy) as stream:
        await echoed(stream, b"warm")
        proxy.delay(150, Flow.TO_TARGET)
        proxy.delay(100, Flow.TO_CLIENT)
        started = time.monotonic()
        assert await echoed(stream, b"late") == b"late"
        assert time.monotonic() - started >= 0.240
        proxy.heal()
        started = time.monotonic()
        await echoed(stream, b"now")
        assert time.monotonic() - started < 0.240


async def test_cut_resets_both_ends(proxy: NetProxy, echo: Echo) -> None:
    async with client(proxy) as (reader, writer):
        await echoed((reader, writer), b"x")
        proxy.cut()
        await reset_within(reader)
        await wait_for(lambda: echo.ends == ["reset"], what="the target reset")
        await wait_for(lambda: not proxy.connections, what="the connection forgotten")


async def test_cut_while_held_resets_at_once(proxy: NetProxy) -> None:
    async with client(proxy) as (reader, _):
        proxy.blackhole()
        proxy.cut()
        await reset_within(reader)


async def test_new_target_takes_later_connections(proxy: NetProxy, echo: Echo) -> None:
    other = Echo()
    await other.start()
    try:
        async with client(proxy) as first:
            proxy.target = ("127.0.0.1", other.port)
            async with client(proxy) as second:
                await echoed(first, b"1")
                await echoed(second, b"2")
        assert (bytes(echo.received), bytes(other.received)) == (b"1", b"2")
    finally:
        assert other.server is not None
        other.server.close()


def test_proxy_refuses_a_target_off_loopback() -> None:
    with pytest.raises(ValueError, match="only forwards to loopback"):
        NetProxy(80, "example.com")


@pytest.mark.parametrize("end", ["fin", "rst"])
async def test_bytes_towards_a_gone_end_reset_the_connection(
    proxy: NetProxy, echo: Echo, end: str
) -> None:
    async with client(proxy) as (reader, writer):
        await echoed((reader, writer), b"x")
        proxy.blackhole(drop=True)
        # The target closes; the client never hears of it.
        if end == "fin":
            echo.writers[0].close()
        else:
            reset(echo.writers[0])
        await nothing_within(reader, 200 * MS)
        proxy.heal()
        writer.write(b"after")
        await reset_within(reader)


@pytest.mark.parametrize("drop", [False, True], ids=["held", "dropped"])
async def test_lost_target_is_heard_of_when_healed_or_on_the_next_send(
    proxy: NetProxy, echo: Echo, drop: bool
) -> None:
    async with client(proxy) as (reader, writer):
        await echoed((reader, writer), b"x")
        proxy.blackhole(drop=drop)
        proxy.connections[0].lose_target()
        await nothing_within(reader, 200 * MS)
        proxy.heal()
        if drop:
            await nothing_within(reader, 200 * MS)  # a client that only reads is deaf
            writer.write(b"hello?")
            await reset_within(reader)
        else:
            async with asyncio.timeout(1000 * MS):
                assert await reader.read() == b""  # the held FIN
