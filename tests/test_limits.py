"""Every limit of Settings with its documented behaviour (protocol.md §5, §6, §7, §10).

Each test runs a real hub with the limit set small, pushes a client just
past it, and checks the documented answer: an error frame (the connection
stays open and keeps working), a close code, or an HTTP status at the
handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus
from websockets.protocol import State

from hub.app import Hub
from hub.keys import Keys
from tests.helpers import MS, glob_escape, wait_for
from tests.hubtools import (
    binary_job,
    expect,
    expect_closed,
    expect_silence,
    http_get,
    register,
    result,
    send,
    submit,
)

MakeHub = Callable[..., Awaitable[Hub]]
Connect = Callable[..., Awaitable[ClientConnection]]


async def open_node(connect: Connect, hub: Hub, node_id: str, **kwargs: Any) -> ClientConnection:
    ws = await connect(hub, "/v1/node")
    await register(ws, node_id=node_id, **kwargs)
    return ws


async def open_session(connect: Connect, hub: Hub) -> ClientConnection:
    ws = await connect(hub, "/v1/session")
    await expect(ws, "welcome")
    return ws


async def refused_status(connect: Connect, hub: Hub, path: str) -> int:
    with pytest.raises(InvalidStatus) as info:
        await connect(hub, path)
    return info.value.response.status_code


# Sizes


async def test_message_over_max_frame_bytes_is_closed_1009(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(max_frame_bytes=4096)
    session = await open_session(connect, hub)
    # At the limit: read, and refused as a frame (not JSON), connection open.
    await session.send("x" * 4096)
    await expect(session, "error", code="BAD_FRAME")
    await session.send("x" * 4097)
    assert await expect_closed(session, 1009) == []
    session = await open_session(connect, hub)
    await session.send(b"\x00" * 5000)
    await expect_closed(session, 1009)
    node = await connect(hub, "/v1/node")
    await send(node, type="register", node_id="gpu-1", pad="x" * 5000)
    await expect_closed(node, 1009)


async def test_payload_over_max_payload_bytes_is_too_large(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(max_payload_bytes=1024)
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    # {"t":"..."} encodes to 8 bytes plus the string.
    await submit(session, "c-1", payload={"t": "x" * 1017})
    await expect(session, "error", ref="c-1", code="TOO_LARGE")
    await submit(session, "c-1", payload={"t": "x" * 1016})
    await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    assert len(orjson.dumps(job["payload"])) == 1024
    # Whitespace does not count: the payload is measured re-encoded compactly.
    spaced = '{"type":"job","ref":"c-2","src_lang":"en","tgt_lang":"fr","payload":{"t"  :  "'
    await session.send(spaced + "x" * 1016 + '"   }}')
    await expect(session, "accepted", ref="c-2")


async def test_audio_over_max_audio_bytes_is_too_large(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(max_audio_bytes=1024)
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    header = {"type": "job", "ref": "c-1", "src_lang": "en", "tgt_lang": "fr"}
    await session.send(binary_job(header, b"\x01" * 1025))
    await expect(session, "error", ref="c-1", code="TOO_LARGE")
    await session.send(binary_job(header, b""))
    await expect(session, "error", ref="c-1", code="BAD_FRAME")
    await session.send(binary_job(header, b"\x01" * 1024))
    await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    assert job["audio"] == b"\x01" * 1024


async def test_result_over_max_result_bytes_is_too_large(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(max_result_bytes=1024)
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    await send(node, type="partial", job_id=job["job_id"], attempt=1, result={"t": "x" * 1017})
    await expect(node, "error", code="TOO_LARGE")
    await result(node, job, result={"t": "x" * 1017})
    await expect(node, "error", code="TOO_LARGE")
    # The job still runs on the node: a result within the limit counts.
    await send(node, type="load", load={"pad": "x" * 5000})  # max_load_bytes: 4096
    await expect(node, "error", code="TOO_LARGE")
    await result(node, job, result={"t": "x" * 1016})
    done = await expect(session, "result", ref="c-1", status="finished")
    assert done["result"] == {"t": "x" * 1016}


# Ids (protocol.md §5): length, and the characters allowed in Redis key names

HOSTILE_IDS = (
    "evil:node",
    "evil{x}",
    "{evil}",
    "evil}",
    "evil node",
    "evil*",
    "evil?",
    "evil[1]",
    "évil",
    "evil\u200b",
    "evil\n",
    "evil\x00",
    "evil/../x",
    "evil\\x",
    "",
)


async def test_id_length_is_limited(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(max_id_length=16)
    node = await connect(hub, "/v1/node")
    await send(
        node,
        type="register",
        node_id="n" * 17,
        services=["asr"],
        languages=["en", "fr"],
        max_jobs=1,
    )
    await expect(node, "error", code="BAD_FRAME")
    await send(
        node,
        type="register",
        node_id="n" * 16,
        services=["s" * 17],
        languages=["en", "fr"],
        max_jobs=1,
    )
    await expect(node, "error", code="BAD_FRAME")
    await register(node, node_id="n" * 16, pools=["p" * 16])
    session = await open_session(connect, hub)
    await submit(session, "r" * 17)
    frame = await expect(session, "error", code="BAD_FRAME")
    assert frame["ref"] is None
    await submit(session, "r" * 16)
    await expect(session, "accepted", ref="r" * 16)
    # Language codes: at most 24 characters (no node serves these pairs).
    await submit(session, "c-1", src_lang="zh-Hans-abcdefgh-abcdefg")
    await expect(session, "error", ref="c-1", code="NO_POOL_FOR_LANG_PAIR")
    await submit(session, "c-2", src_lang="zh-Hans-abcdefgh-abcdefgh")
    await expect(session, "error", ref="c-2", code="BAD_FRAME")


async def test_ids_with_hostile_characters_are_refused_and_never_reach_redis(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub()
    register_fields: dict[str, Any] = {
        "services": ["asr"],
        "languages": ["en", "fr"],
        "max_jobs": 1,
    }
    attacker = await connect(hub, "/v1/node")
    for bad in HOSTILE_IDS:
        for field, value in (
            ("node_id", bad),
            ("services", [bad]),
            ("pools", [bad]),
            ("resume", [bad]),
            ("languages", ["en", bad]),
            ("lang_pairs", [["en", bad]]),
        ):
            frame = {"type": "register", "node_id": "evil-ok"} | register_fields
            if field == "lang_pairs":
                del frame["languages"]
            frame[field] = value
            await send(attacker, **frame)
            reply = await expect(attacker, "error", code="BAD_FRAME")
            assert reply["ref"] is None, (field, bad)
    # The connection stayed open: a valid registration still works.
    await register(attacker, node_id="gpu-1", max_jobs=4)
    for bad in HOSTILE_IDS:
        await send(attacker, type="result", job_id=bad, attempt=1, status="finished")
        await expect(attacker, "error", code="BAD_FRAME")
        await send(attacker, type="partial", job_id=bad, attempt=1, result={})
        await expect(attacker, "error", code="BAD_FRAME")

    session = await open_session(connect, hub)
    for bad in HOSTILE_IDS:
        await send(session, type="ack", job_ids=[bad])
        await expect(session, "error", code="BAD_FRAME")
        await submit(session, "c-1", src_lang=bad or "x")
        await expect(session, "error", ref="c-1", code="BAD_FRAME")
        await submit(session, "c-1", tgt_lang=f"en:{bad}")
        await expect(session, "error", ref="c-1", code="BAD_FRAME")
    # Resuming a session named with those characters: refused, no key touched.
    for bad in HOSTILE_IDS:
        if not bad:
            continue  # an empty session_id is no session_id: a new session
        ws = await connect(hub, f"/v1/session?session_id={quote(bad)}&resume_token=0")
        await expect_closed(ws, 4007)
    # Refs are the session's own names, stored only as values: any printable
    # text is fine, and the job runs under a hub-made id.
    for i, ref in enumerate(("a:b", "{x}", "*", "é ü", "evil}")):
        await submit(session, ref)
        accepted = await expect(session, "accepted", ref=ref)
        assert re.fullmatch(r"[A-Za-z0-9_-]+", accepted["job_id"]), i
        job = await expect(attacker, "job", job_id=accepted["job_id"])
        await result(attacker, job)
        await expect(session, "result", ref=ref)

    # No key of the cell was named after hostile input.
    pattern = glob_escape(keys.prefix) + "*"
    names = [k.decode() async for k in redis.scan_iter(match=pattern)]
    assert names
    for name in names:
        assert name.startswith(keys.prefix)
        suffix = name[len(keys.prefix) :]
        assert "evil" not in suffix, name
        assert re.fullmatch(r"[A-Za-z0-9._~-]+(:[A-Za-z0-9._~-]+)*", suffix), name


async def test_max_jobs_over_max_jobs_per_node_is_bad_frame(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(max_jobs_per_node=4)
    node = await connect(hub, "/v1/node")
    for max_jobs in ("5", "0", "-1", str(2**70), "4.0", "4e0", "true", '"4"', "null", "[4]"):
        await node.send(
            '{"type":"register","node_id":"gpu-1","services":["asr"],'
            f'"languages":["en","fr"],"max_jobs":{max_jobs}}}'
        )
        await expect(node, "error", code="BAD_FRAME")
    # resume lists are bounded the same way.
    await send(
        node,
        type="register",
        node_id="gpu-1",
        services=["asr"],
        languages=["en", "fr"],
        max_jobs=4,
        resume=[f"j-{i}" for i in range(5)],
    )
    await expect(node, "error", code="BAD_FRAME")
    assert not await redis.exists(keys.node("gpu-1"))
    await register(node, node_id="gpu-1", max_jobs=4)
    assert await redis.hget(keys.node("gpu-1"), "max_jobs") == b"4"


# Per-session limits (protocol.md §9.2 order: rate, duplicate, in-flight, scheduling)


async def test_max_inflight_per_session_is_too_many_jobs(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(max_inflight_per_session=2)
    node = await open_node(connect, hub, "gpu-1", max_jobs=8)
    session = await open_session(connect, hub)
    for ref in ("c-1", "c-2"):
        await submit(session, ref)
        await expect(session, "accepted", ref=ref)
    await submit(session, "c-3")
    await expect(session, "error", ref="c-3", code="TOO_MANY_JOBS")
    # A duplicate ref is checked before the count.
    await submit(session, "c-1")
    await expect(session, "error", ref="c-1", code="DUPLICATE_REF")
    # Another session has its own budget.
    other = await open_session(connect, hub)
    await submit(other, "c-1")
    await expect(other, "accepted", ref="c-1")
    job = await expect(node, "job")
    await result(node, job)
    await expect(session, "result", job_id=job["job_id"])
    await submit(session, "c-3")
    await expect(session, "accepted", ref="c-3")


async def test_max_queued_per_session_is_queue_full(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(max_queued_per_session=2, queue_wait_ms=5000)
    node = await open_node(connect, hub, "gpu-1", max_jobs=1)
    session = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    for ref in ("c-2", "c-3"):
        await submit(session, ref)
        await expect(session, "queued", ref=ref)
    await submit(session, "c-4")
    await expect(session, "error", ref="c-4", code="QUEUE_FULL")
    # Another session may still queue in the same pool.
    other = await open_session(connect, hub)
    await submit(other, "o-1")
    await expect(other, "queued", ref="o-1")
    # When the slot frees, the session's next queued job runs.
    job = await expect(node, "job")
    await result(node, job)
    await expect(session, "result", ref="c-1")
    accepted = await expect(session, "accepted", ref="c-2")
    await expect(node, "job", job_id=accepted["job_id"])


async def test_queue_max_is_queue_full(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(queue_max=1, queue_wait_ms=5000)
    await open_node(connect, hub, "gpu-1", max_jobs=1)
    first, second = await open_session(connect, hub), await open_session(connect, hub)
    await submit(first, "c-1")
    await expect(first, "accepted", ref="c-1")
    await submit(first, "c-2")
    await expect(first, "queued", ref="c-2")
    await submit(second, "c-1")
    await expect(second, "error", ref="c-1", code="QUEUE_FULL")


async def burst_codes(session: ClientConnection, refs: list[str]) -> list[str]:
    """Send a job per ref back to back, then return the error code of each.

    Back to back, so that no token comes back between them however slow the
    machine is; the answers may come in any order.
    """
    for ref in refs:
        await submit(session, ref)
    codes = {}
    for _ in refs:
        frame = await expect(session, "error")
        codes[frame["ref"]] = frame["code"]
    return [codes[ref] for ref in refs]


async def test_session_rate_is_rate_limited(make_hub: MakeHub, connect: Connect) -> None:
    # No node: each job that passes the rate check is refused by scheduling.
    hub = await make_hub(session_rate_per_s=5.0, session_burst=3)
    session = await open_session(connect, hub)
    codes = await burst_codes(session, [f"c-{i}" for i in range(5)])
    assert codes == ["NO_POOL_FOR_LANG_PAIR"] * 3 + ["RATE_LIMITED"] * 2
    # Another session has its own bucket.
    other = await open_session(connect, hub)
    codes = await burst_codes(other, [f"o-{i}" for i in range(4)])
    assert codes == ["NO_POOL_FOR_LANG_PAIR"] * 3 + ["RATE_LIMITED"]
    # Tokens come back at the rate; the connection never closed.
    await asyncio.sleep(250 * MS)
    await submit(session, "c-5")
    await expect(session, "error", ref="c-5", code="NO_POOL_FOR_LANG_PAIR")


# Connections (protocol.md §10)


async def test_max_connections_is_http_503(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(max_connections=3)
    clients = [await open_session(connect, hub) for _ in range(2)]
    clients.append(await open_node(connect, hub, "gpu-1"))
    assert await refused_status(connect, hub, "/v1/session") == 503
    assert await refused_status(connect, hub, "/v1/node") == 503
    # HTTP endpoints still answer while the WebSockets are full.
    status, _, _ = await http_get(hub.port, "/readyz")
    assert status == 200
    await clients[0].close()
    await wait_for(lambda: hub.gate.connections < 3, what="a slot to free")
    await open_session(connect, hub)


async def test_max_connections_per_ip_is_http_429(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(max_connections_per_ip=2)
    first = await open_session(connect, hub)
    await open_node(connect, hub, "gpu-1")
    assert await refused_status(connect, hub, "/v1/session") == 429
    assert await refused_status(connect, hub, "/v1/node") == 429
    await first.close()
    await wait_for(lambda: hub.gate.connections < 2, what="a slot to free")
    await open_session(connect, hub)


# Timeouts (protocol.md §3.1, §7)


async def test_no_register_in_time_is_closed_4001(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(register_timeout_s=0.3)
    silent = await connect(hub, "/v1/node")
    chatty = await connect(hub, "/v1/node")
    # Frames other than register do not stop the clock.
    await send(chatty, type="load", load={})
    await expect(chatty, "error", code="NOT_REGISTERED")
    await send(chatty, type="drain")
    await expect(chatty, "error", code="NOT_REGISTERED")
    started = asyncio.get_running_loop().time()
    await expect_closed(silent, 4001, within=1000 * MS)
    await expect_closed(chatty, 4001, within=1000 * MS)
    assert asyncio.get_running_loop().time() - started < 1000 * MS


async def test_unfinished_handshake_is_cut_after_the_register_timeout(
    make_hub: MakeHub,
) -> None:
    # open_timeout is register_timeout_s: half-open and slow handshakes are cut.
    hub = await make_hub(register_timeout_s=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", hub.port)
    writer.write(b"GET /v1/node HTTP/1.1\r\nHost: x\r\n")  # never finished
    try:
        async with asyncio.timeout(1500 * MS):
            assert await reader.read() == b""  # EOF from the hub
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_idle_session_is_closed_4006(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(session_idle_timeout_s=0.3)
    idle = await open_session(connect, hub)
    busy = await open_session(connect, hub)

    async def keep_busy() -> None:
        while True:
            await send(busy, type="ack", job_ids=[])
            await asyncio.sleep(100 * MS)

    task = asyncio.create_task(keep_busy())
    try:
        # The hub checks idleness once a second.
        await expect_closed(idle, 4006, within=2500 * MS)
        assert busy.state is State.OPEN
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await expect_closed(busy, 4006, within=2500 * MS)


async def test_slow_session_is_closed_4005(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(send_buffer_bytes=64 * 1024)
    node = await open_node(connect, hub, "gpu-1")
    session = await connect(hub, "/v1/session")
    welcome = await expect(session, "welcome")
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    job = await expect(node, "job")
    link = hub.registry.sessions[welcome["session_id"]]

    # The session stops reading; the node streams big partials at it.
    assert session.transport is not None
    session.transport.pause_reading()
    chunk = {"t": "x" * 200_000}
    for _ in range(400):  # bounded: 80 MB at most
        await send(node, type="partial", job_id=job["job_id"], attempt=1, result=chunk)
        if link.ws.state is not State.OPEN:
            break
        await asyncio.sleep(0)
    await wait_for(lambda: link.ws.state is not State.OPEN, what="the hub to close the session")
    # The hub closed it as too slow; the node was not hurt.
    session.transport.resume_reading()
    await expect_closed(session, 4005, within=5000 * MS)
    await wait_for(lambda: node.state is State.OPEN)
    await expect(node, "cancel", job_id=job["job_id"], reason="CANCELLED")


async def test_limit_errors_do_not_close_the_connection(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(max_payload_bytes=64, max_inflight_per_session=1)
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    for _ in range(50):
        await submit(session, "big", payload={"t": "x" * 100})
        await expect(session, "error", ref="big", code="TOO_LARGE")
        await session.send("{")
        await expect(session, "error", code="BAD_FRAME")
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
    await submit(session, "c-2")
    await expect(session, "error", ref="c-2", code="TOO_MANY_JOBS")
    job = await expect(node, "job")
    await result(node, job)
    await expect(session, "result", ref="c-1")
    await expect_silence(session, 10 * MS)
    assert session.state is State.OPEN
