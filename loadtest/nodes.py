"""Simulated nodes: register, hold each job for a service time, echo the session's data.

A node answers every job with a ``result`` whose ``result`` object carries
what the session sent, so the session can check that it got *its* job back:

    {"echo": <the job's payload>, "audio_len": <bytes of audio received>,
     "audio_tag": <hex of the audio's first 8 bytes>, "hold_us": <time held>}

It also checks the hub's promise that a node never gets more than
``max_jobs`` jobs at once (protocol.md §3.3). A repeated ``job`` frame (the
same attempt again, which a hub sends after a Redis failure when it is not
sure the first reached the node) is counted as ``node_repeats``, not as a
job: a repeat of a running attempt is ignored, one of an attempt it answered
lately gets the same result again.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from hub.errors import Code, ProtocolError
from hub.protocol import (
    ErrorReply,
    NodeCancel,
    NodeJob,
    Registered,
    decode_to_node,
    encode_node_result,
    encode_register,
)

from .peer import SimPeer

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["SimNode"]

_HEADER_LENGTH = 4
"""A binary frame starts with its JSON header's length, uint32 big-endian (protocol.md §2)."""


class _Running:
    """A job a node holds until its service time is up."""

    __slots__ = ("attempt", "audio_len", "job_id", "payload", "received", "tag")

    def __init__(
        self, job_id: str, attempt: int, payload: Any, audio_len: int, tag: str, received: float
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.payload = payload
        self.audio_len = audio_len
        self.tag = tag
        self.received = received


class SimNode(SimPeer):
    """One simulated node; it reconnects with the same id after churn or a drop."""

    def __init__(self, worker: Worker, index: int, base_url: str) -> None:
        super().__init__(worker, base_url + "/v1/node", "node")
        self.node_id = f"{worker.plan.node_prefix}{index}"
        self.running: dict[str, _Running] = {}
        """Jobs held, by id; a job cancelled or lost with the connection leaves it."""
        self.recent: dict[tuple[str, int], _Running | None] = {}
        """Attempts received lately, oldest first: the job once answered, else None."""

    def hello(self) -> bytes:
        plan = self.w.plan
        pairs = [(plan.src_lang, plan.tgt_lang)]
        return encode_register(
            self.node_id, ["asr"], plan.max_jobs, lang_pairs=pairs, pools=[plan.pool]
        )

    # Callbacks

    def on_message(self, binary: bool, data: bytes) -> None:
        if self.leaving:
            return  # the hub re-dispatches what it sent us after we left
        received = time.perf_counter()
        w = self.w
        header = data
        audio_len = 0
        tag = ""
        if binary:
            # A job with audio: decode the header alone, and read of the audio
            # only what the result echoes, without copying it.
            end = _HEADER_LENGTH + int.from_bytes(data[:_HEADER_LENGTH], "big")
            if len(data) < _HEADER_LENGTH or end > len(data):
                w.stats.checks["node: bad frame from hub"] += 1
                return
            header = data[_HEADER_LENGTH:end]
            audio_len = len(data) - end
            tag = data[end : end + 8].hex()
        try:
            frame = orjson.loads(header)
        except orjson.JSONDecodeError:
            frame = None
        # Job frames are read here, with the checks of hub.protocol's decoder
        # but without building its frozen dataclass; any other frame, and a
        # job that fails a check, goes through the decoder.
        if type(frame) is dict and frame.get("type") == "job":
            job_id = frame.get("job_id")
            attempt = frame.get("attempt")
            payload = frame.get("payload")
            if (
                type(job_id) is str
                and type(attempt) is int
                and type(payload) is dict
                and type(frame.get("session_id")) is str
                and type(frame.get("src_lang")) is str
                and type(frame.get("tgt_lang")) is str
                and type(frame.get("deadline_ms")) is int
            ):
                self._job(job_id, attempt, payload, audio_len, tag, received)
                return
        self._decode(data, binary, received)

    def _decode(self, data: bytes, binary: bool, received: float) -> None:
        st = self.w.stats
        try:
            frame = decode_to_node(data, binary=binary)
        except ProtocolError as exc:
            problem = "unexpected frame type" if exc.code == Code.UNKNOWN_TYPE else "bad frame"
            st.checks[f"node: {problem} from hub"] += 1
            return
        if type(frame) is NodeJob:
            audio = frame.audio or b""
            self._job(
                frame.job_id, frame.attempt, frame.payload, len(audio), audio[:8].hex(), received
            )
        elif type(frame) is NodeCancel:
            st.counters["node_cancels"] += 1
            held = self.running.get(frame.job_id)
            if held is not None and held.attempt == frame.attempt:
                del self.running[frame.job_id]
        elif type(frame) is Registered:
            self.greet()
        elif type(frame) is ErrorReply:
            st.node_errors[frame.code] += 1

    def on_close(self, code: int | None) -> None:
        self.running.clear()
        super().on_close(code)

    # Jobs

    def _job(
        self,
        job_id: str,
        attempt: int,
        payload: dict[str, Any],
        audio_len: int,
        tag: str,
        received: float,
    ) -> None:
        w = self.w
        key = (job_id, attempt)
        recent = self.recent
        if key in recent:
            # protocol.md §3.3: the hub re-sent an attempt it was not sure of.
            w.stats.counters["node_repeats"] += 1
            answered = recent[key]
            if answered is not None:
                self._answer(answered)
            return
        recent[key] = None
        if len(recent) > 4 * w.plan.max_jobs + 64:
            del recent[next(iter(recent))]
        w.stats.counters["node_jobs"] += 1
        if len(self.running) >= w.plan.max_jobs:
            w.stats.checks["node: more jobs than max_jobs at once"] += 1
        if w.plan.audio_bytes and audio_len != w.plan.audio_bytes:
            w.stats.checks["node: audio length differs from what was sent"] += 1
        job = _Running(job_id, attempt, payload, audio_len, tag, received)
        if w.instant:
            self._answer(job)
        else:
            self.running[job_id] = job
            service_s = w.service_min_s + w.service_span_s * w.rng.random()
            w.wheel.call_at(received + service_s, self._finish, job)

    def _finish(self, job: _Running) -> None:
        """The service time is up: answer, unless the job was cancelled or lost meanwhile."""
        running = self.running
        # Identity, not id: after a reconnection the hub may send the same job again.
        if running.get(job.job_id) is job:
            del running[job.job_id]
            self._answer(job)

    def _answer(self, job: _Running) -> None:
        key = (job.job_id, job.attempt)
        if key in self.recent:
            self.recent[key] = job
        conn = self.conn
        if conn is None or not conn.is_open:
            return
        hold_us = int((time.perf_counter() - job.received) * 1e6)
        result = {
            "echo": job.payload,
            "audio_len": job.audio_len,
            "audio_tag": job.tag,
            "hold_us": hold_us,
        }
        conn.send_text(encode_node_result(job.job_id, job.attempt, "finished", result))
        self.w.stats.counters["node_results"] += 1
