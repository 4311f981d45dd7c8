"""Tests of the Sans-I/O layer, hub/protocol/ and hub/errors.py: plain calls, no loop, no sockets.

This file alone covers every branch of hub/protocol/, so that the protocol
is tested by its own rules and not through the server.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.config import Settings
from hub.errors import (
    ClientError,
    Code,
    ErrorCode,
    LimitExceeded,
    ProtocolError,
    RedisUnavailable,
    ScriptError,
    error_for_code,
)
from hub.protocol import (
    DEFAULT_POOL,
    Accepted,
    Ack,
    CancelJob,
    CloseCode,
    Drain,
    ErrorReply,
    JobId,
    Limits,
    Load,
    NodeCancel,
    NodeConnection,
    NodeId,
    NodeJob,
    NodePartial,
    NodeResult,
    NodeState,
    Queued,
    Register,
    Registered,
    SessionConnection,
    SessionId,
    SessionPartial,
    SessionResult,
    SessionState,
    SubmitJob,
    Welcome,
    decode_to_node,
    decode_to_session,
    encode_accepted,
    encode_ack,
    encode_cancel,
    encode_cancel_job,
    encode_drain,
    encode_error,
    encode_job,
    encode_load,
    encode_node_partial,
    encode_node_result,
    encode_partial,
    encode_queued,
    encode_register,
    encode_registered,
    encode_result,
    encode_submit_job,
    encode_submit_job_audio,
    encode_welcome,
    join_binary,
    parse_job_body,
    parse_node_frame,
    parse_session_frame,
    split_binary,
)

ROOT = Path(__file__).resolve().parent.parent
LIMITS = Limits()
ID_RULE = "of 1 to 64 characters from A-Z a-z 0-9 . _ -"
BAD_REF = "'ref' must be a string of 1 to 64 characters without control characters"

# Helpers that read like protocol.md


def text(**fields: Any) -> str:
    """A text frame with these fields."""
    return orjson.dumps(fields).decode()


def binary(audio: bytes, **fields: Any) -> bytes:
    """A binary frame: 4-byte header length, JSON header, audio."""
    return join_binary(orjson.dumps(fields), audio)


def register(**changes: Any) -> dict[str, Any]:
    """The fields of a valid register frame, with changes (None deletes)."""
    fields: dict[str, Any] = {
        "type": "register",
        "node_id": "gpu-1",
        "services": ["asr", "nmt", "tts"],
        "languages": ["zh", "en"],
        "max_jobs": 4,
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def job(**changes: Any) -> dict[str, Any]:
    """The fields of a valid session job frame, with changes (None deletes)."""
    fields: dict[str, Any] = {
        "type": "job",
        "ref": "c-1",
        "src_lang": "zh",
        "tgt_lang": "en",
        "payload": {"text": "你好"},
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def result(**changes: Any) -> dict[str, Any]:
    """The fields of a valid node result frame, with changes (None deletes)."""
    fields: dict[str, Any] = {
        "type": "result",
        "job_id": "j-1",
        "attempt": 1,
        "status": "finished",
        "result": {"text": "hello"},
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def reason(exc: ClientError) -> tuple[str, str, str | None]:
    """What the client is told: code, message and ref."""
    return exc.code, exc.message, exc.ref


def node_refusal(message: str | bytes, limits: Limits = LIMITS) -> tuple[str, str, str | None]:
    with pytest.raises(ProtocolError) as exc_info:
        parse_node_frame(message, limits)
    return reason(exc_info.value)


def session_refusal(message: str | bytes, limits: Limits = LIMITS) -> tuple[str, str, str | None]:
    with pytest.raises(ProtocolError) as exc_info:
        parse_session_frame(message, limits)
    return reason(exc_info.value)


def refusal(call: Callable[[], object]) -> tuple[str, str, str | None]:
    with pytest.raises(ClientError) as exc_info:
        call()
    return reason(exc_info.value)


def open_node() -> NodeConnection:
    """A node connection that registered and was accepted."""
    node = NodeConnection(LIMITS)
    node.receive(text(**register()))
    node.registered(NodeId("gpu-1"))
    return node


def new_session(
    max_inflight: int = 4, rate_per_s: float | None = None, burst: int = 1
) -> SessionConnection:
    return SessionConnection(LIMITS, max_inflight=max_inflight, rate_per_s=rate_per_s, burst=burst)


def exactly(message: str) -> str:
    """A ``match=`` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


def deep(depth: int) -> str:
    """JSON text of objects nested deeper than orjson encodes (it decodes them)."""
    return '{"a":' * depth + "{}" + "}" * depth


def attempt(call: Callable[..., object], *args: object) -> object:
    """Call, and return None when the call refuses the input with a client error."""
    try:
        return call(*args)
    except ClientError:
        return None


# Module rules


