"""Exceptions of the client SDKs.

Hierarchy::

    HubClientError
    ├── JobRefused          the hub answered a job with an ``error`` frame
    ├── SessionLost         the hub refused to resume the session (close 4007)
    ├── ResultTimeout       no result came within the job's time budget plus a grace
    ├── ClientClosed        the client was closed while the job was unfinished
    └── ConnectionRejected  the hub refused the connection for good (1008, 4002…)
"""

from __future__ import annotations

__all__ = [
    "ClientClosed",
    "ConnectionRejected",
    "HubClientError",
    "JobRefused",
    "ResultTimeout",
    "SessionLost",
]


class HubClientError(Exception):
    """Base class of every exception the client SDKs raise on purpose."""


class JobRefused(HubClientError):
    """The hub refused a job (protocol.md §4.9): it was **not** run.

    Args:
        code: the error code (protocol.md §6), e.g. ``NO_POOL_FOR_LANG_PAIR``.
        message: the hub's explanation, for humans.
        ref: the job's ``ref``.
    """

    def __init__(
        self, code: str, message: str, ref: str | None = None, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(code, message, ref)
        self.code = code
        """Error code of protocol.md §6; act on it."""
        self.message = message
        """English text for humans; it may change between releases."""
        self.ref = ref
        """The session's ``ref`` of the job."""
        self.retry_after_ms = retry_after_ms
        """When the job may be submitted again (``OVERLOADED``); ``None`` if the hub did not say."""

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class SessionLost(HubClientError):
    """The hub refused to resume the session, so unfinished jobs are lost.

    The client starts a fresh session by itself; jobs submitted before the
    loss fail with this exception, because their results cannot reach the
    new session. Submit them again if they are still wanted.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"session lost: {self.reason}; submit the job again"


class ResultTimeout(HubClientError, TimeoutError):
    """No result arrived in time (the hub or the connection is gone for too long)."""

    def __init__(self, ref: str, timeout_s: float) -> None:
        super().__init__(ref, timeout_s)
        self.ref = ref
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return f"no result for job {self.ref} within {self.timeout_s:g} s"


class ClientClosed(HubClientError):
    """The client was closed before the job ended."""

    def __str__(self) -> str:
        return "the client is closed"


class ConnectionRejected(HubClientError):
    """The hub refused the connection in a way that retrying cannot fix.

    Args:
        code: a WebSocket close code (``1008`` unauthorized, ``1009`` too big,
            ``4002`` replaced), an HTTP status of the handshake (``401``,
            ``403``), or an error code of a refused ``register``.
        reason: the hub's reason.
    """

    def __init__(self, code: int | str, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"the hub rejected the connection ({self.code}): {self.reason or 'no reason given'}"
