"""Node SDK: serve a hub's jobs with an async handler.

A node connects to ``/v1/node``, registers, runs each job it receives in a
task of its own, and sends the handler's return value as the job's result.
Usage::

    node = NodeClient("ws://127.0.0.1:8765", node_id="gpu-1",
                      languages=["zh", "en"], max_jobs=4)

    @node.handler
    async def translate(job: Job) -> dict[str, Any]:
        await job.partial({"text": "..."})
        return {"text": "hello"}

    async with node:
        await node.run()          # until drained, closed or rejected

or in the background: ``node.start()``, ``await node.wait_registered()``,
later ``await node.drain()``.

The client reconnects with exponential backoff and full jitter whenever the
connection drops, and registers again with ``resume`` naming the jobs it is
still running (and those whose results it could not send yet): the hub keeps
them on the node when it can (``resumed``) and the results are sent on the
new connection; the jobs it no longer wants (``dropped``) are cancelled
locally (protocol.md §3.1, §3.2).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ..errors import Code, HubError
from ..protocol import NODE_PATH, CloseCode, split_binary
from .backoff import Backoff
from .errors import ConnectionRejected
from .transport import auth_headers, endpoint, handshake_status

__all__ = ["Handler", "Job", "NodeClient"]

logger = logging.getLogger("hub.client.node")

# protocol.md §7: do not reconnect unchanged after these.
_FATAL_CLOSE_CODES = frozenset(
    {CloseCode.POLICY_VIOLATION, CloseCode.MESSAGE_TOO_BIG, CloseCode.REPLACED}
)
_FATAL_HTTP_STATUSES = frozenset({401, 403})
_RESULT_RETRY_S = 120.0
"""How long a result refused with ``UNAVAILABLE`` is sent again: as long as Redis
may plausibly be down (a count of tries would depend on the backoff)."""
_RECENT_RESULTS_S = 60.0
"""How long a sent result is kept, in case the hub answers ``UNAVAILABLE``."""
_MAX_RESUME = 256
"""protocol.md §5: ``resume`` has at most ``max_jobs_per_node`` entries."""
_STOP_JOBS_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True, slots=True)
class Job:
    """One attempt of a job, as the hub sent it (protocol.md §3.3)."""

    job_id: str
    """The hub's id of the job."""
    attempt: int
    """Attempt number, from 1; a job lost with its node comes back with a higher one."""
    session_id: str
    """The session that submitted the job."""
    src_lang: str
    """Source language code, lowercased."""
    tgt_lang: str
    """Target language code, lowercased."""
    payload: dict[str, Any]
    """The session's payload object."""
    audio: bytes | None
    """The session's audio, byte for byte, or ``None`` for a text-only job."""
    deadline_ms: int
    """When the hub gives up on the job, in Unix milliseconds of the fleet's clock."""
    _node: NodeClient = dataclasses.field(repr=False, compare=False)

    async def partial(self, result: Mapping[str, Any]) -> None:
        """Send an intermediate result to the session (protocol.md §3.6).

        Partials are best effort: one sent while the node is disconnected,
        or after the job was cancelled, is dropped.

        Raises:
            TypeError: if ``result`` cannot be encoded as a JSON object.
        """
        await self._node._send_partial(self, result)


Handler: TypeAlias = Callable[[Job], Awaitable[Mapping[str, Any] | None]]
"""An async function that runs one job and returns its result object (or ``None``)."""


@dataclasses.dataclass(slots=True)
class _Running:
    job: Job
    task: asyncio.Task[None]


@dataclasses.dataclass(slots=True)
class _Sent:
    frame: str
    sent_at: float
    tries: int = 0
    refused_at: float | None = None
    """When the hub first answered ``UNAVAILABLE`` for it."""


