"""Bad input over real sockets gets a clear answer, and nothing else breaks.

Issue 3, "Bad input": each test sends one kind of bad frame and checks the
documented error code (protocol.md §6) or close code (§7), that the
connection stays usable when it should, that another connection keeps
working, and that the Redis invariants still hold afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.server import ServerProtocol

from hub.app import Hub
from hub.gate import RedactingLogger
from hub.keys import Keys
from tests.helpers import MS, wait_for
from tests.hubtools import (
    ALL_BYTES,
    Connect,
    binary_job,
    check_invariants,
    expect,
    expect_closed,
    expect_silence,
    http_get,
    node_hash,
    open_node,
    open_session,
    receive,
    register,
    result,
    round_trip,
    send,
    submit,
    wait_running,
)

MakeHub = Callable[..., Awaitable[Hub]]


@dataclasses.dataclass
class Fleet:
    """A hub with one node (gpu-1: en<->fr, 2 slots) and one session."""

    hub: Hub
    node: ClientConnection
    session: ClientConnection
    connect: Connect
    redis: Redis
    keys: Keys
    checks: int = 0

    async def still_serving(self, *, node: ClientConnection | None = None) -> None:
        """The same connections still work, a new session works, Redis is sound."""
        node = node or self.node
        self.checks += 1
        await round_trip(self.session, node, f"check-{self.checks}")
        other = await open_session(self.connect, self.hub)
        await round_trip(other, node, f"other-{self.checks}")
        await self.invariants()

    async def invariants(self) -> None:
        nodes = [m.decode() for m in await self.redis.zrange(self.keys.seen, 0, -1)]
        await check_invariants(self.redis, self.keys, {"gpu-1", "gpu-2", *nodes})


MakeFleet = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def make_fleet(make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys) -> MakeFleet:
    async def make(**settings: Any) -> Fleet:
        hub = await make_hub(**settings)
        node = await open_node(connect, hub, "gpu-1", max_jobs=2)
        session = await open_session(connect, hub)
        return Fleet(hub, node, session, connect, redis, keys)

    return make


@pytest.fixture
async def fleet(make_fleet: MakeFleet) -> Fleet:
    return await make_fleet()


NOT_OBJECTS = ["[1, 2]", '"job"', "42", "null", "true"]


# Session frames


async def test_session_invalid_json_is_bad_frame(fleet: Fleet) -> None:
    await fleet.session.send('{"type": "job", "ref": ')
    await expect(
        fleet.session, "error", ref=None, code="BAD_FRAME", message="frame is not valid JSON"
    )
    await fleet.still_serving()


@pytest.mark.parametrize("text", NOT_OBJECTS)
async def test_session_json_that_is_not_an_object_is_bad_frame(fleet: Fleet, text: str) -> None:
    await fleet.session.send(text)
    await expect(
        fleet.session, "error", ref=None, code="BAD_FRAME", message="frame must be a JSON object"
    )
    await fleet.still_serving()


async def test_session_invalid_utf8_in_binary_header_is_bad_frame(fleet: Fleet) -> None:
    await fleet.session.send(b"\x00\x00\x00\x02\xff\xfeaudio")
    await expect(fleet.session, "error", ref=None, code="BAD_FRAME")
    await fleet.still_serving()


async def test_session_unknown_type_is_unknown_type_with_its_ref(fleet: Fleet) -> None:
    await send(fleet.session, type="subscribe", ref="c-9")
    await expect(fleet.session, "error", ref="c-9", code="UNKNOWN_TYPE")
    await fleet.still_serving()


async def test_session_frame_without_type_is_bad_frame(fleet: Fleet) -> None:
    await send(fleet.session, ref="c-1", src_lang="en", tgt_lang="fr")
    await expect(fleet.session, "error", ref="c-1", code="BAD_FRAME")
    await send(fleet.session, type=7, ref="c-1")
    await expect(fleet.session, "error", ref="c-1", code="BAD_FRAME")
    await fleet.still_serving()


@pytest.mark.parametrize(
    ("fields", "ref"),
    [
        ({"src_lang": "en", "tgt_lang": "fr"}, None),  # no ref
        ({"ref": 5, "src_lang": "en", "tgt_lang": "fr"}, None),
        ({"ref": "x" * 65, "src_lang": "en", "tgt_lang": "fr"}, None),
        ({"ref": "a\nb", "src_lang": "en", "tgt_lang": "fr"}, None),
        ({"ref": "c-1", "tgt_lang": "fr"}, "c-1"),  # no src_lang
        ({"ref": "c-1", "src_lang": "en", "tgt_lang": 5}, "c-1"),
        ({"ref": "c-1", "src_lang": "english!", "tgt_lang": "fr"}, "c-1"),
        ({"ref": "c-1", "src_lang": "en", "tgt_lang": "fr", "payload": [1]}, "c-1"),
        ({"ref": "c-1", "src_lang": "en", "tgt_lang": "fr", "payload": "text"}, "c-1"),
        ({"ref": "c-1", "src_lang": "en", "tgt_lang": "fr", "timeout_ms": 1.5}, "c-1"),
        ({"ref": "c-1", "src_lang": "en", "tgt_lang": "fr", "timeout_ms": 1000.0}, "c-1"),
        ({"ref": "c-1", "src_lang": "en", "tgt_lang": "fr", "timeout_ms": True}, "c-1"),
        ({"ref": "c-1", "src_lang": "en", "tgt_lang": "fr", "timeout_ms": 0}, "c-1"),
        ({"ref": "c-1", "src_lang": "en", "tgt_lang": "fr", "timeout_ms": "5"}, "c-1"),
    ],
    ids=[
        "no-ref",
        "int-ref",
        "long-ref",
        "control-ref",
        "no-src",
        "int-tgt",
        "bad-lang",
        "list-payload",
        "string-payload",
        "float-timeout",
        "float-integral-timeout",
        "bool-timeout",
        "zero-timeout",
        "string-timeout",
    ],
)
async def test_session_job_with_missing_or_ill_typed_field_is_bad_frame(
    fleet: Fleet, fields: dict[str, Any], ref: str | None
) -> None:
    await send(fleet.session, type="job", **fields)
    await expect(fleet.session, "error", ref=ref, code="BAD_FRAME")
    await expect_silence(fleet.node, 20 * MS)
    await fleet.still_serving()


async def test_session_cancel_without_ref_is_bad_frame(fleet: Fleet) -> None:
    await send(fleet.session, type="cancel")
    await expect(fleet.session, "error", ref=None, code="BAD_FRAME")
    await fleet.still_serving()


async def test_session_payload_over_its_limit_is_too_large(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(max_payload_bytes=1024)
    await submit(fleet.session, "big", payload={"text": "x" * 2000})
    await expect(fleet.session, "error", ref="big", code="TOO_LARGE")
    await expect_silence(fleet.node, 20 * MS)
    await fleet.still_serving()


async def test_session_audio_over_its_limit_is_too_large(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(max_audio_bytes=1000)
    await submit(fleet.session, "big", audio=bytes(1001))
    await expect(fleet.session, "error", ref="big", code="TOO_LARGE")
    await fleet.still_serving()


async def test_session_binary_job_without_audio_is_bad_frame(fleet: Fleet) -> None:
    await fleet.session.send(binary_job({"type": "job", "ref": "c-1", "src_lang": "en"}, b""))
    await expect(fleet.session, "error", code="BAD_FRAME")
    await fleet.session.send(
        binary_job({"type": "job", "ref": "c-1", "src_lang": "en", "tgt_lang": "fr"}, b"")
    )
    await expect(fleet.session, "error", ref="c-1", code="BAD_FRAME")
    await fleet.still_serving()


@pytest.mark.parametrize(
    "frame",
    [
        (1000).to_bytes(4, "big") + b'{"type": "job"}' + ALL_BYTES,
        (2**32 - 1).to_bytes(4, "big") + b"{}",
        (5).to_bytes(4, "big") + b"{}",
    ],
    ids=["1000", "2**32-1", "one-past"],
)
async def test_session_binary_header_length_past_the_end_is_bad_frame(
    fleet: Fleet, frame: bytes
) -> None:
    await fleet.session.send(frame)
    await expect(
        fleet.session,
        "error",
        ref=None,
        code="BAD_FRAME",
        message="binary header length past end of frame",
    )
    await expect_silence(fleet.node, 20 * MS)
    await fleet.still_serving()


async def test_session_binary_frame_shorter_than_its_length_field_is_bad_frame(
    fleet: Fleet,
) -> None:
    await fleet.session.send(b"\x00\x01")
    await expect(fleet.session, "error", ref=None, code="BAD_FRAME")
    await fleet.still_serving()


async def test_session_binary_frame_that_is_not_a_job_is_bad_frame(fleet: Fleet) -> None:
    await fleet.session.send(binary_job({"type": "cancel", "ref": "c-1"}, ALL_BYTES))
    await expect(fleet.session, "error", ref="c-1", code="BAD_FRAME")
    await fleet.still_serving()


async def test_session_message_over_max_frame_bytes_is_closed_with_1009(
    make_fleet: MakeFleet,
) -> None:
    fleet = await make_fleet(max_frame_bytes=64 * 1024, max_audio_bytes=1024 * 1024)
    big = await open_session(fleet.connect, fleet.hub)
    await submit(big, "big", audio=bytes(65 * 1024))
    await expect_closed(big, 1009)
    await fleet.still_serving()


async def test_session_duplicate_ref_is_refused_and_the_first_job_goes_on(fleet: Fleet) -> None:
    await submit(fleet.session, "c-1", payload={"n": 1})
    accepted = await expect(fleet.session, "accepted", ref="c-1")
    job = await expect(fleet.node, "job")
    await submit(fleet.session, "c-1", payload={"n": 2})
    await expect(fleet.session, "error", ref="c-1", code="DUPLICATE_REF")
    await expect_silence(fleet.node, 20 * MS)
    await wait_running(fleet.redis, fleet.keys, "gpu-1", 1)
    await result(fleet.node, job, result={"n": 1})
    await expect(fleet.session, "result", ref="c-1", job_id=accepted["job_id"], result={"n": 1})
    await fleet.still_serving()


async def test_session_duplicate_ref_of_a_queued_job_is_refused(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet()
    await submit(fleet.session, "a")
    await submit(fleet.session, "b")
    jobs = [await expect(fleet.node, "job"), await expect(fleet.node, "job")]
    await expect(fleet.session, "accepted")
    await expect(fleet.session, "accepted")
    await submit(fleet.session, "q")
    await expect(fleet.session, "queued", ref="q")
    await submit(fleet.session, "q")
    await expect(fleet.session, "error", ref="q", code="DUPLICATE_REF")
    for job in jobs:
        await result(fleet.node, job, result={})
    # Frames of different jobs interleave (protocol.md §9.2): two results,
    # and "q" gets a slot.
    frames = [await receive(fleet.session) for _ in range(3)]
    assert sorted((f["type"], f["ref"]) for f in frames) == [
        ("accepted", "q"),
        ("result", "a"),
        ("result", "b"),
    ]
    job = await expect(fleet.node, "job")
    await result(fleet.node, job, result={})
    await expect(fleet.session, "result", ref="q", status="finished")
    await fleet.still_serving()


async def test_session_cancel_of_an_unknown_ref_is_unknown_job(fleet: Fleet) -> None:
    await send(fleet.session, type="cancel", ref="never-sent")
    await expect(fleet.session, "error", ref="never-sent", code="UNKNOWN_JOB")
    await fleet.still_serving()


async def test_session_cancel_of_a_finished_job_is_unknown_job(fleet: Fleet) -> None:
    await round_trip(fleet.session, fleet.node, "done")
    await send(fleet.session, type="cancel", ref="done")
    await expect(fleet.session, "error", ref="done", code="UNKNOWN_JOB")
    await fleet.still_serving()


async def test_session_ack_of_unknown_ids_is_ignored(fleet: Fleet) -> None:
    await send(fleet.session, type="ack", job_ids=["nope", "never"])
    await expect_silence(fleet.session, 50 * MS)
    await send(fleet.session, type="ack", job_ids="nope")
    await expect(fleet.session, "error", code="BAD_FRAME")
    await fleet.still_serving()


# Scheduling refusals


async def test_job_for_a_pair_nobody_serves_is_no_pool_for_lang_pair(fleet: Fleet) -> None:
    await submit(fleet.session, "c-1", src_lang="de", tgt_lang="ja")
    await expect(fleet.session, "error", ref="c-1", code="NO_POOL_FOR_LANG_PAIR")
    await expect_silence(fleet.node, 20 * MS)
    await fleet.still_serving()


async def test_job_for_a_pair_whose_nodes_are_gone_is_empty_pool(fleet: Fleet) -> None:
    gone = await open_node(fleet.connect, fleet.hub, "gpu-2", languages=["de", "ja"])
    await gone.close()
    await wait_for(
        lambda: _state(fleet, "gpu-2", "lost"), timeout=1000 * MS, what="gpu-2 to be lost"
    )
    await submit(fleet.session, "c-1", src_lang="de", tgt_lang="ja")
    await expect(fleet.session, "error", ref="c-1", code="EMPTY_POOL")
    await fleet.still_serving()


async def test_job_when_every_node_is_busy_and_queueing_is_off_is_no_available_node(
    make_fleet: MakeFleet,
) -> None:
    fleet = await make_fleet(queue_wait_ms=0)
    await submit(fleet.session, "a")
    await submit(fleet.session, "b")
    jobs = [await expect(fleet.node, "job"), await expect(fleet.node, "job")]
    await expect(fleet.session, "accepted")
    await expect(fleet.session, "accepted")
    other = await open_session(fleet.connect, fleet.hub)
    await submit(other, "c")
    await expect(other, "error", ref="c", code="NO_AVAILABLE_NODE")
    await expect_silence(fleet.node, 20 * MS)
    await fleet.invariants()
    for job in jobs:
        await result(fleet.node, job, result={})
    for _ in jobs:
        await expect(fleet.session, "result", status="finished")
    await fleet.still_serving()


async def test_job_when_the_queue_is_full_is_queue_full(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(queue_max=1)
    await submit(fleet.session, "a")
    await submit(fleet.session, "b")
    jobs = [await expect(fleet.node, "job"), await expect(fleet.node, "job")]
    await expect(fleet.session, "accepted")
    await expect(fleet.session, "accepted")
    await submit(fleet.session, "q1")
    await expect(fleet.session, "queued", ref="q1")
    other = await open_session(fleet.connect, fleet.hub)
    await submit(other, "q2")
    await expect(other, "error", ref="q2", code="QUEUE_FULL")
    await fleet.invariants()
    # The refused ref is free again, and the queued job still runs.
    await result(fleet.node, jobs[0], result={})
    await expect(fleet.session, "result", status="finished")
    await expect(fleet.session, "accepted", ref="q1")
    queued_job = await expect(fleet.node, "job")
    for job in (jobs[1], queued_job):
        await result(fleet.node, job, result={})
    for _ in range(2):
        await expect(fleet.session, "result", status="finished")
    await fleet.still_serving()


# Node frames


async def test_node_frame_before_register_is_not_registered(fleet: Fleet) -> None:
    ws = await fleet.connect(fleet.hub, "/v1/node")
    await send(ws, type="result", job_id="j-1", attempt=1, status="finished")
    await expect(ws, "error", code="NOT_REGISTERED")
    await send(ws, type="drain")
    await expect(ws, "error", code="NOT_REGISTERED")
    # The connection stays open and can still register.
    await register(ws, node_id="gpu-2", languages=["de", "ja"])
    assert (await node_hash(fleet.redis, fleet.keys, "gpu-2"))["state"] == "live"
    await fleet.still_serving()


async def test_node_bad_register_can_be_corrected(fleet: Fleet) -> None:
    ws = await fleet.connect(fleet.hub, "/v1/node")
    await send(ws, type="register", node_id="gpu-2", services=["asr"], languages=["en", "fr"])
    await expect(ws, "error", code="BAD_FRAME")  # no max_jobs
    await send(
        ws,
        type="register",
        node_id="gpu 2",
        services=["asr"],
        languages=["en", "fr"],
        max_jobs=1,
    )
    await expect(ws, "error", code="BAD_FRAME")  # a space in the id
    await send(
        ws,
        type="register",
        node_id="gpu-2",
        services=["asr"],
        languages=["en"],
        max_jobs=1,
    )
    await expect(ws, "error", code="BAD_FRAME")  # one language is no pair
    await register(ws, node_id="gpu-2", languages=["de", "ja"], max_jobs=1)
    await fleet.still_serving()


async def test_node_second_register_is_already_registered(fleet: Fleet) -> None:
    await send(
        fleet.node,
        type="register",
        node_id="gpu-9",
        services=["asr"],
        languages=["de", "ja"],
        max_jobs=7,
    )
    await expect(fleet.node, "error", code="ALREADY_REGISTERED")
    node = await node_hash(fleet.redis, fleet.keys, "gpu-1")
    assert node["max_jobs"] == "2"
    assert await node_hash(fleet.redis, fleet.keys, "gpu-9") == {}
    await fleet.still_serving()


async def test_node_invalid_json_is_bad_frame(fleet: Fleet) -> None:
    await fleet.node.send("{not json")
    await expect(fleet.node, "error", ref=None, code="BAD_FRAME")
    await fleet.still_serving()


@pytest.mark.parametrize("text", NOT_OBJECTS)
async def test_node_json_that_is_not_an_object_is_bad_frame(fleet: Fleet, text: str) -> None:
    await fleet.node.send(text)
    await expect(fleet.node, "error", ref=None, code="BAD_FRAME")
    await fleet.still_serving()


async def test_node_unknown_type_is_unknown_type(fleet: Fleet) -> None:
    await send(fleet.node, type="job", job_id="j-1")
    await expect(fleet.node, "error", code="UNKNOWN_TYPE")
    await fleet.still_serving()


async def test_node_binary_frame_is_bad_frame(fleet: Fleet) -> None:
    await fleet.node.send(binary_job({"type": "load", "load": {}}, ALL_BYTES))
    await expect(fleet.node, "error", code="BAD_FRAME")
    await fleet.still_serving()


@pytest.mark.parametrize(
    "fields",
    [
        {"attempt": 1, "status": "finished"},  # no job_id
        {"job_id": "J", "status": "finished"},  # no attempt
        {"job_id": "J", "attempt": "1", "status": "finished"},
        {"job_id": "J", "attempt": 1.0, "status": "finished"},
        {"job_id": "J", "attempt": True, "status": "finished"},
        {"job_id": "J", "attempt": 0, "status": "finished"},
        {"job_id": "J", "attempt": 1},  # no status
        {"job_id": "J", "attempt": 1, "status": "done"},
        {"job_id": "J", "attempt": 1, "status": "finished", "result": [1]},
        {"job_id": "J", "attempt": 1, "status": "failed", "error": 5},
    ],
    ids=[
        "no-job-id",
        "no-attempt",
        "string-attempt",
        "float-attempt",
        "bool-attempt",
        "zero-attempt",
        "no-status",
        "bad-status",
        "list-result",
        "int-error",
    ],
)
async def test_node_result_with_missing_or_ill_typed_field_is_bad_frame(
    fleet: Fleet, fields: dict[str, Any]
) -> None:
    await submit(fleet.session, "c-1")
    await expect(fleet.session, "accepted", ref="c-1")
    job = await expect(fleet.node, "job")
    frame = {k: job["job_id"] if v == "J" else v for k, v in fields.items()}
    await send(fleet.node, type="result", **frame)
    await expect(fleet.node, "error", code="BAD_FRAME")
    # The job is untouched: it still runs, and its proper result counts.
    await expect_silence(fleet.session, 20 * MS)
    await wait_running(fleet.redis, fleet.keys, "gpu-1", 1)
    await result(fleet.node, job, result={"ok": True})
    await expect(fleet.session, "result", ref="c-1", status="finished", result={"ok": True})
    await fleet.still_serving()


async def test_node_result_over_its_limit_is_too_large(make_fleet: MakeFleet) -> None:
    fleet = await make_fleet(max_result_bytes=1024)
    await submit(fleet.session, "c-1")
    await expect(fleet.session, "accepted", ref="c-1")
    job = await expect(fleet.node, "job")
    await result(fleet.node, job, result={"text": "x" * 2000})
    await expect(fleet.node, "error", code="TOO_LARGE")
    await wait_running(fleet.redis, fleet.keys, "gpu-1", 1)
    await result(fleet.node, job, result={"text": "short"})
    await expect(fleet.session, "result", ref="c-1", result={"text": "short"})
    await fleet.still_serving()


async def test_node_load_over_its_limit_is_too_large(fleet: Fleet) -> None:
    await send(fleet.node, type="load", load={"blob": "x" * 5000})
    await expect(fleet.node, "error", code="TOO_LARGE")
    await send(fleet.node, type="load", load=[1])
    await expect(fleet.node, "error", code="BAD_FRAME")
    await fleet.still_serving()


async def test_node_message_over_max_frame_bytes_is_closed_with_1009(
    make_fleet: MakeFleet,
) -> None:
    fleet = await make_fleet(max_frame_bytes=64 * 1024)
    big = await open_node(fleet.connect, fleet.hub, "gpu-2")
    await send(big, type="load", load={"blob": "x" * (65 * 1024)})
    await expect_closed(big, 1009)
    await fleet.still_serving()
    assert (await node_hash(fleet.redis, fleet.keys, "gpu-2"))["state"] == "lost"


async def test_node_result_for_an_unknown_job_is_unknown_job(fleet: Fleet) -> None:
    await send(fleet.node, type="result", job_id="no-such-job", attempt=1, status="finished")
    # protocol.md §4.9: error frames to nodes name the job in "ref".
    await expect(fleet.node, "error", ref="no-such-job", code="UNKNOWN_JOB")
    await fleet.still_serving()


async def test_node_result_for_another_nodes_job_is_node_mismatch(fleet: Fleet) -> None:
    other = await open_node(fleet.connect, fleet.hub, "gpu-2", languages=["de", "ja"])
    await submit(fleet.session, "c-1")
    await expect(fleet.session, "accepted", ref="c-1", node_id="gpu-1")
    job = await expect(fleet.node, "job")
    await result(other, job, result={"stolen": True})
    await expect(other, "error", ref=job["job_id"], code="NODE_MISMATCH")
    await expect_silence(fleet.session, 20 * MS)
    await fleet.invariants()
    await result(fleet.node, job, result={"mine": True})
    await expect(fleet.session, "result", ref="c-1", result={"mine": True})
    await fleet.still_serving()


async def test_node_result_for_a_stale_attempt_is_stale_attempt(fleet: Fleet) -> None:
    # The job's node is lost mid-job; the other node gets attempt 2 and
    # reports attempt 1.
    nodes = {"gpu-1": fleet.node, "gpu-2": await open_node(fleet.connect, fleet.hub, "gpu-2")}
    await submit(fleet.session, "c-1")
    first = await expect(fleet.session, "accepted", ref="c-1", attempt=1)
    job = await expect(nodes[first["node_id"]], "job", attempt=1)
    lost = nodes.pop(first["node_id"])
    assert lost.transport is not None
    lost.transport.abort()
    [(other_id, other)] = nodes.items()
    fleet.node = other
    await expect(
        fleet.session, "accepted", ref="c-1", job_id=job["job_id"], node_id=other_id, attempt=2
    )
    retry = await expect(other, "job", job_id=job["job_id"], attempt=2)
    await result(other, job, result={"old": True})  # attempt 1
    await expect(other, "error", ref=job["job_id"], code="STALE_ATTEMPT")
    await expect_silence(fleet.session, 20 * MS)
    await fleet.invariants()
    await result(other, retry, result={"new": True})
    await expect(fleet.session, "result", ref="c-1", result={"new": True})
    await fleet.still_serving()


async def test_node_result_sent_twice_is_stale_attempt_the_second_time(fleet: Fleet) -> None:
    await submit(fleet.session, "c-1")
    await expect(fleet.session, "accepted", ref="c-1")
    job = await expect(fleet.node, "job")
    await result(fleet.node, job, result={"n": 1})
    await expect(fleet.session, "result", ref="c-1", result={"n": 1})
    await result(fleet.node, job, result={"n": 2})
    await expect(fleet.node, "error", ref=job["job_id"], code="STALE_ATTEMPT")
    await expect_silence(fleet.session, 20 * MS)
    await wait_running(fleet.redis, fleet.keys, "gpu-1", 0)
    await fleet.still_serving()


async def test_node_result_for_a_future_attempt_is_stale_attempt(fleet: Fleet) -> None:
    await submit(fleet.session, "c-1")
    await expect(fleet.session, "accepted", ref="c-1")
    job = await expect(fleet.node, "job")
    await result(fleet.node, job, result={}, attempt=5)
    await expect(fleet.node, "error", ref=job["job_id"], code="STALE_ATTEMPT")
    await wait_running(fleet.redis, fleet.keys, "gpu-1", 1)
    await result(fleet.node, job, result={})
    await expect(fleet.session, "result", ref="c-1", status="finished")
    await fleet.still_serving()


async def test_node_partial_for_an_unknown_job_is_unknown_job(fleet: Fleet) -> None:
    await send(fleet.node, type="partial", job_id="no-such-job", attempt=1, result={})
    await expect(fleet.node, "error", ref="no-such-job", code="UNKNOWN_JOB")
    await fleet.still_serving()


async def test_node_partial_for_a_stale_attempt_is_stale_attempt(fleet: Fleet) -> None:
    await submit(fleet.session, "c-1")
    await expect(fleet.session, "accepted", ref="c-1")
    job = await expect(fleet.node, "job")
    await send(fleet.node, type="partial", job_id=job["job_id"], attempt=2, result={})
    await expect(fleet.node, "error", ref=job["job_id"], code="STALE_ATTEMPT")
    await expect_silence(fleet.session, 20 * MS)
    await result(fleet.node, job, result={})
    await expect(fleet.session, "result", ref="c-1")
    await fleet.still_serving()


async def test_node_partial_for_another_nodes_job_is_node_mismatch(fleet: Fleet) -> None:
    other = await open_node(fleet.connect, fleet.hub, "gpu-2", languages=["de", "ja"])
    await submit(fleet.session, "c-1")
    await expect(fleet.session, "accepted", ref="c-1", node_id="gpu-1")
    job = await expect(fleet.node, "job")
    await send(other, type="partial", job_id=job["job_id"], attempt=1, result={"x": 1})
    await expect(other, "error", ref=job["job_id"], code="NODE_MISMATCH")
    await expect_silence(fleet.session, 20 * MS)
    await result(fleet.node, job, result={})
    await expect(fleet.session, "result", ref="c-1")
    await fleet.still_serving()


async def test_node_partial_after_the_result_is_stale_attempt(fleet: Fleet) -> None:
    await submit(fleet.session, "c-1")
    await expect(fleet.session, "accepted", ref="c-1")
    job = await expect(fleet.node, "job")
    await result(fleet.node, job, result={})
    await expect(fleet.session, "result", ref="c-1")
    await send(fleet.node, type="partial", job_id=job["job_id"], attempt=1, result={})
    await expect(fleet.node, "error", ref=job["job_id"], code="STALE_ATTEMPT")
    await expect_silence(fleet.session, 20 * MS)
    await fleet.still_serving()


async def test_node_partial_that_is_not_an_object_is_bad_frame(fleet: Fleet) -> None:
    await submit(fleet.session, "c-1")
    await expect(fleet.session, "accepted", ref="c-1")
    job = await expect(fleet.node, "job")
    await send(fleet.node, type="partial", job_id=job["job_id"], attempt=1, result="text")
    await expect(fleet.node, "error", code="BAD_FRAME")
    await result(fleet.node, job, result={})
    await expect(fleet.session, "result", ref="c-1")
    await fleet.still_serving()


async def test_garbage_from_many_connections_does_not_disturb_a_running_job(
    fleet: Fleet,
) -> None:
    await submit(fleet.session, "c-1", audio=ALL_BYTES)
    await expect(fleet.session, "accepted", ref="c-1")
    job = await expect(fleet.node, "job")
    junk = [
        "",
        "{",
        "[]",
        '{"type": null}',
        '{"type": "job", "ref": "r", "src_lang": "en", "tgt_lang": "fr", "payload": 1}',
    ]
    for path in ("/v1/session", "/v1/node"):
        ws = await fleet.connect(fleet.hub, path)
        if path == "/v1/session":
            await expect(ws, "welcome")
        for text in junk:
            await ws.send(text)
        await ws.send(b"\xff\xff\xff\xff")
    await result(fleet.node, job, result={"audio": len(job["audio"])})
    await expect(fleet.session, "result", ref="c-1", result={"audio": 256})
    await fleet.still_serving()


async def _state(fleet: Fleet, node_id: str, state: str) -> bool:
    return (await node_hash(fleet.redis, fleet.keys, node_id)).get("state") == state


# Bytes sent with a request that the hub answers over HTTP (issue 12, gap 5)

_ANSWERED_OVER_HTTP = [
    "/nowhere",  # 404
    "/v1/node",  # 426: no Upgrade header
    "/v1/session",  # 426
    "/readyz",  # 200
    "/healthz",  # 200
]


async def _request_with_trailing_bytes(port: int, path: str) -> bytes:
    """Send a request and, in the same packet, bytes after it; read until closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        writer.write(request + b"GET /again HTTP/1.1\r\n\r\n")
        async with asyncio.timeout(2000 * MS):
            return await reader.read()
    finally:
        writer.transport.abort()


