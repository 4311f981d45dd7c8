"""The peers' side: what nodes and sessions send, and reading what the hub sends them.

The client SDKs (:mod:`hub.client`) and the load test's simulated peers
build every frame with these encoders and read every frame with
:func:`decode_to_node` and :func:`decode_to_session`.

The encoders are plain functions that return the frame as :class:`bytes`,
ready to send without another copy: the UTF-8 JSON of a text frame (send it
as text, e.g. ``await ws.send(frame, text=True)`` with websockets), or a
whole binary frame (:func:`encode_submit_job_audio`). They raise
:class:`TypeError` for a value that is not JSON.

The decoders check the type of each field a peer reads and return the frozen
dataclasses of :mod:`hub.protocol.frames`; fields they do not know are
ignored, as protocol.md §2 asks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import orjson

from hub.errors import Code, ProtocolError

from .frames import (
    Accepted,
    ErrorReply,
    NodeCancel,
    NodeJob,
    Queued,
    Registered,
    SessionPartial,
    SessionResult,
    ToNodeFrame,
    ToSessionFrame,
    Welcome,
    join_binary,
    load_object,
    split_binary,
    unknown_type,
)

__all__ = [
    "decode_to_node",
    "decode_to_session",
    "encode_ack",
    "encode_cancel_job",
    "encode_drain",
    "encode_load",
    "encode_node_partial",
    "encode_node_result",
    "encode_register",
    "encode_submit_job",
    "encode_submit_job_audio",
]

_DRAIN: Final = b'{"type":"drain"}'


# What a node sends (protocol.md §3)


def encode_register(
    node_id: str,
    services: Sequence[str],
    max_jobs: int,
    *,
    languages: Sequence[str] | None = None,
    lang_pairs: Sequence[Sequence[str]] | None = None,
    pools: Sequence[str] | None = None,
    resume: Sequence[str] = (),
    cell: str | None = None,
) -> bytes:
    """Encode a node's ``register`` (protocol.md §3.1).

    Args:
        node_id: the node's id.
        services: services it runs.
        max_jobs: jobs it runs at once.
        languages: languages served, meaning every ordered pair of two of them.
        lang_pairs: ``(src, tgt)`` pairs served, instead of ``languages``.
        pools: pools to join; ``None`` for the hub's default pool.
        resume: jobs still running from a previous connection.
        cell: the cell to join; ``None`` for its token's, else the hub's default.

    Returns:
        The text frame.

    Raises:
        ValueError: unless exactly one of ``languages`` and ``lang_pairs`` is given.
    """
    frame: dict[str, Any] = {"type": "register", "node_id": node_id, "services": list(services)}
    if languages is not None and lang_pairs is None:
        frame["languages"] = list(languages)
    elif lang_pairs is not None and languages is None:
        frame["lang_pairs"] = [list(pair) for pair in lang_pairs]
    else:
        raise ValueError("give exactly one of languages and lang_pairs")
    frame["max_jobs"] = max_jobs
    if pools is not None:
        frame["pools"] = list(pools)
    if resume:
        frame["resume"] = list(resume)
    if cell is not None:
        frame["cell"] = cell
    return orjson.dumps(frame)


def encode_node_result(
    job_id: str,
    attempt: int,
    status: str,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> bytes:
    """Encode the end of one attempt of a job (protocol.md §3.5).

    Args:
        job_id: the job's id.
        attempt: the attempt the node ran.
        status: ``finished`` or ``failed``.
        result: the result object, or ``None``.
        error: why it failed, or ``None``.

    Returns:
        The text frame.

    Raises:
        TypeError: if ``result`` is not a JSON object.
    """
    frame: dict[str, Any] = {
        "type": "result",
        "job_id": job_id,
        "attempt": attempt,
        "status": status,
        "result": result,
    }
    if error is not None:
        frame["error"] = error
    return orjson.dumps(frame)


def encode_node_partial(job_id: str, attempt: int, result: Mapping[str, Any]) -> bytes:
    """Encode an intermediate result of a running job (protocol.md §3.6).

    Returns:
        The text frame.

    Raises:
        TypeError: if ``result`` is not a JSON object.
    """
    return orjson.dumps({"type": "partial", "job_id": job_id, "attempt": attempt, "result": result})


def encode_load(load: Mapping[str, Any]) -> bytes:
    """Encode a node's report of its own load (protocol.md §3.7).

    Returns:
        The text frame.

    Raises:
        TypeError: if ``load`` is not a JSON object.
    """
    return orjson.dumps({"type": "load", "load": load})


def encode_drain() -> bytes:
    """Encode a node's ``drain`` (protocol.md §3.8).

    Returns:
        The text frame.
    """
    return _DRAIN


# What a session sends (protocol.md §4)


def encode_submit_job(
    ref: str,
    src_lang: str,
    tgt_lang: str,
    payload: Mapping[str, Any] | None = None,
    *,
    timeout_ms: int | None = None,
) -> bytes:
    """Encode a session's job without audio (protocol.md §4.2).

    Args:
        ref: the session's name for the job.
        src_lang: source language code.
        tgt_lang: target language code.
        payload: a JSON object for the node; ``None`` sends ``{}``.
        timeout_ms: the job's time budget; ``None`` for the hub's default.

    Returns:
        The text frame.

    Raises:
        TypeError: if ``payload`` is not a JSON object.
    """
    frame: dict[str, Any] = {
        "type": "job",
        "ref": ref,
        "src_lang": src_lang,
        "tgt_lang": tgt_lang,
        "payload": {} if payload is None else payload,
    }
    if timeout_ms is not None:
        frame["timeout_ms"] = timeout_ms
    return orjson.dumps(frame)


def encode_submit_job_audio(
    ref: str,
    src_lang: str,
    tgt_lang: str,
    payload: Mapping[str, Any] | None,
    audio: bytes,
    *,
    timeout_ms: int | None = None,
) -> bytes:
    """Encode a session's job with its audio, as a binary frame (protocol.md §2, §4.2).

    Args:
        ref: the session's name for the job.
        src_lang: source language code.
        tgt_lang: target language code.
        payload: a JSON object for the node; ``None`` sends ``{}``.
        audio: the audio, sent to the node byte for byte.
        timeout_ms: the job's time budget; ``None`` for the hub's default.

    Returns:
        The binary frame.

    Raises:
        ValueError: if ``audio`` is empty.
        TypeError: if ``payload`` is not a JSON object.
    """
    if not audio:
        raise ValueError("audio must not be empty; send a job without audio instead")
    header = encode_submit_job(ref, src_lang, tgt_lang, payload, timeout_ms=timeout_ms)
    return join_binary(header, audio)


def encode_cancel_job(ref: str) -> bytes:
    """Encode a session's ``cancel`` of an unfinished job (protocol.md §4.3).

    Returns:
        The text frame.
    """
    return orjson.dumps({"type": "cancel", "ref": ref})


def encode_ack(job_ids: Sequence[str]) -> bytes:
    """Encode a session's ``ack`` of the results it received (protocol.md §4.4).

    Args:
        job_ids: at most ``max_ack_ids`` (256) job ids.

    Returns:
        The text frame.
    """
    return orjson.dumps({"type": "ack", "job_ids": list(job_ids)})


# Reading what the hub sends


def decode_to_node(data: str | bytes, *, binary: bool = False) -> ToNodeFrame:
    """Read one message the hub sent a node.

    Args:
        data: the message: JSON text (as :class:`str` or UTF-8 bytes), or
            with ``binary`` a binary frame.
        binary: whether ``data`` came in a binary frame (a job with audio).

    Returns:
        A :class:`~hub.protocol.frames.Registered`,
        :class:`~hub.protocol.frames.NodeJob`,
        :class:`~hub.protocol.frames.NodeCancel` or
        :class:`~hub.protocol.frames.ErrorReply`.

    Raises:
        ProtocolError: ``BAD_FRAME`` for a malformed frame, ``UNKNOWN_TYPE``
            for a type the hub does not send nodes.
    """
    audio = None
    if binary and isinstance(data, bytes):
        header, audio = split_binary(data)
        frame = load_object(header)
    else:
        frame = load_object(data)
    kind = _type(frame)
    if kind == "job":
        return _job(frame, audio)
    if audio is not None:
        raise ProtocolError("binary frames carry only jobs")
    read = _TO_NODE.get(kind)
    if read is None:
        raise ProtocolError(unknown_type(kind), code=Code.UNKNOWN_TYPE)
    return read(frame)


def decode_to_session(data: str | bytes) -> ToSessionFrame:
    """Read one message the hub sent a session.

    Args:
        data: the JSON text of a text frame, as :class:`str` or UTF-8 bytes.

    Returns:
        A :class:`~hub.protocol.frames.Welcome`,
        :class:`~hub.protocol.frames.Accepted`,
        :class:`~hub.protocol.frames.Queued`,
        :class:`~hub.protocol.frames.SessionPartial`,
        :class:`~hub.protocol.frames.SessionResult` or
        :class:`~hub.protocol.frames.ErrorReply`.

    Raises:
        ProtocolError: ``BAD_FRAME`` for a malformed frame, ``UNKNOWN_TYPE``
            for a type the hub does not send sessions.
    """
    frame = load_object(data)
    kind = _type(frame)
    read = _TO_SESSION.get(kind)
    if read is None:
        raise ProtocolError(unknown_type(kind), code=Code.UNKNOWN_TYPE)
    return read(frame)


def _registered(frame: dict[str, Any]) -> Registered:
    return Registered(
        _str(frame, "node_id"),
        _str(frame, "hub_id"),
        _int(frame, "heartbeat_interval_ms"),
        _strs(frame, "resumed"),
        _strs(frame, "dropped"),
    )


def _job(frame: dict[str, Any], audio: bytes | None) -> NodeJob:
    payload = frame.get("payload")
    if type(payload) is not dict:
        raise ProtocolError("'payload' must be a JSON object")
    return NodeJob(
        _str(frame, "job_id"),
        _int(frame, "attempt"),
        _str(frame, "session_id"),
        _str(frame, "src_lang"),
        _str(frame, "tgt_lang"),
        payload,
        _int(frame, "deadline_ms"),
        audio,
    )


def _cancel(frame: dict[str, Any]) -> NodeCancel:
    return NodeCancel(_str(frame, "job_id"), _int(frame, "attempt"), _str(frame, "reason"))


def _error(frame: dict[str, Any]) -> ErrorReply:
    ref = frame.get("ref")
    if ref is not None and type(ref) is not str:
        raise ProtocolError("'ref' must be a string or null")
    retry = frame.get("retry_after_ms")
    if retry is not None and (type(retry) is not int or retry < 0):
        raise ProtocolError("'retry_after_ms' must be a non-negative integer")
    return ErrorReply(ref, _str(frame, "code"), _str(frame, "message"), retry)


def _welcome(frame: dict[str, Any]) -> Welcome:
    return Welcome(_str(frame, "session_id"), _str(frame, "hub_id"), _str(frame, "resume_token"))


def _accepted(frame: dict[str, Any]) -> Accepted:
    return Accepted(
        _str(frame, "ref"), _str(frame, "job_id"), _str(frame, "node_id"), _int(frame, "attempt")
    )


def _queued(frame: dict[str, Any]) -> Queued:
    return Queued(_str(frame, "ref"), _str(frame, "job_id"))


def _partial(frame: dict[str, Any]) -> SessionPartial:
    result = frame.get("result")
    if type(result) is not dict:
        raise ProtocolError("'result' must be a JSON object")
    return SessionPartial(_str(frame, "ref"), _str(frame, "job_id"), result)


def _result(frame: dict[str, Any]) -> SessionResult:
    status = frame.get("status")
    result = frame.get("result")
    error = frame.get("error")
    if status != "finished" and status != "failed":
        raise ProtocolError("'status' must be 'finished' or 'failed'")
    if result is not None and type(result) is not dict:
        raise ProtocolError("'result' must be a JSON object or null")
    if error is not None and type(error) is not str:
        raise ProtocolError("'error' must be a string or null")
    return SessionResult(_str(frame, "ref"), _str(frame, "job_id"), status, result, error)


_TO_NODE: Final[dict[str, Callable[[dict[str, Any]], ToNodeFrame]]] = {
    "registered": _registered,
    "cancel": _cancel,
    "error": _error,
}
_TO_SESSION: Final[dict[str, Callable[[dict[str, Any]], ToSessionFrame]]] = {
    "welcome": _welcome,
    "accepted": _accepted,
    "queued": _queued,
    "partial": _partial,
    "result": _result,
    "error": _error,
}


def _type(frame: dict[str, Any]) -> str:
    kind = frame.get("type")
    if type(kind) is not str:
        raise ProtocolError("'type' must be a string")
    return kind


def _str(frame: dict[str, Any], field: str) -> str:
    value = frame.get(field)
    if type(value) is not str:
        raise ProtocolError(f"'{field}' must be a string")
    return value


def _int(frame: dict[str, Any], field: str) -> int:
    value = frame.get(field)
    if type(value) is not int:
        raise ProtocolError(f"'{field}' must be an integer")
    return value


def _strs(frame: dict[str, Any], field: str) -> tuple[str, ...]:
    value = frame.get(field)
    if type(value) is not list or not all(type(item) is str for item in value):
        raise ProtocolError(f"'{field}' must be a list of strings")
    return tuple(value)
