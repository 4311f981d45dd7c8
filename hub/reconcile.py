"""What a hub does when Redis comes back: re-send what may be lost, settle what was.

One path, :meth:`Reconciler.reconcile`, run one at a time by whichever part
notices first: the Redis watch before it sets ``ready`` again, the bus after
each new subscription, the heartbeat loop when Redis refuses a heartbeat.

**Every time the bus subscribes again** (a Redis failure always drops the
subscription), frames published to this hub meanwhile are lost: pub/sub is
at most once (protocol.md §8). For each node connected here the hub reads
from Redis the attempts that run on it (:meth:`CellReads.node_jobs
<hub.reads.CellReads.node_jobs>`, two pipelines) and compares them with what
it wrote to the node's socket: :attr:`NodeLink.jobs <hub.registry.NodeLink.jobs>`
records each (job, attempt) whose ``job`` frame went out on that socket and
drops it when the attempt ends there (result, cancel). That record is what
"acknowledged" means here: TCP delivers what was written to a live socket,
and a socket that dies takes the node through a new registration with
``resume``. Then:

- an attempt Redis gives the node and the socket never carried is sent again,
  by the hub that keeps the job's audio (:meth:`Router.send_job
  <hub.router.Router.send_job>`, over the bus kind ``D`` when another hub
  keeps it; ``AUDIO_LOST`` when none does). The node ignores an attempt it
  runs or ran lately, and sends again the result of one it finished
  (protocol.md §3.3);
- an attempt the socket carried that Redis no longer gives the node (its
  ``cancel`` was lost) is cancelled on the node, so the node's real load
  matches its slots.

**When Redis restarted or failed over** (the server's ``run_id`` changed: a
restart from an append-only file fsynced every second, or a replica promoted
behind its primary, may both have lost the last writes), the hub is not ready
until it has, before the steps above:

- registered again every live node socket whose registration Redis lost or
  holds at an older epoch (``register_node`` with the jobs Redis or the hub
  knows it runs as ``resume``), so its registration, epoch and ``running``
  are those of the socket that really holds it; jobs it runs that Redis no
  longer gives it are cancelled on it (a node whose registration Redis kept
  keeps it: its jobs are settled by the steps above);
- checked every session's unfinished jobs against Redis: a result Redis holds
  is sent, and a job Redis no longer knows ends with ``JOB_LOST``
  (``end_lost_job.lua``: one outcome, whoever records it first).

Every read and call is bounded: nodes and sessions go by chunks, each
node's jobs by ``max_jobs_per_node``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

from . import protocol as proto
from .cells import Cells
from .config import Settings
from .errors import Code, RedisUnavailable
from .events import JobEnded, NodeReplaced
from .health import Health
from .metrics import Metrics
from .outbox import Outbox
from .protocol import JobId
from .reads import NodeJobs, RunningJob
from .registry import NodeLink, Registry, Route, SessionLink
from .router import Router
from .tasks import Tasks

__all__ = ["Reconciler"]

logger = logging.getLogger("hub.reconcile")

_CHUNK = 128
"""Nodes (or sessions) reconciled per round of reads and script calls."""

_RETRIES_S = (0.05, 0.1, 0.2, 0.5, 1.0)

_FORWARD_CHECKS_S = (0.5, 1.0, 2.0, 4.0)
"""Waits before checking again that attempts handed to their audio's hub reached
their node: that hub's own subscription may have come back after this one's, and
a bus message to it before then is lost."""
"""Waits between the tries of a background reconcile while Redis is not back yet."""

_T = TypeVar("_T")


def _chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _reason(job: RunningJob | None) -> str:
    """Why a node must stop an attempt Redis no longer gives it (a ``cancel`` reason)."""
    if job is None or not job.status:
        return Code.JOB_LOST
    if job.status in ("finished", "failed"):
        return job.error if job.error in Code.__members__ else Code.CANCELLED
    return Code.NODE_LOST  # re-dispatched, or waiting in a queue again


class Reconciler:
    """Brings this hub's connections and Redis back in agreement after a Redis failure.

    Args:
        hub_id: this hub's id.
        settings: limits (jobs per node).
        cells: the cells served, each with its scheduler: the reads and script calls.
        registry: the connections here.
        outbox: frames to nodes and sessions.
        router: acts on the events of script replies; sends job frames.
        metrics: counts what was done (``hub_redis_reconciled_total``).
        health: ``ready`` is cleared while a restart is reconciled.
        tasks: owner of the background reconciles.
    """

    def __init__(
        self,
        hub_id: str,
        settings: Settings,
        cells: Cells,
        registry: Registry,
        outbox: Outbox,
        router: Router,
        metrics: Metrics,
        health: Health,
        tasks: Tasks,
    ) -> None:
        self.hub_id = hub_id
        self._max_jobs = settings.max_jobs_per_node
        self._cells = cells
        self._scheduler = cells.main
        self._registry = registry
        self._outbox = outbox
        self._router = router
        self._metrics = metrics
        self._health = health
        self._tasks = tasks
        self._lock = asyncio.Lock()
        self._run_id: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._forwarded = False
        """The last pass handed an attempt to the hub that keeps its audio."""
        self.restarts = 0
        """Redis restarts (or failovers) reconciled."""
        self.resent = 0
        """Job frames sent again because Redis gives a node an attempt its socket never carried."""
        self.cancelled = 0
        """Attempts cancelled on a node because Redis no longer gives them to it."""
        self.lost = 0
        """Jobs this hub ended with ``JOB_LOST``."""
        self.reconciled_at: float | None = None
        """When (``time.monotonic()``) the last restart was reconciled."""

    # Public methods

    async def reconcile(self) -> None:
        """Reconcile now: a restart first if Redis restarted, then the re-sends.

        A step of the Redis watch's preparation (before ``ready``).

        Raises:
            RedisUnavailable: if Redis does not answer; call again later.
        """
        async with self._lock:
            run_id = await self._server_ids()
            if self._run_id is not None and run_id != self._run_id:
                # Jobs are refused (UNAVAILABLE) until the restart is settled.
                self._health.ready = False
                logger.warning("! redis restarted (run_id changed): reconciling its state")
                await self._restarted()
                self.restarts += 1
                self._metrics.reconciled.labels("restarts").inc()
                self.reconciled_at = time.monotonic()
            self._run_id = run_id
            await self._resend()

    def schedule(self) -> None:
        """Reconcile in the background (after a new bus subscription); runs coalesce."""
        if self._health.stopping:
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = self._tasks.spawn(self._background())

    async def restarted(self) -> bool:
        """Whether Redis restarted since the last reconcile; if so, one is scheduled.

        Called before acting on a refusal that a restart may explain (a
        heartbeat of an epoch Redis lost), so that the node is registered
        again instead of being closed.

        Raises:
            RedisUnavailable: if Redis does not answer.
        """
        if self._run_id is None or await self._server_ids() == self._run_id:
            return False
        self._health.ready = False  # the Redis watch reconciles before ready
        self.schedule()
        return True

    # Private methods

    async def _server_ids(self) -> str:
        """The ``run_id`` of each Redis server of the cells served (a cluster: each
        master), joined: it changes when any of them restarted or failed over."""
        return ",".join([await s.server_id() for s in self._cells.servers()])

    async def _background(self) -> None:
        checks = iter(_FORWARD_CHECKS_S)
        while True:
            self._again = False
            self._forwarded = False
            for delay in (*_RETRIES_S, None):
                try:
                    await self.reconcile()
                    break
                except RedisUnavailable:
                    if delay is None:
                        return  # Redis is away again: the next subscription retries
                    await asyncio.sleep(delay)
            if self._health.stopping:
                return
            if not self._again and self._forwarded:
                # Check again that what another hub was to send went out (bounded).
                wait = next(checks, None)
                if wait is not None:
                    await asyncio.sleep(wait)
                    self._again = True
            if not self._again or self._health.stopping:
                return

    def _node_links(self, cell: str) -> list[NodeLink]:
        """The registered nodes here of one cell (each cell's reads go to its Redis)."""
        return [
            link
            for link in self._registry.nodes.values()
            if link.node_id is not None
            and not link.closing
            and link.registration is not None
            and link.cell == cell
        ]

    def _current(self, link: NodeLink) -> bool:
        return link.node_id is not None and self._registry.nodes.get(link.node_id) is link

    async def _restarted(self) -> None:
        for scheduler in self._cells:
            for chunk in _chunks(self._node_links(scheduler.keys.cell)):
                seen = await scheduler.node_jobs(
                    [(link.node_id or "", list(link.jobs)) for link in chunk],
                    max_jobs=self._max_jobs,
                )
                await asyncio.gather(
                    *(
                        self._register_again(link, jobs)
                        for link, jobs in zip(chunk, seen, strict=True)
                    )
                )
        sessions = [
            s for s in self._registry.sessions.values() if s.conn.open_refs and not s.closing
        ]
        for schunk in _chunks(sessions):
            await asyncio.gather(*(self._check_session(link) for link in schunk))

    async def _register_again(self, link: NodeLink, seen: NodeJobs) -> None:
        """Register a live node socket again, resuming every job it may run."""
        frame = link.registration
        assert frame is not None and link.node_id is not None
        if seen.epoch > link.epoch:
            return  # a newer registration holds the id: this socket is replaced
        if seen.epoch == link.epoch and seen.hub == self.hub_id:
            return  # Redis kept this registration: its jobs are settled by _resend
        resume = list(dict.fromkeys([*seen.jobs, *link.jobs]))[: self._max_jobs]
        reg = await self._cells[link.cell].register_node(
            link.node_id,
            services=frame.services,
            lang_pairs=frame.lang_pairs,
            max_jobs=frame.max_jobs,
            pools=frame.pools,
            resume=resume,
        )
        if self._current(link):
            link.epoch = reg.epoch
        logger.info(
            "= node %s registered again (epoch %d, %d jobs kept, %d dropped)",
            link.node_id,
            reg.epoch,
            len(reg.resumed),
            len(reg.dropped),
        )
        for jid in reg.dropped:
            route = link.jobs.get(jid)
            if route is not None:
                await self._stop(link, jid, route, seen.others.get(jid))
        # The old registration was this very socket.
        self._router.route(
            e for e in reg.events if not (type(e) is NodeReplaced and e.hub == self.hub_id)
        )

    async def _stop(self, link: NodeLink, jid: str, route: Route, job: RunningJob | None) -> None:
        """Stop an attempt on the node; end the job ``JOB_LOST`` when Redis lost it."""
        reason = _reason(job)
        if route.attempt:
            self.cancelled += 1
            self._metrics.reconciled.labels("cancelled").inc()
            self._outbox.send_node(
                self.hub_id,
                link.node_id or "",
                proto.encode_cancel(JobId(jid), route.attempt, reason),
                untrack=jid,
            )
        else:
            link.jobs.pop(jid, None)  # resumed: its attempt is unknown here
        if reason == Code.JOB_LOST and route.session_id:
            ended = await self._cells[link.cell].end_lost_job(
                jid, route.session_id, route.ref, session_hub=route.session_hub
            )
            if ended is not None:
                self._ended_lost(ended)

    def _ended_lost(self, ended: JobEnded) -> None:
        self.lost += 1
        self._metrics.reconciled.labels("lost").inc()
        self._router.ended(ended)

    async def _check_session(self, link: SessionLink) -> None:
        """Check a session's unfinished jobs against Redis: send results, end lost jobs."""
        session_id = link.session_id
        # Records this hub as the session's (the hash may be lost) and reads its jobs,
        # in each cell where it has some.
        replies = await asyncio.gather(
            *(self._cells[cell].resume_session(session_id) for cell in link.all_cells())
        )
        if self._registry.sessions.get(session_id) is not link:
            return
        open_jobs = [job for reply in replies for job in reply[1]]
        missed = [e for reply in replies for e in reply[2]]
        known = {jid for jid, _, _ in open_jobs}
        for e in missed:
            known.add(e.job_id)
            jid = JobId(e.job_id)
            if link.conn.job_ended(jid) is not None:
                frame = proto.encode_result(e.ref, jid, e.status, e.result, e.error)
                self._outbox.push(link.ws, frame)
        for jid, ref in link.conn.open_jobs():
            scheduler = self._cells.for_job(jid)
            if jid in known or scheduler is None:
                continue
            ended = await scheduler.end_lost_job(jid, session_id, ref)
            if ended is not None:
                self._ended_lost(ended)

    async def _resend(self) -> None:
        """Re-send the attempts Redis gives each node here that its socket never carried."""
        for scheduler in self._cells:
            for chunk in _chunks(self._node_links(scheduler.keys.cell)):
                carried = [dict(link.jobs) for link in chunk]
                asked = [
                    (link.node_id or "", list(jobs))
                    for link, jobs in zip(chunk, carried, strict=True)
                ]
                seen = await scheduler.node_jobs(asked, max_jobs=self._max_jobs)
                for link, jobs, redis in zip(chunk, carried, seen, strict=True):
                    if self._current(link) and not link.closing:
                        await self._settle_node(link, jobs, redis)

    async def _settle_node(self, link: NodeLink, carried: dict[str, Route], seen: NodeJobs) -> None:
        node_id = link.node_id or ""
        for jid, route in carried.items():
            job = seen.jobs.get(jid)
            if route.attempt == 0 or (job is not None and job.attempt.attempt == route.attempt):
                continue  # resumed by the node itself, or still its attempt
            if link.jobs.get(jid) is route:
                # Its cancel was lost (or Redis lost the job): stop it on the node.
                await self._stop(link, jid, route, job or seen.others.get(jid))
        for jid, job in seen.jobs.items():
            now = link.jobs.get(jid)
            if now is not None and now.attempt in (0, job.attempt.attempt):
                continue
            self.resent += 1
            self._metrics.reconciled.labels("resent").inc()
            d = dataclasses.replace(job.attempt, node_hub=self.hub_id)
            if d.audio_hub and d.audio_hub != self.hub_id:
                self._forwarded = True
            logger.info("= sending job %s attempt %d to node %s again", jid, d.attempt, node_id)
            self._router.send_job(d)
