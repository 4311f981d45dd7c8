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
from .cells import Cells
from .config import Settings
from .errors import ClientError, Code, ErrorCode, RedisUnavailable, SchedulingError
from .events import Accepted, Dispatch, JobEnded, Queued
from .health import Health
from .metrics import Metrics
from .outbox import Outbox
from .protocol import CloseCode, JobId, SessionId
from .registry import Registry, SessionLink
from .router import Router
from .scheduler import new_job_id
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

_SPILLS = (Code.NO_AVAILABLE_NODE, Code.EMPTY_POOL, Code.NO_POOL_FOR_LANG_PAIR)
"""Refusals of a free-node-only dispatch after which a job tries another cell."""


class _Spilled(Exception):
    """A spill-over try took the job: its id (in the cell that took it) and the reply."""

    def __init__(self, job_id: JobId, reply: Accepted | Queued) -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.reply = reply


class Sessions:
    """Serves session connections and keeps their jobs' outcomes for resume.

    Args:
        hub_id: this hub's id (the session's hub, for results).
        settings: limits, resume window, idle timeout, resume secret.
        limits: frame limits for the session state machines.
        cells: the cells served, each with its scheduler: the script calls.
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
        cells: Cells,
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
        self._cells = cells
        self._scheduler = cells.main
        self._registry = registry
        self._outbox = outbox
        self._router = router
        self._metrics = metrics
        self._health = health
        self._tasks = tasks
        self._audio = audio
        self._shedder = shedder
        secret = settings.resume_secret.encode() if settings.resume_secret else b""
        self._secrets = {cell: secret for cell in cells.names}
        """Cell -> the key of its sessions' resume tokens (each cell's, from its Redis)."""
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
        """Load the keys of resume tokens, one per cell (shared by every hub through Redis)."""
        for cell, secret in self._secrets.items():
            if not secret:
                self._secrets[cell] = await self._cells[cell].resume_secret()

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
        session_id, resumed, cell = await self._welcome(ws, grant)
        if session_id is None:
            return
        link = SessionLink(ws, session_id, self._settings, self._limits, grant, cell)
        # Every session is recorded when it opens (its hub, for results), so a
        # resume can tell an expired session from one that never sent a job.
        try:
            known, open_jobs, missed = await self._cells[cell].resume_session(session_id)
            if resumed and known and self._cells.several:
                open_jobs, missed = await self._resume_spilled(link, open_jobs, missed)
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
        token = self._resume_token(session_id, cell)
        push(ws, proto.encode_welcome(session_id, self.hub_id, token))
        for e in missed:
            push(ws, proto.encode_result(e.ref, JobId(e.job_id), e.status, e.result, e.error))
        try:
            await self._receive_frames(link)
        finally:
            link.conn.close()
            if self._registry.remove_session(link) and not self._health.closing:
                self._start_resume_window(session_id, link.all_cells())

    async def _resume_spilled(
        self,
        link: SessionLink,
        open_jobs: tuple[tuple[str, str, str], ...],
        missed: tuple[JobEnded, ...],
    ) -> tuple[tuple[tuple[str, str, str], ...], tuple[JobEnded, ...]]:
        """Resume the session in the other cells its jobs spilled to, too.

        Its cell records those cells (add_session_cell.lua) before a job
        goes there; resume_session in each routes their results here and
        gives their open jobs and missed results.

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        others = [
            c
            for c in await self._cells[link.cell].session_cells(link.session_id)
            if c in self._cells
        ]
        if not others:
            return open_jobs, missed
        replies = await asyncio.gather(
            *(self._cells[c].resume_session(link.session_id) for c in others)
        )
        for c in others:
            link.cells[c] = -float("inf")
        more_open = [job for reply in replies for job in reply[1]]
        more_missed = [e for reply in replies for e in reply[2]]
        return (*open_jobs, *more_open), (*missed, *more_missed)

    async def _welcome(
        self, ws: ServerConnection, grant: SessionGrant
    ) -> tuple[SessionId | None, bool, str]:
        """The session's id, whether it resumes one, and its cell; None after closing the socket."""
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        cell = await self._session_cell(ws, grant, query.get("cell", [None])[0])
        if cell is None:
            return None, False, ""
        wanted = query.get("session_id", [None])[0]
        if grant.session_id is not None:
            # The token names the session: presenting it again resumes it.
            if wanted is not None and wanted != grant.session_id:
                await ws.close(CloseCode.POLICY_VIOLATION, "session_id differs from the token")
                return None, False, ""
            return SessionId(grant.session_id), True, cell
        if wanted is None:
            return SessionId(secrets.token_urlsafe(12)), False, cell
        token = query.get("resume_token", [""])[0]
        # Bytes: compare_digest raises TypeError on non-ASCII str.
        if not hmac.compare_digest(token.encode(), self._resume_token(wanted, cell).encode()):
            await ws.close(CloseCode.BAD_RESUME_TOKEN, "bad resume token")
            return None, False, ""
        return SessionId(wanted), True, cell

    async def _session_cell(
        self, ws: ServerConnection, grant: SessionGrant, wanted: str | None
    ) -> str | None:
        """The session's cell: its token's, its URL's (``?cell=``), else the hub's.

        None after closing the socket: 1008 when the URL names another cell
        than the token, 4008 when this hub does not serve it (protocol.md §7).
        """
        if grant.cell is not None and wanted is not None and wanted != grant.cell:
            await ws.close(CloseCode.POLICY_VIOLATION, "cell differs from the token")
            return None
        cell = grant.cell or wanted or self._cells.default
        if cell not in self._cells:
            self._metrics.job_refused(Code.UNKNOWN_CELL)
            await ws.close(CloseCode.UNKNOWN_CELL, "unknown cell")
            return None
        return cell

    def _resume_token(self, session_id: str, cell: str) -> str:
        secret = self._secrets[cell]
        return hmac.new(secret, session_id.encode(), hashlib.sha256).hexdigest()[:32]

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
        cells = self._cells
        if not cells.several:
            with contextlib.suppress(RedisUnavailable):
                await self._scheduler.ack_results(session_id, job_ids)
            return
        # Each job's result waits in the cell the job ran in (its id says which).
        by_cell: dict[str, list[str]] = {}
        for jid in job_ids:
            cell = cells.job_cell(jid)
            if cell is not None:
                by_cell.setdefault(cell, []).append(jid)

        async def ack(cell: str, ids: list[str]) -> None:
            with contextlib.suppress(RedisUnavailable):
                await cells[cell].ack_results(session_id, ids)

        await asyncio.gather(*(ack(cell, ids) for cell, ids in by_cell.items()))

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
        token = new_job_id()
        jid = JobId(self._cells.job_id(link.cell, token))
        audio = frame.audio
        timeout_ms = frame.timeout_ms or self._settings.job_timeout_ms
        if audio and not self._audio.put(jid, audio, timeout_ms):
            self._refuse(
                link, ref, Code.OVERLOADED, "the audio budget is full", self._shedder.retry_after_ms
            )
            return
        started = time.monotonic()
        link.submitting.add(jid)
        cell = link.cell
        ids = [jid]  # the id of the job's last try: it changes with the cell tried
        if len(link.started) < _MAX_TIMED:
            link.started[jid] = started
        try:
            if self._cells.spill:
                cell = await self._spill(link, frame, ids, token, timeout_ms)
                jid = self._move(link, ids, JobId(self._cells.job_id(cell, token)))
            reply = await self._cells[cell].dispatch_task(
                link.session_id,
                frame.src_lang,
                frame.tgt_lang,
                frame.payload,
                ref=ref,
                has_audio=bool(audio),
                timeout_ms=timeout_ms,
                job_id=jid,
            )
        except _Spilled as spilled:
            jid, reply = spilled.job_id, spilled.reply
        except SchedulingError as exc:
            jid = ids[0]
            link.submitting.discard(jid)
            link.started.pop(jid, None)
            self._audio.drop(jid)
            self._refuse(link, ref, exc.code, exc.message)
            return
        except RedisUnavailable:
            jid = ids[0]
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
        self._complete_submit(link, frame, jid, reply, started)

    def _complete_submit(
        self,
        link: SessionLink,
        frame: proto.SubmitJob,
        jid: JobId,
        reply: Accepted | Queued,
        started: float,
    ) -> None:
        """Tell the session its job is accepted (and send it to its node) or queued."""
        ref = frame.ref
        audio = frame.audio
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

    async def _spill(
        self,
        link: SessionLink,
        frame: proto.SubmitJob,
        ids: list[JobId],
        token: str,
        timeout_ms: int,
    ) -> str:
        """Try the job's cell, then up to ``spill`` others, on a free node only.

        Each try is one dispatch_task call in one cell, with a queue wait of 0.

        Args:
            ids: ``ids[0]`` is the job's id in the cell tried last.

        Returns:
            The cell whose plain dispatch (which queues) the job gets next:
            its own, or, when its own has no live node for the pair, the
            first other that has.

        Raises:
            _Spilled: a cell took the job on a free node (its id and reply).
            SchedulingError: a refusal that no other cell changes.
            RedisUnavailable: Redis did not answer (the job, under ``ids[0]``,
                may or may not exist).
        """
        cells = self._cells
        home = link.cell
        pair = f"{frame.src_lang.lower()}:{frame.tgt_lang.lower()}"
        try:
            reply = await self._try_cell(link, frame, home, ids[0], timeout_ms)
        except SchedulingError as exc:
            if exc.code not in _SPILLS:
                raise
            refusal = exc
        else:
            raise _Spilled(ids[0], reply)
        queue_in = home if refusal.code == Code.NO_AVAILABLE_NODE else None
        for cell in cells.spill_order(home, pair):
            jid = self._move(link, ids, JobId(cells.job_id(cell, token)))
            try:
                reply = await self._try_cell(link, frame, cell, jid, timeout_ms)
            except SchedulingError as exc:
                if exc.code == Code.NO_AVAILABLE_NODE:
                    queue_in = queue_in or cell
                elif exc.code in _SPILLS:
                    cells.lacks(cell, pair)
                else:
                    raise
            else:
                self._metrics.spilled.inc()
                raise _Spilled(jid, reply)
        if queue_in is None:
            raise refusal
        return queue_in

    async def _try_cell(
        self, link: SessionLink, frame: proto.SubmitJob, cell: str, jid: JobId, timeout_ms: int
    ) -> Accepted | Queued:
        """One spill-over try: dispatch_task in ``cell`` on a free node only."""
        dispatch = self._cells[cell].dispatch_task(
            link.session_id,
            frame.src_lang,
            frame.tgt_lang,
            frame.payload,
            ref=frame.ref,
            has_audio=bool(frame.audio),
            timeout_ms=timeout_ms,
            job_id=jid,
            spill_try=True,
        )
        if cell == link.cell:
            return await dispatch
        # The record first, in the same pipeline on a single Redis. Without it a
        # resume would miss the job: a failed record fails the submit, which then
        # takes the job back like any whose reply was lost.
        noted, reply = await asyncio.gather(
            self._note_cell(link, cell), dispatch, return_exceptions=True
        )
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(noted, BaseException):
            raise noted
        return reply

    async def _note_cell(self, link: SessionLink, cell: str) -> None:
        """Record in the session's cell that it may have jobs in ``cell`` (for its resume).

        Once per connection and cell, again when half the record's TTL passed.
        """
        now = time.monotonic()
        if now - link.cells.get(cell, -float("inf")) < self._scheduler.session_ttl_ms() / 2000:
            return
        await self._cells[link.cell].add_session_cell(link.session_id, cell)
        link.cells[cell] = now

    def _move(self, link: SessionLink, ids: list[JobId], new: JobId) -> JobId:
        """Give the job being submitted its id in another cell: audio and tracking move."""
        old, ids[0] = ids[0], new
        if old != new:
            link.submitting.discard(old)
            link.submitting.add(new)
            self._audio.rename(old, new)
            started = link.started.pop(old, None)
            if started is not None:
                link.started[new] = started
        return new

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
        scheduler = self._cells.for_job(job_id)
        assert scheduler is not None  # an id this hub made
        delay = 0.1
        for _ in range(40):
            try:
                done = await scheduler.cancel_task(job_id, session_id, reason="UNAVAILABLE")
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
                await scheduler.ack_results(session_id, [job_id])
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
            scheduler = self._cells.for_job(jid)
            if scheduler is None:
                raise SchedulingError(ErrorCode.UNKNOWN_JOB)
            done = await scheduler.cancel_task(jid, link.session_id)
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

    def _start_resume_window(self, session_id: str, cells: list[str]) -> None:
        """The session may resume within ``resume_window_s``; then its jobs are cancelled."""
        window = self._settings.resume_window_s

        def expire() -> None:
            self._gone.pop(session_id, None)
            for cell in cells:
                self._tasks.spawn(self._close_session_jobs(session_id, cell))

        if window <= 0:
            expire()
        else:
            self._gone[session_id] = asyncio.get_running_loop().call_later(window, expire)

    async def _close_session_jobs(self, session_id: str, cell: str) -> None:
        for _ in range(64):  # bounded: 256 jobs per call
            try:
                done, events = await self._cells[cell].session_closed(session_id)
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
            ended: list[JobEnded] = []
            for cell in link.all_cells():
                # Bounded: the pool may still hold connections that died with Redis.
                for delay in (0.05, 0.1, 0.2, 0.5, 1.0, 0):
                    try:
                        ended.extend(await self._cells[cell].ended_results(session_id))
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
