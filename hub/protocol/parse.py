"""Parsing of what nodes and sessions send the hub (protocol.md §2, §3, §4, §5).

Each message is decoded once with orjson, validated once, and turned into a
frozen dataclass of :mod:`hub.protocol.frames`, or refused with
:class:`~hub.errors.ProtocolError`. JSON objects that the hub only carries (a
job's ``payload``, a node's ``result`` or ``load``) are kept as compact
encoded bytes, never decoded again.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final, cast

import orjson

from hub.errors import Code, ProtocolError
from hub.keys import is_cell

from .frames import (
    DEFAULT_POOL,
    Ack,
    CancelJob,
    Drain,
    JobId,
    JobStatus,
    Limits,
    Load,
    NodeFrame,
    NodeId,
    NodePartial,
    NodeResult,
    Register,
    SessionFrame,
    SubmitJob,
    load_object,
    split_binary,
    unknown_type,
)

__all__ = ["parse_job_body", "parse_node_frame", "parse_session_frame"]

_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]+")
_LANG_RE: Final = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8}){0,3}")
_MAX_LANG_LENGTH: Final = 24
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DRAIN: Final = Drain()

# Errors that do not depend on the limits.
_NO_TYPE: Final = "'type' must be a string"
_BINARY_NOT_JOB: Final = "binary frames carry only session jobs"
_NO_AUDIO: Final = "binary job frame has no audio"


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
    frame = load_object(message)
    kind = frame.get("type")
    if type(kind) is not str:
        raise ProtocolError(_NO_TYPE)
    parse = _NODE_PARSERS.get(kind)
    if parse is None:
        raise ProtocolError(unknown_type(kind), code=Code.UNKNOWN_TYPE)
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
        frame = load_object(message)
    else:
        header, audio = split_binary(message)
        frame = load_object(header)
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
    raise ProtocolError(unknown_type(kind), code=Code.UNKNOWN_TYPE, ref=ref)


def parse_job_body(body: bytes, ref: str, limits: Limits, *, binary: bool) -> SubmitJob:
    """Parse and validate the body of ``POST /v1/jobs`` (protocol.md §11.2).

    The body is the object of a session's ``job`` frame (§4.2) without
    ``type`` and ``ref`` (both ignored when present), or, when ``binary``,
    the binary envelope of §2 with that object as its header.

    Args:
        body: the request body.
        ref: the job's ref (the hub names HTTP jobs itself).
        limits: validation limits.
        binary: the body is the binary envelope (``application/octet-stream``).

    Raises:
        ProtocolError: ``BAD_FRAME`` or ``TOO_LARGE``.
    """
    audio: bytes | None = None
    if binary:
        header, audio = split_binary(body)
        frame = load_object(header)
    else:
        frame = load_object(body)
    return _parse_submit_job(frame, audio, ref, limits)


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
    cell = frame.get("cell")
    if cell is not None and not is_cell(cell):
        raise ProtocolError("'cell' must be 1 to 64 letters, digits, '_' or '-'")
    return Register(
        cast(NodeId, node_id),
        services,
        pairs,
        max_jobs,
        (DEFAULT_POOL,) if pools is None else _ids(pools, "pools", 1, limits.max_pools, limits),
        () if resume is None else _job_ids(resume, "resume", 0, limits.max_jobs_per_node, limits),
        cell,
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
