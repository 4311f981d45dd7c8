"""Error codes of the protocol, errors raised by the hub, and the codes Lua scripts return.

Hierarchy::

    HubError
    ├── ClientError            a client's fault; the message is safe to send
    │   ├── ProtocolError      malformed, unknown or out-of-order frame
    │   │   └── FrameTooLarge  over max_frame_bytes (close 1009)
    │   ├── LimitExceeded      a configured limit was hit (rate, size, count)
    │   ├── Unauthorized       missing or invalid credentials
    │   └── SchedulingError    a script refused the transition (see ErrorCode)
    └── ServerError            our fault; details are logged, never sent
        ├── RedisUnavailable   Redis cannot be reached right now
        └── ScriptError        a script returned something we cannot read

:class:`Code` is the one list of the protocol's error codes (protocol.md §6),
used by the hub and by the client SDKs. It lives here, beside the exceptions
that carry it, because this module imports nothing but :mod:`enum` and :mod:`re`: the
Sans-I/O protocol layer, the server and the SDKs can all import it.

Lua scripts return negative integers for expected failures; :class:`ErrorCode`
lists those script return codes, :attr:`ErrorCode.code` names the protocol
code each one is sent as, and :func:`error_for_code` maps a script's code to
its exception, so Python never parses Redis error strings.
"""

from __future__ import annotations

import enum
import re

__all__ = [
    "ClientError",
    "Code",
    "ErrorCode",
    "ErrorNames",
    "FrameTooLarge",
    "HubError",
    "LimitExceeded",
    "ProtocolError",
    "RedisUnavailable",
    "SchedulingError",
    "ScriptError",
    "ServerError",
    "Unauthorized",
    "error_for_code",
]


class Code(enum.StrEnum):
    """Error codes of the protocol (protocol.md §6).

    Each member is the string sent on the wire (``Code.UNAVAILABLE ==
    "UNAVAILABLE"``), in ``error`` frames, as the ``error`` of a failed
    ``result`` and as the ``reason`` of a ``cancel``.
    """

    NO_POOL_FOR_LANG_PAIR = "NO_POOL_FOR_LANG_PAIR"
    EMPTY_POOL = "EMPTY_POOL"
    NO_AVAILABLE_NODE = "NO_AVAILABLE_NODE"
    QUEUE_FULL = "QUEUE_FULL"
    NODE_MISMATCH = "NODE_MISMATCH"
    UNKNOWN_JOB = "UNKNOWN_JOB"
    JOB_TIMEOUT = "JOB_TIMEOUT"
    NODE_LOST = "NODE_LOST"
    CANCELLED = "CANCELLED"
    BAD_FRAME = "BAD_FRAME"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    NOT_REGISTERED = "NOT_REGISTERED"
    ALREADY_REGISTERED = "ALREADY_REGISTERED"
    STALE_ATTEMPT = "STALE_ATTEMPT"
    DUPLICATE_REF = "DUPLICATE_REF"
    TOO_LARGE = "TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    UNAUTHORIZED = "UNAUTHORIZED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    TOO_MANY_JOBS = "TOO_MANY_JOBS"
    OVERLOADED = "OVERLOADED"
    AUDIO_LOST = "AUDIO_LOST"
    JOB_LOST = "JOB_LOST"
    UNKNOWN_CELL = "UNKNOWN_CELL"


class ErrorCode(enum.IntEnum):
    """Negative return codes of the Lua scripts (first element of the reply).

    These never go on the wire: :attr:`code` is the protocol code each one
    is sent as.
    """

    NO_POOL_FOR_LANG_PAIR = -1
    EMPTY_POOL = -2
    NO_AVAILABLE_NODE = -3
    QUEUE_FULL = -4
    UNKNOWN_JOB = -5
    NODE_MISMATCH = -6
    STALE_ATTEMPT = -7
    UNKNOWN_NODE = -8
    STALE_EPOCH = -9
    SESSION_MISMATCH = -10
    SESSION_QUEUE_FULL = -11
    JOB_MOVED = -12
    STALE_PARTIAL = -13

    @property
    def code(self) -> Code:
        """The protocol code this script code is sent as: the one of the same name, if any."""
        return _WIRE_ALIASES.get(self) or Code[self.name]


class HubError(Exception):
    """Base class of every error the hub raises on purpose."""


