"""The scheduling core: one async method per Lua script.

Every scheduling transition is exactly one script call (see ``lua/``); a
script and its method share a name. The methods build KEYS and ARGV in the
order each script's header lists them and turn replies into the types of
:mod:`hub.events`; expected refusals raise :class:`~hub.errors.SchedulingError`.
Calls go through a :class:`~hub.batcher.Batcher`: the calls issued in one
event-loop iteration share one pipeline.

The cell's counters (the ``stats`` hash: jobs dispatched, finished, failed by
error code, queued, refused, nodes lost...) are not written by the scripts on
every job: each hub counts what its script replies report and adds its counts
to the hash in batches (:meth:`Scheduler.flush_stats`), at once after a quiet
spell and then at most every ``stats_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, Literal

from redis.asyncio import Redis

from .batcher import Batcher
from .config import Settings
from .errors import ErrorCode, ErrorNames, RedisUnavailable
from .events import (
    Accepted,
    Cancellation,
    Completion,
    Dispatch,
    Event,
    JobEnded,
    NodeLost,
    PartialRoute,
    Queued,
    SweepReport,
    as_text,
    parse_ended,
    parse_events,
    raise_refusal,
)
from .keys import Keys
from .node_scripts import NodeScripts
from .reads import redis_unavailable_as
from .scripts import load_script_sources

__all__ = ["MAX_COUNTERS", "Scheduler", "new_job_id"]

MAX_COUNTERS = 1000
"""Most distinct counters a hub holds between two flushes (error codes come from nodes)."""

_REFUSALS_COUNTED = {
    int(ErrorCode.NO_AVAILABLE_NODE): "refused:NO_AVAILABLE_NODE",
    int(ErrorCode.QUEUE_FULL): "refused:QUEUE_FULL",
}


def new_job_id() -> str:
    """A random, unguessable job id (128 bits, URL-safe)."""
    return secrets.token_urlsafe(16)


class Scheduler(NodeScripts):
    """The async API over the scheduling scripts of one cell.

    The wrappers of the node scripts (register_node, heartbeat, node_lost,
    drain_node) come from :class:`~hub.node_scripts.NodeScripts`, the plain
    reads of the cell (status page, ended results) from
    :class:`~hub.reads.CellReads`.

    Args:
        redis: a client created with ``decode_responses=False`` (audio is
            binary) and, on purpose, no retries: a retried script could run
            twice.
        settings: limits and timings (queue, attempts, TTLs, leases).
        hub_id: this hub's id, recorded with its nodes and sessions.
        keys: key names of the cell (default: ``Keys(settings.cell)``).
        sources: script name -> source (default: the scripts of ``lua/``,
            :func:`~hub.scripts.load_script_sources`); tests and benchmarks
            pass variants.
        max_batch, max_pipelines, max_pending: limits of the
            :class:`~hub.batcher.Batcher` (calls per pipeline, pipelines in
            flight, calls waiting).
        stats_interval_s: least time between two additions of this hub's
            counts to the cell's counters.
        batcher: the pipelines to send the calls through, shared by the cells
            of one Redis server (:class:`~hub.cells.Cells`); default: a new one.
    """

    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        *,
        hub_id: str,
        keys: Keys | None = None,
        sources: Mapping[str, str] | None = None,
        max_batch: int = 256,
        max_pipelines: int = 4,
        max_pending: int = 20000,
        stats_interval_s: float = 0.05,
        batcher: Batcher | None = None,
    ) -> None:
        super().__init__(redis, keys if keys is not None else Keys(settings.cell))
        self.settings = settings
        self.hub_id = hub_id
        self.batcher = batcher or Batcher(
            redis,
            load_script_sources() if sources is None else sources,
            max_batch=max_batch,
            max_pipelines=max_pipelines,
            max_pending=max_pending,
            reply_timeout_s=settings.redis_reply_timeout_s,
            wait_replicas=settings.redis_wait_replicas,
            wait_ms=settings.redis_wait_ms,
        )
        """Sends the script calls."""
        self._random = random.Random()
        self.stats_interval_s = stats_interval_s
        self._counts: dict[str, int] = {}
        self._error_names = ErrorNames()
        self._counts_task: asyncio.Task[None] | None = None
        self._counts_sent = -float("inf")
        self._counts_lock = asyncio.Lock()

    @property
    def shas(self) -> dict[str, str]:
        """Script name -> SHA1, as EVALSHA names them."""
        return self.batcher.shas

    @property
    def batches(self) -> int:
        """Pipelines sent so far (for metrics)."""
        return self.batcher.batches

    @property
    def calls(self) -> int:
        """Script calls sent so far (for metrics)."""
        return self.batcher.calls

    @property
    def pending(self) -> int:
        """Script calls waiting for a pipeline."""
        return len(self.batcher.pending) + len(self.batcher.urgent)

    async def load_scripts(self) -> None:
        """Load every script into Redis (SCRIPT LOAD); call at startup and after failover.

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        await self.batcher.load_scripts()

    async def close(self) -> None:
        """Wait for pipelines in flight (bounded by the Redis timeout); add this hub's
        last counts to the cell's counters if Redis answers; give back connections."""
        await self.batcher.close()
        task, self._counts_task = self._counts_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RedisUnavailable):
            await self.flush_stats()

    async def flush_stats(self) -> None:
        """Add the counts of this hub's script replies so far to the cell's counters.

        One pipeline of HINCRBY on the ``stats`` hash; flushes run one at a
        time, so when this returns every count made before the call is in
        Redis. They are also flushed in the background on their own.

        Raises:
            RedisUnavailable: Redis did not answer; the counts are kept for
                the next flush.
        """
        async with self._counts_lock:
            counts, self._counts = self._counts, {}
            if not counts:
                return
            try:
                with redis_unavailable_as("stats"):
                    pipe = self.redis.pipeline(transaction=False)
                    for name, n in counts.items():
                        pipe.hincrby(self.keys.stats, name, n)
                    await pipe.execute()
            except BaseException:
                for name, n in counts.items():
                    self._count(name, n, flush=False)
                raise

    async def status(self, *, max_nodes: int = 10000) -> dict[str, Any]:
        """:meth:`CellReads.status <hub.reads.CellReads.status>`, with this hub's counts
        flushed first (:meth:`flush_stats`)."""
        await self.flush_stats()
        return await super().status(max_nodes=max_nodes)

    def count_refused(self, code: str) -> None:
        """Count a job refused with ``code`` in the cell's counters (``refused:<code>``).

        For the refusals a session gets without :meth:`dispatch_task`
        counting them (``OVERLOADED`` at the edge, ``UNAUTHORIZED``,
        ``UNAVAILABLE``, refusals of other scripts): the cell's counters
        then hold every refusal, whichever hub made it.
        """
        name = "refused:" + code
        if name not in _REFUSALS_COUNTED.values():
            self._count(name)

    def _count(self, name: str, n: int = 1, *, flush: bool = True) -> None:
        """Count ``n`` of ``name`` for the cell's counters; flush in the background."""
        counts = self._counts
        if name in counts:
            counts[name] += n
        elif len(counts) < MAX_COUNTERS:
            counts[name] = n
        if flush and self._counts_task is None:
            self._counts_task = asyncio.get_running_loop().create_task(
                self._flush_stats_soon(), name="stats"
            )

    def _count_events(self, events: Iterable[Event]) -> None:
        """Count what script events report: attempts started, jobs ended, nodes lost."""
        for e in events:
            kind = type(e)
            if kind is Dispatch:
                assert isinstance(e, Dispatch)
                self._count("dispatched" if e.attempt == 1 else "redispatched")
            elif kind is JobEnded:
                assert isinstance(e, JobEnded)
                self._count_ended(e)
            elif kind is NodeLost:
                self._count("nodes_lost")

    def _count_ended(self, e: JobEnded) -> None:
        self._count(e.status)
        if e.error and e.status == "failed":
            self._count("error:" + self._error_names(e.error))

    async def _flush_stats_soon(self) -> None:
        """Flush counts until none are left, at most every :attr:`stats_interval_s`.

        Stops when Redis does not answer: the counts wait for the next reply.
        """
        try:
            while self._counts:
                wait = self._counts_sent + self.stats_interval_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._counts_sent = time.monotonic()
                try:
                    await self.flush_stats()
                except RedisUnavailable:
                    return
        finally:
            if self._counts_task is asyncio.current_task():
                self._counts_task = None

    async def dispatch_task(
        self,
        session_id: str,
        src_lang: str,
        tgt_lang: str,
        payload: bytes,
        *,
        ref: str = "",
        has_audio: bool = False,
        timeout_ms: int | None = None,
        job_id: str | None = None,
        session_hub: str | None = None,
        now_ms: int = 0,
        spill_try: bool = False,
    ) -> Accepted | Queued:
        """Run a session's job on the least-loaded free node, or queue it (dispatch_task.lua).

        KEYS: pair's pools, session, job, deadlines, session's jobs, queued,
        queue depths, pair's live nodes, pair's queue, session's queue of the
        pair, queue heads. ARGV: prefix, job id, session, src, tgt, payload, has audio,
        timeout, queue wait, queue max, seed, session hub, ref, now, max queued
        per session, session TTL.

        Args:
            spill_try: only a free node will do (a queue wait of 0): the job
                tries this cell before it queues in its own (:mod:`hub.cells`);
                its NO_AVAILABLE_NODE is not counted as a refusal.

        Raises:
            SchedulingError: NO_POOL_FOR_LANG_PAIR, EMPTY_POOL, NO_AVAILABLE_NODE,
                QUEUE_FULL.
            RedisUnavailable: Redis did not answer; the job may or may not exist.
        """
        k = self.keys
        src, tgt = src_lang.lower(), tgt_lang.lower()
        jid = job_id or new_job_id()
        s = self.settings
        reply = await self._call(
            "dispatch_task",
            [
                k.lang(src, tgt),
                k.session(session_id),
                k.job(jid),
                k.deadlines,
                k.session_jobs(session_id),
                k.queued,
                k.queue_depth,
                k.live(src, tgt),
                k.queue(src, tgt),
                k.session_queue(src, tgt, session_id),
                k.queue_heads,
            ],
            [
                k.prefix,
                jid,
                session_id,
                src,
                tgt,
                payload,
                b"1" if has_audio else b"",
                timeout_ms if timeout_ms is not None else s.job_timeout_ms,
                0 if spill_try else s.queue_wait_ms,
                s.queue_max,
                self._seed(),
                session_hub or self.hub_id,
                ref,
                now_ms,
                s.max_queued_per_session,
                self.session_ttl_ms(),
            ],
        )
        if isinstance(reply, int) and reply in _REFUSALS_COUNTED and not spill_try:
            self._count(_REFUSALS_COUNTED[reply])
        raise_refusal(reply, ref=ref or None)
        if int(reply[0]) == 1:
            self._count("dispatched")
            return Accepted(jid, as_text(reply[1]), int(reply[2]), as_text(reply[3]), int(reply[4]))
        self._count("queued")
        return Queued(jid, as_text(reply[1]), int(reply[2]))

    async def complete_task(
        self,
        job_id: str,
        node_id: str,
        attempt: int,
        status: Literal["finished", "failed"],
        *,
        result: bytes = b"null",
        error: str | None = None,
        repeat: bool = False,
        now_ms: int = 0,
    ) -> Completion:
        """End a job on its node's report and free the slot (complete_task.lua).

        KEYS: job, node, node's jobs. ARGV: prefix, job id, node id, attempt,
        status, result, error, now, job TTL, repeat, seed.

        Args:
            repeat: this call repeats one whose reply was lost (Redis
                unavailable): if that one ended the job, its result event
                comes back again instead of STALE_ATTEMPT.

        Raises:
            SchedulingError: UNKNOWN_JOB, NODE_MISMATCH, STALE_ATTEMPT.
        """
        k = self.keys
        reply = await self._call(
            "complete_task",
            [k.job(job_id), k.node(node_id), k.node_jobs(node_id)],
            [
                k.prefix,
                job_id,
                node_id,
                attempt,
                status,
                result,
                error or "",
                now_ms,
                self.settings.job_ttl_ms,
                b"1" if repeat else b"",
                self._seed(),
            ],
            urgent=True,
        )
        raise_refusal(reply)
        done = Completion(
            parse_ended(reply[1], "complete_task"),
            bool(int(reply[2])),
            parse_events(reply[3], "complete_task"),
        )
        self._count_ended(done.ended)
        self._count_events(done.events)
        return done

    async def cancel_task(
        self, job_id: str, session_id: str, *, reason: str = "CANCELLED", now_ms: int = 0
    ) -> Cancellation:
        """End a session's unfinished job (cancel_task.lua).

        KEYS: job. ARGV: prefix, job id, session id, reason, now, job TTL, seed.

        Raises:
            SchedulingError: UNKNOWN_JOB (also for another session's job),
                STALE_ATTEMPT (already ended).
        """
        k = self.keys
        reply = await self._call(
            "cancel_task",
            [k.job(job_id)],
            [k.prefix, job_id, session_id, reason, now_ms, self.settings.job_ttl_ms, self._seed()],
        )
        raise_refusal(reply)
        cancelled = Cancellation(
            parse_ended(reply[1], "cancel_task"), parse_events(reply[2], "cancel_task")
        )
        self._count_ended(cancelled.ended)
        self._count_events(cancelled.events)
        return cancelled

    async def route_partial(self, job_id: str, node_id: str, attempt: int) -> PartialRoute:
        """Where a node's partial result of a job attempt goes (route_partial.lua).

        KEYS: job. ARGV: prefix, node id, attempt.

        A read, for a partial whose route this hub does not know (a job the
        node kept across a reconnection): it changes nothing.

        Args:
            job_id: the job the partial is for.
            node_id: the node it came from (bound to the connection).
            attempt: the attempt the node names.

        Returns:
            The job's session, the hub holding the session's socket and the job's ref.

        Raises:
            SchedulingError: UNKNOWN_JOB, NODE_MISMATCH (never this node's
                job), JOB_MOVED (the node ran it before, another node runs it
                now), STALE_PARTIAL (another attempt, or the job ended).
            RedisUnavailable: if Redis cannot be reached.
        """
        k = self.keys
        reply = await self._call("route_partial", [k.job(job_id)], [k.prefix, node_id, attempt])
        raise_refusal(reply)
        return PartialRoute(as_text(reply[1]), as_text(reply[2]), as_text(reply[3]))

    async def sweep(
        self, *, now_ms: int = 0, lease_ms: int | None = None, expire_nodes: bool = True
    ) -> SweepReport:
        """Expire overdue jobs, expired queue waits and silent nodes (sweep.lua).

        KEYS: deadlines, queued, seen, sweep lease. ARGV: prefix, now, node
        lease, batch, max attempts, job TTL, seed, hub id, sweep lease.

        Args:
            lease_ms: how long this hub keeps the sweep to itself; default
                twice the sweep interval; 0 always runs.
            expire_nodes: False leaves silent nodes alone this time (a node
                lease longer than any clock).
        """
        k = self.keys
        s = self.settings
        if lease_ms is None:
            lease_ms = 2 * s.sweep_interval_ms
        reply = await self._call(
            "sweep",
            [k.deadlines, k.queued, k.seen, k.sweep_lease],
            [
                k.prefix,
                now_ms,
                s.lease_ms if expire_nodes else 10**15,
                s.sweep_batch,
                s.max_attempts,
                s.job_ttl_ms,
                self._seed(),
                self.hub_id,
                lease_ms,
            ],
        )
        report = SweepReport(
            bool(int(reply[0])),
            int(reply[1]),
            int(reply[2]),
            int(reply[3]),
            parse_events(reply[4], "sweep"),
        )
        self._count_events(report.events)
        return report

    async def session_closed(
        self, session_id: str, *, reason: str = "CANCELLED", now_ms: int = 0, batch: int = 256
    ) -> tuple[bool, tuple[Event, ...]]:
        """Cancel a gone session's unfinished jobs (session_closed.lua).

        KEYS: session, session's jobs. ARGV: prefix, session id, hub id,
        reason, now, job TTL, batch, seed.

        Returns:
            (done, events); done is False when the session resumed on another hub.
        """
        k = self.keys
        reply = await self._call(
            "session_closed",
            [k.session(session_id), k.session_jobs(session_id)],
            [
                k.prefix,
                session_id,
                self.hub_id,
                reason,
                now_ms,
                self.settings.job_ttl_ms,
                batch,
                self._seed(),
            ],
        )
        events = parse_events(reply[1], "session_closed")
        self._count_events(events)
        return bool(int(reply[0])), events

    async def resume_session(
        self, session_id: str, *, max_results: int = 1000
    ) -> tuple[bool, tuple[tuple[str, str, str], ...], tuple[JobEnded, ...]]:
        """Route a reconnected session's results to this hub (resume_session.lua).

        KEYS: session, session's jobs, session's ended jobs. ARGV: prefix,
        session id, hub id, session TTL, max results.

        Returns:
            (known, unfinished jobs as (job id, ref, status), unacknowledged results).
        """
        k = self.keys
        reply = await self._call(
            "resume_session",
            [k.session(session_id), k.session_jobs(session_id), k.session_done(session_id)],
            [k.prefix, session_id, self.hub_id, self.session_ttl_ms(), max_results],
        )
        open_jobs = tuple((as_text(j[0]), as_text(j[1]), as_text(j[2])) for j in reply[1])
        ended = tuple(parse_ended(e, "resume_session") for e in reply[2])
        return bool(int(reply[0])), open_jobs, ended

    async def end_lost_job(
        self,
        job_id: str,
        session_id: str,
        ref: str,
        *,
        session_hub: str | None = None,
        now_ms: int = 0,
    ) -> JobEnded | None:
        """End a job Redis no longer knows with ``JOB_LOST`` (end_lost_job.lua).

        KEYS: job. ARGV: prefix, job id, session id, ref, session hub, now, job TTL.

        For a job a session or a node still holds after Redis came back
        without its last writes (:mod:`hub.reconcile`): the first caller
        records the one outcome, every later one changes nothing.

        Returns:
            The result event, or ``None`` when Redis knows the job.
        """
        reply = await self._call(
            "end_lost_job",
            [self.keys.job(job_id)],
            [
                self.keys.prefix,
                job_id,
                session_id,
                ref,
                session_hub or self.hub_id,
                now_ms,
                self.settings.job_ttl_ms,
            ],
        )
        if reply == 0:
            return None
        ended = parse_ended(reply[1], "end_lost_job")
        self._count_ended(ended)
        return ended

    async def add_session_cell(self, session_id: str, cell: str) -> bool:
        """Record that a session of this cell may have jobs in ``cell`` (add_session_cell.lua).

        KEYS: session's other cells. ARGV: cell, session TTL.

        Called before the session's first job goes to another cell, so a
        resume finds that cell's jobs (:meth:`session_cells`).

        Returns:
            Whether ``cell`` was new to the session's record.
        """
        reply = await self._call(
            "add_session_cell",
            [self.keys.session_cells(session_id)],
            [cell, self.session_ttl_ms()],
        )
        return bool(int(reply))

    async def ack_results(self, session_id: str, job_ids: Sequence[str]) -> int:
        """Forget acknowledged results of a session (ack_results.lua).

        KEYS: session's ended jobs, session. ARGV: prefix, job ids.
        """
        if not job_ids:
            return 0
        k = self.keys
        reply = await self._call(
            "ack_results", [k.session_done(session_id), k.session(session_id)], [k.prefix, *job_ids]
        )
        return int(reply)

    def session_ttl_ms(self) -> int:
        """How long a session's records live after its last activity, ms."""
        s = self.settings
        return 2 * max(s.job_ttl_ms, int(s.resume_window_s * 1000), s.max_job_timeout_ms)

    def _seed(self) -> int:
        # 1 .. 2147483646, what the scripts' generator takes (getrandbits: no randrange's cost).
        return self._random.getrandbits(31) % 2147483646 + 1

    def _call(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, urgent: bool = False
    ) -> Coroutine[Any, Any, Any]:
        """One script call through :attr:`batcher` (see :meth:`~hub.batcher.Batcher.call`).

        A plain function handing back the batcher's coroutine: no coroutine of
        its own per call.
        """
        return self.batcher.call(name, keys, args, urgent=urgent)
