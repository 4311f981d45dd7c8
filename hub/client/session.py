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
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Literal, TypeAlias

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from ..errors import Code
from ..protocol import SESSION_PATH, CloseCode, join_binary
from .backoff import Backoff
from .errors import (
    ClientClosed,
    ConnectionRejected,
    HubClientError,
    JobRefused,
    ResultTimeout,
    SessionLost,
)
from .transport import auth_headers, endpoint, handshake_status

__all__ = ["JobResult", "Partial", "SessionClient", "StreamEvent"]

logger = logging.getLogger("hub.client.session")

# protocol.md §7: do not reconnect unchanged after these.
_FATAL_CLOSE_CODES = frozenset(
    {CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG, CloseCode.REPLACED}
)
_FATAL_HTTP_STATUSES = frozenset({401, 403})
_MAX_ACK_IDS = 256
"""protocol.md §4.4: most job ids in one ``ack``."""
_SEEN_RESULTS = 10000
"""Job ids whose results were delivered, remembered to drop repeats after a resume."""
_PROBE_PREFIX = "\u2063resume-"
"""Ref of the cancel sent as a barrier after a resume; no job ever has it."""


@dataclasses.dataclass(frozen=True, slots=True)
class JobResult:
    """The end of a job (protocol.md §4.8)."""

    ref: str
    """The client's name for the job."""
    job_id: str
    """The hub's id of the job."""
    status: Literal["finished", "failed"]
    """``finished`` or ``failed``."""
    result: dict[str, Any] | None
    """The node's result object, or ``None``."""
    error: str | None
    """``None`` when finished; an error code (``JOB_TIMEOUT``, ``NODE_LOST``,
    ``CANCELLED``…) or the node's own message when failed."""
    node_id: str | None
    """The node of the last attempt, or ``None`` if the job never ran."""

    @property
    def ok(self) -> bool:
        """Whether the job finished."""
        return self.status == "finished"


@dataclasses.dataclass(frozen=True, slots=True)
class Partial:
    """An intermediate result of a running job (protocol.md §4.7)."""

    ref: str
    job_id: str
    result: dict[str, Any]
    node_id: str | None
    """The node running the job, as last announced by ``accepted``."""


StreamEvent: TypeAlias = Partial | JobResult
"""What :meth:`SessionClient.stream` yields."""

PartialCallback: TypeAlias = Callable[[Partial], object]
"""Called with each partial; may return an awaitable, which is run in a task."""


@dataclasses.dataclass(slots=True)
class _Pending:
    ref: str
    frame: str | bytes
    future: asyncio.Future[JobResult]
    on_partial: PartialCallback | None
    job_id: str | None = None
    node_id: str | None = None
    sent_on: int = 0
    """Connection number the job frame went out on; 0 while unsent."""
    resent: bool = False