class ClientError(HubError):
    """A client's fault. ``code`` is the protocol error code; the text is safe to send."""

    code: Code = Code.BAD_FRAME

    def __init__(self, message: str = "", *, code: Code | None = None, ref: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        """Human-readable explanation, safe to send to the client."""
        self.ref = ref
        """The client's ``ref`` of the job concerned, when there is one."""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.message else self.code


class ProtocolError(ClientError):
    """A frame that does not follow protocol.md."""

    code = Code.BAD_FRAME


class FrameTooLarge(ProtocolError):
    """A frame larger than ``max_frame_bytes``."""

    code = Code.TOO_LARGE


class LimitExceeded(ClientError):
    """A configured limit (rate, count, size) was hit."""

    code = Code.RATE_LIMITED


class Unauthorized(ClientError):
    """Missing, invalid or insufficient credentials."""

    code = Code.UNAUTHORIZED


class SchedulingError(ClientError):
    """A scheduling script refused the transition; ``code`` names why."""

    def __init__(self, error_code: ErrorCode, *, ref: str | None = None):
        super().__init__(_MESSAGES[error_code], code=error_code.code, ref=ref)
        self.error_code = error_code
        """The script's return code."""


class ServerError(HubError):
    """Our fault: logged with details, sent to clients only as ``INTERNAL``."""


class RedisUnavailable(ServerError):
    """Redis could not be reached or did not answer in time."""

    def __init__(self, operation: str):
        super().__init__(operation)
        self.operation = operation

    def __str__(self) -> str:
        return f"redis unavailable during {self.operation}"


class ScriptError(ServerError):
    """A script returned a reply the wrapper cannot read."""

    def __init__(self, script: str, reply: object):
        super().__init__(script, reply)
        self.script = script
        self.reply = reply

    def __str__(self) -> str:
        return f"unexpected reply from {self.script}.lua: {self.reply!r}"


# Script codes sent as a protocol code of another name.
_WIRE_ALIASES: dict[ErrorCode, Code] = {
    ErrorCode.UNKNOWN_NODE: Code.NOT_REGISTERED,
    ErrorCode.STALE_EPOCH: Code.NOT_REGISTERED,
    ErrorCode.SESSION_MISMATCH: Code.UNKNOWN_JOB,
    ErrorCode.SESSION_QUEUE_FULL: Code.QUEUE_FULL,
    ErrorCode.JOB_MOVED: Code.STALE_ATTEMPT,
    ErrorCode.STALE_PARTIAL: Code.STALE_ATTEMPT,
}

_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.NO_POOL_FOR_LANG_PAIR: "no pool serves this language pair",
    ErrorCode.EMPTY_POOL: "no live node serves this language pair",
    ErrorCode.NO_AVAILABLE_NODE: "every node for this language pair is busy",
    ErrorCode.QUEUE_FULL: "the queue for this language pair is full",
    ErrorCode.UNKNOWN_JOB: "no such job",
    ErrorCode.NODE_MISMATCH: "the job was not dispatched to this node",
    ErrorCode.STALE_ATTEMPT: "the attempt is stale or the job has already ended",
    ErrorCode.UNKNOWN_NODE: "the node is not registered",
    ErrorCode.STALE_EPOCH: "the node registered again on a newer connection",
    ErrorCode.SESSION_MISMATCH: "no such job",
    ErrorCode.SESSION_QUEUE_FULL: "this session has too many queued jobs",
    ErrorCode.JOB_MOVED: "the job moved to another node",
    ErrorCode.STALE_PARTIAL: "the attempt is stale or the job has ended",
}


def error_for_code(code: int, *, ref: str | None = None) -> SchedulingError:
    """Map a script's negative return code to its exception.

    Raises:
        ValueError: if ``code`` is not an :class:`ErrorCode`.
    """
    return SchedulingError(ErrorCode(code), ref=ref)


_ERROR_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


class ErrorNames:
    """The names failed jobs' errors are counted under: codes, and ``OTHER`` for the rest.

    A node's ``error`` may be its own message (protocol.md §3.5), often with
    a job id or a number in it: one counter per distinct message would grow
    the cell's ``stats`` hash, every dashboard snapshot and the metrics'
    label sets without bound. So an error counts under its own name only
    when it is a protocol code (:class:`Code`) or looks like one
    (``[A-Z][A-Z0-9_]*``, ``MODEL_CRASHED``), and at most ``limit`` such
    names of a node's own are kept; the rest count as ``OTHER``.

    Args:
        limit: most names of nodes' own codes counted under their name.
    """

    OTHER = "OTHER"

    def __init__(self, limit: int = 64) -> None:
        self._names: set[str] = set(Code)
        self._limit = len(self._names) + limit

    def __call__(self, error: str) -> str:
        """The name ``error`` is counted under."""
        if error in self._names:
            return error
        if len(self._names) < self._limit and _ERROR_NAME.fullmatch(error):
            self._names.add(error)
            return error
        return self.OTHER
