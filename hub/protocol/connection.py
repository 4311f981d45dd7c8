"""Per-connection state machines: order rules and session limits (protocol.md §9).

The server feeds each message it received, and the current time when a rule
needs one, to a :class:`NodeConnection` or a :class:`SessionConnection`, and
acts on the frame it returns.
"""

from __future__ import annotations

import enum

from hub.errors import Code, LimitExceeded, ProtocolError

from .frames import (
    CancelJob,
    Drain,
    JobId,
    Limits,
    NodeFrame,
    NodeId,
    Register,
    SessionFrame,
    SubmitJob,
)
from .parse import parse_node_frame, parse_session_frame

__all__ = ["NodeConnection", "NodeState", "SessionConnection", "SessionState"]


class NodeState(enum.Enum):
    """State of a node connection."""

    CONNECTING = enum.auto()
    """Waiting for ``register`` and for Redis to accept it."""
    OPEN = enum.auto()
    """Registered: takes jobs."""
    DRAINING = enum.auto()
    """Sent ``drain``: finishes its jobs, takes no new ones."""
    CLOSED = enum.auto()
    """The connection is gone."""


class NodeConnection:
    """Order rules of one node connection (protocol.md §9.1).

    Feed each message to :meth:`receive` and act on the frame it returns.
    Call :meth:`registered` once Redis accepted the registration and
    :meth:`close` when the socket closes.

    Args:
        limits: validation limits of incoming frames.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        """Validation limits of incoming frames."""
        self.state = NodeState.CONNECTING
        """Where the connection is; compare with ``is``."""
        self.node_id: NodeId | None = None
        """The node's id, once :meth:`registered` was called."""
        self._register_received = False

    # Public methods

    def receive(self, message: str | bytes) -> NodeFrame:
        """Parse a message from the node and check that it comes in order.

        A :class:`Register` moves nothing: call :meth:`registered` after
        Redis accepted it, or close the connection. A :class:`Drain` moves
        ``OPEN`` to ``DRAINING``.

        Raises:
            ProtocolError: ``BAD_FRAME``, ``UNKNOWN_TYPE`` or ``TOO_LARGE``
                for a bad frame, ``NOT_REGISTERED`` for any other frame
                before registration, ``ALREADY_REGISTERED`` for a second
                ``register``, and ``BAD_FRAME`` after :meth:`close`. The
                connection stays usable after each of these.
        """
        if self.state is NodeState.CLOSED:
            raise ProtocolError("the connection is closed")
        frame = parse_node_frame(message, self.limits)
        if type(frame) is Register:
            if self._register_received:
                raise ProtocolError("the node is already registered", code=Code.ALREADY_REGISTERED)
            self._register_received = True
        elif self.state is NodeState.CONNECTING:
            raise ProtocolError("send register first", code=Code.NOT_REGISTERED)
        elif type(frame) is Drain:
            self.state = NodeState.DRAINING
        return frame

    def registered(self, node_id: NodeId) -> None:
        """Record that Redis accepted the node's registration: ``CONNECTING`` -> ``OPEN``.

        Raises:
            RuntimeError: unless a ``register`` was received and the
                connection is ``CONNECTING``.
        """
        if self.state is not NodeState.CONNECTING or not self._register_received:
            raise RuntimeError(f"registered() called in state {self.state.name}")
        self.node_id = node_id
        self.state = NodeState.OPEN

    def close(self) -> None:
        """Record that the connection is gone; later messages are refused."""
        self.state = NodeState.CLOSED


class SessionState(enum.Enum):
    """State of a session connection."""

    OPEN = enum.auto()
    """Welcomed: sends jobs."""
    CLOSED = enum.auto()
    """The connection is gone."""


