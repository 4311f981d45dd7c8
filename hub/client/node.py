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

Given several hubs (``NodeClient(urls=["wss://hub-a:443", "wss://hub-b:443"],
…)``), the node tries them in an order drawn from its id, so that a fleet
spreads over them, and moves to the next when its hub is unreachable or
going away (protocol.md §8).

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
import collections
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection

from ..errors import Code
from ..protocol import (
    NODE_PATH,
    CloseCode,
    ErrorReply,
    NodeCancel,
    NodeJob,
    Registered,
    ToNodeFrame,
    decode_to_node,
    encode_drain,
    encode_load,
    encode_node_partial,
    encode_node_result,
    encode_register,
)
from .backoff import Backoff
from .errors import ConnectionRejected
from .jobs import Handler, Job
from .ledger import Results
from .link import Link
from .transport import hub_urls

__all__ = ["Handler", "Job", "NodeClient"]

logger = logging.getLogger("hub.client.node")

_MAX_RESUME = 256
"""protocol.md §5: ``resume`` has at most ``max_jobs_per_node`` entries."""
_RECENT_ATTEMPTS = 1024
"""Attempts run lately, remembered so that a repeated ``job`` frame is ignored."""
_STOP_JOBS_TIMEOUT_S = 5.0


@dataclasses.dataclass(slots=True)
class _Running:
    job: Job
    task: asyncio.Task[None]


