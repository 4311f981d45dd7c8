"""The HTTP job API (protocol.md §11): submit, look up and cancel jobs without a WebSocket.

A job submitted over HTTP takes the path of a session's job
(:meth:`~hub.sessions.Sessions._submit`): shedding, the session's rate and
in-flight limits, the token's language pairs, the audio kept here
(:class:`~hub.audio.AudioStore`), one ``dispatch_task.lua`` call, and the
:class:`~hub.router.Router` for the job frame. It runs under the session id
of its client, so the queues' round robin and "a client sees only its own
jobs" hold as they do for sockets:

- with session tokens, the token's ``sid`` claim; a token without one is a
  client of its own (its id is a digest of the token);
- in open mode (loopback only, unless ``--insecure``), the client's address.

Results come back the way a session's do: each script's result event goes
to the hub recorded for the session (the last hub it submitted to, here or
over the bus), where :class:`~hub.outbox.Outbox` hands it to
:meth:`JobsApi.job_ended`. A request that waits (``wait_ms``) is woken by it;
it also reads the job's record every :data:`_POLL_S` and once at the end,
so a result routed elsewhere (the client submitted to another hub since) or
lost on the bus costs latency, never the answer. Ended jobs are read from
Redis (:meth:`~hub.reads.CellReads.job`) while their record lives
(``job_ttl_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import orjson

from . import protocol as proto
from .audio import AudioStore
from .auth import OPEN_SESSION, Authenticator, SessionGrant
from .cells import Cells
from .config import Settings
from .errors import (
    ClientError,
    Code,
    ProtocolError,
    RedisUnavailable,
    SchedulingError,
    Unauthorized,
)
from .events import Dispatch, Queued
from .health import Health
from .httpconn import HttpRequest, HttpResponse, error_response
from .latency import Latencies
from .metrics import Metrics
from .protocol import JobId
from .reads import JobRecord
from .router import Router
from .scheduler import new_job_id
from .sessions import Sessions
from .shedding import Shedder
from .tasks import Tasks

__all__ = ["JobsApi"]

logger = logging.getLogger("hub.jobsapi")

JOBS_PATH = "/v1/jobs"

_POLL_S = 2.0
"""How often a waiting request reads its job's record, in case its result went elsewhere."""
_MAX_CLIENTS = 10_000
"""HTTP clients whose rate and in-flight counts this hub keeps (the least recent go)."""
_END_GRACE_S = 5.0
"""A job counts against its client's in-flight limit here until its result comes
here, or this long after its deadline (a result routed to another hub)."""
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_OPEN_ID_RE = re.compile(r"[^A-Za-z0-9._-]")
_T = TypeVar("_T")
_METHODS = frozenset(("GET", "HEAD", "POST", "DELETE"))
"""Methods counted by name in ``hub_http_requests`` (the others as ``other``)."""

_UNAVAILABLE = "the scheduler is unavailable; try again"
_SHUTTING_DOWN = "the hub is shutting down; try another"


class _Client:
    """What this hub tracks of one HTTP client: its rate and its unfinished jobs."""

    def __init__(self, settings: Settings, limits: proto.Limits, grant: SessionGrant) -> None:
        self._settings = settings
        self.conn = proto.SessionConnection(
            limits,
            max_inflight=grant.max_inflight or settings.max_inflight_per_session,
            rate_per_s=grant.rate_per_s or settings.session_rate_per_s,
            burst=grant.burst or settings.session_burst,
        )
        self.ends: dict[str, float] = {}
        """Unfinished jobs -> when they stop counting (monotonic), whatever happens."""
        self.started: dict[str, float] = {}
        """Unfinished jobs -> when they were submitted (:class:`~hub.latency.Latencies`),
        as a socket session's ``SessionLink.started``: bounded by its in-flight limit."""

    def grant(self, grant: SessionGrant) -> None:
        """Take the limits of the request's token: a client's new token (the same
        ``sid``, other claims) applies from its first request, as on a new socket."""
        s, conn = self._settings, self.conn
        conn.max_inflight = grant.max_inflight or s.max_inflight_per_session
        conn.rate_per_s = grant.rate_per_s or s.session_rate_per_s
        conn.burst = grant.burst or s.session_burst

    def expire(self, now: float) -> None:
        """Stop counting jobs whose result never came here."""
        for jid in [j for j, end in self.ends.items() if end < now]:
            self.forget(jid)

    def forget(self, jid: str) -> None:
        # The job's ref is its id: refused or ended, the ref closes the same way.
        self.ends.pop(jid, None)
        self.started.pop(jid, None)
        self.conn.job_refused(jid)


