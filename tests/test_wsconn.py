"""Messages handed to the hub from ``data_received`` (hub/wsconn.py).

Whole messages are parsed by the hub itself and skip websockets' assembler;
fragmented ones go through it, in order with the others; bad UTF-8 closes
the connection with 1007. The raw tests write frames on the client's socket
themselves, cut anywhere, to reach every branch of the hub's parser.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
from collections.abc import Awaitable, Callable

import orjson
from websockets.asyncio.client import ClientConnection

from hub.app import Hub
from hub.wsconn import HubConnection
from tests.hubtools import (
    ALL_BYTES,
    Connect,
    binary_job,
    expect,
    expect_closed,
    open_node,
    open_session,
    receive,
    submit,
)

TEXT, BINARY, CONT, PING = 0x1, 0x2, 0x0, 0x9

MakeHub = Callable[..., Awaitable[Hub]]


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0
) -> bytes:
    """A client frame as RFC 6455 §5.2 lays it out (masked unless told)."""
    first = (0x80 if fin else 0) | rsv | opcode
    length = len(payload)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = bytes((first, mask_bit | length))
    elif length < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not masked:
        return header + payload
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def text_job(ref: str) -> bytes:
    return client_frame(TEXT, job_text(ref).encode())


def audio_job(ref: str, audio: bytes) -> bytes:
    header = {"type": "job", "ref": ref, "src_lang": "en", "tgt_lang": "fr"}
    return client_frame(BINARY, binary_job(header, audio))


def job_text(ref: str) -> str:
    return orjson.dumps({"type": "job", "ref": ref, "src_lang": "en", "tgt_lang": "fr"}).decode()


async def test_fragmented_job_is_handled_in_order_with_whole_ones(
    hub: Hub, connect: Connect
) -> None:
    await open_node(connect, hub, "gpu-1", max_jobs=4)
    session: ClientConnection = await open_session(connect, hub)
    link = next(iter(hub.registry.sessions.values()))
    assert isinstance(link.ws, HubConnection) and link.ws.on_message is not None

    text = job_text("fragmented")
    await session.send([text[:10], text[10:25], text[25:]])  # three frames, one message
    await submit(session, "whole")

    await expect(session, "accepted", ref="fragmented")
    await expect(session, "accepted", ref="whole")


async def test_text_frame_with_bad_utf8_closes_1007_and_harms_no_one_else(
    hub: Hub, connect: Connect
) -> None:
    await open_node(connect, hub, "gpu-1")
    bad = await open_session(connect, hub)
    good = await open_session(connect, hub)

    await bad.send(b'{"type": "job", "ref": "\xff"}', text=True)

    await expect_closed(bad, 1007)
    await submit(good, "c-1")
    await expect(good, "accepted", ref="c-1")


async def test_frames_cut_anywhere_across_reads_are_parsed_whole_and_in_order(
    hub: Hub, connect: Connect
) -> None:
    node = await open_node(connect, hub, "gpu-1", max_jobs=8)
    session = await open_session(connect, hub)
    small = ALL_BYTES * 60  # 15,360 bytes: a 16-bit length
    large = ALL_BYTES * 300  # 76,800 bytes: a 64-bit length
    frames = [text_job("t-1"), audio_job("a-16", small), audio_job("a-64", large), text_job("t-2")]
    wire = b"".join(frames)
    second, third = len(frames[0]), len(frames[0]) + len(frames[1])
    rng = random.Random(7)
    # Cuts inside each kind of header (2-byte, 16-bit and 64-bit lengths),
    # its extended length, its mask, and anywhere in the payloads.
    cuts = {1, 3, 5, second + 1, second + 3, second + 6, third + 5, third + 11, third + 13}
    cuts = sorted(cuts | set(rng.sample(range(len(wire)), 12)))
    for start, end in zip([0, *cuts], [*cuts, len(wire)], strict=True):
        session.transport.write(wire[start:end])
        await asyncio.sleep(0.005)  # separate reads on the hub's side

    for ref in ("t-1", "a-16", "a-64", "t-2"):
        await expect(session, "accepted", ref=ref)
    jobs = [await receive(node) for _ in range(4)]
    assert [job.get("audio") for job in jobs] == [None, small, large, None]


async def test_control_frames_and_fragments_between_whole_messages_keep_their_order(
    hub: Hub, connect: Connect
) -> None:
    await open_node(connect, hub, "gpu-1", max_jobs=8)
    session = await open_session(connect, hub)
    text = job_text("fragmented").encode()
    wire = (
        text_job("c-1")
        + client_frame(PING, b"are you there")
        + client_frame(TEXT, text[:20], fin=False)
        + client_frame(PING, b"")
        + client_frame(CONT, text[20:])
        + text_job("c-2")
    )
    session.transport.write(wire)  # one write: the hub reads it at once

    for ref in ("c-1", "fragmented", "c-2"):
        await expect(session, "accepted", ref=ref)
    pong = await session.ping()
    async with asyncio.timeout(2):
        await pong  # the connection still answers control frames
    await submit(session, "c-3")
    await expect(session, "accepted", ref="c-3")


async def test_unmasked_frame_closes_1002(hub: Hub, connect: Connect) -> None:
    session = await open_session(connect, hub)
    session.transport.write(client_frame(TEXT, job_text("c-1").encode(), masked=False))
    await expect_closed(session, 1002)


async def test_frame_with_reserved_bits_closes_1002(hub: Hub, connect: Connect) -> None:
    session = await open_session(connect, hub)
    session.transport.write(client_frame(TEXT, job_text("c-1").encode(), rsv=0x40))
    await expect_closed(session, 1002)


async def test_frame_over_the_limit_closes_1009_before_its_payload_arrives(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(max_frame_bytes=4096)
    session = await open_session(connect, hub, max_size=None)
    whole = client_frame(BINARY, b"x" * 100_000)
    session.transport.write(whole[:14])  # the header only: 100,000 bytes announced
    await expect_closed(session, 1009)
