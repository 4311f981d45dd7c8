"""Client SDKs: :class:`NodeClient` for workers, :class:`SessionClient` for apps.

Both speak protocol v1 (protocol.md) over one WebSocket each, reconnect with
exponential backoff and full jitter, and resume where they left off.
"""

from __future__ import annotations

from .backoff import Backoff
from .errors import (
    ClientClosed,
    ConnectionRejected,
    HubClientError,
    JobRefused,
    ResultTimeout,
    SessionLost,
)
from .node import Handler, Job, NodeClient
from .session import JobResult, Partial, SessionClient, StreamEvent

__all__ = [
    "Backoff",
    "ClientClosed",
    "ConnectionRejected",
    "Handler",
    "HubClientError",
    "Job",
    "JobRefused",
    "JobResult",
    "NodeClient",
    "Partial",
    "ResultTimeout",
    "SessionClient",
    "SessionLost",
    "StreamEvent",
]
