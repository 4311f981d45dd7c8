"""Simulated nodes: register, hold each job for a service time, echo the session's data.

A node answers every job with a ``result`` whose ``result`` object carries
what the session sent, so the session can check that it got *its* job back:

    {"echo": <the job's payload>, "audio_len": <bytes of audio received>,
     "audio_tag": <hex of the audio's first 8 bytes>, "hold_us": <time held>}

It also checks the hub's promise that a node never gets more than
``max_jobs`` jobs at once (protocol.md §3.3).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

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


class SimNode(SimPeer):
    """One simulated node; it reconnects with the same id after churn or a drop."""

    def __init__(self, worker: Worker, index: int, base_url: str) -> None:
        super().__init__(worker, base_url + "/v1/node", "node")
        self.node_id = f"lt-n{index}"
        self.running: dict[str, asyncio.TimerHandle | None] = {}

    def hello(self) -> bytes:
        plan = self.w.plan
        pairs = [(plan.src_lang, plan.tgt_lang)]
        return encode_register(self.node_id, ["asr"], plan.max_jobs, lang_pairs=pairs)

    # Callbacks

    def on_message(self, binary: bool, data: bytes) -> None:
        w = self.w
        if self.leaving:
            return  # the hub re-dispatches what it sent us after we left
        try:
            frame = decode_to_node(data, binary=binary)
        except ProtocolError as exc:
            problem = "unexpected frame type" if exc.code == Code.UNKNOWN_TYPE else "bad frame"
            w.stats.checks[f"node: {problem} from hub"] += 1
            return
        if type(frame) is NodeJob:
            self._job(frame)
        elif type(frame) is NodeCancel:
            w.stats.counters["node_cancels"] += 1
            handle = self.running.pop(frame.job_id, None)
            if handle is not None:
                handle.cancel()
        elif type(frame) is Registered:
            self.greet()
        elif type(frame) is ErrorReply:
            w.stats.node_errors[frame.code] += 1

    def on_close(self, code: int | None) -> None:
        for handle in self.running.values():
            if handle is not None:
                handle.cancel()
        self.running.clear()
        super().on_close(code)

    # Jobs

    def _job(self, frame: NodeJob) -> None:
        w = self.w
        w.stats.counters["node_jobs"] += 1
        job_id, attempt, payload = frame.job_id, frame.attempt, frame.payload
        audio = frame.audio or b""
        if len(self.running) >= w.plan.max_jobs:
            w.stats.checks["node: more jobs than max_jobs at once"] += 1
        if w.plan.audio_bytes and len(audio) != w.plan.audio_bytes:
            w.stats.checks["node: audio length differs from what was sent"] += 1
        tag = audio[:8].hex()
        received = time.perf_counter()
        if w.instant:
            self._finish(job_id, attempt, payload, len(audio), tag, received)
        else:
            self.running[job_id] = w.loop.call_later(
                w.service.draw_s(w.rng),
                self._finish,
                job_id,
                attempt,
                payload,
                len(audio),
                tag,
                received,
            )

    def _finish(
        self, job_id: str, attempt: int, payload: Any, audio_len: int, tag: str, received: float
    ) -> None:
        self.running.pop(job_id, None)
        conn = self.conn
        if conn is None or not conn.is_open:
            return
        hold_us = int((time.perf_counter() - received) * 1e6)
        result = {"echo": payload, "audio_len": audio_len, "audio_tag": tag, "hold_us": hold_us}
        conn.send_text(encode_node_result(job_id, attempt, "finished", result))
        self.w.stats.counters["node_results"] += 1