class SessionClient:
    """A session: submits jobs to a hub and waits for their results.

    Args:
        url: the hub, ``ws://host:port`` (``/v1/session`` is added) or the
            full endpoint URL.
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
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        backoff: Backoff | None = None,
        default_timeout_s: float = 30.0,
        result_grace_s: float = 60.0,
        ack_interval_s: float = 0.05,
        ack_batch: int = 32,
        open_timeout_s: float = 10.0,
        max_frame_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.url = endpoint(url, SESSION_PATH)
        """The hub's session endpoint."""
        self.backoff = backoff or Backoff()
        self.default_timeout_s = default_timeout_s
        self.result_grace_s = result_grace_s
        self.ack_interval_s = ack_interval_s
        self.ack_batch = max(1, min(ack_batch, _MAX_ACK_IDS))
        self.open_timeout_s = open_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.session_id: str | None = None
        """The session's id, from ``welcome``."""
        self.hub_id: str | None = None
        """The hub of the current (or last) connection."""
        self.connections = 0
        """Connections welcomed so far (1 after :meth:`connect`)."""
        self._token = token
        self._resume_token: str | None = None
        self._ws: ClientConnection | None = None
        self._pending: dict[str, _Pending] = {}
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._acks: list[str] = []
        self._ack_timer: asyncio.TimerHandle | None = None
        self._refs = itertools.count(1)
        self._probe: str | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._fatal: HubClientError | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()

    # Public methods

    async def connect(self) -> None:
        """Open the first connection and wait for ``welcome``; then stay connected.

        Raises:
            OSError: if the hub cannot be reached.
            TimeoutError: if the handshake or ``welcome`` takes longer than
                ``open_timeout_s``.
            ConnectionRejected: if the hub refuses the session.
        """
        if self._run_task is not None:
            raise RuntimeError("the session is already connected")
        try:
            ws = await self._open()
        except InvalidHandshake as exc:
            status = handshake_status(exc)
            if status in _FATAL_HTTP_STATUSES:
                raise ConnectionRejected(status or 0, str(exc)) from exc
            raise
        self._run_task = asyncio.get_running_loop().create_task(self._run(ws), name="session")

    @property
    def connected(self) -> bool:
        """Whether the session has a welcomed connection right now."""
        return self._connected.is_set()

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
            ``JOB_TIMEOUT``, ``NODE_LOST``, ``NO_AVAILABLE_NODE``…).

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
        if self._closing:
            raise ClientClosed()
        ref = f"c-{next(self._refs)}"
        header: dict[str, Any] = {
            "type": "job",
            "ref": ref,
            "src_lang": src_lang,
            "tgt_lang": tgt_lang,
            "payload": dict(payload or {}),
        }
        if timeout_ms is not None:
            header["timeout_ms"] = timeout_ms
        encoded = orjson.dumps(header)
        if audio is None:
            frame: str | bytes = encoded.decode()
        elif not audio:
            raise ValueError("audio must not be empty; pass None for a text-only job")
        else:
            frame = join_binary(encoded, bytes(audio))
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(ref, frame, future, on_partial)
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
        if self._closing:
            return
        self._closing = True
        self._fail_all(ClientClosed)
        ws = self._ws
        if ws is not None:
            await self._flush_acks(ws)
            await ws.close()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        task = self._run_task
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
        for t in list(self._tasks):
            t.cancel()

    async def __aenter__(self) -> SessionClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<SessionClient {self.session_id} {self.url} unfinished={self.unfinished}>"

    # Private methods: connection

    async def _open(self) -> ClientConnection:
        """Connect and wait for ``welcome``; resume the session if there is one."""
        query = None
        if self.session_id is not None and self._resume_token is not None:
            query = {"session_id": self.session_id, "resume_token": self._resume_token}
        ws = await connect(
            endpoint(self.url, SESSION_PATH, query),
            additional_headers=auth_headers(self._token),
            open_timeout=self.open_timeout_s,
            max_size=self.max_frame_bytes,
            compression=None,
            close_timeout=2,
        )
        try:
            async with asyncio.timeout(self.open_timeout_s):
                welcome = _decode(await ws.recv())
        except BaseException:
            await ws.close()
            raise
        if welcome.get("type") != "welcome":
            await ws.close()
            raise ConnectionRejected("welcome", f"unexpected first frame {welcome.get('type')!r}")
        resumed = query is not None and welcome.get("session_id") == self.session_id
        self.session_id = str(welcome.get("session_id"))
        self._resume_token = str(welcome.get("resume_token"))
        self.hub_id = str(welcome.get("hub_id"))
        self.connections += 1
        logger.info(
            "= session %s %s on hub %s",
            self.session_id,
            "resumed" if resumed else "opened",
            self.hub_id,
        )
        self._ws = ws
        self._connected.set()
        await self._welcomed(ws, resumed)
        return ws

    async def _run(self, ws: ClientConnection | None) -> None:
        failures = 0
        try:
            while not self._closing:
                if ws is None:
                    try:
                        ws = await self._open()
                    except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                        status = handshake_status(exc)
                        if status in _FATAL_HTTP_STATUSES:
                            self._give_up(ConnectionRejected(status or 0, str(exc)))
                            return
                        if _close_code(exc) == CloseCode.BAD_RESUME_TOKEN:
                            self._lose_session()
                        else:
                            logger.warning("! session cannot connect to %s: %s", self.url, exc)
                        failures += 1
                        await self._sleep(self.backoff.delay_s(failures, self._rng))
                        continue
                    except ConnectionRejected as exc:
                        self._give_up(exc)
                        return
                failures = 0
                await self._serve(ws)
                code, reason = ws.close_code, ws.close_reason or ""
                ws = None
                if self._closing:
                    return
                logger.info("= session %s disconnected (%s %s)", self.session_id, code, reason)
                if code in _FATAL_CLOSE_CODES:
                    self._give_up(ConnectionRejected(code or 0, reason))
                    return
                if code == CloseCode.BAD_RESUME_TOKEN:
                    self._lose_session()
                failures += 1
                await self._sleep(self.backoff.delay_s(failures, self._rng))
        finally:
            self._connected.clear()
            self._ws = None

    async def _serve(self, ws: ClientConnection) -> None:
        try:
            while True:
                message = await ws.recv()
                try:
                    frame = _decode(message)
                except ValueError as exc:
                    logger.warning("! session dropped a bad frame: %s", exc)
                    continue
                self._on_frame(ws, frame)
        except ConnectionClosed:
            pass
        finally:
            self._ws = None
            self._connected.clear()
            await ws.close()

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
            await self._send(ws, orjson.dumps({"type": "cancel", "ref": self._probe}).decode())
        await self._flush_acks(ws)

    async def _send(self, ws: ClientConnection, frame: str | bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.send(frame)

    async def _send_job(self, ws: ClientConnection, pending: _Pending) -> None:
        pending.sent_on = self.connections
        await self._send(ws, pending.frame)

    async def _sleep(self, delay_s: float) -> None:
        logger.info("= session reconnecting in %.2f s", delay_s)
        await asyncio.sleep(delay_s)

    # Private methods: frames

    def _on_frame(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        ref = frame.get("ref")
        pending = self._pending.get(ref) if isinstance(ref, str) else None
        if kind == "result":
            self._on_result(ws, frame, pending)
        elif kind == "partial":
            if pending is not None and pending.on_partial is not None:
                result = frame.get("result")
                partial = Partial(
                    pending.ref,
                    str(frame.get("job_id")),
                    result if isinstance(result, dict) else {},
                    pending.node_id,
                )
                outcome = pending.on_partial(partial)
                if inspect.isawaitable(outcome):
                    self._spawn(outcome)
        elif kind == "accepted" or kind == "queued":
            if pending is not None:
                pending.job_id = str(frame.get("job_id"))
                if kind == "accepted":
                    pending.node_id = str(frame.get("node_id"))
        elif kind == "error":
            self._on_error(ws, frame, pending)

    def _on_result(
        self, ws: ClientConnection, frame: dict[str, Any], pending: _Pending | None
    ) -> None:
        job_id = str(frame.get("job_id"))
        self._ack(ws, job_id)
        if job_id in self._seen:
            return  # re-sent after a resume: delivered already
        self._seen[job_id] = None
        if len(self._seen) > _SEEN_RESULTS:
            self._seen.popitem(last=False)
        if pending is None or (pending.job_id is not None and pending.job_id != job_id):
            return  # abandoned (cancelled, timed out) or not ours
        result = frame.get("result")
        error = frame.get("error")
        status: Literal["finished", "failed"] = (
            "finished" if frame.get("status") == "finished" else "failed"
        )
        del self._pending[pending.ref]
        if not pending.future.done():
            pending.future.set_result(
                JobResult(
                    pending.ref,
                    job_id,
                    status,
                    result if isinstance(result, dict) else None,
                    None if error is None else str(error),
                    pending.node_id,
                )
            )

    def _on_error(
        self, ws: ClientConnection, frame: dict[str, Any], pending: _Pending | None
    ) -> None:
        ref, code = frame.get("ref"), str(frame.get("code"))
        message = str(frame.get("message", ""))
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
            self._fail(pending, JobRefused(code, message, pending.ref))

    # Private methods: acknowledgements and bookkeeping

    def _ack(self, ws: ClientConnection, job_id: str) -> None:
        self._acks.append(job_id)
        if len(self._acks) >= self.ack_batch:
            self._spawn(self._flush_acks(ws))
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                self.ack_interval_s, self._ack_due
            )

    def _ack_due(self) -> None:
        self._ack_timer = None
        ws = self._ws
        if ws is not None:
            self._spawn(self._flush_acks(ws))

    async def _flush_acks(self, ws: ClientConnection) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        while self._acks:
            batch, self._acks = self._acks[:_MAX_ACK_IDS], self._acks[_MAX_ACK_IDS:]
            try:
                await ws.send(orjson.dumps({"type": "ack", "job_ids": batch}).decode())
            except ConnectionClosed:
                self._acks[:0] = batch  # sent after the resume
                return

    def _abandon(self, pending: _Pending) -> None:
        """Forget a job the caller gave up on, and cancel it on the hub."""
        if self._pending.get(pending.ref) is pending:
            del self._pending[pending.ref]
        ws = self._ws
        if ws is not None and pending.sent_on:
            frame = orjson.dumps({"type": "cancel", "ref": pending.ref}).decode()
            self._spawn(self._send(ws, frame))

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

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _close_code(exc: BaseException) -> int | None:
    """The close code the hub sent with a closed connection's exception, if any."""
    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
        return exc.rcvd.code
    return None


def _decode(message: str | bytes) -> dict[str, Any]:
    frame = orjson.loads(message)
    if type(frame) is not dict:
        raise ValueError("frame is not a JSON object")
    return frame
