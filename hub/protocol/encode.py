"""Encoders of what the hub sends nodes and sessions (protocol.md §3, §4, §6).

Text frames are returned as :class:`str`, binary frames as :class:`bytes`.
Encoded JSON objects the hub carries (``payload``, ``result``) are spliced
in with ``orjson.Fragment``, never decoded.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from .frames import JobId, JobStatus, NodeId, SessionId, join_binary

__all__ = [
    "encode_accepted",
    "encode_cancel",
    "encode_error",
    "encode_job",
    "encode_partial",
    "encode_queued",
    "encode_registered",
    "encode_result",
    "encode_welcome",
]


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


def encode_error(
    ref: str | None, code: str, message: str, retry_after_ms: int | None = None
) -> str:
    """Encode an error frame (protocol.md §6).

    Args:
        ref: the ``ref`` of the session's job concerned, if any.
        code: a :class:`~hub.errors.Code`.
        message: human-readable text, safe to send.
        retry_after_ms: when the client may try again (``OVERLOADED``); omitted if None.
    """
    frame: dict[str, object] = {"type": "error", "ref": ref, "code": code, "message": message}
    if retry_after_ms is not None:
        frame["retry_after_ms"] = retry_after_ms
    return orjson.dumps(frame).decode()
