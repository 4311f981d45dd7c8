"""Session SDK: submit jobs to a hub and get their results.

Usage::

    async with SessionClient("ws://127.0.0.1:8765") as session:
        result = await session.submit("zh", "en", {"text": "你好"}, audio=pcm)
        print(result.status, result.result, result.node_id)

        async for event in session.stream("zh", "en", {"text": "你好"}):
            print(event)        # Partial(...) frames, then the JobResult

Any number of submits may run at once, from any number of tasks. The client
names each job with a ``ref`` of its own, reconnects with backoff when the
connection drops, and resumes the session (``?session_id=…&resume_token=…``
from ``welcome``): results that completed meanwhile are delivered then, each
exactly once (protocol.md §4.1, §8). Received results are acknowledged with
``ack`` frames, batched.

Given several hubs (``SessionClient(urls=[…])``), the session starts on a
random one of them and moves to the next when its hub is unreachable or
going away, resuming there (protocol.md §8).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection

from ..errors import Code
from ..protocol import (
    SESSION_PATH,
    Accepted,
    CloseCode,
    ErrorReply,
    Queued,
    SessionPartial,
    SessionResult,
    ToSessionFrame,
    Welcome,
    decode_to_session,
    encode_cancel_job,
    encode_submit_job,
    encode_submit_job_audio,
)
from .backoff import Backoff
from .errors import (
    ClientClosed,
    ConnectionRejected,
    HubClientError,
    JobRefused,
    ResultTimeout,
    SessionLost,
)
from .jobs import JobResult, Partial, PartialCallback, StreamEvent
from .ledger import MAX_ACK_IDS, Acks
from .link import Link
from .transport import endpoint, hub_urls

__all__ = ["JobResult", "Partial", "SessionClient", "StreamEvent"]

logger = logging.getLogger("hub.client.session")

_PROBE_PREFIX = "\u2063resume-"
"""Ref of the cancel sent as a barrier after a resume; no job ever has it."""


@dataclasses.dataclass(slots=True)
class _Pending:
    ref: str
    frame: bytes
    binary: bool
    """Whether ``frame`` is a binary frame (a job with audio)."""
    future: asyncio.Future[JobResult]
    on_partial: PartialCallback | None
    job_id: str | None = None
    node_id: str | None = None
    sent_on: int = 0
    """Connection number the job frame went out on; 0 while unsent."""
    resent: bool = False


class SessionClient(Link[ToSessionFrame]):
    """A session: submits jobs to a hub and waits for their results.

    Args:
        url: the hub, ``ws://host:port`` (``/v1/session`` is added) or the
            full endpoint URL; the same as ``urls=[url]``.
        urls: several hubs of one cell, instead of ``url``: the session
            starts on a random one (so sessions spread), stays on a hub while
            it serves it, and moves to the next when a hub is unreachable or
            closes with ``1001``, ``1011``, ``1012``, ``1013`` or no close
            frame, resuming there with its resume token (protocol.md §8).
        spread: ``False`` tries ``urls`` in the order given (a preferred
            hub first, then the backups) instead of a random order.
        token: sent as ``Authorization: Bearer <token>`` when not ``None``.
            (Browsers, which cannot set headers on a WebSocket, put it in the
            URL instead: ``/v1/session?token=…``.)
        backoff: delays between reconnection attempts (default :class:`Backoff`()).
        default_timeout_s: the hub's job budget assumed when ``timeout_ms`` is
            not given (the hub's ``job_timeout_ms``, 30 s by default).
        result_grace_s: how much longer than the job's budget to wait for its
            result before :class:`ResultTimeout`; covers queueing and a
            reconnection (the hub's resume window is 60 s by default).
        ack_interval_s: received results are acknowledged at most this late…
        ack_batch: …or as soon as this many are waiting.
        open_timeout_s: timeout of the handshake and of ``welcome``.
        max_frame_bytes: largest message accepted from the hub.
        ping_interval_s: the session's liveness: it pings the hub this often…
        ping_timeout_s: …and a ping unanswered this long (a dead link: no FIN,
            no RST) ends the connection; the session then reconnects and
            resumes (protocol.md §8). ``None`` disables either.
        on_connected: called with the session after each ``welcome`` (and
            the frames it sends after a resume).
        on_frame: called with the session and each frame from the hub after
            ``welcome``, before the session acts on it (tracing).

    Raises:
        ValueError: unless exactly one of ``url`` and ``urls`` is given, or
            if a URL is not a WebSocket URL.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        urls: Sequence[str] | None = None,
        spread: bool = True,
        token: str | None = None,
        backoff: Backoff | None = None,
        default_timeout_s: float = 30.0,
        result_grace_s: float = 60.0,
        ack_interval_s: float = 0.05,
        ack_batch: int = 32,
        open_timeout_s: float = 10.0,
        max_frame_bytes: int = 16 * 1024 * 1024,
        ping_interval_s: float | None = 20.0,
        ping_timeout_s: float | None = 20.0,
        on_connected: Callable[[SessionClient], None] | None = None,
        on_frame: Callable[[SessionClient, ToSessionFrame], None] | None = None,
    ) -> None:
        super().__init__(
            hub_urls(url, urls, SESSION_PATH),
            token=token,
            backoff=backoff,
            open_timeout_s=open_timeout_s,
            max_frame_bytes=max_frame_bytes,
            logger=logger,
            ping_interval_s=ping_interval_s,
            ping_timeout_s=ping_timeout_s,
            spread=spread,
            on_connected=on_connected,
            on_frame=on_frame,
        )
        self.default_timeout_s = default_timeout_s
        self.result_grace_s = result_grace_s
        self.session_id: str | None = None
        """The session's id, from ``welcome``."""
        self._resume_token: str | None = None
        self._pending: dict[str, _Pending] = {}
        self._acks = Acks(self, max(1, min(ack_batch, MAX_ACK_IDS)), ack_interval_s)
        self._refs = itertools.count(1)
        self._probe: str | None = None
        self._fatal: HubClientError | None = None

    # Public methods

    async def connect(self) -> None:
        """Open the first connection and wait for ``welcome``; then stay connected.

        Given several hubs, each is tried once, in turn, until one answers.

        Raises:
            OSError: if the hub (the last one tried) cannot be reached.
            TimeoutError: if the handshake or ``welcome`` takes longer than
                ``open_timeout_s``.
            ConnectionRejected: if the hub refuses the session.
        """
        if self._run_task is not None:
            raise RuntimeError("the session is already connected")
        ws = await self._open_any()
        self._run_task = asyncio.get_running_loop().create_task(self._run(ws), name="session")

    @property
    def connected(self) -> bool:
        """Whether the session has a welcomed connection right now."""
        return self._up.is_set()

    @property
    def unfinished(self) -> int:
        """Jobs submitted whose results have not arrived yet."""
        return len(self._pending)

    async def submit(
        self,
        src_lang: str,
        tgt_lang: str,
        payload: Mapping[str, Any] | None = None,
        *,
        audio: bytes | None = None,
        timeout_ms: int | None = None,
        on_partial: PartialCallback | None = None,
    ) -> JobResult:
        """Submit a job and wait for its result.

        Cancelling the task that awaits this cancels the job on the hub.

        Args:
            src_lang: source language code.
            tgt_lang: target language code.
            payload: a JSON object for the node.
            audio: bytes sent untouched to the node, in a binary frame.
            timeout_ms: the job's time budget; ``None`` for the hub's default.
            on_partial: called with each :class:`Partial`.

        Returns:
            The :class:`JobResult`, finished or failed (by the node, or with
            ``JOB_TIMEOUT``, ``NODE_LOST``, ``NO_AVAILABLE_NODE``, ``JOB_LOST``…).

        Raises:
            JobRefused: when the hub refused the job (it did not run).
            SessionLost: when the session could not be resumed.
            ResultTimeout: when no result came in the job's budget plus
                ``result_grace_s``.
            ClientClosed: when the client was closed meanwhile.
            ConnectionRejected: when the hub refused the connection for good.
            ValueError: if ``audio`` is empty.
        """
        if self._run_task is None:
            raise RuntimeError("connect first: async with SessionClient(...) as session")
        if self._fatal is not None:
            raise self._fatal
        if self._stopping.is_set():
            raise ClientClosed()
        ref = f"c-{next(self._refs)}"
        payload = None if payload is None else dict(payload)
        if audio is None:
            frame = encode_submit_job(ref, src_lang, tgt_lang, payload, timeout_ms=timeout_ms)
        else:
            frame = encode_submit_job_audio(
                ref, src_lang, tgt_lang, payload, bytes(audio), timeout_ms=timeout_ms
            )
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(ref, frame, audio is not None, future, on_partial)
        self._pending[ref] = pending
        budget_s = (
            timeout_ms / 1000 if timeout_ms is not None else self.default_timeout_s
        ) + self.result_grace_s
        try:
            if self._ws is not None:
                await self._send_job(self._ws, pending)
            async with asyncio.timeout(budget_s):
                return await asyncio.shield(future)
        except TimeoutError:
            if future.done() and not future.cancelled():
                raise  # the future's own TimeoutError subclass
            self._abandon(pending)
            raise ResultTimeout(ref, budget_s) from None
        except asyncio.CancelledError:
            self._abandon(pending)
            raise
        finally:
            if self._pending.get(ref) is pending and future.done():
                del self._pending[ref]

    async def stream(
        self,
        src_lang: str,
        tgt_lang: str,
        payload: Mapping[str, Any] | None = None,
        *,
        audio: bytes | None = None,
        timeout_ms: int | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Submit a job; yield its partials, then its :class:`JobResult`.

        Leaving the loop early cancels the job. Raises as :meth:`submit`.
        """
        queue: asyncio.Queue[Partial | None] = asyncio.Queue()
        task = asyncio.get_running_loop().create_task(
            self.submit(
                src_lang,
                tgt_lang,
                payload,
                audio=audio,
                timeout_ms=timeout_ms,
                on_partial=queue.put_nowait,
            )
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield item
            yield task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, HubClientError):
                    await task

    async def close(self) -> None:
        """Close the session; unfinished submits raise :class:`ClientClosed`.

        The hub keeps the session's jobs for its resume window, then cancels them.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._fail_all(ClientClosed)
        ws = self._ws
        if ws is not None:
            await self._acks.flush(ws)
        self._acks.cancel()
        await self._shut_down(5)

    async def __aenter__(self) -> SessionClient:
        await self.connect()
        return self

    def __repr__(self) -> str:
        return f"<SessionClient {self.session_id} {self.url} unfinished={self.unfinished}>"

    # Private methods: connection

    def _label(self) -> str:
        return f"session {self.session_id}"

    def _endpoint(self) -> str:
        if self.session_id is None or self._resume_token is None:
            return self.url
        query = {"session_id": self.session_id, "resume_token": self._resume_token}
        return endpoint(self.url, SESSION_PATH, query)

    def _decode(self, message: str | bytes) -> ToSessionFrame:
        return decode_to_session(message)

    def _closed(self, code: int | None) -> None:
        if code == CloseCode.BAD_RESUME_TOKEN:
            self._lose_session()

    async def _greet(self, ws: ClientConnection) -> None:
        """Wait for ``welcome``: the session resumes when it keeps its id."""
        resuming = self.session_id is not None and self._resume_token is not None
        async with asyncio.timeout(self.open_timeout_s):
            welcome = self._decode(await ws.recv())
        if type(welcome) is not Welcome:
            raise ConnectionRejected("welcome", f"unexpected first frame {welcome!r:.80}")
        resumed = resuming and welcome.session_id == self.session_id
        self.session_id = welcome.session_id
        self._resume_token = welcome.resume_token
        self.hub_id = welcome.hub_id
        self.connections += 1
        logger.info(
            "= session %s %s on hub %s",
            self.session_id,
            "resumed" if resumed else "opened",
            self.hub_id,
        )
        self._ws = ws
        self._up.set()
        await self._welcomed(ws, resumed)

    async def _run(self, ws: ClientConnection) -> None:
        try:
            await self._reconnect(ws)
        except ConnectionRejected as exc:
            self._give_up(exc)

    async def _welcomed(self, ws: ClientConnection, resumed: bool) -> None:
        """Send what waited for a connection (protocol.md §8)."""
        unconfirmed = False
        for pending in list(self._pending.values()):
            if pending.sent_on == 0:
                await self._send_job(ws, pending)
            elif pending.job_id is None:
                if resumed:
                    unconfirmed = True
                else:  # a fresh session cannot learn the fate of the old one's jobs
                    self._fail(pending, SessionLost("the hub started a new session"))
        if unconfirmed:
            # A job sent just before the drop may or may not have reached the
            # hub. The hub handles our frames only after it re-sent the
            # results we missed, so the answer to this cancel of a ref that
            # never exists marks the end of those: then resend the jobs still
            # unconfirmed (a DUPLICATE_REF answer means the hub has it).
            self._probe = f"{_PROBE_PREFIX}{self.connections}"
            await self._send(encode_cancel_job(self._probe), ws)
        await self._acks.flush(ws)

    async def _send_job(self, ws: ClientConnection, pending: _Pending) -> None:
        pending.sent_on = self.connections
        if pending.binary:
            await self._send_binary(pending.frame, ws)
        else:
            await self._send(pending.frame, ws)

    # Private methods: frames

    def _on_frame(self, ws: ClientConnection, frame: ToSessionFrame) -> None:
        if isinstance(frame, Welcome):
            return  # only ever the first frame, read by _greet
        pending = self._pending.get(frame.ref) if frame.ref is not None else None
        if type(frame) is SessionResult:
            self._on_result(ws, frame, pending)
        elif type(frame) is SessionPartial:
            if pending is not None and pending.on_partial is not None:
                partial = Partial(pending.ref, frame.job_id, frame.result, pending.node_id)
                outcome = pending.on_partial(partial)
                if inspect.isawaitable(outcome):
                    self._spawn(outcome)
        elif type(frame) is Accepted or type(frame) is Queued:
            if pending is not None:
                pending.job_id = frame.job_id
                if type(frame) is Accepted:
                    pending.node_id = frame.node_id
        elif type(frame) is ErrorReply:
            self._on_error(ws, frame, pending)

    def _on_result(
        self, ws: ClientConnection, frame: SessionResult, pending: _Pending | None
    ) -> None:
        job_id = frame.job_id
        if not self._acks.received(ws, job_id):
            return  # re-sent after a resume: delivered already
        if pending is None or (pending.job_id is not None and pending.job_id != job_id):
            return  # abandoned (cancelled, timed out) or not ours
        del self._pending[pending.ref]
        if not pending.future.done():
            pending.future.set_result(
                JobResult(
                    pending.ref, job_id, frame.status, frame.result, frame.error, pending.node_id
                )
            )

    def _on_error(self, ws: ClientConnection, frame: ErrorReply, pending: _Pending | None) -> None:
        ref, code, message = frame.ref, frame.code, frame.message
        if ref is not None and ref == self._probe:
            self._probe = None
            for p in list(self._pending.values()):
                if p.job_id is None and 0 < p.sent_on < self.connections:
                    p.resent = True
                    self._spawn(self._send_job(ws, p))
            return
        if pending is None:
            logger.debug("< session error %s for %r: %s", code, ref, message)
            return
        if code == Code.DUPLICATE_REF and pending.resent:
            pending.resent = False  # the hub still has the job: its result will come
            return
        if pending.job_id is None:
            self._fail(pending, JobRefused(code, message, pending.ref, frame.retry_after_ms))

    # Private methods: acknowledgements and bookkeeping

    def _abandon(self, pending: _Pending) -> None:
        """Forget a job the caller gave up on, and cancel it on the hub."""
        if self._pending.get(pending.ref) is pending:
            del self._pending[pending.ref]
        ws = self._ws
        if ws is not None and pending.sent_on:
            self._spawn(self._send(encode_cancel_job(pending.ref), ws))

    def _fail(self, pending: _Pending, exc: HubClientError) -> None:
        self._pending.pop(pending.ref, None)
        if not pending.future.done():
            pending.future.set_exception(exc)

    def _fail_all(self, error: Callable[[], HubClientError]) -> None:
        for pending in list(self._pending.values()):
            self._fail(pending, error())

    def _lose_session(self) -> None:
        """protocol.md §7, 4007: the session cannot be resumed; start a fresh one."""
        logger.warning("! session %s cannot be resumed: starting a new one", self.session_id)
        for pending in list(self._pending.values()):
            if pending.sent_on:
                self._fail(pending, SessionLost("the hub refused the resume token (4007)"))
        self.session_id = None
        self._resume_token = None
        self._acks.clear()
        self._probe = None

    def _give_up(self, exc: HubClientError) -> None:
        logger.warning("! session %s: %s", self.session_id, exc)
        self._fatal = exc
        self._fail_all(lambda: exc)
