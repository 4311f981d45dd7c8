"""Helpers of the end-to-end server tests: clients that speak protocol.md.

Import as ``from tests.hubtools import register, submit, expect``. Clients
are plain ``websockets.asyncio.client`` connections; the helpers below read
like the spec (websockets ``assertFrameSent``). Every wait is bounded and a
multiple of :data:`tests.helpers.MS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from hub.app import Hub
from hub.keys import Keys
from loadtest.procs import open_websocket
from tests.helpers import MS

__all__ = [
    "ALL_BYTES",
    "FRAME_TIMEOUT",
    "Connect",
    "Frame",
    "RawNode",
    "attempts",
    "binary_job",
    "check_invariants",
    "collect_results",
    "expect",
    "expect_closed",
    "expect_silence",
    "http_get",
    "job_record",
    "node_hash",
    "open_node",
    "open_session",
    "partial",
    "receive",
    "register",
    "result",
    "round_trip",
    "send",
    "submit",
    "wait_running",
]

FRAME_TIMEOUT = 2000 * MS
"""How long :func:`expect` waits for a frame by default."""

ALL_BYTES = bytes(range(256))
"""Every byte value once: audio that survives only a byte-exact path."""

Frame = dict[str, Any]
"""A decoded frame; a binary frame's audio is under the key ``"audio"``."""

Connect = Callable[..., Awaitable[ClientConnection]]
"""The ``connect`` fixture: ``await connect(hub, "/v1/node", **client_options)``."""

_LEN = struct.Struct(">I")


# Frames


def binary_job(header: dict[str, Any], audio: bytes) -> bytes:
    """A binary frame (protocol.md §2): uint32 header length, JSON header, audio."""
    encoded = orjson.dumps(header)
    return _LEN.pack(len(encoded)) + encoded + audio


def _decode(message: str | bytes) -> Frame:
    if isinstance(message, str):
        frame = orjson.loads(message)
        assert isinstance(frame, dict), f"hub sent a non-object frame: {message!r}"
        return frame
    (size,) = _LEN.unpack_from(message)
    frame = orjson.loads(message[4 : 4 + size])
    assert isinstance(frame, dict), f"hub sent a non-object binary header: {message[:64]!r}"
    frame["audio"] = message[4 + size :]
    return frame


async def send(ws: ClientConnection, **fields: Any) -> None:
    """Send one text frame: the JSON object of ``fields``."""
    await ws.send(orjson.dumps(fields).decode())


async def receive(ws: ClientConnection, within: float = FRAME_TIMEOUT) -> Frame:
    """The next frame from the hub, decoded.

    Raises:
        AssertionError: if nothing arrives within ``within`` seconds or the
            connection closes.
    """
    try:
        async with asyncio.timeout(within):
            message = await ws.recv()
    except TimeoutError:
        raise AssertionError(f"no frame within {within:.3f} s") from None
    except ConnectionClosed as exc:
        raise AssertionError(f"connection closed while waiting for a frame: {exc}") from exc
    return _decode(message)


async def expect(
    ws: ClientConnection, type: str, *, within: float = FRAME_TIMEOUT, **fields: Any
) -> Frame:
    """Receive the next frame and check its ``type`` and the given ``fields``.

    Returns:
        The whole frame, for the fields the test could not know in advance.
    """
    frame = await receive(ws, within)
    assert frame.get("type") == type, f"expected a {type!r} frame, got {frame!r}"
    for name, value in fields.items():
        assert frame.get(name) == value, f"expected {name}={value!r} in {frame!r}"
    return frame


async def expect_silence(ws: ClientConnection, duration: float = 100 * MS) -> None:
    """Check that the hub sends nothing for ``duration`` seconds."""
    try:
        async with asyncio.timeout(duration):
            message = await ws.recv()
    except TimeoutError:
        return
    raise AssertionError(f"expected no frame, got {_decode(message)!r}")


async def expect_closed(
    ws: ClientConnection, code: int, *, within: float = FRAME_TIMEOUT
) -> list[Frame]:
    """Read until the hub closes the connection; check the close code.

    Returns:
        The frames received before the close.
    """
    frames: list[Frame] = []
    try:
        async with asyncio.timeout(within):
            while True:
                frames.append(_decode(await ws.recv()))
    except ConnectionClosed:
        pass
    except TimeoutError:
        raise AssertionError(
            f"connection still open after {within:.3f} s; frames: {frames!r}"
        ) from None
    assert ws.close_code == code, (
        f"expected close code {code}, got {ws.close_code} ({ws.close_reason!r})"
    )
    return frames


# Node side (protocol.md §3)


