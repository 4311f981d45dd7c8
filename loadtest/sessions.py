"""Simulated sessions: send audio jobs at a cadence, check every answer.

Each job's ``ref`` is the session's sequence number, its payload names the
session and the number, and its audio starts with the same two numbers
packed in 8 bytes. The node echoes all three (see :mod:`loadtest.nodes`), so
for each ``result`` the session checks that it is the right job, with the
right payload and the right audio, and that it comes exactly once
(protocol.md §4.8: "sent exactly once per accepted or queued job").
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING, Any

import orjson

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
)
from hub.protocol.frames import join_binary

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
        self.ticks = 0
        """Open loop: the generation of the tick chain; :meth:`stop` ends the current one."""

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
            self.ticks += 1
            self.next_due = first_due
            w.wheel.call_at(first_due, self._tick, self.ticks)
        else:
            for _ in range(w.plan.inflight):
                self.send_job()

    def stop(self) -> None:
        self.ticks += 1

    def _tick(self, generation: int) -> None:
        if generation != self.ticks:
            return  # stopped
        w = self.w
        now = time.perf_counter()
        if now >= w.end_at:
            return
        if not self.is_open:
            pass  # reconnecting: this tick is lost, like audio of a dropped call
        elif len(self.jobs) >= w.plan.max_outstanding:
            w.stats.counters["skipped"] += 1
        else:
            self.send_job(now)
        self.next_due += w.interval_s
        if self.next_due < now:  # a stalled loop does not send a catch-up burst
            self.next_due = now + w.interval_s
        w.wheel.call_at(self.next_due, self._tick, generation)

    def send_job(self, now: float | None = None) -> None:
        w = self.w
        conn = self.conn
        if conn is None or not conn.is_open:
            return
        if now is None:
            now = time.perf_counter()
        if now >= w.end_at:
            return
        self.seq = seq = self.seq + 1
        ref = str(seq)
        header = encode_submit_job(
            ref, w.plan.src_lang, w.plan.tgt_lang, {"seq": seq, "sid": self.sid}
        )
        self.jobs[ref] = _Job(seq, now)
        tail = w.audio_tail
        if tail is None:
            conn.send_text(header)
        else:
            # The audio is the job's tag and the worker's audio, masked once for all jobs.
            conn.send_binary_with_tail(join_binary(header, _TAG.pack(self.index, seq)), tail)
        st = w.stats
        st.counters["sent"] += 1
        st.second(now).sent += 1

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
        if self.leaving:
            return  # frames still in flight to a connection we are closing
        now = time.perf_counter()
        try:
            frame = orjson.loads(data)
        except orjson.JSONDecodeError:
            frame = None
        kind = frame.get("type") if type(frame) is dict else None
        # The two frames every job gets are read here, with the checks of
        # hub.protocol's decoder but without building its frozen dataclasses;
        # any other frame, and one of these that fails a check, goes through
        # the decoder.
        if kind == "result":
            ref = frame.get("ref")
            job_id = frame.get("job_id")
            status = frame.get("status")
            result = frame.get("result")
            error = frame.get("error")
            if (
                type(ref) is str
                and type(job_id) is str
                and (status == "finished" or status == "failed")
                and (result is None or type(result) is dict)
                and (error is None or type(error) is str)
            ):
                self._result(ref, job_id, status == "finished", result, error, now)
                return
        elif kind == "accepted":
            ref = frame.get("ref")
            job_id = frame.get("job_id")
            attempt = frame.get("attempt")
            if (
                type(ref) is str
                and type(job_id) is str
                and type(frame.get("node_id")) is str
                and type(attempt) is int
            ):
                self._accepted(ref, job_id, attempt, now)
                return
        self._decode(data, now)

    def _decode(self, data: bytes, now: float) -> None:
        st = self.w.stats
        try:
            frame = decode_to_session(data)
        except ProtocolError as exc:
            problem = "unexpected frame type" if exc.code == Code.UNKNOWN_TYPE else "bad frame"
            st.checks[f"session: {problem} from hub"] += 1
            return
        if type(frame) is SessionResult:
            self._result(
                frame.ref,
                frame.job_id,
                frame.status == "finished",
                frame.result,
                frame.error,
                now,
            )
        elif type(frame) is Accepted:
            self._accepted(frame.ref, frame.job_id, frame.attempt, now)
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

    def _accepted(self, ref: str, job_id: str, attempt: int, now: float) -> None:
        st = self.w.stats
        job = self.jobs.get(ref)
        if job is None:
            refused = self.refused.get(ref)
            if refused is not None:
                st.checks[f"session: accepted for a job refused with {refused}"] += 1
            elif not self._late(ref):
                st.checks["session: accepted for an unknown ref"] += 1
            return
        if job.accepted_at is None:
            job.accepted_at = now
            us = int((now - job.sent_at) * 1e6)
            st.second(now).accept.record(us)
            st.counters["accepted"] += 1
            if job.job_id is None:
                st.hists["answer"].record(us)
                st.counters["answered"] += 1
        if attempt > 1:
            st.counters["redispatched"] += 1
        if job.job_id is None:
            job.job_id = job_id
        elif job.job_id != job_id:
            st.checks["session: accepted with another job_id"] += 1
        job.attempt = attempt

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

    def _result(
        self,
        ref: str,
        job_id: str,
        finished: bool,
        result: dict[str, Any] | None,
        error: str | None,
        now: float,
    ) -> None:
        w = self.w
        st = w.stats
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
        counters = st.counters
        counters["results"] += 1
        if job.job_id is None:
            st.checks["session: result before accepted or queued"] += 1
        elif job_id != job.job_id:
            st.checks["session: result with another job_id"] += 1
        second = st.second(now)
        if finished:
            counters["finished"] += 1
            if result is None:
                result = {}
            echo = result.get("echo") or {}
            if not w.plan.echo_checked:
                # A real fleet's nodes answered (hub bench --nodes 0): what they
                # return is theirs; the job, ref and exactly-once checks still hold.
                counters["ok"] += 1
                second.ok += 1
            elif echo.get("seq") != job.seq or echo.get("sid") != self.sid:
                st.checks["session: result echoes another job's payload"] += 1
            elif w.audio_tail is not None and (
                result.get("audio_len") != w.plan.audio_bytes
                or result.get("audio_tag") != _TAG.pack(self.index, job.seq).hex()
            ):
                st.checks["session: result echoes other audio"] += 1
            else:
                counters["ok"] += 1
                second.ok += 1
            us = int((now - job.sent_at) * 1e6)
            second.e2e.record(us)
            hold = result.get("hold_us")
            if type(hold) is int and w.plan.echo_checked:
                st.hists["overhead"].record(us - hold)
        else:
            counters["failed"] += 1
            second.failed += 1
            st.failed[str(error)] += 1
        if not w.open_loop:
            self._next_after_answer(refused=False)

    def dropped(self) -> None:
        if self.jobs:
            self.w.stats.checks["session: jobs lost with a dropped connection"] += len(self.jobs)
            self.jobs.clear()
