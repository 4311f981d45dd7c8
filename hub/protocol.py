"""Wire protocol v1: frames, parsing, encoding and per-connection state.

This module is Sans-I/O, like websockets' ``protocol.py``: it reads no
socket, no Redis and no clock. The server feeds it each WebSocket message it
received and the current time when a rule needs one, and sends what the
encoders return. protocol.md is the normative description; comments cite it
as ``protocol.md §N``.

Incoming messages are decoded once with orjson, validated once, and turned
into frozen dataclasses, or rejected with :class:`~hub.errors.ProtocolError`
(or :class:`~hub.errors.LimitExceeded` for the session's limits). JSON
objects that the hub only carries (a job's ``payload``, a node's ``result``
or ``load``) are kept as compact encoded bytes, and the encoders splice
those bytes into outgoing frames untouched, so they are never decoded again.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal, NewType, TypeAlias, cast

import orjson

from hub.errors import Code, LimitExceeded, ProtocolError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from hub.config import Settings

__all__ = [
    "DEFAULT_POOL",
    "NODE_PATH",
    "SESSION_PATH",
    "Ack",
    "CancelJob",
    "CloseCode",
    "Drain",
    "JobId",
    "JobStatus",
    "Limits",
    "Load",
    "NodeConnection",
    "NodeFrame",
    "NodeId",
    "NodePartial",
    "NodeResult",
    "NodeState",
    "Register",
    "SessionConnection",
    "SessionFrame",
    "SessionId",
    "SessionState",
    "SubmitJob",
    "encode_accepted",
    "encode_cancel",
    "encode_error",
    "encode_job",
    "encode_partial",
    "encode_queued",
    "encode_registered",
    "encode_result",
    "encode_welcome",
    "join_binary",
    "parse_node_frame",
    "parse_session_frame",
    "split_binary",
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


# Parsing (protocol.md §2, §5)

_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]+")
_LANG_RE: Final = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8}){0,3}")
_MAX_LANG_LENGTH: Final = 24
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HEADER_LENGTH_BYTES: Final = 4
_DRAIN: Final = Drain()

# Errors that do not depend on the limits.
_NOT_JSON: Final = "frame is not valid JSON"
_NOT_OBJECT: Final = "frame must be a JSON object"
_NO_TYPE: Final = "'type' must be a string"
_BINARY_NOT_JOB: Final = "binary frames carry only session jobs"
_SHORT_BINARY: Final = "binary frame shorter than its 4-byte header length"
_HEADER_PAST_END: Final = "binary header length past end of frame"
_NO_AUDIO: Final = "binary job frame has no audio"


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


def parse_node_frame(message: str | bytes, limits: Limits) -> NodeFrame:
    """Parse and validate one message from a node.

    Args:
        message: a text frame as :class:`str`, a binary frame as :class:`bytes`.
        limits: validation limits.

    Raises:
        ProtocolError: ``BAD_FRAME``, ``UNKNOWN_TYPE`` or ``TOO_LARGE``.
    """
    # protocol.md §2: nodes send text frames only.
    if not isinstance(message, str):
        raise ProtocolError(_BINARY_NOT_JOB)
    frame = _load(message)
    kind = frame.get("type")
    if type(kind) is not str:
        raise ProtocolError(_NO_TYPE)
    parse = _NODE_PARSERS.get(kind)
    if parse is None:
        raise ProtocolError(_unknown_type(kind), code=Code.UNKNOWN_TYPE)
    return parse(frame, limits)


def parse_session_frame(message: str | bytes, limits: Limits) -> SessionFrame:
    """Parse and validate one message from a session.

    Args:
        message: a text frame as :class:`str`, a binary frame as :class:`bytes`
            (a job whose audio follows its JSON header).
        limits: validation limits.

    Raises:
        ProtocolError: ``BAD_FRAME``, ``UNKNOWN_TYPE`` or ``TOO_LARGE``, with
            the frame's ``ref`` when it had a valid one.
    """
    audio: bytes | None = None
    if isinstance(message, str):
        frame = _load(message)
    else:
        header, audio = split_binary(message)
        frame = _load(header)
    ref = frame.get("ref")
    if not _is_ref(ref, limits):
        ref = None
    kind = frame.get("type")
    if type(kind) is not str:
        raise ProtocolError(_NO_TYPE, ref=ref)
    if kind == "job":
        return _parse_submit_job(frame, audio, ref, limits)
    if audio is not None:
        raise ProtocolError(_BINARY_NOT_JOB, ref=ref)
    if kind == "cancel":
        if ref is None:
            raise ProtocolError(_bad_ref(limits))
        return CancelJob(ref)
    if kind == "ack":
        return Ack(_job_ids(frame.get("job_ids"), "job_ids", 0, limits.max_ack_ids, limits))
    raise ProtocolError(_unknown_type(kind), code=Code.UNKNOWN_TYPE, ref=ref)


def _load(data: str | bytes) -> dict[str, Any]:
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(_NOT_JSON) from exc
    if type(frame) is not dict:
        raise ProtocolError(_NOT_OBJECT)
    return frame


def _unknown_type(kind: str) -> str:
    return f"unknown frame type {kind[:32]!r}"


def _parse_register(frame: dict[str, Any], limits: Limits) -> Register:
    node_id = frame.get("node_id")
    if not _is_id(node_id, limits):
        raise ProtocolError(_bad_id("node_id", limits))
    services = _ids(frame.get("services"), "services", 1, limits.max_services, limits)
    languages = frame.get("languages")
    lang_pairs = frame.get("lang_pairs")
    # protocol.md §3.1: exactly one of languages and lang_pairs.
    if (languages is None) == (lang_pairs is None):
        raise ProtocolError("register needs exactly one of 'languages' and 'lang_pairs'")
    pairs = _lang_pairs(lang_pairs, limits) if languages is None else _all_pairs(languages, limits)
    max_jobs = frame.get("max_jobs")
    if type(max_jobs) is not int or not 1 <= max_jobs <= limits.max_jobs_per_node:
        raise ProtocolError(f"'max_jobs' must be an integer from 1 to {limits.max_jobs_per_node}")
    pools = frame.get("pools")
    resume = frame.get("resume")
    return Register(
        cast(NodeId, node_id),
        services,
        pairs,
        max_jobs,
        (DEFAULT_POOL,) if pools is None else _ids(pools, "pools", 1, limits.max_pools, limits),
        () if resume is None else _job_ids(resume, "resume", 0, limits.max_jobs_per_node, limits),
    )


def _all_pairs(languages: object, limits: Limits) -> tuple[tuple[str, str], ...]:
    # protocol.md §3.1: languages means every ordered pair of distinct languages.
    codes = _langs(languages, limits.max_languages)
    if codes is None or len(codes) < 2:
        raise ProtocolError(
            f"'languages' must list 2 to {limits.max_languages} distinct language codes"
        )
    return tuple((src, tgt) for src in codes for tgt in codes if src != tgt)


def _langs(value: object, max_items: int) -> tuple[str, ...] | None:
    if type(value) is not list or len(value) > max_items:
        return None
    codes: dict[str, None] = {}
    for item in value:
        code = _lang(item)
        if code is None:
            return None
        codes[code] = None
    return tuple(codes)


def _lang_pairs(value: object, limits: Limits) -> tuple[tuple[str, str], ...]:
    max_pairs = limits.max_languages * limits.max_languages
    if type(value) is list and 1 <= len(value) <= max_pairs:
        pairs: dict[tuple[str, str], None] = {}
        for item in value:
            if type(item) is not list or len(item) != 2:
                break
            src = _lang(item[0])
            tgt = _lang(item[1])
            if src is None or tgt is None:
                break
            pairs[src, tgt] = None
        else:
            return tuple(pairs)
    raise ProtocolError(
        f"'lang_pairs' must be a list of 1 to {max_pairs} [src, tgt] language code pairs"
    )


def _parse_node_result(frame: dict[str, Any], limits: Limits) -> NodeResult:
    job_id = _job_id(frame, limits)
    attempt = _attempt(frame)
    status = frame.get("status")
    if status != "finished" and status != "failed":
        raise ProtocolError("'status' must be 'finished' or 'failed'")
    result = frame.get("result")
    encoded = (
        b"null" if result is None else _encode_object(result, "result", limits.max_result_bytes)
    )
    error = frame.get("error")
    if error is not None and type(error) is not str:
        raise ProtocolError("'error' must be a string or null")
    # protocol.md §3.5: error only means something for failed; long ones are cut.
    if status == "finished":
        error = None
    elif error is not None:
        error = error[: limits.max_error_length]
    return NodeResult(job_id, attempt, cast(JobStatus, status), encoded, error)


def _parse_node_partial(frame: dict[str, Any], limits: Limits) -> NodePartial:
    job_id = _job_id(frame, limits)
    attempt = _attempt(frame)
    return NodePartial(
        job_id, attempt, _encode_object(frame.get("result"), "result", limits.max_result_bytes)
    )


def _parse_load(frame: dict[str, Any], limits: Limits) -> Load:
    return Load(_encode_object(frame.get("load"), "load", limits.max_load_bytes))


def _parse_drain(frame: dict[str, Any], limits: Limits) -> Drain:
    return _DRAIN


_NODE_PARSERS: Final[dict[str, Callable[[dict[str, Any], Limits], NodeFrame]]] = {
    "register": _parse_register,
    "result": _parse_node_result,
    "partial": _parse_node_partial,
    "load": _parse_load,
    "drain": _parse_drain,
}


def _parse_submit_job(
    frame: dict[str, Any], audio: bytes | None, ref: str | None, limits: Limits
) -> SubmitJob:
    if ref is None:
        raise ProtocolError(_bad_ref(limits))
    src_lang = _lang(frame.get("src_lang"))
    if src_lang is None:
        raise ProtocolError(_bad_lang("src_lang"), ref=ref)
    tgt_lang = _lang(frame.get("tgt_lang"))
    if tgt_lang is None:
        raise ProtocolError(_bad_lang("tgt_lang"), ref=ref)
    payload = frame.get("payload")
    encoded = (
        b"{}"
        if payload is None
        else _encode_object(payload, "payload", limits.max_payload_bytes, ref)
    )
    timeout_ms = frame.get("timeout_ms")
    if timeout_ms is not None:
        if type(timeout_ms) is not int or timeout_ms < 1:
            raise ProtocolError("'timeout_ms' must be a positive integer", ref=ref)
        # protocol.md §4.2: a larger budget is lowered to the limit, not refused.
        timeout_ms = min(timeout_ms, limits.max_timeout_ms)
    if audio is not None:
        if not audio:
            raise ProtocolError(_NO_AUDIO, ref=ref)
        if len(audio) > limits.max_audio_bytes:
            raise ProtocolError(
                f"audio is larger than {limits.max_audio_bytes} bytes", code=Code.TOO_LARGE, ref=ref
            )
    return SubmitJob(ref, src_lang, tgt_lang, encoded, audio, timeout_ms)


# Field validators


def _is_id(value: object, limits: Limits) -> bool:
    return (
        type(value) is str
        and len(value) <= limits.max_id_length
        and _ID_RE.fullmatch(value) is not None
    )


def _is_ref(value: object, limits: Limits) -> bool:
    return (
        type(value) is str
        and 0 < len(value) <= limits.max_id_length
        and _CONTROL_RE.search(value) is None
    )


def _lang(value: object) -> str | None:
    if type(value) is str and len(value) <= _MAX_LANG_LENGTH and _LANG_RE.fullmatch(value):
        # protocol.md §5: language codes are case-insensitive (BCP 47).
        return value.lower()
    return None


def _bad_id(field: str, limits: Limits) -> str:
    return (
        f"'{field}' must be an id of 1 to {limits.max_id_length} characters from A-Z a-z 0-9 . _ -"
    )


def _bad_ref(limits: Limits) -> str:
    return (
        f"'ref' must be a string of 1 to {limits.max_id_length} characters"
        " without control characters"
    )


def _bad_lang(field: str) -> str:
    return f"'{field}' must be a language code such as 'en' or 'zh-Hans'"


def _ids(
    value: object, field: str, min_items: int, max_items: int, limits: Limits
) -> tuple[str, ...]:
    if type(value) is list and min_items <= len(value) <= max_items:
        for item in value:
            if not _is_id(item, limits):
                break
        else:
            return tuple(dict.fromkeys(value))
    raise ProtocolError(
        f"'{field}' must be a list of {min_items} to {max_items} ids"
        f" of 1 to {limits.max_id_length} characters from A-Z a-z 0-9 . _ -"
    )


def _job_ids(
    value: object, field: str, min_items: int, max_items: int, limits: Limits
) -> tuple[JobId, ...]:
    return cast(tuple[JobId, ...], _ids(value, field, min_items, max_items, limits))


def _job_id(frame: dict[str, Any], limits: Limits) -> JobId:
    job_id = frame.get("job_id")
    if not _is_id(job_id, limits):
        raise ProtocolError(_bad_id("job_id", limits))
    return cast(JobId, job_id)


def _attempt(frame: dict[str, Any]) -> int:
    attempt = frame.get("attempt")
    if type(attempt) is not int or attempt < 1:
        raise ProtocolError("'attempt' must be a positive integer")
    return attempt


def _encode_object(value: object, field: str, max_bytes: int, ref: str | None = None) -> bytes:
    if type(value) is not dict:
        raise ProtocolError(f"'{field}' must be a JSON object", ref=ref)
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        # orjson decodes 1024 levels of nesting but encodes only 254.
        raise ProtocolError(f"'{field}' is nested too deeply", ref=ref) from exc
    if len(encoded) > max_bytes:
        raise ProtocolError(
            f"'{field}' is larger than {max_bytes} bytes", code=Code.TOO_LARGE, ref=ref
        )
    return encoded


# Outgoing frames (protocol.md §3, §4). Text frames are returned as str,
# binary frames as bytes. Encoded JSON (payload, result) is spliced in with
# orjson.Fragment, never decoded.


def encode_registered(
    node_id: NodeId,
    hub_id: str,
    heartbeat_interval_ms: int,
    resumed: Iterable[JobId],
    dropped: Iterable[JobId],
) -> str:
    """Encode the hub's answer to ``register``."""
    return orjson.dumps(
        {
            "type": "registered",
            "node_id": node_id,
            "hub_id": hub_id,
            "heartbeat_interval_ms": heartbeat_interval_ms,
            "resumed": list(resumed),
            "dropped": list(dropped),
        }
    ).decode()


