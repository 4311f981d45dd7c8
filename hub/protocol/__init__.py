"""Wire protocol v1 (protocol.md), Sans-I/O: frames, parsing, encoding, connection state.

Like websockets' ``protocol.py``, this package reads no socket, no Redis and
no clock. The hub feeds it each WebSocket message it received, and the
current time when a rule needs one, and sends what the encoders return; the
client SDKs and the load test build their frames with it and read the hub's
frames with it. protocol.md is the normative description; comments cite it
as ``protocol.md §N``.

Import every name from ``hub.protocol``; the modules only split the work:

- :mod:`~hub.protocol.frames`: ids, endpoints, :class:`CloseCode`,
  :class:`Limits`, every frame as a frozen dataclass, binary framing;
- :mod:`~hub.protocol.parse`: what nodes and sessions send, validated;
- :mod:`~hub.protocol.encode`: what the hub sends;
- :mod:`~hub.protocol.client`: what nodes and sessions send, encoded, and
  what the hub sends them, decoded;
- :mod:`~hub.protocol.connection`: per-connection order rules and limits.

The protocol's error codes are :class:`hub.errors.Code`.
"""

from __future__ import annotations

from .client import (
    decode_to_node,
    decode_to_session,
    encode_ack,
    encode_cancel_job,
    encode_drain,
    encode_load,
    encode_node_partial,
    encode_node_result,
    encode_register,
    encode_submit_job,
    encode_submit_job_audio,
)
from .connection import NodeConnection, NodeState, SessionConnection, SessionState
from .encode import (
    encode_accepted,
    encode_cancel,
    encode_error,
    encode_job,
    encode_partial,
    encode_queued,
    encode_registered,
    encode_result,
    encode_welcome,
)
from .frames import (
    DEFAULT_POOL,
    NODE_PATH,
    SESSION_PATH,
    Accepted,
    Ack,
    CancelJob,
    CloseCode,
    Drain,
    ErrorReply,
    JobId,
    JobStatus,
    Limits,
    Load,
    NodeCancel,
    NodeFrame,
    NodeId,
    NodeJob,
    NodePartial,
    NodeResult,
    Queued,
    Register,
    Registered,
    SessionFrame,
    SessionId,
    SessionPartial,
    SessionResult,
    SubmitJob,
    ToNodeFrame,
    ToSessionFrame,
    Welcome,
    join_binary,
    split_binary,
)
from .parse import parse_node_frame, parse_session_frame

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
    "NodeConnection",
    "NodeFrame",
    "NodeId",
    "NodeJob",
    "NodePartial",
    "NodeResult",
    "NodeState",
    "Queued",
    "Register",
    "Registered",
    "SessionConnection",
    "SessionFrame",
    "SessionId",
    "SessionPartial",
    "SessionResult",
    "SessionState",
    "SubmitJob",
    "ToNodeFrame",
    "ToSessionFrame",
    "Welcome",
    "decode_to_node",
    "decode_to_session",
    "encode_accepted",
    "encode_ack",
    "encode_cancel",
    "encode_cancel_job",
    "encode_drain",
    "encode_error",
    "encode_job",
    "encode_load",
    "encode_node_partial",
    "encode_node_result",
    "encode_partial",
    "encode_queued",
    "encode_register",
    "encode_registered",
    "encode_result",
    "encode_submit_job",
    "encode_submit_job_audio",
    "encode_welcome",
    "join_binary",
    "parse_node_frame",
    "parse_session_frame",
    "split_binary",
]
