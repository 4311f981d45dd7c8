"""What the SDKs hand to the code that uses them: jobs to run, results and partials.

A node's handler gets a :class:`Job`; a session's ``submit`` returns a
:class:`JobResult`, and ``stream`` yields :class:`Partial` frames first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, TypeAlias

from ..protocol import NodeJob

__all__ = ["Handler", "Job", "JobResult", "Partial", "PartialCallback", "StreamEvent"]


@dataclasses.dataclass(frozen=True, slots=True)
class Job(NodeJob):
    """One attempt of a job, as the hub sent it (protocol.md §3.3).

    Its fields are those of :class:`~hub.protocol.NodeJob`: ``job_id``,
    ``attempt`` (from 1; a job lost with its node comes back with a higher
    one), ``session_id``, ``src_lang`` and ``tgt_lang`` (lowercased),
    ``payload`` (the session's object), ``deadline_ms`` (when the hub gives
    up on the job, in Unix milliseconds of the fleet's clock) and ``audio``
    (the session's audio byte for byte, or ``None`` for a text-only job).
    """

    _send_partial: Callable[[Job, Mapping[str, Any]], Awaitable[None]] = dataclasses.field(
        repr=False, compare=False, kw_only=True
    )
    """How the node that runs the job sends its partials."""

    async def partial(self, result: Mapping[str, Any]) -> None:
        """Send an intermediate result to the session (protocol.md §3.6).

        Partials are best effort: one sent while the node is disconnected,
        or after the job was cancelled, is dropped.

        Raises:
            TypeError: if ``result`` cannot be encoded as a JSON object.
        """
        await self._send_partial(self, result)


Handler: TypeAlias = Callable[[Job], Awaitable[Mapping[str, Any] | None]]
"""An async function that runs one job and returns its result object (or ``None``)."""


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
    ``CANCELLED``, ``JOB_LOST``…) or the node's own message when failed.
    ``JOB_LOST`` and ``AUDIO_LOST``: the hub lost the job (Redis came back
    without it, or the audio is gone); it may have run or not, and may be
    submitted again (protocol.md §8)."""
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