class NodeClient(Link[ToNodeFrame]):
    """A node: registers with a hub and runs the jobs it sends.

    Args:
        url: the hub, ``ws://host:port`` (``/v1/node`` is added) or the full
            endpoint URL; the same as ``urls=[url]``.
        urls: several hubs of one cell, instead of ``url``: the node tries
            them in an order drawn from ``node_id`` (the same after every
            restart; a fleet spreads evenly), stays on a hub while it serves
            it, and moves to the next when a hub is unreachable or closes
            with ``1001``, ``1011``, ``1012``, ``1013`` or no close frame,
            registering there with ``resume`` (protocol.md §8).
        spread: ``False`` tries ``urls`` in the order given (a preferred
            hub first, then the backups) instead of spreading.
        node_id: the node's id; a second live connection with the same id
            replaces the first (which gets :class:`ConnectionRejected`).
        languages: languages served; means every ordered pair of two of them.
        lang_pairs: ``(src, tgt)`` pairs served, instead of ``languages``.
        services: services it runs.
        max_jobs: jobs it runs at once; the hub sends no more than this.
        pools: operator pools to join; ``None`` means the hub's default pool.
        cell: the cell to join (one the hubs serve); ``None``: the token's,
            else the hub's default cell.
        token: sent as ``Authorization: Bearer <token>`` when not ``None``.
        handler: the job handler; or set it later with :meth:`handler`.
        backoff: delays between reconnection attempts (default :class:`Backoff`()).
        open_timeout_s: timeout of the WebSocket handshake.
        register_timeout_s: how long to wait for ``registered``.
        max_frame_bytes: largest message accepted from the hub.
        on_connected: called with the node after each registration.
        on_frame: called with the node and each frame from the hub (tracing).

    Raises:
        ValueError: unless exactly one of ``languages`` and ``lang_pairs`` is
            given, and exactly one of ``url`` and ``urls``; if ``max_jobs`` is
            smaller than 1, or a URL is not a WebSocket URL.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        urls: Sequence[str] | None = None,
        spread: bool = True,
        node_id: str,
        languages: Sequence[str] | None = None,
        lang_pairs: Sequence[tuple[str, str] | Sequence[str]] | None = None,
        services: Sequence[str] = ("asr", "nmt", "tts"),
        max_jobs: int = 1,
        pools: Sequence[str] | None = None,
        cell: str | None = None,
        token: str | None = None,
        handler: Handler | None = None,
        backoff: Backoff | None = None,
        open_timeout_s: float = 10.0,
        register_timeout_s: float = 10.0,
        max_frame_bytes: int = 16 * 1024 * 1024,
        on_connected: Callable[[NodeClient], None] | None = None,
        on_frame: Callable[[NodeClient, ToNodeFrame], None] | None = None,
    ) -> None:
        if (languages is None) == (lang_pairs is None):
            raise ValueError("give exactly one of languages and lang_pairs")
        if max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        super().__init__(
            hub_urls(url, urls, NODE_PATH),
            token=token,
            backoff=backoff,
            open_timeout_s=open_timeout_s,
            max_frame_bytes=max_frame_bytes,
            logger=logger,
            spread=spread,
            spread_key=node_id,
            on_connected=on_connected,
            on_frame=on_frame,
        )
        self.node_id = node_id
        """The node's id."""
        self.languages = None if languages is None else list(languages)
        self.lang_pairs = None if lang_pairs is None else [list(p) for p in lang_pairs]
        self.services = list(services)
        self.max_jobs = max_jobs
        """Jobs run at once."""
        self.pools = None if pools is None else list(pools)
        self.cell = cell
        """The cell named in ``register``."""
        self.register_timeout_s = register_timeout_s
        self._handler = handler
        self._jobs: dict[str, _Running] = {}
        self._recent: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        # (job id, attempt) of the attempts started lately, oldest first.
        self.repeats = 0
        """``job`` frames ignored because they repeated an attempt run lately (protocol.md §3.3)."""
        self._unsent: dict[str, bytes] = {}  # job id -> result frame not yet sent
        self._results = Results()  # sent, in case the hub answers UNAVAILABLE
        self._slots = asyncio.Semaphore(max_jobs)
        self._done_event = asyncio.Event()
        self._draining = False
        self._running = False

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
        return self._up.is_set()

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
        self._done_event.clear()
        try:
            await self._reconnect()
        finally:
            self._running = False
            self._up.clear()
            await self._stop_jobs()
            self._done_event.set()

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
        waiter = asyncio.ensure_future(self._up.wait())
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.wait((waiter, task), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not self._up.is_set():
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
        await self._send(encode_drain())
        if not self._running:
            return
        async with asyncio.timeout(timeout_s):
            await self._done_event.wait()

    async def send_load(self, load: Mapping[str, Any]) -> None:
        """Report the node's own view of its load (protocol.md §3.7); best effort."""
        await self._send(encode_load(load))

    async def close(self) -> None:
        """Stop: cancel running jobs (no results are sent), close the connection."""
        if self._run_task is None:
            await self._stop_jobs()
        await self._shut_down(_STOP_JOBS_TIMEOUT_S + 3)

    async def __aenter__(self) -> NodeClient:
        return self

    def __repr__(self) -> str:
        return f"<NodeClient {self.node_id} {self.url} running={self.running}>"

    # Private methods: connection

    def _label(self) -> str:
        return f"node {self.node_id}"

    def _done(self, code: int | None) -> bool:
        if self._draining and (code == CloseCode.DRAINED or not self._busy()):
            logger.info("= node %s drained", self.node_id)
            return True
        return False

    def _decode(self, message: str | bytes) -> ToNodeFrame:
        return decode_to_node(message, binary=isinstance(message, bytes))

    async def _greet(self, ws: ClientConnection) -> None:
        await self._register(ws)

    async def _register(self, ws: ClientConnection) -> None:
        # protocol.md §3.1: resume the jobs still running and those whose
        # results wait to be sent, so the hub keeps them on this node.
        resume = list(dict.fromkeys([*self._jobs, *self._unsent]))[:_MAX_RESUME]
        frame = encode_register(
            self.node_id,
            self.services,
            self.max_jobs,
            languages=self.languages,
            lang_pairs=self.lang_pairs,
            pools=self.pools,
            resume=resume,
            cell=self.cell,
        )
        await ws.send(frame, text=True)
        async with asyncio.timeout(self.register_timeout_s):
            while True:
                reply = self._decode(await ws.recv())
                if type(reply) is Registered:
                    break
                if type(reply) is ErrorReply and reply.code != Code.UNAVAILABLE:
                    raise ConnectionRejected(reply.code, reply.message)
                # protocol.md §7: after UNAVAILABLE the hub closes with 1013; retry.
        self.hub_id = reply.hub_id
        self.connections += 1
        logger.info(
            "= node %s registered with hub %s (resumed %d, dropped %d)",
            self.node_id,
            self.hub_id,
            len(reply.resumed),
            len(reply.dropped),
        )
        # protocol.md §3.2: dropped jobs are no longer ours; stop them.
        for job_id in reply.dropped:
            self._cancel_job(job_id, None)
            self._unsent.pop(job_id, None)
        self._ws = ws
        self._up.set()
        for job_id, result in list(self._unsent.items()):
            if job_id not in self._jobs:
                await self._send_result_frame(job_id, result)
        if self._draining:
            await self._send(encode_drain(), ws)

    def _on_frame(self, ws: ClientConnection, frame: ToNodeFrame) -> None:
        if type(frame) is NodeJob:
            self._start_job(frame)
        elif type(frame) is NodeCancel:
            self._cancel_job(frame.job_id, frame.attempt)
        elif type(frame) is ErrorReply:
            self._on_error(frame)

    # Private methods: jobs

    def _start_job(self, frame: NodeJob) -> None:
        key = (frame.job_id, frame.attempt)
        running = self._jobs.get(frame.job_id)
        if key in self._recent or (running is not None and running.job.attempt > frame.attempt):
            # protocol.md §3.3: a hub re-sends the job frames it is not sure
            # were delivered (after a Redis failure); a repeat of an attempt
            # this node runs or ran lately is ignored, as is an older attempt.
            self.repeats += 1
            logger.debug("= node %s ignored a repeat of job %s", self.node_id, frame.job_id)
            if running is None:
                self._result_again(frame.job_id, frame.attempt)
            return
        self._recent[key] = None
        if len(self._recent) > _RECENT_ATTEMPTS:
            self._recent.popitem(last=False)
        job = Job(
            frame.job_id,
            frame.attempt,
            frame.session_id,
            frame.src_lang,
            frame.tgt_lang,
            frame.payload,
            frame.deadline_ms,
            frame.audio,
            _send_partial=self._send_partial,
        )
        # A newer attempt of a job we still run replaces it.
        self._cancel_job(job.job_id, None)
        task = asyncio.get_running_loop().create_task(
            self._run_job(job), name=f"job-{job.job_id}-{job.attempt}"
        )
        self._jobs[job.job_id] = _Running(job, task)

    def _result_again(self, job_id: str, attempt: int) -> None:
        """Send again the result of an attempt that ended here, if it is still kept.

        The hub re-sends a job frame when Redis says the attempt still runs
        here: Redis may have come back without the result (protocol.md §8).
        Only the first result of an attempt counts, so a second is harmless.
        """
        result = self._unsent.get(job_id) or self._results.frame(job_id)
        if result is None or orjson.loads(result).get("attempt") != attempt:
            return
        self._spawn(self._send_result_frame(job_id, result))

    def _cancel_job(self, job_id: str, attempt: int | None) -> None:
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
        try:
            frame = encode_node_result(job.job_id, job.attempt, status, result, error)
        except TypeError as exc:
            error = f"result is not JSON: {exc}"
            frame = encode_node_result(job.job_id, job.attempt, "failed", None, error)
        # Kept until sent, so a reconnection resumes and sends it.
        self._unsent[job.job_id] = frame
        await self._send_result_frame(job.job_id, frame)

    async def _send_result_frame(self, job_id: str, frame: bytes) -> None:
        if not await self._send(frame):
            return  # sent after the next registration
        if self._unsent.get(job_id) == frame:
            del self._unsent[job_id]
        self._results.sent(job_id, frame)

    def _on_error(self, frame: ErrorReply) -> None:
        code, job_id = frame.code, frame.ref
        if code == Code.UNAVAILABLE and job_id is not None and job_id in self._results:
            # protocol.md §6: Redis was down, the result did not count: retry.
            sent = self._results.refused(job_id)
            if sent is None:
                logger.warning("! node %s gave up sending the result of %s", self.node_id, job_id)
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
            if job_id is not None:
                self._results.forget(job_id)
        else:
            logger.warning(
                "! node %s: hub error %s for %s: %s", self.node_id, code, job_id, frame.message
            )

    async def _resend(self, job_id: str, frame: bytes, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._unsent.setdefault(job_id, frame)
        await self._send_result_frame(job_id, frame)

    async def _send_partial(self, job: Job, result: Mapping[str, Any]) -> None:
        frame = encode_node_partial(job.job_id, job.attempt, result)
        running = self._jobs.get(job.job_id)
        if running is not None and running.job is job:
            await self._send(frame)

    def _busy(self) -> bool:
        return bool(self._jobs or self._unsent)

    async def _stop_jobs(self) -> None:
        running = [r.task for r in self._jobs.values()]
        self._jobs.clear()
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=_STOP_JOBS_TIMEOUT_S)
