"""The protocol's vocabulary: ids, endpoints, close codes, limits and frames.

Every frame of protocol.md is a frozen dataclass here, in both directions:
what nodes and sessions send the hub (which :mod:`hub.protocol.parse`
validates into them) and what the hub sends them (which
:mod:`hub.protocol.decode` reads into them). Binary frames are split and
joined here too (protocol.md §2).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any, Final, Literal, NewType, TypeAlias

import orjson

from hub.errors import ProtocolError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hub.config import Settings

__all__ = [
    "DEFAULT_POOL",
    "NODE_PATH",
    "SESSION_PATH",
    "Accepted",
    "Ack",
    "CancelJob",
    "CloseCode",
    "Drain",
    "ErrorReply",
    "JobId",
    "JobStatus",
    "Limits",
    "Load",
    "NodeCancel",
    "NodeFrame",
    "NodeId",
    "NodeJob",
    "NodePartial",
    "NodeResult",
    "Queued",
    "Register",
    "Registered",
    "SessionFrame",
    "SessionId",
    "SessionPartial",
    "SessionResult",
    "SubmitJob",
    "ToNodeFrame",
    "ToSessionFrame",
    "Welcome",
    "join_binary",
    "load_object",
    "split_binary",
    "unknown_type",
]

NodeId = NewType("NodeId", str)
SessionId = NewType("SessionId", str)
JobId = NewType("JobId", str)

JobStatus: TypeAlias = Literal["finished", "failed"]

NODE_PATH: Final = "/v1/node"
"""WebSocket endpoint of nodes (protocol.md §1)."""
SESSION_PATH: Final = "/v1/session"
"""WebSocket endpoint of sessions (protocol.md §1)."""
DEFAULT_POOL: Final = "default"
"""Pool of a node whose ``register`` names none."""


class CloseCode(enum.IntEnum):
    """WebSocket close codes the hub uses (protocol.md §7)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    REGISTER_TIMEOUT = 4001
    REPLACED = 4002
    DRAINED = 4003
    LOST = 4004
    TOO_SLOW = 4005
    IDLE_TIMEOUT = 4006
    BAD_RESUME_TOKEN = 4007
    UNKNOWN_CELL = 4008


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Validation limits of incoming frames (protocol.md §5).

    Raises:
        ValueError: if a limit is smaller than 1.
    """

    max_payload_bytes: int = 65536
    """Largest encoded ``payload`` of a session's job."""
    max_audio_bytes: int = 1048576
    """Largest audio part of a binary job frame."""
    max_result_bytes: int = 262144
    """Largest encoded ``result`` of a node's ``result`` or ``partial``."""
    max_id_length: int = 64
    """Longest id (node, pool, service, job, session) and ``ref``."""
    max_jobs_per_node: int = 256
    """Largest ``max_jobs`` of a node, and longest ``resume`` list."""
    max_timeout_ms: int = 600000
    """Largest ``timeout_ms`` of a job; larger values are lowered to it."""
    max_languages: int = 32
    """Most entries of ``languages`` (``lang_pairs`` may have its square)."""
    max_pools: int = 8
    """Most entries of ``pools``."""
    max_services: int = 8
    """Most entries of ``services``."""
    max_error_length: int = 256
    """Longest ``error`` of a failed result; longer ones are truncated."""
    max_ack_ids: int = 256
    """Most entries of an ``ack``."""
    max_load_bytes: int = 4096
    """Largest encoded ``load`` object of a node."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """Take the limits that :class:`~hub.config.Settings` configures."""
        return cls(
            max_payload_bytes=settings.max_payload_bytes,
            max_audio_bytes=settings.max_audio_bytes,
            max_result_bytes=settings.max_result_bytes,
            max_id_length=settings.max_id_length,
            max_jobs_per_node=settings.max_jobs_per_node,
            max_timeout_ms=settings.max_job_timeout_ms,
        )


# Incoming frames: node to hub (protocol.md §3)


@dataclasses.dataclass(frozen=True, slots=True)
class Register:
    """A node's first frame: who it is and what it serves."""

    node_id: NodeId
    """The node's id, bound to the connection from now on."""
    services: tuple[str, ...]
    """Services it runs (``asr``, ``nmt``, ``tts``…), without duplicates."""
    lang_pairs: tuple[tuple[str, str], ...]
    """Ordered ``(src, tgt)`` pairs it serves, lowercased, without duplicates."""
    max_jobs: int
    """Jobs it runs at once."""
    pools: tuple[str, ...] = (DEFAULT_POOL,)
    """Operator pools it joins."""
    resume: tuple[JobId, ...] = ()
    """Jobs it is still running from a previous connection and wants to keep."""
    cell: str | None = None
    """The cell it joins, one its hub serves; ``None``: its token's, else the hub's."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeResult:
    """A node's final answer for one attempt of a job."""

    job_id: JobId
    attempt: int
    status: JobStatus
    result: bytes
    """Encoded JSON object, or ``b"null"`` when the node sent none."""
    error: str | None
    """The node's message when ``failed``, at most ``max_error_length`` chars."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodePartial:
    """An intermediate result of a running job."""

    job_id: JobId
    attempt: int
    result: bytes
    """Encoded JSON object."""


@dataclasses.dataclass(frozen=True, slots=True)
class Load:
    """A node's self-reported load, stored for status and dispatch."""

    load: bytes
    """Encoded JSON object."""