class JobsApi:
    """Answers the requests of the job API.

    Args:
        hub_id: this hub's id (the session's hub of jobs submitted here).
        settings: limits, waits, job timeouts.
        limits: frame limits (the body of a job).
        auth: checks session tokens.
        cells: the script calls and job records of each cell served (a
            client's jobs run in its token's cell, else the hub's default).
        router: starts accepted jobs on their node; routes cancel events.
        sessions: takes back a job whose dispatch reply was lost.
        audio: where the audio of jobs accepted here is kept.
        shedder: whether new jobs must be refused ``OVERLOADED``.
        latencies: where the jobs' time to accepted and end to end are counted,
            beside those of socket sessions (the dashboard's latencies).
        metrics: refusals.
        health: whether Redis is usable and the hub is closing.
        tasks: owner of the script calls that outlive their request.
    """

    def __init__(
        self,
        hub_id: str,
        settings: Settings,
        limits: proto.Limits,
        auth: Authenticator,
        cells: Cells,
        router: Router,
        sessions: Sessions,
        audio: AudioStore,
        shedder: Shedder,
        latencies: Latencies,
        metrics: Metrics,
        health: Health,
        tasks: Tasks,
    ) -> None:
        self.hub_id = hub_id
        self._settings = settings
        self._limits = limits
        self._auth = auth
        self._cells = cells
        self._router = router
        self._sessions = sessions
        self._audio = audio
        self._shedder = shedder
        self._latencies = latencies
        self._metrics = metrics
        self._health = health
        self._tasks = tasks
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._waiters: dict[str, set[asyncio.Future[bytes | None]]] = {}

    # Public methods

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """Answer one request (the :class:`~hub.httpconn.HttpServer` handler)."""
        response = await self._route(request)
        method = request.method if request.method in _METHODS else "other"
        self._metrics.http_requests.labels(method, str(response.status)).inc()
        return response

    async def _route(self, request: HttpRequest) -> HttpResponse:
        url = urlsplit(request.target)
        path = url.path
        query = parse_qs(url.query)
        if path == JOBS_PATH:
            if request.method != "POST":
                return _not_allowed("POST")
            return await self._submit(request, query)
        if path.startswith(JOBS_PATH + "/"):
            job_id = path[len(JOBS_PATH) + 1 :]
            if request.method in ("GET", "HEAD"):
                return await self._look_up(request, job_id, query)
            if request.method == "DELETE":
                return await self._cancel(request, job_id)
            return _not_allowed("GET, DELETE")
        if path in ("/healthz", "/readyz"):
            # Probes that send HEAD (or come after a job request on a kept-alive
            # connection) get the answer websockets gives a GET on a fresh one.
            if request.method not in ("GET", "HEAD"):
                return _not_allowed("GET, HEAD")
            if path == "/healthz":
                return HttpResponse(http.HTTPStatus.OK.value, b"ok\n", "text/plain")
            if self._health.ready and not self._health.closing:
                return HttpResponse(http.HTTPStatus.OK.value, b"ready\n", "text/plain")
            return HttpResponse(
                http.HTTPStatus.SERVICE_UNAVAILABLE.value, b"not ready\n", "text/plain"
            )
        return error_response(
            Code.BAD_FRAME,
            "no such route: the job API is /v1/jobs (other routes answer on connections "
            "of their own)",
            status=http.HTTPStatus.NOT_FOUND,
            close=True,
        )

    def job_ended(self, session_id: str, job_id: str, frame: str | bytes) -> None:
        """A job of a session of this hub ended: wake its waiting requests.

        Called by :class:`~hub.outbox.Outbox` with the job's ``result`` frame,
        for every result that reaches this hub (socket sessions' too: two dict
        lookups each).
        """
        client = self._clients.get(session_id)
        if client is not None:
            self._latencies.sent(client.started, job_id, ended=True)
            client.forget(job_id)
        waiters = self._waiters.pop(job_id, None)
        if waiters:
            data = frame.encode() if isinstance(frame, str) else frame
            for fut in waiters:
                if not fut.done():
                    fut.set_result(data)

    def job_accepted(self, session_id: str, job_id: str) -> None:
        """A job of a session of this hub was accepted (an attempt started on a node).

        Called by :class:`~hub.outbox.Outbox` for every ``accepted`` frame
        for a session of this hub: counts the job's time to accepted (its
        first attempt's) when it was submitted here over HTTP.
        """
        client = self._clients.get(session_id)
        if client is not None:
            self._latencies.sent(client.started, job_id, ended=False)

    def close(self) -> None:
        """Wake every waiting request (the hub shuts down): each answers what it knows."""
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()

    # Routes

    async def _submit(self, request: HttpRequest, query: dict[str, list[str]]) -> HttpResponse:
        try:
            session_id, grant, client = self._client(request)
            wait_s = self._wait_s(query)
            cell = grant.cell or self._cells.default
            if cell not in self._cells:
                raise ProtocolError(
                    f"this hub does not serve cell {cell!r}", code=Code.UNKNOWN_CELL
                )
            jid = self._cells.job_id(cell, new_job_id())
            binary = _media_type(request) == "application/octet-stream"
            frame = proto.parse_job_body(request.body, jid, self._limits, binary=binary)
        except ClientError as exc:
            return self._refused(exc.code, exc.message)
        if self._health.closing:
            return self._refused(Code.UNAVAILABLE, _SHUTTING_DOWN, close=True)
        audio = frame.audio
        shed = self._shedder
        why = shed.reason(len(audio) if audio else 0)
        if why:
            return self._refused(Code.OVERLOADED, why, shed.retry_after_ms)
        now = time.monotonic()
        client.expire(now)
        try:
            client.conn.admit(frame, now)
        except ClientError as exc:
            return self._refused(exc.code, exc.message)
        # Watched before the dispatch: a fast node's result may come before its reply.
        fut = self._watch(jid) if wait_s > 0 else None
        try:
            # A client that goes away never cuts a dispatch from its routing.
            started = await self._unless_cancelled(self._start(session_id, grant, client, frame))
            if isinstance(started, HttpResponse):
                client.forget(jid)
                return started
            return await self._wait(jid, session_id, wait_s, fut, submitted=started)
        finally:
            self._unwatch(jid, fut)

    async def _start(
        self, session_id: str, grant: SessionGrant, client: _Client, frame: proto.SubmitJob
    ) -> HttpResponse | str:
        """Dispatch a job admitted for its client.

        Returns:
            A refusal, or the job's status: ``running`` or ``queued``.
        """
        jid = JobId(frame.ref)
        scheduler = self._cells.for_job(jid)
        assert scheduler is not None  # its id names a cell served here (_submit)
        if not grant.allows_pair(frame.src_lang, frame.tgt_lang):
            return self._refused(
                Code.UNAUTHORIZED,
                "the token does not allow this language pair",
                status=http.HTTPStatus.FORBIDDEN,
            )
        if not self._health.ready:
            return self._refused(Code.UNAVAILABLE, _UNAVAILABLE)
        audio = frame.audio
        timeout_ms = frame.timeout_ms or self._settings.job_timeout_ms
        if audio and not self._audio.put(jid, audio, timeout_ms):
            return self._refused(
                Code.OVERLOADED, "the audio budget is full", self._shedder.retry_after_ms
            )
        # Counted from now: its result may come before the dispatch reply.
        client.ends[jid] = time.monotonic() + timeout_ms / 1000 + _END_GRACE_S
        client.started[jid] = self._latencies.now()
        started = time.monotonic()
        try:
            reply = await scheduler.dispatch_task(
                session_id,
                frame.src_lang,
                frame.tgt_lang,
                frame.payload,
                ref=jid,
                has_audio=bool(audio),
                timeout_ms=timeout_ms,
                job_id=jid,
            )
        except SchedulingError as exc:
            self._audio.drop(jid)
            return self._refused(exc.code, exc.message)
        except RedisUnavailable:
            # The script may have run before the connection failed: take the job back.
            self._sessions.abandon(session_id, jid)
            return self._refused(Code.UNAVAILABLE, _UNAVAILABLE)
        self._shedder.dispatched(time.monotonic() - started)
        client.conn.job_started(jid, jid)
        if type(reply) is Queued:
            self._metrics.queued.inc()
            return "queued"
        assert not isinstance(reply, Queued)
        self._router.dispatch(
            Dispatch(
                node_hub=reply.node_hub,
                node_id=reply.node_id,
                job_id=jid,
                attempt=reply.attempt,
                session_id=session_id,
                src_lang=frame.src_lang,
                tgt_lang=frame.tgt_lang,
                deadline_ms=reply.deadline_ms,
                payload=frame.payload,
                audio_hub=self.hub_id if audio else "",
                session_hub=self.hub_id,
                ref=jid,
            )
        )
        return "running"

    async def _look_up(
        self, request: HttpRequest, job_id: str, query: dict[str, list[str]]
    ) -> HttpResponse:
        try:
            session_id, _, _ = self._client(request)
            wait_s = self._wait_s(query)
        except ClientError as exc:
            return _refusal(exc.code, exc.message)
        if not _ID_RE.fullmatch(job_id):
            return _refusal(Code.UNKNOWN_JOB, "no such job")
        fut = self._watch(job_id) if wait_s > 0 else None
        try:
            return await self._wait(job_id, session_id, wait_s, fut, submitted=None)
        finally:
            self._unwatch(job_id, fut)

    async def _cancel(self, request: HttpRequest, job_id: str) -> HttpResponse:
        try:
            session_id, _, _ = self._client(request)
        except ClientError as exc:
            return _refusal(exc.code, exc.message)
        if not _ID_RE.fullmatch(job_id):
            return _refusal(Code.UNKNOWN_JOB, "no such job")
        return await self._unless_cancelled(self._end(job_id, session_id))

    async def _end(self, job_id: str, session_id: str) -> HttpResponse:
        """Cancel a job (cancel_task.lua) and route what it caused."""
        try:
            scheduler = self._cells.for_job(job_id)
            if scheduler is None:
                return _refusal(Code.UNKNOWN_JOB, "no such job")
            done = await scheduler.cancel_task(job_id, session_id)
        except SchedulingError as exc:
            message = "the job has already ended" if exc.code is Code.STALE_ATTEMPT else exc.message
            return _refusal(exc.code, message)
        except RedisUnavailable:
            return _refusal(Code.UNAVAILABLE, _UNAVAILABLE)
        self._router.ended(done.ended)
        self._router.route(done.events)
        e = done.ended
        return _ended(job_id, e.status, e.result, e.error)

    async def _unless_cancelled(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a script call and the routing of its reply to the end, even if the
        request is cancelled (its client went away): the job's state in Redis and
        what its node and waiters are told must not part."""
        return await asyncio.shield(self._tasks.spawn(coro))

    # Waiting

    def _watch(self, job_id: str) -> asyncio.Future[bytes | None] | None:
        """A future :meth:`job_ended` completes with the job's result frame (None: closing)."""
        if self._health.closing:
            return None
        fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, set()).add(fut)
        return fut

    def _unwatch(self, job_id: str, fut: asyncio.Future[bytes | None] | None) -> None:
        waiters = self._waiters.get(job_id)
        if fut is not None and waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self._waiters[job_id]

    async def _wait(
        self,
        job_id: str,
        session_id: str,
        wait_s: float,
        fut: asyncio.Future[bytes | None] | None,
        *,
        submitted: str | None,
    ) -> HttpResponse:
        """Answer with the job once it ended, or with its state after ``wait_s``.

        Args:
            fut: from :meth:`_watch`, when the request waits.
            submitted: the job's status when it was just accepted here for
                ``session_id`` (a ``POST``: ``202`` until it ends); ``None``
                for a look-up (``GET``: ``200`` with the job's record).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        record: JobRecord | None = None
        if submitted is None:
            got = await self._read(job_id, session_id)
            if isinstance(got, HttpResponse):
                return got
            record = got
        while fut is not None and (record is None or not record.ended):
            left = deadline - loop.time()
            if left > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, _POLL_S)):
                        await asyncio.shield(fut)
            frame = fut.result() if fut.done() else None
            if frame is not None and submitted is not None:
                return _from_frame(job_id, frame)
            # The result (a look-up answers from the record), a poll, the end of
            # the wait or the hub shutting down: read the record.
            got = await self._read(job_id, session_id)
            if isinstance(got, HttpResponse):
                if submitted is None:
                    return got
                # Accepted all the same: never a refusal, the client looks it up later.
                return _pending(job_id, record.status if record else submitted)
            record = got
            if fut.done() or deadline - loop.time() <= 0:
                break
        if record is None:
            assert submitted is not None
            return _pending(job_id, submitted)
        if submitted is None:
            return _record(record)
        if record.ended:
            return _ended(job_id, record.status, record.result, record.error)
        return _pending(job_id, record.status)

    async def _read(self, job_id: str, session_id: str) -> JobRecord | HttpResponse:
        """The job's record if it is the client's; else a refusal (404, or 503)."""
        try:
            scheduler = self._cells.for_job(job_id)
            record = None if scheduler is None else await scheduler.job(job_id)
        except RedisUnavailable:
            return _refusal(Code.UNAVAILABLE, _UNAVAILABLE)
        if record is None or record.session_id != session_id:
            # Another client's job is no different from none (its id is a secret).
            return _refusal(Code.UNKNOWN_JOB, "no such job")
        return record

    # Private methods

    def _client(self, request: HttpRequest) -> tuple[str, SessionGrant, _Client]:
        """The client of a request: its session id, its grant, its state on this hub.

        Raises:
            Unauthorized: no token, or a bad one (with session tokens).
        """
        if self._auth.session_auth:
            token = _bearer(request.headers.get("authorization", ""))
            if token is None:
                raise Unauthorized("missing bearer token")
            grant = self._auth.session({"Authorization": f"Bearer {token}"}, {})
            session_id = grant.session_id or "t-" + hashlib.sha256(token.encode()).hexdigest()[:40]
        else:
            grant = OPEN_SESSION
            session_id = "http-" + _OPEN_ID_RE.sub("-", request.peer)[:59]
        client = self._clients.get(session_id)
        if client is None:
            client = _Client(self._settings, self._limits, grant)
            self._clients[session_id] = client
            if len(self._clients) > _MAX_CLIENTS:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(session_id)
            client.grant(grant)
        return session_id, grant, client

    def _wait_s(self, query: dict[str, list[str]]) -> float:
        """The ``wait_ms`` of a request, in seconds, at most ``http_max_wait_ms``.

        Raises:
            ProtocolError: ``BAD_FRAME`` for a value that is not an integer >= 0.
        """
        values = query.get("wait_ms")
        if not values:
            return 0.0
        text = values[-1]
        if not text.isascii() or not text.isdigit():
            raise ProtocolError("'wait_ms' must be an integer >= 0")
        longest = self._settings.http_max_wait_ms
        # Larger values are lowered (protocol.md §11.2), however many digits they have.
        return (min(int(text), longest) if len(text) <= 12 else longest) / 1000

    def _refused(
        self,
        code: Code,
        message: str,
        retry_after_ms: int | None = None,
        *,
        status: http.HTTPStatus | None = None,
        close: bool = False,
    ) -> HttpResponse:
        """A job refused (counted like a session's: ``hub_jobs_refused``, and the
        default cell's ``refused:<code>`` that the dashboard shows, as sessions count)."""
        self._metrics.job_refused(code)
        self._cells.main.count_refused(code)
        return _refusal(code, message, retry_after_ms, status=status, close=close)


def _refusal(
    code: Code,
    message: str,
    retry_after_ms: int | None = None,
    *,
    status: http.HTTPStatus | None = None,
    close: bool = False,
) -> HttpResponse:
    """:func:`~hub.httpconn.error_response`, with the challenge of a 401."""
    headers: tuple[tuple[str, str], ...] = ()
    if code is Code.UNAUTHORIZED and status is None:
        headers = (("WWW-Authenticate", "Bearer"),)
    return error_response(
        code, message, status=status, retry_after_ms=retry_after_ms, headers=headers, close=close
    )


def _bearer(value: str) -> str | None:
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _media_type(request: HttpRequest) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _not_allowed(allow: str) -> HttpResponse:
    return error_response(
        Code.BAD_FRAME,
        f"method not allowed here; allowed: {allow}",
        status=http.HTTPStatus.METHOD_NOT_ALLOWED,
        headers=(("Allow", allow),),
    )


def _json(status: http.HTTPStatus, body: dict[str, Any], **extra: Any) -> HttpResponse:
    return HttpResponse(status.value, orjson.dumps(body), **extra)


def _ended(job_id: str, status: str, result: bytes, error: str | None) -> HttpResponse:
    body = {"job_id": job_id, "status": status, "result": orjson.Fragment(result), "error": error}
    return _json(http.HTTPStatus.OK, body)


def _pending(job_id: str, status: str, *, close: bool = False) -> HttpResponse:
    location = f"{JOBS_PATH}/{job_id}"
    return _json(
        http.HTTPStatus.ACCEPTED,
        {"job_id": job_id, "status": status},
        headers=(("Location", location),),
        close=close,
    )


def _record(r: JobRecord) -> HttpResponse:
    body = {
        "job_id": r.job_id,
        "status": r.status,
        "result": orjson.Fragment(r.result),
        "error": r.error,
        "src_lang": r.src_lang,
        "tgt_lang": r.tgt_lang,
        "node_id": r.node_id or None,
        "attempt": r.attempt,
        "deadline_ms": r.deadline_ms or None,
    }
    return _json(http.HTTPStatus.OK, body)


def _from_frame(job_id: str, frame: bytes) -> HttpResponse:
    """The 200 of a job whose ``result`` frame (protocol.md §4.8) reached this hub."""
    f = orjson.loads(frame)
    return _json(
        http.HTTPStatus.OK,
        {
            "job_id": job_id,
            "status": f["status"],
            "result": f.get("result"),
            "error": f.get("error"),
        },
    )