class NodeClient:
    """A node: registers with a hub and runs the jobs it sends.

    Args:
        url: the hub, ``ws://host:port`` (``/v1/node`` is added) or the full
            endpoint URL.
        node_id: the node's id; a second live connection with the same id
            replaces the first (which gets :class:`ConnectionRejected`).
        languages: languages served; means every ordered pair of two of them.
        lang_pairs: ``(src, tgt)`` pairs served, instead of ``languages``.
        services: services it runs.
        max_jobs: jobs it runs at once; the hub sends no more than this.
        pools: operator pools to join; ``None`` means the hub's default pool.
        token: sent as ``Authorization: Bearer <token>`` when not ``None``.
        handler: the job handler; or set it later with :meth:`handler`.
        backoff: delays between reconnection attempts (default :class:`Backoff`()).
        open_timeout_s: timeout of the WebSocket handshake.
        register_timeout_s: how long to wait for ``registered``.
        max_frame_bytes: largest message accepted from the hub.

    Raises:
        ValueError: unless exactly one of ``languages`` and ``lang_pairs`` is
            given, or if ``max_jobs`` is smaller than 1, or ``url`` is not a
            WebSocket URL.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        languages: Sequence[str] | None = None,
        lang_pairs: Sequence[tuple[str, str] | Sequence[str]] | None = None,
        services: Sequence[str] = ("asr", "nmt", "tts"),
        max_jobs: int = 1,
        pools: Sequence[str] | None = None,
        token: str | None = None,
        handler: Handler | None = None,
        backoff: Backoff | None = None,
        open_timeout_s: float = 10.0,
        register_timeout_s: float = 10.0,
        max_frame_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if (languages is None) == (lang_pairs is None):
            raise ValueError("give exactly one of languages and lang_pairs")
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        self.url = endpoint(url, NODE_PATH)
        """The hub's node endpoint."""
        self.node_id = node_id
        """The node's id."""
        self.languages = None if languages is None else list(languages)
        self.lang_pairs = None if lang_pairs is None else [list(p) for p in lang_pairs]
        self.services = list(services)
        self.max_jobs = max_jobs
        """Jobs run at once."""
        self.pools = None if pools is None else list(pools)
        self.backoff = backoff or Backoff()
        self.open_timeout_s = open_timeout_s
        self.register_timeout_s = register_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.hub_id: str | None = None
        """Id of the hub of the current (or last) connection."""
        self.connections = 0
        """How many times the node registered (1 after the first connection)."""
        self._token = token
        self._handler = handler
        self._ws: ClientConnection | None = None  # set while registered
        self._jobs: dict[str, _Running] = {}
        self._unsent: dict[str, str] = {}  # job id -> result frame not yet sent
        self._recent: dict[str, _Sent] = {}  # job id -> result sent, for UNAVAILABLE
        self._tasks: set[asyncio.Task[Any]] = set()
        self._slots = asyncio.Semaphore(max_jobs)
        self._registered = asyncio.Event()
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._draining = False
        self._running = False
        self._run_task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    # Public methods

    def handler(self, fn: Handler) -> Handler:
        """Decorator: use ``fn`` as the job handler.

        ``fn`` gets a :class:`Job` and returns the result object (or ``None``).
        An exception ends the job as ``failed`` with its message as ``error``.
        When the hub cancels the job, the task running ``fn`` is cancelled and
        no result is sent.
        """
        self._handler = fn
        return fn

    @property
    def registered(self) -> bool:
        """Whether the node is connected and registered right now."""
        return self._registered.is_set()

    @property
    def running(self) -> int:
        """Jobs running right now."""
        return len(self._jobs)

    async def run(self) -> None:
        """Connect, register and serve jobs, reconnecting whenever needed.

        Returns when :meth:`drain` completes or :meth:`close` is called.
        Jobs still running when it returns are cancelled.

        Raises:
            ConnectionRejected: when the hub refuses the node for good
                (unauthorized, replaced by another connection with the same
                ``node_id``, a ``register`` it finds invalid).
            RuntimeError: if no handler is set or the node already runs.
        """
        if self._handler is None:
            raise RuntimeError("set a job handler first: @node.handler")
        if self._running:
            raise RuntimeError("the node is already running")
        self._running = True
        self._done.clear()
        failures = 0
        try:
            while not self._stopping.is_set():
                registered_before = self.connections
                code = await self._connect_once()
                if self._stopping.is_set():
                    return
                if self._draining and (code == CloseCode.DRAINED or not self._busy()):
                    logger.info("= node %s drained", self.node_id)
                    return
                failures = 1 if self.connections > registered_before else failures + 1
                delay = self.backoff.delay_s(failures, self._rng)
                logger.info("= node %s reconnecting in %.2f s", self.node_id, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
        finally:
            self._running = False
            self._registered.clear()
            await self._stop_jobs()
            self._done.set()

    def start(self) -> None:
        """Run :meth:`run` in a background task owned by the client.

        Follow with :meth:`wait_registered`; :meth:`close` (or leaving
        ``async with``) stops it.
        """
        if self._run_task is not None and not self._run_task.done():
            raise RuntimeError("the node is already started")
        self._run_task = asyncio.get_running_loop().create_task(
            self.run(), name=f"node-{self.node_id}"
        )

    async def wait_registered(self, timeout_s: float | None = 10.0) -> None:
        """Wait until the node is registered (after :meth:`start`).

        Raises:
            TimeoutError: if it is not registered within ``timeout_s``.
            ConnectionRejected: if the background task stopped on a rejection.
        """
        task = self._run_task
        if task is None:
            raise RuntimeError("call start() first")
        waiter = asyncio.ensure_future(self._registered.wait())
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait((waiter, task), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._registered.is_set():
            task.result()  # raises what stopped it
            raise RuntimeError("the node stopped before registering")

    async def wait_closed(self) -> None:
        """Wait until the background task of :meth:`start` ends; re-raise its error."""
        if self._run_task is not None:
            await self._run_task

    async def drain(self, timeout_s: float | None = None) -> None:
        """Take no new jobs, finish the running ones, then leave (protocol.md §3.8).

        Sends ``drain`` (again after each reconnection) and waits until the
        hub closes the connection with ``4003`` and :meth:`run` returns.

        Raises:
            TimeoutError: if that takes longer than ``timeout_s``.
        """
        self._draining = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await ws.send('{"type":"drain"}')
        if not self._running:
            return
        async with asyncio.timeout(timeout_s):
            await self._done.wait()

    async def send_load(self, load: Mapping[str, Any]) -> None:
        """Report the node's own view of its load (protocol.md §3.7); best effort."""
        ws = self._ws
        if ws is None:
            return
        frame = orjson.dumps({"type": "load", "load": load}).decode()
        with contextlib.suppress(ConnectionClosed):
            await ws.send(frame)

    async def close(self) -> None:
        """Stop: cancel running jobs (no results are sent), close the connection."""
        self._stopping.set()
        ws = self._ws
        if ws is not None:
            await ws.close()
        task = self._run_task
        if task is not None and not task.done():
            try:
                async with asyncio.timeout(_STOP_JOBS_TIMEOUT_S + 3):
                    await asyncio.shield(task)
            except TimeoutError:
                task.cancel()
        elif task is None:
            await self._stop_jobs()
        for t in list(self._tasks):
            t.cancel()

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<NodeClient {self.node_id} {self.url} running={self.running}>"

    # Private methods: connection

    async def _connect_once(self) -> int | None:
        """One connection from handshake to close; returns the close code."""
        try:
            ws = await connect(
                self.url,
                additional_headers=auth_headers(self._token),
                open_timeout=self.open_timeout_s,
                max_size=self.max_frame_bytes,
                compression=None,
                close_timeout=2,
            )
        except InvalidURI as exc:
            raise ConnectionRejected("URL", str(exc)) from exc
        except InvalidHandshake as exc:
            status = handshake_status(exc)
            if status in _FATAL_HTTP_STATUSES:
                raise ConnectionRejected(status or 0, str(exc)) from exc
            logger.warning("! node %s cannot connect to %s: %s", self.node_id, self.url, exc)
            return None
        except (OSError, TimeoutError) as exc:
            logger.warning(
                "! node %s cannot connect to %s: %s", self.node_id, self.url, exc or "timeout"
            )
            return None
        try:
            await self._register(ws)
            await self._serve(ws)
        except ConnectionClosed:
            pass
        except TimeoutError:
            logger.warning("! node %s: no registered frame in time", self.node_id)
        finally:
            self._ws = None
            self._registered.clear()
            await ws.close()
        code, reason = ws.close_code, ws.close_reason or ""
        logger.info("= node %s disconnected (%s %s)", self.node_id, code, reason)
        if code in _FATAL_CLOSE_CODES:
            raise ConnectionRejected(code or 0, reason)
        return code

    async def _register(self, ws: ClientConnection) -> None:
        # protocol.md §3.1: resume the jobs still running and those whose
        # results wait to be sent, so the hub keeps them on this node.
        resume = list(dict.fromkeys([*self._jobs, *self._unsent]))[:_MAX_RESUME]
        frame: dict[str, Any] = {
            "type": "register",
            "node_id": self.node_id,
            "services": self.services,
            "max_jobs": self.max_jobs,
            "resume": resume,
        }
        if self.languages is not None:
            frame["languages"] = self.languages
        else:
            frame["lang_pairs"] = self.lang_pairs
        if self.pools is not None:
            frame["pools"] = self.pools
        await ws.send(orjson.dumps(frame).decode())
        async with asyncio.timeout(self.register_timeout_s):
            while True:
                reply = _decode(await ws.recv())
                kind = reply.get("type")
                if kind == "registered":
                    break
                if kind == "error":
                    code = str(reply.get("code"))
                    if code == Code.UNAVAILABLE:
                        continue  # protocol.md §7: the hub closes with 1013; retry
                    raise ConnectionRejected(code, str(reply.get("message", "")))
        self.hub_id = str(reply.get("hub_id", ""))
        self.connections += 1
        resumed = _strings(reply.get("resumed"))
        dropped = _strings(reply.get("dropped"))
        logger.info(
            "= node %s registered with hub %s (resumed %d, dropped %d)",
            self.node_id,
            self.hub_id,
            len(resumed),
            len(dropped),
        )
        # protocol.md §3.2: dropped jobs are no longer ours; stop them.
        for job_id in dropped:
            self._cancel_job(job_id, None)
            self._unsent.pop(job_id, None)
        self._ws = ws
        self._registered.set()
        for job_id, result in list(self._unsent.items()):
            if job_id not in self._jobs:
                await self._send_result_frame(job_id, result)
        if self._draining:
            await ws.send('{"type":"drain"}')

    async def _serve(self, ws: ClientConnection) -> None:
        while True:
            message = await ws.recv()
            audio: bytes | None = None
            try:
                if isinstance(message, bytes):
                    header, audio = split_binary(message)
                    frame = _decode(header)
                else:
                    frame = _decode(message)
            except (ValueError, HubError) as exc:  # a bad frame is logged, not fatal
                logger.warning("! node %s dropped a bad frame: %s", self.node_id, exc)
                continue
            kind = frame.get("type")
            if kind == "job":
                self._start_job(frame, audio)
            elif kind == "cancel":
                self._cancel_job(str(frame.get("job_id")), frame.get("attempt"))
            elif kind == "error":
                self._on_error(frame)

    # Private methods: jobs

    def _start_job(self, frame: dict[str, Any], audio: bytes | None) -> None:
        try:
            job = Job(
                job_id=str(frame["job_id"]),
                attempt=int(frame["attempt"]),
                session_id=str(frame.get("session_id", "")),
                src_lang=str(frame["src_lang"]),
                tgt_lang=str(frame["tgt_lang"]),
                payload=dict(frame.get("payload") or {}),
                audio=audio,
                deadline_ms=int(frame.get("deadline_ms", 0)),
                _node=self,
            )
        except (KeyError, TypeError, ValueError) as exc:
            logger.warning("! node %s dropped a malformed job: %s", self.node_id, exc)
            return
        # A newer attempt of a job we still run replaces it.
        self._cancel_job(job.job_id, None)
        task = asyncio.get_running_loop().create_task(
            self._run_job(job), name=f"job-{job.job_id}-{job.attempt}"
        )
        self._jobs[job.job_id] = _Running(job, task)

    def _cancel_job(self, job_id: str, attempt: object) -> None:
        running = self._jobs.get(job_id)
        if running is None or (attempt is not None and running.job.attempt != attempt):
            return
        del self._jobs[job_id]
        running.task.cancel()
        logger.info("= node %s cancelled job %s", self.node_id, job_id)

    async def _run_job(self, job: Job) -> None:
        handler = self._handler
        assert handler is not None
        status, result, error = "failed", None, None
        try:
            async with self._slots:
                value = await handler(job)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"the handler returned {type(value).__name__}, not a dict")
            result = value
            status = "finished"
        except Exception as exc:  # the handler's failure is the job's
            error = str(exc) or type(exc).__name__
            logger.info("= node %s job %s failed: %s", self.node_id, job.job_id, error)
        finally:
            mine = self._jobs.get(job.job_id)
            if mine is not None and mine.job is job:
                del self._jobs[job.job_id]
        payload: dict[str, Any] = {
            "type": "result",
            "job_id": job.job_id,
            "attempt": job.attempt,
            "status": status,
            "result": result,
        }
        if error is not None:
            payload["error"] = error
        try:
            frame = orjson.dumps(payload).decode()
        except TypeError as exc:
            payload.update(status="failed", result=None, error=f"result is not JSON: {exc}")
            frame = orjson.dumps(payload).decode()
        # Kept until sent, so a reconnection resumes and sends it.
        self._unsent[job.job_id] = frame
        await self._send_result_frame(job.job_id, frame)

    async def _send_result_frame(self, job_id: str, frame: str) -> None:
        ws = self._ws
        if ws is None:
            return  # sent after the next registration
        try:
            await ws.send(frame)
        except ConnectionClosed:
            return
        if self._unsent.get(job_id) == frame:
            del self._unsent[job_id]
        self._remember(job_id, frame)

    def _remember(self, job_id: str, frame: str) -> None:
        now = time.monotonic()
        while self._recent:
            oldest = next(iter(self._recent))
            if now - self._recent[oldest].sent_at < _RECENT_RESULTS_S:
                break
            del self._recent[oldest]
        previous = self._recent.pop(job_id, None)
        self._recent[job_id] = _Sent(
            frame, now, previous.tries if previous else 0, previous.refused_at if previous else None
        )

    def _on_error(self, frame: dict[str, Any]) -> None:
        code, job_id = frame.get("code"), frame.get("ref")
        if code == Code.UNAVAILABLE and isinstance(job_id, str) and job_id in self._recent:
            # protocol.md §6: Redis was down, the result did not count: retry.
            sent = self._recent[job_id]
            sent.tries += 1
            now = time.monotonic()
            if sent.refused_at is None:
                sent.refused_at = now
            if now - sent.refused_at > _RESULT_RETRY_S:
                logger.warning("! node %s gave up sending the result of %s", self.node_id, job_id)
                del self._recent[job_id]
                return
            delay = self.backoff.delay_s(sent.tries + 1, self._rng)
            logger.info(
                "= node %s: result of %s refused (UNAVAILABLE); sending it again in %.2f s",
                self.node_id,
                job_id,
                delay,
            )
            self._spawn(self._resend(job_id, sent.frame, delay))
        elif code in (Code.STALE_ATTEMPT, Code.UNKNOWN_JOB, Code.NODE_MISMATCH):
            # The job is no longer ours (cancelled, timed out, retried elsewhere).
            logger.debug("< node %s: %s for %s", self.node_id, code, job_id)
            if isinstance(job_id, str):
                self._recent.pop(job_id, None)
        else:
            logger.warning(
                "! node %s: hub error %s for %s: %s",
                self.node_id,
                code,
                job_id,
                frame.get("message"),
            )

    async def _resend(self, job_id: str, frame: str, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._unsent.setdefault(job_id, frame)
        await self._send_result_frame(job_id, frame)

    async def _send_partial(self, job: Job, result: Mapping[str, Any]) -> None:
        frame = orjson.dumps(
            {"type": "partial", "job_id": job.job_id, "attempt": job.attempt, "result": result}
        ).decode()
        ws = self._ws
        running = self._jobs.get(job.job_id)
        if ws is None or running is None or running.job is not job:
            return
        with contextlib.suppress(ConnectionClosed):
            await ws.send(frame)

    def _busy(self) -> bool:
        return bool(self._jobs or self._unsent)

    async def _stop_jobs(self) -> None:
        running = [r.task for r in self._jobs.values()]
        self._jobs.clear()
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=_STOP_JOBS_TIMEOUT_S)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _decode(message: str | bytes) -> dict[str, Any]:
    frame = orjson.loads(message)
    if type(frame) is not dict:
        raise ValueError("frame is not a JSON object")
    return frame


def _strings(value: object) -> list[str]:
    if not isinstance(value, Iterable) or isinstance(value, str | bytes):
        return []
    return [str(v) for v in value]