@dataclasses.dataclass(frozen=True, slots=True)
class Drain:
    """The node takes no new jobs and leaves when its jobs are done."""


# Incoming frames: session to hub (protocol.md §4)


@dataclasses.dataclass(frozen=True, slots=True)
class SubmitJob:
    """A session's job."""

    ref: str
    """The session's name for the job, unique among its unfinished jobs."""
    src_lang: str
    """Source language code, lowercased."""
    tgt_lang: str
    """Target language code, lowercased."""
    payload: bytes
    """Encoded JSON object (``b"{}"`` when the frame had none)."""
    audio: bytes | None = None
    """Audio bytes of a binary frame; ``None`` for a text frame."""
    timeout_ms: int | None = None
    """Time budget asked for, at most ``max_timeout_ms``; ``None`` for the default."""


@dataclasses.dataclass(frozen=True, slots=True)
class CancelJob:
    """The session gives up on an unfinished job."""

    ref: str


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """The session received the results of these jobs (protocol.md §8)."""

    job_ids: tuple[JobId, ...]


NodeFrame: TypeAlias = Register | NodeResult | NodePartial | Load | Drain
SessionFrame: TypeAlias = SubmitJob | CancelJob | Ack

# Outgoing frames: hub to node (protocol.md §3)


@dataclasses.dataclass(frozen=True, slots=True)
class Registered:
    """The hub's answer to ``register``."""

    node_id: str
    hub_id: str
    heartbeat_interval_ms: int
    resumed: tuple[str, ...]
    """Jobs of ``resume`` the node keeps."""
    dropped: tuple[str, ...]
    """Jobs of ``resume`` that are no longer the node's: it stops them."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeJob:
    """One attempt of a job, sent to the node that runs it."""

    job_id: str
    attempt: int
    session_id: str
    src_lang: str
    tgt_lang: str
    payload: dict[str, Any]
    """The session's payload object."""
    deadline_ms: int
    """When the hub gives up on the job, in Unix milliseconds of the fleet's clock."""
    audio: bytes | None = None
    """Audio of a binary frame; ``None`` for a text frame."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeCancel:
    """An order to stop one attempt of a job."""

    job_id: str
    attempt: int
    reason: str
    """An error code such as ``CANCELLED`` or ``JOB_TIMEOUT``."""


# Outgoing frames: hub to session (protocol.md §4)


@dataclasses.dataclass(frozen=True, slots=True)
class Welcome:
    """The first frame a session gets."""

    session_id: str
    hub_id: str
    resume_token: str


@dataclasses.dataclass(frozen=True, slots=True)
class Accepted:
    """A session's job runs (again) on a node."""

    ref: str
    job_id: str
    node_id: str
    attempt: int


@dataclasses.dataclass(frozen=True, slots=True)
class Queued:
    """A session's job waits for a free slot."""

    ref: str
    job_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class SessionPartial:
    """An intermediate result of a session's job."""

    ref: str
    job_id: str
    result: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class SessionResult:
    """The end of a session's job."""

    ref: str
    job_id: str
    status: JobStatus
    result: dict[str, Any] | None
    error: str | None
    """``None`` when finished; an error code or the node's message when failed."""


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorReply:
    """An ``error`` frame, to a node or a session (protocol.md §6)."""

    ref: str | None
    """The session's ``ref``, or the node's ``job_id``, concerned; ``None`` if none."""
    code: str
    """A :class:`~hub.errors.Code`, or a code of a later protocol version."""
    message: str
    retry_after_ms: int | None = None
    """When the job may be submitted again (``OVERLOADED``); ``None`` if not said."""


ToNodeFrame: TypeAlias = Registered | NodeJob | NodeCancel | ErrorReply
ToSessionFrame: TypeAlias = (
    Welcome | Accepted | Queued | SessionPartial | SessionResult | ErrorReply
)


# Binary frames (protocol.md §2)

_HEADER_LENGTH_BYTES: Final = 4
_SHORT_BINARY: Final = "binary frame shorter than its 4-byte header length"
_HEADER_PAST_END: Final = "binary header length past end of frame"


def split_binary(message: bytes) -> tuple[bytes, bytes]:
    """Split a binary frame into its JSON header and its audio (protocol.md §2).

    Raises:
        ProtocolError: ``BAD_FRAME`` if the header length doesn't fit the frame.
    """
    if len(message) < _HEADER_LENGTH_BYTES:
        raise ProtocolError(_SHORT_BINARY)
    end = _HEADER_LENGTH_BYTES + int.from_bytes(message[:_HEADER_LENGTH_BYTES], "big")
    if end > len(message):
        raise ProtocolError(_HEADER_PAST_END)
    return message[_HEADER_LENGTH_BYTES:end], message[end:]


def join_binary(header: bytes, audio: bytes) -> bytes:
    """Build a binary frame from an encoded JSON header and audio bytes."""
    return b"".join((len(header).to_bytes(_HEADER_LENGTH_BYTES, "big"), header, audio))


def load_object(data: str | bytes) -> dict[str, Any]:
    """Decode the JSON object of a text frame or of a binary frame's header.

    Raises:
        ProtocolError: ``BAD_FRAME`` if it is not JSON, or not an object.
    """
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("frame is not valid JSON") from exc
    if type(frame) is not dict:
        raise ProtocolError("frame must be a JSON object")
    return frame


def unknown_type(kind: str) -> str:
    """The message refusing a frame of an unknown ``type``."""
    return f"unknown frame type {kind[:32]!r}"
