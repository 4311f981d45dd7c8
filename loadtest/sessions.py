"""Simulated sessions: send audio jobs at a cadence, check every answer.

Each job's ``ref`` is the session's sequence number, its payload names the
session and the number, and its audio starts with the same two numbers
packed in 8 bytes. The node echoes all three (see :mod:`loadtest.nodes`), so
for each ``result`` the session checks that it is the right job, with the
right payload and the right audio, and that it comes exactly once
(protocol.md §4.8: "sent exactly once per accepted or queued job").
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import TYPE_CHECKING

from hub.errors import Code, ProtocolError
from hub.protocol import (
    Accepted,
    ErrorReply,
    Queued,
    SessionPartial,
    SessionResult,
    Welcome,
    decode_to_session,
    encode_submit_job,
    encode_submit_job_audio,
)

from .peer import SimPeer

if TYPE_CHECKING:
    from .worker import Worker

__all__ = ["SimSession"]

_TAG = struct.Struct(">II")


class _Job:
    __slots__ = ("accepted_at", "attempt", "job_id", "sent_at", "seq")

    def __init__(self, seq: int, sent_at: float) -> None:
        self.seq = seq
        self.sent_at = sent_at
        self.accepted_at: float | None = None
        self.job_id: str | None = None
        self.attempt = 0


class SimSession(SimPeer):
    """One simulated session; after churn or a drop it connects again as a new session."""

    def __init__(self, worker: Worker, index: int, base_url: str) -> None:
        super().__init__(worker, base_url + "/v1/session", "session")
        self.index = index
        self.sid = f"s{index}"
        self.jobs: dict[str, _Job] = {}
        self.refused: dict[str, str] = {}
        """Refs of the last jobs refused with an error frame -> the error code."""
        self.seq = 0
        self.next_due = 0.0
        """Open loop: when the next job is due (perf_counter)."""
        self.timer: asyncio.TimerHandle | None = None

    def leave(self) -> None:
        """Disconnect on purpose: unfinished jobs are abandoned, not errors."""
        if self.jobs:
            self.w.stats.counters["abandoned"] += len(self.jobs)
            self.jobs.clear()
        super().leave()

    # Sending

    def start(self, first_due: float) -> None:
        """Start sending: open loop from ``first_due`` on, closed loop at once."""
        w = self.w
        if w.plan.open_loop:
            self.next_due = first_due
            self.timer = w.loop.call_later(max(0.0, first_due - time.perf_counter()), self._tick)
        else:
            for _ in range(w.plan.inflight):
                self.send_job()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _tick(self) -> None:
        w = self.w
        now = time.perf_counter()
        if now >= w.end_at:
            self.timer = None
            return
        if not self.is_open:
            pass  # reconnecting: this tick is lost, like audio of a dropped call
        elif len(self.jobs) >= w.plan.max_outstanding:
            w.stats.counters["skipped"] += 1
        else:
            self.send_job()
        self.next_due += w.interval_s
        if self.next_due < now:  # a stalled loop does not send a catch-up burst
            self.next_due = now + w.interval_s
        self.timer = w.loop.call_later(self.next_due - now, self._tick)

    def send_job(self) -> None:
        w = self.w
        conn = self.conn
        if conn is None or not conn.is_open:
            return
        now = time.perf_counter()
        if now >= w.end_at:
            return
        self.seq = seq = self.seq + 1
        ref = str(seq)
        payload = {"seq": seq, "sid": self.sid}
        self.jobs[ref] = _Job(seq, now)
        if w.audio_rest is None:
            conn.send_text(encode_submit_job(ref, w.plan.src_lang, w.plan.tgt_lang, payload))
        else:
            audio = _TAG.pack(self.index, seq) + w.audio_rest
            conn.send_binary(
                encode_submit_job_audio(ref, w.plan.src_lang, w.plan.tgt_lang, payload, audio)
            )
        w.stats.counters["sent"] += 1
        w.stats.second(now).sent += 1

    def _next_after_answer(self, refused: bool) -> None:
        """Closed loop: send the next job (after a short pause when refused)."""
        w = self.w
        if w.plan.open_loop or self.leaving:
            return
        if refused:
            w.loop.call_later(0.01, self.send_job)
        else:
            self.send_job()

    # Callbacks

    def on_message(self, binary: bool, data: bytes) -> None:
        w = self.w
        st = w.stats
        if self.leaving:
            return  # frames still in flight to a connection we are closing
        try:
            frame = decode_to_session(data)
        except ProtocolError as exc:
            problem = "unexpected frame type" if exc.code == Code.UNKNOWN_TYPE else "bad frame"
            st.checks[f"session: {problem} from hub"] += 1
            return
        now = time.perf_counter()
        if type(frame) is SessionResult:
            self._result(frame, now)
        elif type(frame) is Accepted:
            self._accepted(frame, now)
        elif type(frame) is Queued:
            st.counters["queued"] += 1
            job = self.jobs.get(frame.ref)
            if job is None:
                if self._late(frame.ref):
                    # protocol.md §9.2 rule 4: queued comes before any other frame.
                    st.checks["session: queued after the job's result (order)"] += 1
                else:
                    st.checks["session: queued for an unknown ref"] += 1
            elif job.job_id is None:
                job.job_id = frame.job_id
                st.hists["answer"].record(int((now - job.sent_at) * 1e6))
                st.counters["answered"] += 1
        elif type(frame) is ErrorReply:
            self._refused(frame, now)
        elif type(frame) is SessionPartial:
            st.counters["partials"] += 1
        elif type(frame) is Welcome:
            self.greet()

    def _accepted(self, frame: Accepted, now: float) -> None:
        st = self.w.stats
        job = self.jobs.get(frame.ref)
        if job is None:
            refused = self.refused.get(frame.ref)
            if refused is not None:
                st.checks[f"session: accepted for a job refused with {refused}"] += 1
            elif not self._late(frame.ref):
                st.checks["session: accepted for an unknown ref"] += 1
            return
        if job.accepted_at is None:
            job.accepted_at = now
            us = int((now - job.sent_at) * 1e6)
            st.hists["accept"].record(us)
            st.second(now).accept.record(us)
            st.counters["accepted"] += 1
            if job.job_id is None:
                st.hists["answer"].record(us)
                st.counters["answered"] += 1
        if frame.attempt > 1:
            st.counters["redispatched"] += 1
        if job.job_id is None:
            job.job_id = frame.job_id
        elif job.job_id != frame.job_id:
            st.checks["session: accepted with another job_id"] += 1
        job.attempt = frame.attempt

    def _refused(self, frame: ErrorReply, now: float) -> None:
        st = self.w.stats
        ref, code = frame.ref, frame.code
        st.refused[code] += 1
        st.counters["refused"] += 1
        st.second(now).refused += 1
        if ref is None or self.jobs.pop(ref, None) is None:
            st.checks["session: error frame without a known ref"] += 1
        else:
            # Remembered so that a result for a refused job can say so.
            self.refused[ref] = code
            if len(self.refused) > 256:
                del self.refused[next(iter(self.refused))]
        self._next_after_answer(refused=True)

    def _late(self, ref: str) -> bool:
        """Whether ``ref`` names a job this session sent before (answered or abandoned)."""
        return ref.isdigit() and 0 < int(ref) <= self.seq

    def _result(self, frame: SessionResult, now: float) -> None:
        st = self.w.stats
        ref = frame.ref
        job = self.jobs.pop(ref, None)
        if job is None:
            refused = self.refused.get(ref)
            if refused is not None:
                st.checks[f"session: result for a job refused with {refused}"] += 1
            elif self._late(ref):
                st.checks["session: result for a job that already ended (duplicate)"] += 1
            else:
                st.checks["session: result for an unknown ref"] += 1
            return
        st.counters["results"] += 1
        if job.job_id is not None and frame.job_id != job.job_id:
            st.checks["session: result with another job_id"] += 1
        if job.job_id is None:
            st.checks["session: result before accepted or queued"] += 1
        second = st.second(now)
        if frame.status == "finished":
            st.counters["finished"] += 1
            result = frame.result or {}
            echo = result.get("echo") or {}
            w = self.w
            if echo.get("seq") != job.seq or echo.get("sid") != self.sid:
                st.checks["session: result echoes another job's payload"] += 1
            elif w.audio_rest is not None and (
                result.get("audio_len") != w.plan.audio_bytes
                or result.get("audio_tag") != _TAG.pack(self.index, job.seq).hex()
            ):
                st.checks["session: result echoes other audio"] += 1
            else:
                st.counters["ok"] += 1
                second.ok += 1
            us = int((now - job.sent_at) * 1e6)
            st.hists["e2e"].record(us)
            second.e2e.record(us)
            st.recent.record(us)
            hold = result.get("hold_us")
            if type(hold) is int:
                st.hists["overhead"].record(us - hold)
        else:
            st.counters["failed"] += 1
            second.failed += 1
            st.failed[str(frame.error)] += 1
        self._next_after_answer(refused=False)

    def dropped(self) -> None:
        if self.jobs:
            self.w.stats.checks["session: jobs lost with a dropped connection"] += len(self.jobs)
            self.jobs.clear()