class SessionConnection:
    """Order rules and limits of one session connection (protocol.md §9.2).

    Tracks the session's unfinished jobs by ``ref``: a ref is *open* from
    the :class:`SubmitJob` that :meth:`receive` returns until
    :meth:`job_refused` or :meth:`job_ended`. In between, :meth:`job_started`
    binds it to the hub's job id.

    Args:
        limits: validation limits of incoming frames.
        max_inflight: most open refs.
        rate_per_s: sustained jobs per second (token bucket); ``None`` is
            unlimited.
        burst: size of the token bucket, which starts full.

    Raises:
        ValueError: if ``max_inflight`` or ``burst`` is smaller than 1, or
            ``rate_per_s`` is not positive.
    """

    def __init__(
        self,
        limits: Limits,
        *,
        max_inflight: int,
        rate_per_s: float | None,
        burst: int,
    ) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        if rate_per_s is not None and not rate_per_s > 0:
            raise ValueError("rate_per_s must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.limits = limits
        """Validation limits of incoming frames."""
        self.max_inflight = max_inflight
        """Most unfinished jobs."""
        self.rate_per_s = rate_per_s
        """Sustained jobs per second; ``None`` is unlimited."""
        self.burst = burst
        """Size of the token bucket."""
        self.state = SessionState.OPEN
        """Where the connection is; compare with ``is``."""
        self._tokens = float(burst)
        self._tokens_at: float | None = None
        # ref -> job id, None while the job is pending (not accepted or queued yet).
        self._job_by_ref: dict[str, JobId | None] = {}
        self._ref_by_job: dict[JobId, str] = {}

    # Public methods

    def receive(self, message: str | bytes, now: float) -> SessionFrame:
        """Parse a message from the session and apply the session's limits.

        After a :class:`SubmitJob` is returned, its ref is open and pending:
        call :meth:`job_started` once the job is accepted or queued, or
        :meth:`job_refused` when it was refused.

        Args:
            message: a text frame as :class:`str`, a binary frame as :class:`bytes`.
            now: the current time in seconds, from a monotonic clock.

        Raises:
            ProtocolError: ``BAD_FRAME``, ``UNKNOWN_TYPE`` or ``TOO_LARGE`` for
                a bad frame; ``DUPLICATE_REF`` for a job whose ref is open;
                ``UNKNOWN_JOB`` for a cancel whose ref is not open;
                ``BAD_FRAME`` after :meth:`close`.
            LimitExceeded: ``RATE_LIMITED`` or ``TOO_MANY_JOBS``.
        """
        if self.state is SessionState.CLOSED:
            raise ProtocolError("the connection is closed")
        frame = parse_session_frame(message, self.limits)
        if type(frame) is SubmitJob:
            self.admit(frame, now)
        elif type(frame) is CancelJob and frame.ref not in self._job_by_ref:
            raise ProtocolError(
                "no unfinished job has this ref", code=Code.UNKNOWN_JOB, ref=frame.ref
            )
        return frame

    def admit(self, job: SubmitJob, now: float) -> None:
        """Apply the session's limits to a job parsed elsewhere, and open its ref.

        :meth:`receive` calls it for every job frame; the HTTP job API
        (protocol.md §11) calls it for a job parsed from a request body. The
        caller goes on as after :meth:`receive`.

        Raises:
            ProtocolError: ``DUPLICATE_REF``.
            LimitExceeded: ``RATE_LIMITED`` or ``TOO_MANY_JOBS``.
        """
        ref = job.ref
        # protocol.md §9.2: rate, then duplicate, then in-flight count.
        self._take_token(now, ref)
        if ref in self._job_by_ref:
            raise ProtocolError(
                "'ref' is already used by an unfinished job", code=Code.DUPLICATE_REF, ref=ref
            )
        if len(self._job_by_ref) >= self.max_inflight:
            raise LimitExceeded(
                f"more than {self.max_inflight} unfinished jobs",
                code=Code.TOO_MANY_JOBS,
                ref=ref,
            )
        self._job_by_ref[ref] = None

    def job_started(self, ref: str, job_id: JobId) -> bool:
        """Bind a pending ref to the job id the hub gave it (accepted or queued).

        Returns:
            ``False``, changing nothing, when ``ref`` is not pending (it was
            refused or ended meanwhile).
        """
        if ref not in self._job_by_ref or self._job_by_ref[ref] is not None:
            return False
        self._job_by_ref[ref] = job_id
        self._ref_by_job[job_id] = ref
        return True

    def reopen(self, ref: str, job_id: JobId) -> bool:
        """Re-open a job the session had before it resumed (protocol.md §8).

        Returns:
            ``False``, changing nothing, when the ref is already open or the
            session is at ``max_inflight``.
        """
        if ref in self._job_by_ref or len(self._job_by_ref) >= self.max_inflight:
            return False
        self._job_by_ref[ref] = job_id
        self._ref_by_job[job_id] = ref
        return True

    def job_refused(self, ref: str) -> None:
        """Forget an open ref whose job was refused (after an error frame)."""
        job_id = self._job_by_ref.pop(ref, None)
        if job_id is not None:
            del self._ref_by_job[job_id]

    def job_ended(self, job_id: JobId) -> str | None:
        """Forget a job that ended (result sent, or cancelled).

        Returns:
            The job's ref, or ``None`` when the job is not one of this
            session's open jobs.
        """
        ref = self._ref_by_job.pop(job_id, None)
        if ref is not None:
            del self._job_by_ref[ref]
        return ref

    def ref_for(self, job_id: JobId) -> str | None:
        """The ref of an open job, or ``None``."""
        return self._ref_by_job.get(job_id)

    def open_jobs(self) -> list[tuple[JobId, str]]:
        """The unfinished jobs the hub has an id for, as (job id, ref) pairs."""
        return list(self._ref_by_job.items())

    def job_for(self, ref: str) -> JobId | None:
        """The job id of an open ref, or ``None`` when unknown or still pending."""
        return self._job_by_ref.get(ref)

    @property
    def open_refs(self) -> int:
        """How many refs are open (pending or started)."""
        return len(self._job_by_ref)

    def close(self) -> None:
        """Record that the connection is gone; later messages are refused."""
        self.state = SessionState.CLOSED

    # Private methods

    def _take_token(self, now: float, ref: str) -> None:
        rate_per_s = self.rate_per_s
        if rate_per_s is None:
            return
        if self._tokens_at is not None and now > self._tokens_at:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._tokens_at) * rate_per_s
            )
        # A clock that goes back refills nothing, but counts from the new time.
        self._tokens_at = now
        if self._tokens < 1.0:
            raise LimitExceeded("too many jobs per second", code=Code.RATE_LIMITED, ref=ref)
        self._tokens -= 1.0
