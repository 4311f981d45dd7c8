"""The one consumer of scheduling events.

Every script reply carries the events its transition caused (a job started
on a node, a job ended, an attempt cancelled, a node replaced or lost). The
router turns each into frames or closes, for connections here or on other
hubs (:class:`~hub.outbox.Outbox`). Whichever hub ran the script routes its
events, so a job started by another hub's ``complete_task`` reaches its node
and its session the same way as one started by a submit here.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import protocol as proto
from .events import CancelAttempt, Dispatch, Event, JobEnded, NodeLost, NodeReplaced
from .metrics import Metrics
from .outbox import Outbox
from .protocol import CloseCode, JobId, NodeId, SessionId
from .registry import Route

__all__ = ["Router"]


class Router:
    """Acts on scheduling events.

    Args:
        outbox: where frames and closes go.
        metrics: counts dispatched and ended jobs.
    """

    def __init__(self, outbox: Outbox, metrics: Metrics) -> None:
        self._outbox = outbox
        self._metrics = metrics

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
        frame = proto.encode_job(
            JobId(d.job_id),
            d.attempt,
            SessionId(d.session_id),
            d.src_lang,
            d.tgt_lang,
            d.payload,
            d.deadline_ms,
            d.audio,
        )
        self._outbox.send_node(
            d.node_hub,
            d.node_id,
            frame,
            route=(d.job_id, Route(d.attempt, d.session_id, d.session_hub, d.ref)),
        )
        self._outbox.send_session(
            d.session_hub,
            d.session_id,
            proto.encode_accepted(d.ref, JobId(d.job_id), NodeId(d.node_id), d.attempt),
            job_id=d.job_id,
        )
        self._metrics.dispatched.inc()

    def ended(self, e: JobEnded) -> None:
        """Send a job's outcome to its session."""
        frame = proto.encode_result(e.ref, JobId(e.job_id), e.status, e.result, e.error)
        self._outbox.send_session(e.session_hub, e.session_id, frame, ended=e.job_id)
        self._metrics.job_ended(e.status, e.error or "")