def module_path(name: str) -> Path:
    """The file of a module of the hub: ``hub.protocol`` or ``hub.errors``."""
    path = ROOT / name.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_sans_io_layer_imports_no_io_library_when_parsed() -> None:
    banned = {"asyncio", "redis", "websockets", "socket", "time"}
    modules = (ROOT / "hub" / "protocol").glob("*.py")
    todo = ["hub.protocol", *(f"hub.protocol.{p.stem}" for p in modules if p.stem != "__init__")]
    seen = set(todo)
    found: set[str] = set()
    while todo:
        module = todo.pop()
        path = module_path(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                names = [".".join(filter(None, (base, node.module)))]
            else:
                continue
            for name in names:
                found.add(name.split(".")[0])
                # Follow the hub's own modules: an I/O import there counts too.
                if name.startswith("hub.") and name not in seen:
                    seen.add(name)
                    todo.append(name)
    assert {"hub.errors", "hub.config", "hub.protocol.frames"} <= seen
    assert "orjson" in found
    assert found.isdisjoint(banned), found & banned


def doc_table(heading: str) -> list[list[str]]:
    """The rows of the first table under ``heading`` in protocol.md, as stripped cells."""
    section = (ROOT / "protocol.md").read_text().split(f"\n{heading}\n", 1)[1]
    rows = []
    for line in section.split("\n## ", 1)[0].splitlines():
        if line.startswith("| `"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_protocol_md_documents_each_error_code_once_when_read() -> None:
    documented = [row[0].strip("`") for row in doc_table("## 6. Error codes")]
    assert sorted(documented) == sorted(Code)
    assert len(documented) == len(set(documented))


def test_protocol_md_documents_each_close_code_once_when_read() -> None:
    rows = doc_table("## 7. Close codes")
    documented = [(int(code.strip("`")), name) for code, name, *_ in rows]
    assert documented == [
        (close.value, close.name.lower().replace("_", " ")) for close in CloseCode
    ]


def test_script_codes_are_sent_as_protocol_codes_when_mapped() -> None:
    assert {c: c.code for c in ErrorCode if c.code.name != c.name} == {
        ErrorCode.UNKNOWN_NODE: Code.NOT_REGISTERED,
        ErrorCode.STALE_EPOCH: Code.NOT_REGISTERED,
        ErrorCode.SESSION_MISMATCH: Code.UNKNOWN_JOB,
        ErrorCode.SESSION_QUEUE_FULL: Code.QUEUE_FULL,
        ErrorCode.JOB_MOVED: Code.STALE_ATTEMPT,
        ErrorCode.STALE_PARTIAL: Code.STALE_ATTEMPT,
    }
    assert str(ErrorCode.QUEUE_FULL.code) == "QUEUE_FULL"


def test_limits_refuse_zero_when_built() -> None:
    with pytest.raises(ValueError, match=exactly("max_pools must be at least 1")):
        Limits(max_pools=0)


def test_limits_follow_settings_when_built_from_settings() -> None:
    limits = Limits.from_settings(Settings(max_payload_bytes=10, max_job_timeout_ms=5))
    assert limits == Limits(max_payload_bytes=10, max_timeout_ms=5)


# Framing (protocol.md §2)


def test_client_sends_binary_when_shorter_than_header_length() -> None:
    assert session_refusal(b"\x00\x00\x01") == (
        "BAD_FRAME",
        "binary frame shorter than its 4-byte header length",
        None,
    )


def test_client_sends_binary_when_header_length_past_end() -> None:
    frame = (100).to_bytes(4, "big") + b'{"type":"job"}'
    assert session_refusal(frame) == ("BAD_FRAME", "binary header length past end of frame", None)


def test_client_splits_binary_when_well_formed() -> None:
    assert split_binary(join_binary(b"{}", b"audio")) == (b"{}", b"audio")
    assert split_binary(b"\x00\x00\x00\x00") == (b"", b"")


def test_client_sends_garbage_when_not_json() -> None:
    assert session_refusal("{nope") == ("BAD_FRAME", "frame is not valid JSON", None)
    assert node_refusal("") == ("BAD_FRAME", "frame is not valid JSON", None)
    assert session_refusal(join_binary(b"\xff", b"x")) == (
        "BAD_FRAME",
        "frame is not valid JSON",
        None,
    )


def test_client_sends_json_when_not_an_object() -> None:
    assert session_refusal("[1, 2]") == ("BAD_FRAME", "frame must be a JSON object", None)
    assert node_refusal('"register"') == ("BAD_FRAME", "frame must be a JSON object", None)


def test_client_sends_frame_when_type_is_missing() -> None:
    assert node_refusal(text(node_id="gpu-1")) == ("BAD_FRAME", "'type' must be a string", None)
    assert session_refusal(text(type=1, ref="c-1")) == (
        "BAD_FRAME",
        "'type' must be a string",
        "c-1",
    )


def test_client_sends_frame_when_type_is_unknown() -> None:
    assert node_refusal(text(type="hello")) == (
        "UNKNOWN_TYPE",
        "unknown frame type 'hello'",
        None,
    )
    assert session_refusal(text(type="x" * 100, ref="c-9")) == (
        "UNKNOWN_TYPE",
        f"unknown frame type {'x' * 32!r}",
        "c-9",
    )


def test_session_error_has_no_ref_when_ref_is_invalid() -> None:
    for ref in ["", "a" * 65, "bad\nref", "\x7f", 7]:
        assert session_refusal(text(type="nope", ref=ref))[2] is None


def test_node_sends_binary_when_any_frame() -> None:
    assert node_refusal(binary(b"x", **register())) == (
        "BAD_FRAME",
        "binary frames carry only session jobs",
        None,
    )


def test_session_sends_binary_when_not_a_job() -> None:
    assert session_refusal(binary(b"x", type="cancel", ref="c-1")) == (
        "BAD_FRAME",
        "binary frames carry only session jobs",
        "c-1",
    )


# Node frames (protocol.md §3)


def test_node_sends_register_when_valid() -> None:
    frame = parse_node_frame(text(**register()), LIMITS)
    assert frame == Register(
        NodeId("gpu-1"),
        ("asr", "nmt", "tts"),
        (("zh", "en"), ("en", "zh")),
        4,
        (DEFAULT_POOL,),
        (),
    )


def test_node_sends_register_when_every_option_is_given() -> None:
    message = text(
        **register(
            languages=None,
            lang_pairs=[["zh", "EN"], ["zh", "zh"], ["ZH", "en"]],
            pools=["premium", "default", "premium"],
            resume=["j-1", "j-2"],
            services=["asr", "asr"],
            max_jobs=256,
            cell="eu-west_1",
        )
    )
    assert parse_node_frame(message, LIMITS) == Register(
        NodeId("gpu-1"),
        ("asr",),
        (("zh", "en"), ("zh", "zh")),
        256,
        ("premium", "default"),
        (JobId("j-1"), JobId("j-2")),
        "eu-west_1",
    )


def test_node_sends_register_when_languages_repeat() -> None:
    frame = parse_node_frame(text(**register(languages=["en", "EN", "de", "fr-CA"])), LIMITS)
    assert isinstance(frame, Register)
    assert frame.lang_pairs == (
        ("en", "de"),
        ("en", "fr-ca"),
        ("de", "en"),
        ("de", "fr-ca"),
        ("fr-ca", "en"),
        ("fr-ca", "de"),
    )


def test_node_sends_register_when_null_options_mean_defaults() -> None:
    frame = parse_node_frame(
        '{"type":"register","node_id":"n","services":["asr"],"languages":["en","de"],'
        '"max_jobs":1,"pools":null,"resume":null,"lang_pairs":null,"extra":1}',
        LIMITS,
    )
    assert isinstance(frame, Register)
    assert (frame.pools, frame.resume, frame.cell) == (("default",), (), None)


LANGS = "'languages' must list 2 to 32 distinct language codes"
PAIRS = "'lang_pairs' must be a list of 1 to 1024 [src, tgt] language code pairs"
BOTH = "register needs exactly one of 'languages' and 'lang_pairs'"
MAX_JOBS = "'max_jobs' must be an integer from 1 to 256"
CELL = "'cell' must be 1 to 64 letters, digits, '_' or '-'"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"node_id": None}, f"'node_id' must be an id {ID_RULE}"),
        ({"node_id": "gpu:1"}, f"'node_id' must be an id {ID_RULE}"),
        ({"node_id": "a" * 65}, f"'node_id' must be an id {ID_RULE}"),
        ({"node_id": "gpu-1\n"}, f"'node_id' must be an id {ID_RULE}"),
        ({"services": []}, f"'services' must be a list of 1 to 8 ids {ID_RULE}"),
        ({"services": "asr"}, f"'services' must be a list of 1 to 8 ids {ID_RULE}"),
        ({"services": ["a"] * 9}, f"'services' must be a list of 1 to 8 ids {ID_RULE}"),
        ({"services": ["asr", "{x}"]}, f"'services' must be a list of 1 to 8 ids {ID_RULE}"),
        ({"languages": None}, BOTH),
        ({"lang_pairs": [["zh", "en"]]}, BOTH),
        ({"languages": ["en"]}, LANGS),
        ({"languages": ["en", "en"]}, LANGS),
        ({"languages": "en"}, LANGS),
        ({"languages": ["en", "e"]}, LANGS),
        ({"languages": [f"l{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(33)]}, LANGS),
        ({"languages": None, "lang_pairs": []}, PAIRS),
        ({"languages": None, "lang_pairs": {"zh": "en"}}, PAIRS),
        ({"languages": None, "lang_pairs": [["zh", "en"]] * 1025}, PAIRS),
        ({"languages": None, "lang_pairs": ["zh-en"]}, PAIRS),
        ({"languages": None, "lang_pairs": [["zh", "en", "de"]]}, PAIRS),
        ({"languages": None, "lang_pairs": [["zh:", "en"]]}, PAIRS),
        ({"languages": None, "lang_pairs": [["zh", 1]]}, PAIRS),
        ({"max_jobs": None}, MAX_JOBS),
        ({"max_jobs": True}, MAX_JOBS),
        ({"max_jobs": 0}, MAX_JOBS),
        ({"max_jobs": 257}, MAX_JOBS),
        ({"max_jobs": 4.0}, MAX_JOBS),
        ({"pools": []}, f"'pools' must be a list of 1 to 8 ids {ID_RULE}"),
        ({"pools": ["a b"]}, f"'pools' must be a list of 1 to 8 ids {ID_RULE}"),
        ({"resume": ["j"] * 257}, f"'resume' must be a list of 0 to 256 ids {ID_RULE}"),
        ({"resume": "j-1"}, f"'resume' must be a list of 0 to 256 ids {ID_RULE}"),
        ({"cell": "eu.west"}, CELL),
        ({"cell": ""}, CELL),
        ({"cell": "c" * 65}, CELL),
        ({"cell": "{eu}"}, CELL),
        ({"cell": 7}, CELL),
    ],
)
def test_node_sends_register_when_a_field_is_invalid(changes: dict[str, Any], message: str) -> None:
    assert node_refusal(text(**register(**changes))) == ("BAD_FRAME", message, None)


def test_node_sends_register_when_language_code_is_too_long() -> None:
    code = "abc-12345678-12345678-1"  # 23 characters
    frame = parse_node_frame(text(**register(languages=["en", code])), LIMITS)
    assert isinstance(frame, Register)
    assert frame.lang_pairs[0] == ("en", code)
    assert node_refusal(text(**register(languages=["en", code + "23"]))) == (
        "BAD_FRAME",
        LANGS,
        None,
    )


def test_node_sends_result_when_finished() -> None:
    frame = parse_node_frame(
        '{"type":"result","job_id":"j-1","attempt":2,"status":"finished",'
        '"result": {"text" : "hello"},"error":"ignored"}',
        LIMITS,
    )
    assert frame == NodeResult(JobId("j-1"), 2, "finished", b'{"text":"hello"}', None)


def test_node_sends_result_when_failed_without_result() -> None:
    frame = parse_node_frame(text(**result(status="failed", result=None)), LIMITS)
    assert frame == NodeResult(JobId("j-1"), 1, "failed", b"null", None)


def test_node_sends_result_when_error_is_too_long() -> None:
    frame = parse_node_frame(text(**result(status="failed", error="e" * 300)), LIMITS)
    assert isinstance(frame, NodeResult)
    assert frame.error == "e" * 256


@pytest.mark.parametrize(
    ("changes", "code", "message"),
    [
        ({"job_id": None}, "BAD_FRAME", f"'job_id' must be an id {ID_RULE}"),
        ({"job_id": "j:1"}, "BAD_FRAME", f"'job_id' must be an id {ID_RULE}"),
        ({"attempt": 0}, "BAD_FRAME", "'attempt' must be a positive integer"),
        ({"attempt": False}, "BAD_FRAME", "'attempt' must be a positive integer"),
        ({"attempt": "1"}, "BAD_FRAME", "'attempt' must be a positive integer"),
        ({"status": "done"}, "BAD_FRAME", "'status' must be 'finished' or 'failed'"),
        ({"status": ["failed"]}, "BAD_FRAME", "'status' must be 'finished' or 'failed'"),
        ({"result": [1]}, "BAD_FRAME", "'result' must be a JSON object"),
        ({"result": "ok"}, "BAD_FRAME", "'result' must be a JSON object"),
        (
            {"result": {"t": "x" * 262137}},
            "TOO_LARGE",
            "'result' is larger than 262144 bytes",
        ),
        ({"error": 1}, "BAD_FRAME", "'error' must be a string or null"),
    ],
)
def test_node_sends_result_when_a_field_is_invalid(
    changes: dict[str, Any], code: str, message: str
) -> None:
    assert node_refusal(text(**result(**changes))) == (code, message, None)


def test_node_sends_result_when_result_is_nested_too_deeply() -> None:
    message = '{"type":"result","job_id":"j-1","attempt":1,"status":"failed","result":'
    assert node_refusal(message + deep(300) + "}") == (
        "BAD_FRAME",
        "'result' is nested too deeply",
        None,
    )


def test_node_sends_result_when_result_is_exactly_the_limit() -> None:
    frame = parse_node_frame(text(**result(result={"t": "x" * 262136})), LIMITS)
    assert isinstance(frame, NodeResult)
    assert len(frame.result) == 262144


def test_node_sends_partial_when_valid() -> None:
    frame = parse_node_frame(text(type="partial", job_id="j-1", attempt=1, result={}), LIMITS)
    assert frame == NodePartial(JobId("j-1"), 1, b"{}")


def test_node_sends_partial_when_result_is_missing() -> None:
    assert node_refusal(text(type="partial", job_id="j-1", attempt=1)) == (
        "BAD_FRAME",
        "'result' must be a JSON object",
        None,
    )


def test_node_sends_load_when_valid() -> None:
    frame = parse_node_frame(text(type="load", load={"gpu": 0.5, "queue": 2}), LIMITS)
    assert frame == Load(b'{"gpu":0.5,"queue":2}')


def test_node_sends_load_when_too_large_or_not_an_object() -> None:
    assert node_refusal(text(type="load", load={"x": "y" * 5000})) == (
        "TOO_LARGE",
        "'load' is larger than 4096 bytes",
        None,
    )
    assert node_refusal(text(type="load", load=0.5)) == (
        "BAD_FRAME",
        "'load' must be a JSON object",
        None,
    )


def test_node_sends_drain_when_valid() -> None:
    assert parse_node_frame('{"type":"drain"}', LIMITS) == Drain()


# Session frames (protocol.md §4)


def test_session_sends_job_when_text() -> None:
    frame = parse_session_frame(text(**job(src_lang="ZH-Hans", timeout_ms=1500)), LIMITS)
    assert frame == SubmitJob(
        "c-1", "zh-hans", "en", '{"text":"你好"}'.encode(), audio=None, timeout_ms=1500
    )


def test_session_sends_job_when_binary() -> None:
    frame = parse_session_frame(binary(b"\x00RIFF\xff", **job(payload=None)), LIMITS)
    assert frame == SubmitJob("c-1", "zh", "en", b"{}", audio=b"\x00RIFF\xff")


def test_session_sends_job_when_timeout_is_over_the_limit() -> None:
    frame = parse_session_frame(text(**job(timeout_ms=10**9)), LIMITS)
    assert isinstance(frame, SubmitJob)
    assert frame.timeout_ms == 600000


@pytest.mark.parametrize(
    ("changes", "code", "message", "ref"),
    [
        ({"ref": None}, "BAD_FRAME", BAD_REF, None),
        ({"ref": ""}, "BAD_FRAME", BAD_REF, None),
        ({"ref": "r" * 65}, "BAD_FRAME", BAD_REF, None),
        ({"ref": "tab\there"}, "BAD_FRAME", BAD_REF, None),
        ({"ref": "\x85"}, "BAD_FRAME", BAD_REF, None),
        (
            {"src_lang": "chinese"},
            "BAD_FRAME",
            "'src_lang' must be a language code such as 'en' or 'zh-Hans'",
            "c-1",
        ),
        (
            {"tgt_lang": None},
            "BAD_FRAME",
            "'tgt_lang' must be a language code such as 'en' or 'zh-Hans'",
            "c-1",
        ),
        ({"payload": []}, "BAD_FRAME", "'payload' must be a JSON object", "c-1"),
        (
            {"payload": {"t": "x" * 65530}},
            "TOO_LARGE",
            "'payload' is larger than 65536 bytes",
            "c-1",
        ),
        ({"timeout_ms": 0}, "BAD_FRAME", "'timeout_ms' must be a positive integer", "c-1"),
        ({"timeout_ms": True}, "BAD_FRAME", "'timeout_ms' must be a positive integer", "c-1"),
        ({"timeout_ms": 1.5}, "BAD_FRAME", "'timeout_ms' must be a positive integer", "c-1"),
    ],
)
def test_session_sends_job_when_a_field_is_invalid(
    changes: dict[str, Any], code: str, message: str, ref: str | None
) -> None:
    assert session_refusal(text(**job(**changes))) == (code, message, ref)


def test_session_sends_job_when_payload_is_nested_too_deeply() -> None:
    message = '{"type":"job","ref":"c-1","src_lang":"zh","tgt_lang":"en","payload":'
    assert session_refusal(message + deep(300) + "}") == (
        "BAD_FRAME",
        "'payload' is nested too deeply",
        "c-1",
    )


def test_session_sends_ref_when_unicode_is_allowed() -> None:
    frame = parse_session_frame(text(**job(ref="é 🎤 " + "x" * 60)), LIMITS)
    assert isinstance(frame, SubmitJob)
    assert frame.ref == "é 🎤 " + "x" * 60


def test_session_sends_binary_job_when_audio_is_empty() -> None:
    assert session_refusal(binary(b"", **job())) == (
        "BAD_FRAME",
        "binary job frame has no audio",
        "c-1",
    )


def test_session_sends_binary_job_when_audio_is_too_large() -> None:
    limits = Limits(max_audio_bytes=4)
    assert parse_session_frame(binary(b"1234", **job()), limits) == SubmitJob(
        "c-1", "zh", "en", '{"text":"你好"}'.encode(), audio=b"1234"
    )
    assert session_refusal(binary(b"12345", **job()), limits) == (
        "TOO_LARGE",
        "audio is larger than 4 bytes",
        "c-1",
    )


def test_session_sends_cancel_when_valid() -> None:
    assert parse_session_frame(text(type="cancel", ref="c-1"), LIMITS) == CancelJob("c-1")


def test_session_sends_cancel_when_ref_is_invalid() -> None:
    assert session_refusal(text(type="cancel", ref=3)) == ("BAD_FRAME", BAD_REF, None)


def test_session_sends_ack_when_valid() -> None:
    frame = parse_session_frame(text(type="ack", job_ids=["j-1", "j-2", "j-1"]), LIMITS)
    assert frame == Ack((JobId("j-1"), JobId("j-2")))
    assert parse_session_frame(text(type="ack", job_ids=[]), LIMITS) == Ack(())


def test_session_sends_ack_when_ids_are_invalid() -> None:
    message = f"'job_ids' must be a list of 0 to 256 ids {ID_RULE}"
    for job_ids in [None, ["j"] * 257, ["j 1"], [1]]:
        assert session_refusal(text(type="ack", job_ids=job_ids)) == ("BAD_FRAME", message, None)


# Encoders (protocol.md §3, §4)


def test_hub_sends_registered_when_node_is_accepted() -> None:
    frame = encode_registered(NodeId("gpu-1"), "hub-a", 5000, [JobId("j-1")], (JobId("j-2"),))
    assert orjson.loads(frame) == {
        "type": "registered",
        "node_id": "gpu-1",
        "hub_id": "hub-a",
        "heartbeat_interval_ms": 5000,
        "resumed": ["j-1"],
        "dropped": ["j-2"],
    }


def test_hub_sends_job_when_text_only() -> None:
    frame = encode_job(
        JobId("j-1"), 1, SessionId("s-1"), "zh", "en", b'{"text":"\xe4\xbd\xa0"}', 1700, None
    )
    assert frame == (
        '{"type":"job","job_id":"j-1","attempt":1,"session_id":"s-1","src_lang":"zh",'
        '"tgt_lang":"en","payload":{"text":"你"},"deadline_ms":1700}'
    )


def test_hub_sends_job_when_it_has_audio() -> None:
    audio = bytes(range(256))
    frame = encode_job(JobId("j-1"), 2, SessionId("s-1"), "zh", "en", b"{}", 9, audio)
    assert isinstance(frame, bytes)
    header, rest = split_binary(frame)
    assert rest == audio
    assert orjson.loads(header) == {
        "type": "job",
        "job_id": "j-1",
        "attempt": 2,
        "session_id": "s-1",
        "src_lang": "zh",
        "tgt_lang": "en",
        "payload": {},
        "deadline_ms": 9,
    }


def test_hub_forwards_job_when_session_sent_binary() -> None:
    submitted = parse_session_frame(binary(b"\x01\x02", **job()), LIMITS)
    assert isinstance(submitted, SubmitJob)
    sent = encode_job(
        JobId("j-1"),
        1,
        SessionId("s-1"),
        submitted.src_lang,
        submitted.tgt_lang,
        submitted.payload,
        5,
        submitted.audio,
    )
    assert isinstance(sent, bytes)
    assert sent.endswith(b"\x01\x02")
    assert submitted.payload in sent


def test_hub_sends_cancel_when_job_is_cancelled() -> None:
    assert encode_cancel(JobId("j-1"), 3, "CANCELLED") == (
        '{"type":"cancel","job_id":"j-1","attempt":3,"reason":"CANCELLED"}'
    )


def test_hub_sends_welcome_when_session_opens() -> None:
    assert encode_welcome(SessionId("s-1"), "hub-a", "tok") == (
        '{"type":"welcome","session_id":"s-1","hub_id":"hub-a","resume_token":"tok"}'
    )


def test_hub_sends_accepted_and_queued_when_job_is_taken() -> None:
    assert encode_accepted("c-1", JobId("j-1"), NodeId("gpu-1"), 1) == (
        '{"type":"accepted","ref":"c-1","job_id":"j-1","node_id":"gpu-1","attempt":1}'
    )
    assert encode_queued("c-\n1", JobId("j-1")) == (
        '{"type":"queued","ref":"c-\\n1","job_id":"j-1"}'
    )


def test_hub_sends_partial_when_node_sent_one() -> None:
    spliced = b'{"text": "hel"}'  # spliced untouched, spaces included
    assert encode_partial("c-1", JobId("j-1"), spliced) == (
        '{"type":"partial","ref":"c-1","job_id":"j-1","result":{"text": "hel"}}'
    )


def test_hub_sends_result_when_job_ends() -> None:
    assert encode_result("c-1", JobId("j-1"), "finished", b'{"t":1}', None) == (
        '{"type":"result","ref":"c-1","job_id":"j-1","status":"finished",'
        '"result":{"t":1},"error":null}'
    )
    assert encode_result("c-1", JobId("j-1"), "failed", None, "JOB_TIMEOUT") == (
        '{"type":"result","ref":"c-1","job_id":"j-1","status":"failed",'
        '"result":null,"error":"JOB_TIMEOUT"}'
    )


def test_hub_sends_error_when_frame_is_refused() -> None:
    exc = ProtocolError("frame is not valid JSON")
    assert encode_error(exc.ref, exc.code, exc.message) == (
        '{"type":"error","ref":null,"code":"BAD_FRAME","message":"frame is not valid JSON"}'
    )
    assert orjson.loads(encode_error("c-1", "QUEUE_FULL", "full"))["ref"] == "c-1"


# The peers' side: their encoders, read back by the hub's parser (protocol.md §3, §4)


def test_node_encodes_register_when_it_serves_languages() -> None:
    frame = encode_register("gpu-1", ("asr", "nmt"), 4, languages=["zh", "en"])
    assert frame == (
        b'{"type":"register","node_id":"gpu-1","services":["asr","nmt"],'
        b'"languages":["zh","en"],"max_jobs":4}'
    )
    assert parse_node_frame(frame.decode(), LIMITS) == Register(
        NodeId("gpu-1"), ("asr", "nmt"), (("zh", "en"), ("en", "zh")), 4
    )


def test_node_encodes_register_when_it_serves_pairs_and_resumes() -> None:
    frame = encode_register(
        "gpu-1", ["asr"], 2, lang_pairs=[("en", "zh")], pools=["p"], resume=["j-1"], cell="eu"
    )
    assert parse_node_frame(frame.decode(), LIMITS) == Register(
        NodeId("gpu-1"), ("asr",), (("en", "zh"),), 2, ("p",), (JobId("j-1"),), "eu"
    )


@pytest.mark.parametrize("languages", [None, ["zh", "en"]])
def test_node_encodes_register_when_languages_and_pairs_are_not_one(
    languages: list[str] | None,
) -> None:
    pairs = None if languages is None else [("zh", "en")]
    with pytest.raises(ValueError, match=exactly("give exactly one of languages and lang_pairs")):
        encode_register("gpu-1", ["asr"], 1, languages=languages, lang_pairs=pairs)


def test_node_encodes_result_when_finished_or_failed() -> None:
    finished = encode_node_result("j-1", 2, "finished", {"text": "hi"})
    assert finished == (
        b'{"type":"result","job_id":"j-1","attempt":2,"status":"finished","result":{"text":"hi"}}'
    )
    assert parse_node_frame(finished.decode(), LIMITS) == NodeResult(
        JobId("j-1"), 2, "finished", b'{"text":"hi"}', None
    )
    failed = encode_node_result("j-1", 1, "failed", error="boom")
    assert parse_node_frame(failed.decode(), LIMITS) == NodeResult(
        JobId("j-1"), 1, "failed", b"null", "boom"
    )


def test_node_encodes_result_when_it_is_not_json() -> None:
    with pytest.raises(TypeError):
        encode_node_result("j-1", 1, "finished", {"set": {1}})


def test_node_encodes_partial_load_and_drain_when_valid() -> None:
    partial = encode_node_partial("j-1", 1, {"text": "h"})
    assert parse_node_frame(partial.decode(), LIMITS) == NodePartial(
        JobId("j-1"), 1, b'{"text":"h"}'
    )
    assert parse_node_frame(encode_load({"gpu": 0.5}).decode(), LIMITS) == Load(b'{"gpu":0.5}')
    assert encode_drain() == b'{"type":"drain"}'
    assert parse_node_frame(encode_drain().decode(), LIMITS) == Drain()


def test_session_encodes_job_when_text() -> None:
    frame = encode_submit_job("c-1", "zh", "en", {"text": "你好"}, timeout_ms=500)
    assert parse_session_frame(frame.decode(), LIMITS) == SubmitJob(
        "c-1", "zh", "en", orjson.dumps({"text": "你好"}), None, 500
    )
    plain = encode_submit_job("c-1", "zh", "en")
    assert plain == b'{"type":"job","ref":"c-1","src_lang":"zh","tgt_lang":"en","payload":{}}'


def test_session_encodes_job_when_it_has_audio() -> None:
    frame = encode_submit_job_audio("c-1", "zh", "en", None, b"\x00\x01", timeout_ms=9)
    assert parse_session_frame(frame, LIMITS) == SubmitJob("c-1", "zh", "en", b"{}", b"\x00\x01", 9)


def test_session_encodes_job_when_audio_is_empty() -> None:
    with pytest.raises(ValueError, match="audio must not be empty"):
        encode_submit_job_audio("c-1", "zh", "en", {}, b"")


def test_session_encodes_cancel_and_ack_when_valid() -> None:
    assert parse_session_frame(encode_cancel_job("c-1").decode(), LIMITS) == CancelJob("c-1")
    ack = encode_ack(("j-1", "j-2"))
    assert parse_session_frame(ack.decode(), LIMITS) == Ack((JobId("j-1"), JobId("j-2")))


# The peers' side: the hub's frames, read back by their decoders (protocol.md §3, §4)


def test_node_decodes_registered_when_hub_accepts_it() -> None:
    frame = encode_registered(NodeId("gpu-1"), "hub-a", 5000, [JobId("j-1")], ())
    assert decode_to_node(frame) == Registered("gpu-1", "hub-a", 5000, ("j-1",), ())


def test_node_decodes_job_when_text_or_binary() -> None:
    args = (JobId("j-1"), 2, SessionId("s-1"), "zh", "en", b'{"t":1}', 1700)
    text_job = NodeJob("j-1", 2, "s-1", "zh", "en", {"t": 1}, 1700)
    assert decode_to_node(encode_job(*args, None)) == text_job
    with_audio = encode_job(*args, b"\x01")
    assert decode_to_node(with_audio, binary=True) == dataclasses.replace(text_job, audio=b"\x01")
    # A text frame may come as UTF-8 bytes (the load test's own client).
    assert decode_to_node(str(encode_job(*args, None)).encode()) == text_job


def test_node_decodes_cancel_and_error_when_hub_sends_them() -> None:
    assert decode_to_node(encode_cancel(JobId("j-1"), 3, Code.JOB_TIMEOUT)) == NodeCancel(
        "j-1", 3, "JOB_TIMEOUT"
    )
    assert decode_to_node(encode_error("j-1", Code.UNAVAILABLE, "down")) == ErrorReply(
        "j-1", "UNAVAILABLE", "down"
    )


def test_session_decodes_each_frame_when_hub_sends_it() -> None:
    job_id, node_id = JobId("j-1"), NodeId("gpu-1")
    assert decode_to_session(encode_welcome(SessionId("s-1"), "hub-a", "tok")) == Welcome(
        "s-1", "hub-a", "tok"
    )
    assert decode_to_session(encode_accepted("c-1", job_id, node_id, 1)) == Accepted(
        "c-1", "j-1", "gpu-1", 1
    )
    assert decode_to_session(encode_queued("c-1", job_id)) == Queued("c-1", "j-1")
    assert decode_to_session(encode_partial("c-1", job_id, b'{"t":1}')) == SessionPartial(
        "c-1", "j-1", {"t": 1}
    )
    assert decode_to_session(
        encode_result("c-1", job_id, "finished", b'{"t":2}', None)
    ) == SessionResult("c-1", "j-1", "finished", {"t": 2}, None)
    assert decode_to_session(
        encode_result("c-1", job_id, "failed", None, Code.NODE_LOST)
    ) == SessionResult("c-1", "j-1", "failed", None, "NODE_LOST")
    assert decode_to_session(encode_error(None, Code.BAD_FRAME, "no")) == ErrorReply(
        None, "BAD_FRAME", "no"
    )


def decoding_error(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(ProtocolError) as exc_info:
        call()
    return exc_info.value.code, exc_info.value.message


@pytest.mark.parametrize(
    ("frame", "binary", "expected"),
    [
        ("{", False, ("BAD_FRAME", "frame is not valid JSON")),
        ("[]", False, ("BAD_FRAME", "frame must be a JSON object")),
        ('{"type":1}', False, ("BAD_FRAME", "'type' must be a string")),
        ('{"type":"welcome"}', False, ("UNKNOWN_TYPE", "unknown frame type 'welcome'")),
        (b"\x00\x00", True, ("BAD_FRAME", "binary frame shorter than its 4-byte header length")),
        (
            join_binary(b'{"type":"cancel"}', b"\x01"),
            True,
            ("BAD_FRAME", "binary frames carry only jobs"),
        ),
        (text(type="cancel", job_id=1), False, ("BAD_FRAME", "'job_id' must be a string")),
        (
            text(type="cancel", job_id="j", attempt="1"),
            False,
            ("BAD_FRAME", "'attempt' must be an integer"),
        ),
        (
            text(type="job", payload=[]),
            False,
            ("BAD_FRAME", "'payload' must be a JSON object"),
        ),
        (
            text(type="registered", node_id="n", hub_id="h", heartbeat_interval_ms=1, resumed=[1]),
            False,
            ("BAD_FRAME", "'resumed' must be a list of strings"),
        ),
        (
            text(type="registered", node_id="n", hub_id="h", heartbeat_interval_ms=1, resumed={}),
            False,
            ("BAD_FRAME", "'resumed' must be a list of strings"),
        ),
        (
            text(type="error", ref=1, code="X", message=""),
            False,
            ("BAD_FRAME", "'ref' must be a string or null"),
        ),
    ],
)
def test_node_decodes_frame_when_it_is_malformed(
    frame: str | bytes, binary: bool, expected: tuple[str, str]
) -> None:
    assert decoding_error(lambda: decode_to_node(frame, binary=binary)) == expected


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"type": "job"}, ("UNKNOWN_TYPE", "unknown frame type 'job'")),
        ({"type": "partial", "result": None}, ("BAD_FRAME", "'result' must be a JSON object")),
        (
            {"type": "result", "status": "ok"},
            ("BAD_FRAME", "'status' must be 'finished' or 'failed'"),
        ),
        (
            {"type": "result", "status": "failed", "result": []},
            ("BAD_FRAME", "'result' must be a JSON object or null"),
        ),
        (
            {"type": "result", "status": "failed", "error": 1},
            ("BAD_FRAME", "'error' must be a string or null"),
        ),
    ],
)
def test_session_decodes_frame_when_it_is_malformed(
    fields: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert decoding_error(lambda: decode_to_session(text(**fields))) == expected


# Errors (hub/errors.py)


def test_errors_read_as_code_and_message_when_printed() -> None:
    assert str(ClientError()) == "BAD_FRAME"
    assert str(LimitExceeded("slow down")) == "RATE_LIMITED: slow down"
    assert str(RedisUnavailable("ping")) == "redis unavailable during ping"
    assert str(ScriptError("dispatch", [1])) == "unexpected reply from dispatch.lua: [1]"


def test_script_code_becomes_its_exception_when_mapped() -> None:
    error = error_for_code(-7, ref="c-1")
    assert (error.error_code, error.code, error.ref) == (
        ErrorCode.STALE_ATTEMPT,
        Code.STALE_ATTEMPT,
        "c-1",
    )
    assert error.message == "the attempt is stale or the job has already ended"
    with pytest.raises(ValueError):
        error_for_code(-1000)


# Node connection (protocol.md §9.1)


def test_node_sends_register_when_connecting() -> None:
    node = NodeConnection(LIMITS)
    assert (node.state, node.node_id) == (NodeState.CONNECTING, None)
    assert isinstance(node.receive(text(**register())), Register)
    assert node.state is NodeState.CONNECTING
    node.registered(NodeId("gpu-1"))
    assert (node.state, node.node_id) == (NodeState.OPEN, "gpu-1")


def test_node_sends_result_when_not_registered() -> None:
    node = NodeConnection(LIMITS)
    assert refusal(lambda: node.receive(text(**result()))) == (
        "NOT_REGISTERED",
        "send register first",
        None,
    )
    assert refusal(lambda: node.receive('{"type":"drain"}')) == (
        "NOT_REGISTERED",
        "send register first",
        None,
    )
    assert node.state is NodeState.CONNECTING


def test_node_sends_result_when_register_is_not_accepted_yet() -> None:
    node = NodeConnection(LIMITS)
    node.receive(text(**register()))
    assert refusal(lambda: node.receive(text(**result())))[0] == "NOT_REGISTERED"


def test_node_sends_register_when_already_registered() -> None:
    node = NodeConnection(LIMITS)
    node.receive(text(**register()))
    expected = ("ALREADY_REGISTERED", "the node is already registered", None)
    assert refusal(lambda: node.receive(text(**register()))) == expected
    node.registered(NodeId("gpu-1"))
    assert refusal(lambda: node.receive(text(**register()))) == expected
    assert node.state is NodeState.OPEN


def test_node_sends_frames_when_open() -> None:
    node = open_node()
    assert isinstance(node.receive(text(**result())), NodeResult)
    assert isinstance(node.receive(text(type="load", load={})), Load)
    assert node.state is NodeState.OPEN


def test_node_sends_drain_when_open() -> None:
    node = open_node()
    assert node.receive('{"type":"drain"}') == Drain()
    assert node.state is NodeState.DRAINING
    assert node.receive('{"type":"drain"}') == Drain()
    assert isinstance(node.receive(text(**result())), NodeResult)
    assert node.state is NodeState.DRAINING


def test_node_sends_bad_frame_when_open_and_stays_open() -> None:
    node = open_node()
    assert refusal(lambda: node.receive("{"))[0] == "BAD_FRAME"
    assert node.state is NodeState.OPEN


def test_server_calls_registered_when_out_of_order() -> None:
    node = NodeConnection(LIMITS)
    with pytest.raises(RuntimeError, match=exactly("registered() called in state CONNECTING")):
        node.registered(NodeId("gpu-1"))
    node = open_node()
    with pytest.raises(RuntimeError, match=exactly("registered() called in state OPEN")):
        node.registered(NodeId("gpu-1"))


def test_node_sends_frame_when_closed() -> None:
    node = open_node()
    node.close()
    assert node.state is NodeState.CLOSED
    assert refusal(lambda: node.receive('{"type":"drain"}')) == (
        "BAD_FRAME",
        "the connection is closed",
        None,
    )


# Session connection (protocol.md §9.2)


def test_server_builds_session_when_limits_are_invalid() -> None:
    with pytest.raises(ValueError, match=exactly("max_inflight must be at least 1")):
        new_session(max_inflight=0)
    with pytest.raises(ValueError, match=exactly("rate_per_s must be positive")):
        new_session(rate_per_s=0.0)
    with pytest.raises(ValueError, match=exactly("rate_per_s must be positive")):
        new_session(rate_per_s=float("nan"))
    with pytest.raises(ValueError, match=exactly("burst must be at least 1")):
        new_session(burst=0)


def test_session_sends_jobs_when_under_the_limits() -> None:
    session = new_session()
    assert session.state is SessionState.OPEN
    frame = session.receive(text(**job()), 0.0)
    assert isinstance(frame, SubmitJob)
    assert session.open_refs == 1
    assert session.job_for("c-1") is None
    assert session.open_jobs() == []  # pending: no id yet
    assert session.job_started("c-1", JobId("j-1")) is True
    assert session.job_for("c-1") == "j-1"
    assert session.ref_for(JobId("j-1")) == "c-1"
    assert session.open_jobs() == [("j-1", "c-1")]
    assert session.job_ended(JobId("j-1")) == "c-1"
    assert session.open_refs == 0
    assert session.ref_for(JobId("j-1")) is None
    assert session.open_jobs() == []


def test_session_sends_job_when_ref_is_open() -> None:
    session = new_session()
    session.receive(text(**job()), 0.0)
    assert refusal(lambda: session.receive(text(**job()), 0.0)) == (
        "DUPLICATE_REF",
        "'ref' is already used by an unfinished job",
        "c-1",
    )
    session.job_started("c-1", JobId("j-1"))
    assert refusal(lambda: session.receive(text(**job()), 0.0))[0] == "DUPLICATE_REF"
    session.job_ended(JobId("j-1"))
    assert isinstance(session.receive(text(**job()), 0.0), SubmitJob)


def test_session_sends_job_when_too_many_are_unfinished() -> None:
    session = new_session(max_inflight=2)
    session.receive(text(**job(ref="a")), 0.0)
    session.receive(text(**job(ref="b")), 0.0)
    with pytest.raises(LimitExceeded) as exc_info:
        session.receive(text(**job(ref="c")), 0.0)
    assert reason(exc_info.value) == ("TOO_MANY_JOBS", "more than 2 unfinished jobs", "c")
    session.job_refused("a")
    assert isinstance(session.receive(text(**job(ref="c")), 0.0), SubmitJob)
    assert session.open_refs == 2


def test_session_sends_jobs_when_faster_than_the_rate() -> None:
    session = new_session(max_inflight=100, rate_per_s=2.0, burst=2)
    session.receive(text(**job(ref="a")), 10.0)
    session.receive(text(**job(ref="b")), 10.0)
    with pytest.raises(LimitExceeded) as exc_info:
        session.receive(text(**job(ref="c")), 10.25)
    assert reason(exc_info.value) == ("RATE_LIMITED", "too many jobs per second", "c")
    # Half a second at 2 jobs/s brings one token back (0.5 by 10.25, 0.5 more by 10.5).
    assert isinstance(session.receive(text(**job(ref="c")), 10.5), SubmitJob)
    assert refusal(lambda: session.receive(text(**job(ref="d")), 10.5))[0] == "RATE_LIMITED"


def test_session_sends_jobs_when_clock_goes_back() -> None:
    session = new_session(rate_per_s=1.0, burst=1)
    session.receive(text(**job(ref="a")), 100.0)
    assert refusal(lambda: session.receive(text(**job(ref="b")), 50.0))[0] == "RATE_LIMITED"
    assert isinstance(session.receive(text(**job(ref="b")), 51.0), SubmitJob)


def test_session_sends_job_when_bucket_refills_past_burst() -> None:
    session = new_session(rate_per_s=1.0, burst=2)
    session.receive(text(**job(ref="a")), 0.0)
    session.receive(text(**job(ref="b")), 1000.0)
    session.receive(text(**job(ref="c")), 1000.0)
    assert refusal(lambda: session.receive(text(**job(ref="d")), 1000.0))[0] == "RATE_LIMITED"


def test_session_sends_job_when_rate_limited_but_ref_is_a_duplicate() -> None:
    session = new_session(rate_per_s=1.0, burst=1)
    session.receive(text(**job()), 0.0)
    # protocol.md §9.2: the rate is checked first.
    assert refusal(lambda: session.receive(text(**job()), 0.0))[0] == "RATE_LIMITED"


def test_session_sends_cancel_when_ref_is_unknown() -> None:
    session = new_session()
    assert refusal(lambda: session.receive(text(type="cancel", ref="c-7"), 0.0)) == (
        "UNKNOWN_JOB",
        "no unfinished job has this ref",
        "c-7",
    )


def test_session_sends_cancel_when_ref_is_open() -> None:
    session = new_session()
    session.receive(text(**job()), 0.0)
    assert session.receive(text(type="cancel", ref="c-1"), 0.0) == CancelJob("c-1")
    assert session.open_refs == 1


def test_session_sends_ack_when_open() -> None:
    session = new_session()
    assert session.receive(text(type="ack", job_ids=["j-1"]), 0.0) == Ack((JobId("j-1"),))


def test_server_starts_job_when_ref_is_not_pending() -> None:
    session = new_session()
    assert session.job_started("nope", JobId("j-1")) is False
    session.receive(text(**job()), 0.0)
    assert session.job_started("c-1", JobId("j-1")) is True
    assert session.job_started("c-1", JobId("j-2")) is False
    assert session.job_for("c-1") == "j-1"
    assert session.ref_for(JobId("j-2")) is None


def test_server_refuses_job_when_started_or_unknown() -> None:
    session = new_session()
    session.receive(text(**job()), 0.0)
    session.job_started("c-1", JobId("j-1"))
    session.job_refused("c-1")
    assert (session.open_refs, session.ref_for(JobId("j-1"))) == (0, None)
    session.job_refused("c-1")
    assert session.job_ended(JobId("j-1")) is None


def test_session_sends_job_when_closed() -> None:
    session = new_session()
    session.close()
    assert session.state is SessionState.CLOSED
    assert refusal(lambda: session.receive(text(**job()), 0.0)) == (
        "BAD_FRAME",
        "the connection is closed",
        None,
    )


# Nothing but client errors, whatever comes in (bad input never hurts anyone else)

TINY = Limits(
    max_payload_bytes=32,
    max_audio_bytes=8,
    max_result_bytes=32,
    max_id_length=4,
    max_jobs_per_node=2,
    max_timeout_ms=10,
    max_languages=2,
    max_pools=1,
    max_services=1,
    max_error_length=3,
    max_ack_ids=2,
    max_load_bytes=16,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

VALID_FRAMES: list[dict[str, Any]] = [
    register(),
    register(languages=None, lang_pairs=[["zh", "en"]], pools=["p"], resume=["j-1"]),
    result(),
    result(status="failed", error="boom", result=None),
    {"type": "partial", "job_id": "j-1", "attempt": 1, "result": {"t": "x"}},
    {"type": "load", "load": {"gpu": 0.5}},
    {"type": "drain"},
    job(),
    job(timeout_ms=100, payload={}),
    {"type": "cancel", "ref": "c-1"},
    {"type": "ack", "job_ids": ["j-1"]},
]
FIELDS = sorted({key for frame in VALID_FRAMES for key in frame} | {"lang_pairs", "x"})


@st.composite
def mutated_frames(draw: st.DrawFn) -> dict[str, Any]:
    frame = dict(draw(st.sampled_from(VALID_FRAMES)))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()):
            frame.pop(key, None)
        else:
            frame[key] = draw(json_values | st.sampled_from([[["zh", "en"]], ["en", "de"], 1]))
    return frame


def as_binary(header: bytes, audio: bytes, skew: int) -> bytes:
    return max(0, len(header) + skew).to_bytes(4, "big") + header + audio


text_messages = (
    st.text()
    | json_values.map(lambda v: orjson.dumps(v).decode())
    | mutated_frames().map(lambda f: orjson.dumps(f).decode())
)
binary_messages = st.binary() | st.builds(
    as_binary,
    mutated_frames().map(orjson.dumps) | st.binary(max_size=20),
    st.binary(max_size=12),
    st.sampled_from([0, 0, 0, -1, 1, 100]),
)
messages = text_messages | binary_messages


@settings(
    max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    batch=st.lists(messages, min_size=1, max_size=8),
    limits=st.sampled_from([LIMITS, TINY]),
    now=st.floats(min_value=-1e9, max_value=1e9),
)
def test_client_sends_anything_when_fuzzed(
    batch: list[str | bytes], limits: Limits, now: float
) -> None:
    node = NodeConnection(limits)
    session = SessionConnection(limits, max_inflight=2, rate_per_s=5.0, burst=3)
    for i, message in enumerate(batch):
        attempt(parse_node_frame, message, limits)
        attempt(parse_session_frame, message, limits)
        frame = attempt(node.receive, message)
        if isinstance(frame, Register) and node.state is NodeState.CONNECTING:
            node.registered(frame.node_id)
        submitted = attempt(session.receive, message, now + i / 10)
        if isinstance(submitted, SubmitJob) and i % 2:
            session.job_started(submitted.ref, JobId(f"j{i}"))
        elif isinstance(submitted, CancelJob):
            job_id = session.job_for(submitted.ref)
            if job_id is None:
                session.job_refused(submitted.ref)
            else:
                session.job_ended(job_id)
        assert session.open_refs <= 2
    node.close()
    session.close()
    assert attempt(node.receive, batch[0]) is None
    assert attempt(session.receive, batch[0], now) is None


def test_session_reopens_job_when_resuming():
    conn = SessionConnection(Limits(), max_inflight=1, rate_per_s=None, burst=1)
    assert conn.reopen("r-1", JobId("j-1"))
    assert conn.job_for("r-1") == "j-1"
    assert conn.ref_for(JobId("j-1")) == "r-1"
    assert not conn.reopen("r-1", JobId("j-2"))
    assert not conn.reopen("r-2", JobId("j-3"))
    assert conn.job_ended(JobId("j-1")) == "r-1"
    assert conn.open_refs == 0


# HTTP job bodies (protocol.md §11.2)


def test_client_posts_json_job_body():
    fields = {"type": "ignored", "ref": "ignored", "src_lang": "EN", "tgt_lang": "fr"}
    body = orjson.dumps(fields | {"payload": {"text": "hi"}, "timeout_ms": 10**9})
    job_frame = parse_job_body(body, "j-1", LIMITS, binary=False)
    assert job_frame == SubmitJob("j-1", "en", "fr", b'{"text":"hi"}', None, LIMITS.max_timeout_ms)


def test_client_posts_binary_job_body():
    body = join_binary(b'{"src_lang": "en", "tgt_lang": "fr"}', b"\x00\x01")
    job_frame = parse_job_body(body, "j-2", LIMITS, binary=True)
    assert job_frame == SubmitJob("j-2", "en", "fr", b"{}", b"\x00\x01", None)


def test_client_posts_job_body_when_malformed():
    def body_refusal(body: bytes, binary: bool) -> tuple[str, str, str | None]:
        return refusal(lambda: parse_job_body(body, "j-3", LIMITS, binary=binary))

    assert body_refusal(b"{", False) == ("BAD_FRAME", "frame is not valid JSON", None)
    assert body_refusal(b"[]", False) == ("BAD_FRAME", "frame must be a JSON object", None)
    assert body_refusal(b"\x00\x00\x00\x09{}", True) == (
        "BAD_FRAME",
        "binary header length past end of frame",
        None,
    )
    assert body_refusal(b'{"src_lang": "en"}', False)[0:3:2] == ("BAD_FRAME", "j-3")
    too_big = orjson.dumps({"src_lang": "en", "tgt_lang": "fr", "payload": {"t": "x" * 70000}})
    assert body_refusal(too_big, False)[0] == "TOO_LARGE"


def test_session_admits_job_parsed_elsewhere():
    session = new_session(max_inflight=1, rate_per_s=None)
    first = parse_job_body(b'{"src_lang":"en","tgt_lang":"fr"}', "a", LIMITS, binary=False)
    session.admit(first, 0.0)
    assert session.open_refs == 1
    second = parse_job_body(b'{"src_lang":"en","tgt_lang":"fr"}', "b", LIMITS, binary=False)
    assert refusal(lambda: session.admit(second, 0.0))[0] == "TOO_MANY_JOBS"