async def test_bytes_after_an_http_request_log_one_rate_limited_warning(
    hub: Hub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="websockets")
    caplog.set_level(logging.DEBUG, logger="hub")
    clients = 10 * len(_ANSWERED_OVER_HTTP)
    await asyncio.gather(
        *(
            _request_with_trailing_bytes(hub.port, _ANSWERED_OVER_HTTP[i % 5])
            for i in range(clients)
        )
    )
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    # The hub's and websockets' warnings (PYTHONASYNCIODEBUG adds asyncio's
    # slow-callback ones).
    ours = [r for r in caplog.records if r.name.partition(".")[0] in ("hub", "websockets")]
    warnings = [r for r in ours if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert warnings[0].name == "hub.gate"
    assert "sent bytes before the hub's HTTP response" in warnings[0].getMessage()
    # The hub goes on serving, plain HTTP and WebSockets alike.
    assert (await http_get(hub.port, "/healthz"))[0] == 200


def _websockets_send_eof_twice(logger: RedactingLogger) -> None:
    """Make websockets raise its second-EOF assertion and log it as its server does."""
    protocol = ServerProtocol()
    protocol.send_eof()
    try:
        protocol.send_eof()
    except AssertionError:
        logger.error("unexpected internal error", exc_info=True)


def test_early_bytes_warning_repeats_once_per_window_with_the_count_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    now = [100.0]
    noise = RedactingLogger(
        logging.getLogger("websockets.server"), noise_window_s=10.0, clock=lambda: now[0]
    )
    for step in (0.0, 1.0, 5.0, 3.9, 10.0, 0.5, 25.0):
        now[0] += step
        _websockets_send_eof_twice(noise)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in caplog.records)
    # t=100 logs; t=101, 106, 109.9 are within its window; t=119.9 logs 3;
    # t=120.4 is within the new window; t=145.4 logs 1.
    assert [line.split("(")[1].split(" ")[0] for line in lines] == ["0", "3", "1"]
    assert (noise.noise_total, noise.noise_suppressed) == (7, 0)


def test_other_errors_of_websockets_are_logged_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    logger = RedactingLogger(logging.getLogger("websockets.server"))
    try:
        raise AssertionError("a real bug")
    except AssertionError:
        logger.error("unexpected internal error", exc_info=True)
    [record] = caplog.records
    assert (record.levelno, record.name, record.getMessage()) == (
        logging.ERROR,
        "websockets.server",
        "unexpected internal error",
    )
    assert record.exc_info is not None
