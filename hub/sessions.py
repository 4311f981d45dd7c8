"""A session connection, from welcome to gone: submit, cancel, ack and resume.

What happens when a session submits a job is :meth:`Sessions._submit`:
one ``dispatch_task.lua`` call; the reply starts the job on a node (routed
like every other dispatch), queues it, or refuses it with an error frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import secrets
import time
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection

from . import protocol as proto
from .audio import AudioStore
from .auth import SessionGrant
from .config import Settings
from .errors import ClientError, Code, RedisUnavailable, SchedulingError
from .events import Dispatch, JobEnded, Queued
from .health import Health
from .metrics import Metrics
from .outbox import Outbox
from .protocol import CloseCode, JobId, SessionId
from .registry import Registry, SessionLink
from .router import Router
from .scheduler import Scheduler, new_job_id
from .shedding import Shedder
from .tasks import Tasks
from .wsconn import HubConnection

__all__ = ["Sessions"]

logger = logging.getLogger("hub.sessions")

_UNAVAILABLE = "the scheduler is unavailable; try again"
"""The message of the UNAVAILABLE refusals of submit and cancel."""

_MAX_ABANDONING = 1000
"""Most jobs being taken back after a lost dispatch reply; past it, the sweep ends them."""

_MAX_TIMED = 1024
"""Most open jobs per session whose latency is measured (``SessionLink.started``)."""


class Sessions:
    """Serves session connections and keeps their jobs' outcomes for resume.

    Args:
        hub_id: this hub's id (the session's hub, for results).
        settings: limits, resume window, idle timeout, resume secret.
        limits: frame limits for the session state machines.
        scheduler: the script calls.
        registry: where connections are recorded.
        outbox: sending and closing.
        router: acts on the events of script replies.
        metrics: counters.
        health: whether Redis is usable and the hub is closing.
        tasks: owner of background frame handling.
        audio: where the audio of jobs accepted here is kept.
        shedder: whether new jobs must be refused ``OVERLOADED``.
    """

    def __init__(
        self,
        hub_id: str,
        settings: Settings,
        limits: proto.Limits,
        scheduler: Scheduler,
        registry: Registry,
        outbox: Outbox,
        router: Router,
        metrics: Metrics,
        health: Health,
        tasks: Tasks,
        audio: AudioStore,
        shedder: Shedder,
    ) -> None:
        self.hub_id = hub_id
        self._settings = settings
        self._limits = limits
        self._scheduler = scheduler
        self._registry = registry
        self._outbox = outbox
        self._router = router
        self._metrics = metrics
        self._health = health
        self._tasks = tasks
        self._audio = audio
        self._shedder = shedder
        self._secret = settings.resume_secret.encode() if settings.resume_secret else b""
        self._gone: dict[str, asyncio.TimerHandle] = {}
        self._abandoning = 0
        self._inflight_limit = 2 * settings.max_inflight_per_session

    # Public methods

    async def serve(self, ws: ServerConnection, grant: SessionGrant) -> None:
        """Serve one session connection until it closes.

        Its open jobs run on after it closes; they are cancelled when it has
        not come back within ``resume_window_s``.
        """
        try:
            await self._serve(ws, grant)
        finally:
            self._outbox.forget(ws)

    async def load_secret(self) -> None:
        """Load the key of resume tokens (shared by every hub through Redis)."""
        if not self._secret:
            self._secret = await self._scheduler.resume_secret()

    async def watch_idle(self) -> None:
        """Close sessions silent for longer than ``session_idle_timeout_s`` (4006)."""
        idle = self._settings.session_idle_timeout_s
        if idle is None:
            return
        while not self._health.stopping:
            await asyncio.sleep(1)
            now = time.monotonic()
            for link in list(self._registry.sessions.values()):
                if now - link.last_active > idle and not link.closing:
                    self._outbox.shut(link, CloseCode.IDLE_TIMEOUT)

    def resend_lost_results(self) -> None:
        """After the bus was down (Redis restart): send results published here meanwhile."""
        if self._registry.sessions and not self._health.stopping:
            self._tasks.spawn(self._resend_lost_results())

    def abandon(self, session_id: str, job_id: str) -> None:
        """Take back, once Redis answers, a job refused ``UNAVAILABLE`` whose script may have run.

        Bounded: past ``_MAX_ABANDONING`` such jobs at once, the sweep ends
        them at their deadline instead.
        """
        if self._abandoning < _MAX_ABANDONING:
            self._abandoning += 1
            self._tasks.spawn(self._abandon(session_id, job_id))

    def close(self) -> None:
        """Stop the resume-window timers (hub shutdown: the sessions may come back)."""
        for handle in self._gone.values():
            handle.cancel()
        self._gone.clear()

    # Connection

    async def _serve(self, ws: ServerConnection, grant: SessionGrant) -> None:
        session_id, resumed = await self._welcome(ws, grant)
        if session_id is None:
            return
        link = SessionLink(ws, session_id, self._settings, self._limits, grant)
        # Every session is recorded when it opens (its hub, for results), so a
        # resume can tell an expired session from one that never sent a job.
        try:
            known, open_jobs, missed = await self._scheduler.resume_session(session_id)
        except RedisUnavailable:
            await ws.close(CloseCode.TRY_AGAIN_LATER, "redis unavailable")
            return
        if resumed and not known and grant.session_id is None:
            # protocol.md §8: nothing is left of the session; it must start afresh.
            await ws.close(CloseCode.BAD_RESUME_TOKEN, "session expired")
            return
        for jid, ref, _status in open_jobs:
            link.conn.reopen(ref, JobId(jid))
        old = self._registry.add_session(link)
        if old is not None:
            self._outbox.shut(old, CloseCode.REPLACED)
        handle = self._gone.pop(session_id, None)
        if handle is not None:
            handle.cancel()
        push = self._outbox.push
        push(ws, proto.encode_welcome(session_id, self.hub_id, self._resume_token(session_id)))
        for e in missed:
            push(ws, proto.encode_result(e.ref, JobId(e.job_id), e.status, e.result, e.error))
        try:
            await self._receive_frames(link)
        finally:
            link.conn.close()
            if self._registry.remove_session(link) and not self._health.closing:
                self._start_resume_window(session_id)

    async def _welcome(
        self, ws: ServerConnection, grant: SessionGrant
    ) -> tuple[SessionId | None, bool]:
        """The session's id, and whether it resumes one; None after closing the socket."""
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        wanted = query.get("session_id", [None])[0]
        if grant.session_id is not None:
            # The token names the session: presenting it again resumes it.
            if wanted is not None and wanted != grant.session_id:
                await ws.close(CloseCode.POLICY_VIOLATION, "session_id differs from the token")
                return None, False
            return SessionId(grant.session_id), True
        if wanted is None:
            return SessionId(secrets.token_urlsafe(12)), False
        token = query.get("resume_token", [""])[0]
        # Bytes: compare_digest raises TypeError on non-ASCII str.
        if not hmac.compare_digest(token.encode(), self._resume_token(wanted).encode()):
            await ws.close(CloseCode.BAD_RESUME_TOKEN, "bad resume token")
            return None, False
        return SessionId(wanted), True

    def _resume_token(self, session_id: str) -> str:
        return hmac.new(self._secret, session_id.encode(), hashlib.sha256).hexdigest()[:32]

    async def _receive_frames(self, link: SessionLink) -> None:
        """Handle the session's messages until its connection closes.

        Each message is handled in ``data_received`` (:class:`HubConnection`);
        only a fragmented one comes through this loop.
        """
        ws = link.ws
        handle = functools.partial(self._on_message, link)
        if isinstance(ws, HubConnection):
            ws.on_message = handle
        try:
            async for message in ws:
                handle(message)
        finally:
            if isinstance(ws, HubConnection):
                ws.on_message = None

    def _on_message(self, link: SessionLink, message: str | bytes) -> None:
        now = time.monotonic()
        link.last_active = now
        try:
            frame = link.conn.receive(message, now)
        except ClientError as exc:
            self._metrics.bad_frames.labels("session", exc.code).inc()
            self._scheduler.count_refused(exc.code)
            self._outbox.push(link.ws, proto.encode_error(exc.ref, exc.code, exc.message))
            return
        kind = type(frame)
        limit = self._inflight_limit
        if kind is proto.SubmitJob:
            assert isinstance(frame, proto.SubmitJob)
            shed = self._shedder
            why = shed.reason(len(frame.audio) if frame.audio else 0)
            if why:
                # No task, no Redis call: a refusal costs a fraction of a dispatch.
                self._refuse(link, frame.ref, Code.OVERLOADED, why, shed.retry_after_ms)
                return
            self._tasks.start(link, limit, self._submit(link, frame))
        elif kind is proto.CancelJob:
            assert isinstance(frame, proto.CancelJob)
            self._tasks.start(link, limit, self._cancel(link, frame))
        elif kind is proto.Ack:
            assert isinstance(frame, proto.Ack)
            self._tasks.start(link, limit, self._ack(link.session_id, frame.job_ids))

    async def _ack(self, session_id: str, job_ids: tuple[JobId, ...]) -> None:
        with contextlib.suppress(RedisUnavailable):
            await self._scheduler.ack_results(session_id, job_ids)

    # Jobs

    async def _submit(self, link: SessionLink, frame: proto.SubmitJob) -> None:
        ref = frame.ref
        if not link.grant.allows_pair(frame.src_lang, frame.tgt_lang):
            self._refuse(
                link, ref, Code.UNAUTHORIZED, "the token does not allow this language pair"
            )
            return
        if not self._health.ready:
            self._refuse(link, ref, Code.UNAVAILABLE, _UNAVAILABLE)
            return
        jid = JobId(new_job_id())
        audio = frame.audio
        timeout_ms = frame.timeout_ms or self._settings.job_timeout_ms
        if audio and not self._audio.put(jid, audio, timeout_ms):
            self._refuse(
                link, ref, Code.OVERLOADED, "the audio budget is full", self._shedder.retry_after_ms
            )
            return
        started = time.monotonic()
        link.submitting.add(jid)
        if len(link.started) < _MAX_TIMED:
            link.started[jid] = started
        try:
            reply = await self._scheduler.dispatch_task(
                link.session_id,
                frame.src_lang,
                frame.tgt_lang,
                frame.payload,
                ref=ref,
                has_audio=bool(audio),
                timeout_ms=timeout_ms,
                job_id=jid,
            )
        except SchedulingError as exc:
            link.submitting.discard(jid)
            link.started.pop(jid, None)
            self._audio.drop(jid)
            self._refuse(link, ref, exc.code, exc.message)
            return
        except RedisUnavailable:
            link.submitting.discard(jid)
            link.started.pop(jid, None)
            # The audio stays until the job is taken back or expires: it may have started.
            self._refuse(link, ref, Code.UNAVAILABLE, _UNAVAILABLE)
            # The script may have run before the connection failed: take the job back.
            if len(link.abandoned) < 1024:
                link.abandoned.add(jid)
            self.abandon(link.session_id, jid)
            return
        link.submitting.discard(jid)
        self._shedder.dispatched(time.monotonic() - started)
        if jid in link.ended_early:
            # Its result is already sent; protocol.md §9.2 wants nothing after it.
            link.ended_early.discard(jid)
            link.started.pop(jid, None)
            link.conn.job_refused(ref)
            return
        link.conn.job_started(ref, jid)
        if type(reply) is Queued:
            self._outbox.push(link.ws, proto.encode_queued(ref, jid))
            self._metrics.queued.inc()
            return
        assert not isinstance(reply, Queued)
        self._router.dispatch(
            Dispatch(
                node_hub=reply.node_hub,
                node_id=reply.node_id,
                job_id=jid,
                attempt=reply.attempt,
                session_id=link.session_id,
                src_lang=frame.src_lang.lower(),
                tgt_lang=frame.tgt_lang.lower(),
                deadline_ms=reply.deadline_ms,
                payload=frame.payload,
                audio_hub=self.hub_id if audio else "",
                session_hub=self.hub_id,
                ref=ref,
            )
        )

    def _refuse(
        self,
        link: SessionLink,
        ref: str,
        code: str,
        message: str,
        retry_after_ms: int | None = None,
    ) -> None:
        link.conn.job_refused(ref)
        self._metrics.job_refused(code)
        self._scheduler.count_refused(code)
        self._outbox.push(link.ws, proto.encode_error(ref, code, message, retry_after_ms))

    async def _abandon(self, session_id: str, job_id: str) -> None:
        """End a job whose dispatch reply was lost, once Redis answers again (bounded)."""
        try:
            await self._take_back(session_id, job_id)
        finally:
            self._abandoning -= 1

    async def _take_back(self, session_id: str, job_id: str) -> None:
        delay = 0.1
        for _ in range(40):
            try:
                done = await self._scheduler.cancel_task(job_id, session_id, reason="UNAVAILABLE")
            except SchedulingError:
                pass  # it never ran (UNKNOWN_JOB) or already ended
            except RedisUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            else:
                # Not its own result (done.ended): the session was told UNAVAILABLE.
                # The events are other jobs': the freed slot's, queued jobs that
                # ended past their deadline included.
                self._router.route(done.events)
            with contextlib.suppress(RedisUnavailable):
                await self._scheduler.ack_results(session_id, [job_id])
            return
        logger.warning("! could not take back job %s after a Redis failure", job_id)

    async def _cancel(self, link: SessionLink, frame: proto.CancelJob) -> None:
        jid = link.conn.job_for(frame.ref)
        if jid is None:
            self._outbox.push(
                link.ws,
                proto.encode_error(frame.ref, Code.UNKNOWN_JOB, "the job is not accepted yet"),
            )
            return
        try:
            done = await self._scheduler.cancel_task(jid, link.session_id)
        except SchedulingError as exc:
            self._outbox.push(link.ws, proto.encode_error(frame.ref, exc.code, exc.message))
            return
        except RedisUnavailable:
            self._outbox.push(
                link.ws,
                proto.encode_error(frame.ref, Code.UNAVAILABLE, _UNAVAILABLE),
            )
            return
        self._router.ended(done.ended)
        self._router.route(done.events)

    # Gone

    def _start_resume_window(self, session_id: str) -> None:
        """The session may resume within ``resume_window_s``; then its jobs are cancelled."""
        window = self._settings.resume_window_s

        def expire() -> None:
            self._gone.pop(session_id, None)
            self._tasks.spawn(self._close_session_jobs(session_id))

        if window <= 0:
            expire()
        else:
            self._gone[session_id] = asyncio.get_running_loop().call_later(window, expire)

    async def _close_session_jobs(self, session_id: str) -> None:
        for _ in range(64):  # bounded: 256 jobs per call
            try:
                done, events = await self._scheduler.session_closed(session_id)
            except RedisUnavailable:
                logger.warning("! could not cancel jobs of gone session %s", session_id)
                return
            self._router.route(events)
            if not done or not any(type(e) is JobEnded for e in events):
                return

    async def _resend_lost_results(self) -> None:
        """Send each connected session the results that ended while the bus was down.

        protocol.md §8: the bus is at most once, the outcome stays in Redis.
        Only jobs still open on the connection, so each result goes once per
        connection.
        """
        for session_id, link in list(self._registry.sessions.items()):
            if link.conn.open_refs == 0:
                continue
            # Bounded: the pool may still hold connections that died with Redis.
            for delay in (0.05, 0.1, 0.2, 0.5, 1.0, 0):
                try:
                    ended = await self._scheduler.ended_results(session_id)
                    break
                except RedisUnavailable:
                    if not delay:
                        return  # Redis is gone again: the next subscription retries
                    await asyncio.sleep(delay)
            for e in ended:
                jid = JobId(e.job_id)
                if (
                    self._registry.sessions.get(session_id) is link
                    and link.conn.job_ended(jid) is not None
                ):
                    self._outbox.push(
                        link.ws, proto.encode_result(e.ref, jid, e.status, e.result, e.error)
                    )