def encode_job(
    job_id: JobId,
    attempt: int,
    session_id: SessionId,
    src_lang: str,
    tgt_lang: str,
    payload: bytes,
    deadline_ms: int,
    audio: bytes | None,
) -> str | bytes:
    """Encode a job for a node.

    Args:
        payload: the job's encoded JSON object, spliced in as is.
        deadline_ms: when the hub gives up on the job, in Unix milliseconds
            of the fleet's clock (Redis server time).
        audio: the job's audio, or ``None`` when it has none.

    Returns:
        A text frame (:class:`str`) when ``audio`` is ``None``, else a binary
        frame (:class:`bytes`) with the audio appended untouched.
    """
    header = orjson.dumps(
        {
            "type": "job",
            "job_id": job_id,
            "attempt": attempt,
            "session_id": session_id,
            "src_lang": src_lang,
            "tgt_lang": tgt_lang,
            "payload": orjson.Fragment(payload),
            "deadline_ms": deadline_ms,
        }
    )
    if audio is None:
        return header.decode()
    return join_binary(header, audio)


def encode_cancel(job_id: JobId, attempt: int, reason: str) -> str:
    """Encode an order to a node to stop an attempt of a job.

    Args:
        reason: an error code such as ``CANCELLED`` or ``JOB_TIMEOUT``.
    """
    return orjson.dumps(
        {"type": "cancel", "job_id": job_id, "attempt": attempt, "reason": reason}
    ).decode()