async def register(
    ws: ClientConnection,
    *,
    node_id: str,
    languages: Sequence[str] | None = ("en", "fr"),
    lang_pairs: Sequence[Sequence[str]] | None = None,
    max_jobs: int = 2,
    services: Sequence[str] = ("asr", "nmt"),
    pools: Sequence[str] | None = None,
    resume: Sequence[str] | None = None,
    cell: str | None = None,
) -> Frame:
    """Send ``register`` and expect ``registered`` for ``node_id``."""
    frame: dict[str, Any] = {
        "type": "register",
        "node_id": node_id,
        "services": list(services),
        "max_jobs": max_jobs,
    }
    if lang_pairs is not None:
        frame["lang_pairs"] = [list(p) for p in lang_pairs]
    elif languages is not None:
        frame["languages"] = list(languages)
    if pools is not None:
        frame["pools"] = list(pools)
    if resume is not None:
        frame["resume"] = list(resume)
    if cell is not None:
        frame["cell"] = cell
    await send(ws, **frame)
    return await expect(ws, "registered", node_id=node_id)


async def result(
    ws: ClientConnection,
    job: Frame,
    *,
    status: str = "finished",
    result: Any = None,
    error: str | None = None,
    attempt: int | None = None,
) -> None:
    """Send the ``result`` of a ``job`` frame the node received."""
    await send(
        ws,
        type="result",
        job_id=job["job_id"],
        attempt=job["attempt"] if attempt is None else attempt,
        status=status,
        result=result,
        error=error,
    )


async def partial(ws: ClientConnection, job: Frame, result: Any) -> None:
    """Send a ``partial`` of a ``job`` frame the node received."""
    await send(ws, type="partial", job_id=job["job_id"], attempt=job["attempt"], result=result)


# Session side (protocol.md §4)


async def submit(
    ws: ClientConnection,
    ref: str,
    *,
    src_lang: str = "en",
    tgt_lang: str = "fr",
    payload: Any = None,
    timeout_ms: int | None = None,
    audio: bytes | None = None,
) -> None:
    """Send a ``job``: a text frame, or a binary frame when ``audio`` is given."""
    frame: dict[str, Any] = {"type": "job", "ref": ref, "src_lang": src_lang, "tgt_lang": tgt_lang}
    if payload is not None:
        frame["payload"] = payload
    if timeout_ms is not None:
        frame["timeout_ms"] = timeout_ms
    if audio is None:
        await send(ws, **frame)
    else:
        await ws.send(binary_job(frame, audio))


# Whole exchanges


async def open_session(connect: Connect, hub: Hub, **kwargs: Any) -> ClientConnection:
    """A session connection past its ``welcome``."""
    ws = await connect(hub, "/v1/session", **kwargs)
    await expect(ws, "welcome", hub_id=hub.hub_id)
    return ws


async def open_node(
    connect: Connect, hub: Hub, node_id: str, **register_fields: Any
) -> ClientConnection:
    """A node connection past its ``registered``."""
    ws = await connect(hub, "/v1/node")
    await register(ws, node_id=node_id, **register_fields)
    return ws


async def round_trip(
    session: ClientConnection, node: ClientConnection, ref: str, **job_fields: Any
) -> Frame:
    """Run one job from ``session`` on ``node`` (the only node with a free
    slot) with a partial and a result; return the session's ``result``.
    """
    await submit(session, ref, payload={"ref": ref}, **job_fields)
    accepted = await expect(session, "accepted", ref=ref)
    job = await expect(node, "job", job_id=accepted["job_id"], payload={"ref": ref})
    await partial(node, job, {"partial": ref})
    await expect(session, "partial", ref=ref, job_id=job["job_id"], result={"partial": ref})
    await result(node, job, result={"done": ref})
    return await expect(
        session, "result", ref=ref, job_id=job["job_id"], status="finished", result={"done": ref}
    )


# Redis state


async def collect_results(
    ws: Any, refs: set[str], within: float = 5000 * MS
) -> dict[str, list[Frame]]:
    """Read a session's frames until each of ``refs`` has its ``result``.

    Returns:
        The frames of each ref, in order (``accepted``, ``partial``, ``result``).

    Raises:
        AssertionError: on a second ``result`` for a ref, a frame after a
            ref's result, or a timeout.
    """
    frames: dict[str, list[Frame]] = {ref: [] for ref in refs}
    done: set[str] = set()
    deadline = time.monotonic() + within
    while done != refs:
        frame = await receive(ws, max(deadline - time.monotonic(), 1 * MS))
        ref = frame.get("ref")
        assert ref in refs, f"unexpected frame {frame!r}"
        assert ref not in done, f"frame after the result of {ref}: {frame!r}"
        frames[ref].append(frame)
        if frame["type"] == "result":
            done.add(ref)
    return frames


def attempts(frames: list[Frame]) -> list[tuple[str, int]]:
    """(node, attempt) of each ``accepted`` frame."""
    return [(f["node_id"], f["attempt"]) for f in frames if f["type"] == "accepted"]


async def job_record(redis: Redis, keys: Keys, job_id: str) -> dict[str, str]:
    """A job's hash in Redis, decoded, without its payload and audio flag."""
    raw = await redis.hgetall(keys.job(job_id))
    return {
        f.decode(): v.decode(errors="replace")
        for f, v in raw.items()
        if f not in (b"payload", b"audio")
    }


