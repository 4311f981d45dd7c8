"""Errors raised by the hub, and the codes Lua scripts return.

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

Lua scripts return negative integers for expected failures; :class:`ErrorCode`
lists them and :func:`error_for_code` maps a code to its exception, so Python
never parses Redis error strings.
"""

from __future__ import annotations

import enum

__all__ = [
    "ClientError",
    "ErrorCode",
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


class ErrorCode(enum.IntEnum):
    """Negative codes returned by the Lua scripts (first element of the reply)."""

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


class HubError(Exception):
    """Base class of every error the hub raises on purpose."""


class ClientError(HubError):
    """A client's fault. ``code`` is the protocol error code; the text is safe to send."""

    code: str = "BAD_FRAME"

    def __init__(self, message: str = "", *, code: str | None = None, ref: str | None = None):
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

    code = "BAD_FRAME"


class FrameTooLarge(ProtocolError):
    """A frame larger than ``max_frame_bytes``."""

    code = "TOO_LARGE"


class LimitExceeded(ClientError):
    """A configured limit (rate, count, size) was hit."""

    code = "RATE_LIMITED"


class Unauthorized(ClientError):
    """Missing, invalid or insufficient credentials."""

    code = "UNAUTHORIZED"


class SchedulingError(ClientError):
    """A scheduling script refused the transition; ``code`` names why."""

    def __init__(self, error_code: ErrorCode, *, ref: str | None = None):
        super().__init__(_MESSAGES[error_code], code=_WIRE_CODES[error_code], ref=ref)
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


_WIRE_CODES: dict[ErrorCode, str] = {
    ErrorCode.NO_POOL_FOR_LANG_PAIR: "NO_POOL_FOR_LANG_PAIR",
    ErrorCode.EMPTY_POOL: "EMPTY_POOL",
    ErrorCode.NO_AVAILABLE_NODE: "NO_AVAILABLE_NODE",
    ErrorCode.QUEUE_FULL: "QUEUE_FULL",
    ErrorCode.UNKNOWN_JOB: "UNKNOWN_JOB",
    ErrorCode.NODE_MISMATCH: "NODE_MISMATCH",
    ErrorCode.STALE_ATTEMPT: "STALE_ATTEMPT",
    ErrorCode.UNKNOWN_NODE: "NOT_REGISTERED",
    ErrorCode.STALE_EPOCH: "NOT_REGISTERED",
    ErrorCode.SESSION_MISMATCH: "UNKNOWN_JOB",
    ErrorCode.SESSION_QUEUE_FULL: "QUEUE_FULL",
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
}


def error_for_code(code: int, *, ref: str | None = None) -> SchedulingError:
    """Map a script's negative return code to its exception.

    Raises:
        ValueError: if ``code`` is not an :class:`ErrorCode`.
    """
    return SchedulingError(ErrorCode(code), ref=ref)