def encode_welcome(session_id: SessionId, hub_id: str, resume_token: str) -> str:
    """Encode the first frame the hub sends a session."""
    return orjson.dumps(
        {
            "type": "welcome",
            "session_id": session_id,
            "hub_id": hub_id,
            "resume_token": resume_token,
        }
    ).decode()


def encode_accepted(ref: str, job_id: JobId, node_id: NodeId, attempt: int) -> str:
    """Encode the news that a session's job runs on a node."""
    return orjson.dumps(
        {"type": "accepted", "ref": ref, "job_id": job_id, "node_id": node_id, "attempt": attempt}
    ).decode()


def encode_queued(ref: str, job_id: JobId) -> str:
    """Encode the news that a session's job waits for a free slot."""
    return orjson.dumps({"type": "queued", "ref": ref, "job_id": job_id}).decode()


def encode_partial(ref: str, job_id: JobId, result: bytes) -> str:
    """Encode an intermediate result for a session.

    Args:
        result: the node's encoded JSON object, spliced in as is.
    """
    return orjson.dumps(
        {"type": "partial", "ref": ref, "job_id": job_id, "result": orjson.Fragment(result)}
    ).decode()


def encode_result(
    ref: str, job_id: JobId, status: JobStatus, result: bytes | None, error: str | None
) -> str:
    """Encode the end of a session's job.

    Args:
        result: the node's encoded JSON (``b"null"`` or ``None`` when none).
        error: for ``failed``, an error code such as ``JOB_TIMEOUT`` or the
            node's message; ``None`` otherwise.
    """
    return orjson.dumps(
        {
            "type": "result",
            "ref": ref,
            "job_id": job_id,
            "status": status,
            "result": None if result is None else orjson.Fragment(result),
            "error": error,
        }
    ).decode()


def encode_error(ref: str | None, code: str, message: str) -> str:
    """Encode an error frame (protocol.md §6).

    Args:
        ref: the ``ref`` of the session's job concerned, if any.
        code: a :class:`~hub.errors.Code`.
        message: human-readable text, safe to send.
    """
    return orjson.dumps({"type": "error", "ref": ref, "code": code, "message": message}).decode()


# Per-connection state machines (protocol.md §9)


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
            ref = frame.ref
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
        elif type(frame) is CancelJob and frame.ref not in self._job_by_ref:
            raise ProtocolError(
                "no unfinished job has this ref", code=Code.UNKNOWN_JOB, ref=frame.ref
            )
        return frame

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