async def node_hash(redis: Redis, keys: Keys, node_id: str) -> dict[str, str]:
    """The node's hash in Redis, decoded."""
    raw = await redis.hgetall(keys.node(node_id))
    return {f.decode(): v.decode() for f, v in raw.items()}


async def wait_running(
    redis: Redis, keys: Keys, node_id: str, running: int, within: float = 1000 * MS
) -> None:
    """Wait until Redis says ``node_id`` runs ``running`` jobs."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = (await node_hash(redis, keys, node_id)).get("running")
        if value is not None and int(value) == running:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"node {node_id} runs {value} jobs, expected {running}")
        await asyncio.sleep(5 * MS)


async def check_invariants(redis: Redis, keys: Keys, node_ids: Iterable[str]) -> None:
    """The scheduler's invariants for each live node: its ``running`` count
    equals its jobs set, and each of those jobs runs on it.
    """
    for nid in node_ids:
        node = await node_hash(redis, keys, nid)
        if not node or node.get("state") == "lost":
            continue
        jobs = {j.decode() for j in await redis.smembers(keys.node_jobs(nid))}
        running = []
        for jid in jobs:
            status, on = await redis.hmget(keys.job(jid), "status", "node")
            if status == b"running" and on == nid.encode():
                running.append(jid)
        assert int(node.get("running", "0")) == len(running) == len(jobs), (
            f"node {nid}: running={node.get('running')}, jobs set {sorted(jobs)}, "
            f"running there {sorted(running)}"
        )
        assert 0 <= int(node["running"]) <= int(node["max_jobs"]), node


# HTTP


async def http_get(
    port: int, path: str, within: float = 2000 * MS
) -> tuple[int, dict[str, str], bytes]:
    """GET ``http://127.0.0.1:<port><path>``; returns status, headers, body."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return status, headers, body


# A WebSocket client that never answers pings


class RawNode:
    """A bare RFC 6455 client over a TCP stream: it reads frames but, unlike
    every WebSocket library, never answers pings or close frames by itself.

    It plays a node whose process hangs while its socket stays open. Open
    it with ``await RawNode.open(port, "/v1/node")``; close it with
    :meth:`abort`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, port: int, path: str, within: float = 2000 * MS, *, rcvbuf: int | None = None
    ) -> RawNode:
        """Connect and do the opening handshake by hand.

        Args:
            port: the hub's port.
            path: ``/v1/node`` or ``/v1/session``.
            within: bound of the connection and the handshake.
            rcvbuf: a small receive buffer, for a peer that reads slowly.

        Returns:
            The client, past the handshake.
        """
        reader, writer = await open_websocket(port, path, rcvbuf=rcvbuf, timeout_s=within)
        return cls(reader, writer)

    async def send_text(self, text: str) -> None:
        """Send one masked text frame (clients must mask, RFC 6455 §5.3)."""
        payload = text.encode()
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = bytes([0x81, 0x80 | size])
        elif size < 65536:
            head = bytes([0x81, 0x80 | 126]) + struct.pack(">H", size)
        else:
            head = bytes([0x81, 0x80 | 127]) + struct.pack(">Q", size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(head + mask + masked)
        await self.writer.drain()

    async def send_json(self, **fields: Any) -> None:
        await self.send_text(orjson.dumps(fields).decode())

    async def recv_frame(self, within: float = FRAME_TIMEOUT) -> tuple[int, bytes]:
        """The next frame as (opcode, payload); the hub's frames are unmasked.

        Raises:
            AssertionError: if nothing arrives within ``within`` seconds.
            asyncio.IncompleteReadError: if the hub closed the TCP connection.
        """
        try:
            async with asyncio.timeout(within):
                b0, b1 = await self.reader.readexactly(2)
                size = b1 & 0x7F
                if size == 126:
                    (size,) = struct.unpack(">H", await self.reader.readexactly(2))
                elif size == 127:
                    (size,) = struct.unpack(">Q", await self.reader.readexactly(8))
                return b0 & 0x0F, await self.reader.readexactly(size)
        except TimeoutError:
            raise AssertionError(f"no frame within {within:.3f} s") from None

    async def recv_until_close(self, within: float = FRAME_TIMEOUT) -> tuple[int, list[Frame]]:
        """Read frames, never answering, until a close frame.

        Returns:
            The close code and the text frames received before it (pings are
            skipped).
        """
        frames: list[Frame] = []
        deadline = asyncio.get_running_loop().time() + within
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no close frame within {within:.3f} s; got {frames!r}")
            opcode, payload = await self.recv_frame(left)
            if opcode == 0x8:
                return struct.unpack(">H", payload[:2])[0], frames
            if opcode == 0x1:
                frames.append(_decode(payload.decode()))

    def abort(self) -> None:
        """Drop the TCP connection."""
        self.writer.transport.abort()
