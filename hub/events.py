"""What the scheduling scripts return: events for the hubs, and typed replies.

A script that changes a job or a node returns events: what some hub must
send or close because of the change (:data:`Event`). Lua builds each kind in
one place (``lua/includes/events.lua``) as an array; :func:`parse_event`
turns one into its dataclass here. The other classes are the replies of the
:class:`~hub.scheduler.Scheduler` methods.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeAlias

from .errors import ScriptError, error_for_code

__all__ = [
    "Accepted",
    "Beat",
    "CancelAttempt",
    "Cancellation",
    "Completion",
    "Dispatch",
    "Event",
    "Heartbeats",
    "JobEnded",
    "NodeLost",
    "NodeReplaced",
    "PartialRoute",
    "Queued",
    "Registration",
    "SweepReport",
    "as_text",
    "parse_ended",
    "parse_event",
    "parse_events",
    "raise_refusal",
]


# Events


@dataclasses.dataclass(frozen=True, slots=True)
class Dispatch:
    """A job attempt started on a node: its hub sends the job, the session's hub ``accepted``."""

    node_hub: str
    node_id: str
    job_id: str
    attempt: int
    session_id: str
    src_lang: str
    tgt_lang: str
    deadline_ms: int
    payload: bytes
    audio_hub: str
    """The hub that keeps the job's audio and sends the job frame; empty: no audio."""
    session_hub: str
    ref: str


@dataclasses.dataclass(frozen=True, slots=True)
class JobEnded:
    """A job reached its terminal state: the session's hub sends ``result``."""

    session_hub: str
    session_id: str
    job_id: str
    ref: str
    status: Literal["finished", "failed"]
    result: bytes
    error: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class CancelAttempt:
    """A node must stop an attempt: its hub sends ``cancel``."""

    node_hub: str
    node_id: str
    job_id: str
    attempt: int
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class NodeReplaced:
    """A node id registered on a newer connection: the old one must close."""

    hub: str
    node_id: str
    epoch: int


@dataclasses.dataclass(frozen=True, slots=True)
class NodeLost:
    """A node was taken out (lease expired, socket closed): its connection must close."""

    hub: str
    node_id: str
    epoch: int


Event: TypeAlias = Dispatch | JobEnded | CancelAttempt | NodeReplaced | NodeLost


# Replies


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    """dispatch_task took a slot on ``node_id``."""

    job_id: str
    node_id: str
    attempt: int
    node_hub: str
    deadline_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Queued:
    """dispatch_task queued the job in the queue of its language pair until a slot frees."""

    job_id: str
    queue: str
    """The language pair whose queue the job waits in, ``src:tgt``."""
    deadline_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class Registration:
    """register_node's reply."""

    epoch: int
    resumed: tuple[str, ...]
    dropped: tuple[str, ...]
    events: tuple[Event, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """complete_task's reply."""

    ended: JobEnded
    drained: bool
    events: tuple[Event, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Cancellation:
    """cancel_task's reply."""

    ended: JobEnded
    events: tuple[Event, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class SweepReport:
    """sweep's reply; ``ran`` is False when another hub held the sweep lease."""

    ran: bool
    timed_out: int
    queue_expired: int
    nodes_lost: int
    events: tuple[Event, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PartialRoute:
    """route_partial's reply: where a node's partial result for a job goes."""

    session_id: str
    session_hub: str
    """The hub holding the session's socket now (else the one it had at dispatch)."""
    ref: str


@dataclasses.dataclass(frozen=True, slots=True)
class Beat:
    """One node's heartbeat, for :meth:`~hub.scheduler.Scheduler.heartbeat`."""

    node_id: str
    epoch: int
    online: bool = True
    load: bytes | None = None
    rtt_ms: float | None = None


class Heartbeats(list[int]):
    """heartbeat's reply: one code per beat, plus ``events`` (jobs started on
    nodes that came back online)."""

    def __init__(self, codes: Iterable[int], events: tuple[Event, ...]) -> None:
        super().__init__(codes)
        self.events = events


# Parsing script replies


def as_text(value: Any) -> str:
    """A reply element as text: bytes decoded (UTF-8), anything else through ``str``."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def parse_event(raw: Sequence[Any], script: str) -> Event:
    """One event array of a script's reply as its dataclass.

    Args:
        raw: the array: its kind first, then the fields in declaration order.
        script: the script's name, for the error.

    Raises:
        ScriptError: an unknown kind, or a malformed ``result``.
    """
    kind = as_text(raw[0])
    if kind == "dispatch":
        return Dispatch(
            node_hub=as_text(raw[1]),
            node_id=as_text(raw[2]),
            job_id=as_text(raw[3]),
            attempt=int(raw[4]),
            session_id=as_text(raw[5]),
            src_lang=as_text(raw[6]),
            tgt_lang=as_text(raw[7]),
            deadline_ms=int(raw[8]),
            payload=bytes(raw[9]),
            audio_hub=as_text(raw[10]),
            session_hub=as_text(raw[11]),
            ref=as_text(raw[12]),
        )
    if kind == "result":
        return parse_ended(raw, script)
    if kind == "cancel":
        return CancelAttempt(
            as_text(raw[1]), as_text(raw[2]), as_text(raw[3]), int(raw[4]), as_text(raw[5])
        )
    if kind == "replaced":
        return NodeReplaced(as_text(raw[1]), as_text(raw[2]), int(raw[3]))
    if kind == "lost":
        return NodeLost(as_text(raw[1]), as_text(raw[2]), int(raw[3]))
    raise ScriptError(script, raw)


def parse_ended(raw: Sequence[Any], script: str) -> JobEnded:
    """A ``result`` event array as :class:`JobEnded`.

    Args:
        raw: the array, ``'result'`` first.
        script: the script's name, for the error.

    Raises:
        ScriptError: not a ``result``, or a status other than finished or failed.
    """
    if as_text(raw[0]) != "result":
        raise ScriptError(script, raw)
    status = as_text(raw[5])
    if status not in ("finished", "failed"):
        raise ScriptError(script, raw)
    error = as_text(raw[7])
    return JobEnded(
        session_hub=as_text(raw[1]),
        session_id=as_text(raw[2]),
        job_id=as_text(raw[3]),
        ref=as_text(raw[4]),
        status="finished" if status == "finished" else "failed",
        result=bytes(raw[6]),
        error=error or None,
    )


def parse_events(raw: Sequence[Any], script: str) -> tuple[Event, ...]:
    """Every event array of a script's reply, in order (see :func:`parse_event`).

    Raises:
        ScriptError: one of them cannot be read.
    """
    return tuple(parse_event(e, script) for e in raw)


def raise_refusal(reply: Any, *, ref: str | None = None) -> None:
    """Raise the refusal a script replied with, if it did (a negative code).

    Args:
        reply: the script's reply.
        ref: the client's ref of the job, for the error.

    Raises:
        SchedulingError: the reply is a refusal code (see :class:`~hub.errors.ErrorCode`).
    """
    if isinstance(reply, int):
        raise error_for_code(reply, ref=ref)
