"""The one consumer of scheduling events.

Every script reply carries the events its transition caused (a job started
on a node, a job ended, an attempt cancelled, a node replaced or lost). The
router turns each into frames or closes, for connections here or on other
hubs (:class:`~hub.outbox.Outbox`). Whichever hub ran the script routes its
events, so a job started by another hub's ``complete_task`` reaches its node
and its session the same way as one started by a submit here.

A job's audio is never in Redis: the hub that accepted the job keeps it
(:class:`~hub.audio.AudioStore`) and sends every job frame of it. A
dispatch event read on another hub is forwarded there over the bus
(:meth:`send_job`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from . import protocol as proto
from .audio import AudioStore
from .cells import Cells
from .errors import Code, RedisUnavailable, SchedulingError
from .events import CancelAttempt, Dispatch, Event, JobEnded, NodeLost, NodeReplaced
from .metrics import Metrics
from .outbox import Outbox
from .protocol import CloseCode, JobId, NodeId, SessionId
from .registry import Route
from .tasks import Tasks

__all__ = ["Router"]

logger = logging.getLogger("hub.router")


class Router:
    """Acts on scheduling events.

    Args:
        outbox: where frames and closes go.
        metrics: counts dispatched and ended jobs.
        audio: the audio of the jobs this hub accepted.
        cells: the cells served, each with its scheduler: ends a job whose audio is lost.
        tasks: owner of those calls.
    """

    def __init__(
        self,
        outbox: Outbox,
        metrics: Metrics,
        audio: AudioStore,
        cells: Cells,
        tasks: Tasks,
    ) -> None:
        self.hub_id = outbox.hub_id
        self._outbox = outbox
        self._metrics = metrics
        self._audio = audio
        self._cells = cells
        self._tasks = tasks
        outbox.on_dispatch = self.send_job

    def route(self, events: Iterable[Event]) -> None:
        """Act on each event, in order."""
        out = self._outbox
        for event in events:
            if type(event) is Dispatch:
                self.dispatch(event)
            elif type(event) is JobEnded:
                self.ended(event)
            elif type(event) is CancelAttempt:
                out.send_node(
                    event.node_hub,
                    event.node_id,
                    proto.encode_cancel(JobId(event.job_id), event.attempt, event.reason),
                    untrack=event.job_id,
                )
            elif type(event) is NodeReplaced:
                out.close_node(event.hub, event.node_id, event.epoch, CloseCode.REPLACED)
            elif type(event) is NodeLost:
                # The sweep may have run here while the node's socket is elsewhere.
                out.close_node(event.hub, event.node_id, event.epoch, CloseCode.LOST)

    def dispatch(self, d: Dispatch) -> None:
        """Send a started attempt to its node, and ``accepted`` to its session."""
        self.send_job(d)
        self._outbox.send_session(
            d.session_hub,
            d.session_id,
            proto.encode_accepted(d.ref, JobId(d.job_id), NodeId(d.node_id), d.attempt),
            job_id=d.job_id,
            attempt=d.attempt,
        )
        self._metrics.dispatched.inc()

    def send_job(self, d: Dispatch) -> None:
        """Send the ``job`` frame of a started attempt to its node.

        The hub that keeps the job's audio sends it; another hub forwards the
        event there. A job without audio is sent from here.
        """
        audio = None
        if d.audio_hub:
            if d.audio_hub != self.hub_id:
                self._outbox.forward_dispatch(d.audio_hub, d)
                return
            audio = self._audio.get(d.job_id)
            if audio is None:
                # Kept no longer (expired, or this hub restarted under its id).
                self._tasks.spawn(self._audio_lost(d))
                return
        frame = proto.encode_job(
            JobId(d.job_id),
            d.attempt,
            SessionId(d.session_id),
            d.src_lang,
            d.tgt_lang,
            d.payload,
            d.deadline_ms,
            audio,
        )
        self._outbox.send_node(
            d.node_hub,
            d.node_id,
            frame,
            route=(d.job_id, Route(d.attempt, d.session_id, d.session_hub, d.ref)),
        )

    def ended(self, e: JobEnded) -> None:
        """Send a job's outcome to its session."""
        self._audio.drop(e.job_id)
        frame = proto.encode_result(e.ref, JobId(e.job_id), e.status, e.result, e.error)
        self._outbox.send_session(e.session_hub, e.session_id, frame, ended=e.job_id)
        self._metrics.job_ended(e.status, e.error or "")

    async def _audio_lost(self, d: Dispatch) -> None:
        """End a job whose attempt cannot be sent: its audio is gone (``AUDIO_LOST``)."""
        logger.warning("! job %s started but its audio is not kept here", d.job_id)
        try:
            scheduler = self._cells.for_job(d.job_id)
            if scheduler is None:
                return
            done = await scheduler.cancel_task(d.job_id, d.session_id, reason=Code.AUDIO_LOST)
        except (SchedulingError, RedisUnavailable):
            return  # ended meanwhile, or its deadline ends it (the sweep)
        self.ended(done.ended)
        self.route(done.events)
