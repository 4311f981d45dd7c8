"""The HTTP job API (protocol.md §11) over real HTTP, on the hub's own port.

Nodes are plain WebSocket clients (``tests.hubtools``); the HTTP client
below writes requests and reads answers on one TCP connection, as curl and
every keep-alive client do. Every status of §11.5 has a test here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from hub.app import Hub
from hub.auth import mint_session_token
from hub.errors import Code
from hub.httpconn import HTTP_STATUS, HttpRequest, HttpResponse, HttpServer
from loadtest.procs import Processes, RedisProcess
from tests.helpers import MS, wait_for
from tests.hubtools import (
    ALL_BYTES,
    Connect,
    binary_job,
    expect,
    http_get,
    open_node,
    open_session,
    register,
    result,
    round_trip,
)

KEY = "k" * 32
"""The session token key of the hubs with auth."""
NODE_SECRET = "s" * 32

ANSWER_TIMEOUT = 5000 * MS


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class HttpClient:
    """One keep-alive HTTP/1.1 connection to a hub."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> HttpClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        within: float = ANSWER_TIMEOUT,
    ) -> Reply:
        head = {"Host": "hub"} | (headers or {})
        if json is not None:
            body = orjson.dumps(json)
            head.setdefault("Content-Type", "application/json")
        if body is not None:
            head["Content-Length"] = str(len(body))
        if token is not None:
            head["Authorization"] = f"Bearer {token}"
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        self.writer.write(f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode() + (body or b""))
        return await self.read(within, head=method == "HEAD")

    async def read(self, within: float = ANSWER_TIMEOUT, *, head: bool = False) -> Reply:
        async with asyncio.timeout(within):
            while True:
                raw = await self.reader.readuntil(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                if status != 100:
                    break
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            size = 0 if head else int(headers.get("content-length", "0"))
            body = await self.reader.readexactly(size)
        return Reply(status, headers, body)

    async def closed(self, within: float = ANSWER_TIMEOUT) -> bool:
        """Whether the hub closes the connection (reads until EOF)."""
        async with asyncio.timeout(within):
            return await self.reader.read() == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


HttpFactory = Callable[[Hub], Awaitable[HttpClient]]


@pytest.fixture
async def client() -> AsyncIterator[HttpFactory]:
    """Factory of HTTP connections to a hub, closed at teardown."""
    opened: list[HttpClient] = []

    async def open_client(hub: Hub) -> HttpClient:
        c = await HttpClient.open(hub.port)
        opened.append(c)
        return c

    try:
        yield open_client
    finally:
        for c in opened:
            await c.close()


def job_body(**changes: Any) -> dict[str, Any]:
    return {"src_lang": "en", "tgt_lang": "fr", "payload": {"text": "hi"}} | changes


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, reply
    assert reply.headers["content-type"] == "application/json"
    body = reply.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    if status in (429, 503):
        assert int(reply.headers["retry-after"]) >= 1, reply.headers
    return dict(body)


# Submit, look up, results


async def test_post_waits_for_the_result(hub: Hub, connect: Connect, client: HttpFactory) -> None:
    node = await open_node(connect, hub, "n1")
    http_ = await client(hub)
    send = asyncio.create_task(http_.request("POST", "/v1/jobs?wait_ms=4000", json=job_body()))
    job = await expect(node, "job", payload={"text": "hi"}, src_lang="en", tgt_lang="fr")
    assert job["session_id"] == "http-127.0.0.1"
    await result(node, job, result={"text": "salut"})
    reply = await send
    assert reply.status == 200, reply
    assert reply.json() == {
        "job_id": job["job_id"],
        "status": "finished",
        "result": {"text": "salut"},
        "error": None,
    }
    # Keep-alive: the same connection reads the job back from Redis.
    again = await http_.request("GET", f"/v1/jobs/{job['job_id']}")
    assert again.status == 200
    assert again.json()["status"] == "finished"
    assert again.json()["result"] == {"text": "salut"}
    assert again.json()["node_id"] == "n1"
    _, _, metrics = await http_get(hub.port, "/metrics")
    assert b'hub_http_requests_total{method="POST",status="200"} 1.0' in metrics
    assert b'hub_http_requests_total{method="GET",status="200"} 1.0' in metrics


async def test_post_answers_202_then_get_follows_the_job(
    hub: Hub, connect: Connect, client: HttpFactory
) -> None:
    node = await open_node(connect, hub, "n1")
    http_ = await client(hub)
    reply = await http_.request("POST", "/v1/jobs", json=job_body(timeout_ms=9000))
    assert reply.status == 202, reply
    jid = reply.json()["job_id"]
    assert reply.json() == {"job_id": jid, "status": "running"}
    assert reply.headers["location"] == f"/v1/jobs/{jid}"
    job = await expect(node, "job", job_id=jid)
    running = await http_.request("GET", reply.headers["location"])
    assert running.status == 200
    assert running.json() | {"deadline_ms": 0} == {
        "job_id": jid,
        "status": "running",
        "result": None,
        "error": None,
        "src_lang": "en",
        "tgt_lang": "fr",
        "node_id": "n1",
        "attempt": 1,
        "deadline_ms": 0,
    }
    assert running.json()["deadline_ms"] > 0
    # A look-up that waits is answered when the result comes.
    waiting = asyncio.create_task(http_.request("GET", f"/v1/jobs/{jid}?wait_ms=4000"))
    await asyncio.sleep(50 * MS)
    assert not waiting.done()
    await result(node, job, status="failed", error="model crashed")
    done = await waiting
    assert done.status == 200
    assert done.json()["status"] == "failed"
    assert done.json()["error"] == "model crashed"


async def test_post_binary_envelope_carries_audio_to_the_node(
    hub: Hub, connect: Connect, client: HttpFactory
) -> None:
    node = await open_node(connect, hub, "n1")
    http_ = await client(hub)
    body = binary_job({"src_lang": "en", "tgt_lang": "fr", "payload": {"rate": 16000}}, ALL_BYTES)
    reply = await http_.request(
        "POST", "/v1/jobs", body=body, headers={"Content-Type": "application/octet-stream"}
    )
    assert reply.status == 202, reply
    job = await expect(node, "job", job_id=reply.json()["job_id"], payload={"rate": 16000})
    assert job["audio"] == ALL_BYTES


async def test_post_of_a_queued_job_says_queued(
    hub: Hub, connect: Connect, client: HttpFactory
) -> None:
    node = await open_node(connect, hub, "n1", max_jobs=1)
    http_ = await client(hub)
    first = await http_.request("POST", "/v1/jobs", json=job_body())
    assert first.json()["status"] == "running"
    second = await http_.request("POST", "/v1/jobs", json=job_body())
    assert second.status == 202
    assert second.json()["status"] == "queued"
    job = await expect(node, "job", job_id=first.json()["job_id"])
    await result(node, job, result={"n": 1})
    nxt = await expect(node, "job", job_id=second.json()["job_id"])
    await result(node, nxt, result={"n": 2})
    done = await http_.request("GET", f"/v1/jobs/{nxt['job_id']}?wait_ms=3000")
    assert done.json()["result"] == {"n": 2}


async def test_post_wait_ends_202_while_the_job_runs(
    hub: Hub, connect: Connect, client: HttpFactory
) -> None:
    await open_node(connect, hub, "n1")
    http_ = await client(hub)
    reply = await http_.request("POST", "/v1/jobs?wait_ms=100", json=job_body())
    assert reply.status == 202
    assert reply.json()["status"] == "running"


async def test_a_wait_over_the_maximum_is_lowered_whatever_its_length(
    make_hub: Callable[..., Awaitable[Hub]], connect: Connect, client: HttpFactory
) -> None:
    hub = await make_hub(http_max_wait_ms=100)
    await open_node(connect, hub, "n1")
    http_ = await client(hub)
    for wait_ms in ("5000", "9" * 40, "1" + "0" * 5000):
        reply = await http_.request("POST", f"/v1/jobs?wait_ms={wait_ms}", json=job_body())
        assert reply.status == 202, (wait_ms[:20], reply)
        assert reply.json()["status"] in ("running", "queued")


async def test_delete_cancels_the_job(hub: Hub, connect: Connect, client: HttpFactory) -> None:
    node = await open_node(connect, hub, "n1")
    http_ = await client(hub)
    reply = await http_.request("POST", "/v1/jobs", json=job_body())
    jid = reply.json()["job_id"]
    job = await expect(node, "job", job_id=jid)
    waiting = await client(hub)
    wait = asyncio.create_task(waiting.request("GET", f"/v1/jobs/{jid}?wait_ms=4000"))
    cancelled = await http_.request("DELETE", f"/v1/jobs/{jid}")
    assert cancelled.status == 200
    assert cancelled.json() == {
        "job_id": jid,
        "status": "failed",
        "result": None,
        "error": "CANCELLED",
    }
    await expect(node, "cancel", job_id=jid, attempt=job["attempt"], reason="CANCELLED")
    assert (await wait).json()["error"] == "CANCELLED"
    assert_error(await http_.request("DELETE", f"/v1/jobs/{jid}"), 409, "STALE_ATTEMPT")
    assert_error(await http_.request("DELETE", "/v1/jobs/nope"), 404, "UNKNOWN_JOB")


async def test_a_wait_outlives_a_lost_node(hub: Hub, connect: Connect, client: HttpFactory) -> None:
    first = await open_node(connect, hub, "n1", max_jobs=1)
    http_ = await client(hub)
    send = asyncio.create_task(http_.request("POST", "/v1/jobs?wait_ms=4000", json=job_body()))
    job = await expect(first, "job", attempt=1)
    second = await open_node(connect, hub, "n2", max_jobs=1)
    await first.close()  # the node is lost: the job moves to n2 as attempt 2
    retry = await expect(second, "job", job_id=job["job_id"], attempt=2)
    await result(second, retry, result={"text": "from n2"})
    reply = await send
    assert reply.status == 200, reply
    assert reply.json()["result"] == {"text": "from n2"}
    record = await http_.request("GET", f"/v1/jobs/{job['job_id']}")
    assert (record.json()["node_id"], record.json()["attempt"]) == ("n2", 2)


async def test_websockets_and_plain_routes_share_the_port(
    hub: Hub, connect: Connect, client: HttpFactory
) -> None:
    node = await open_node(connect, hub, "n1")
    session = await open_session(connect, hub)
    await round_trip(session, node, "c-1")
    status, _, body = await http_get(hub.port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    http_ = await client(hub)
    send = asyncio.create_task(http_.request("POST", "/v1/jobs?wait_ms=3000", json=job_body()))
    job = await expect(node, "job")
    await result(node, job, result={"ok": True})
    assert (await send).json()["result"] == {"ok": True}
    await round_trip(session, node, "c-2")
    # Probes answer on a job API connection too, HEAD included.
    probe = await client(hub)
    assert (await probe.request("HEAD", "/healthz")).status == 200
    ready = await probe.request("HEAD", "/readyz")
    assert (ready.status, ready.body) == (200, b"")
    assert (await probe.request("GET", "/readyz")).body == b"ready\n"
    refused = await probe.request("POST", "/healthz", body=b"")
    assert_error(refused, 405, "BAD_FRAME")
    assert refused.headers["allow"] == "GET, HEAD"
    # Another route of the gate on a job API connection: 404, and the hub closes it.
    other = await client(hub)
    assert_error(await other.request("GET", "/v1/jobs/x"), 404, "UNKNOWN_JOB")
    assert_error(await other.request("POST", "/metrics", body=b""), 404, "BAD_FRAME")
    assert await other.closed()


# Errors


async def test_bad_requests_get_their_codes(
    hub: Hub, connect: Connect, client: HttpFactory
) -> None:
    await open_node(connect, hub, "n1")
    http_ = await client(hub)
    bad_json = await http_.request("POST", "/v1/jobs", body=b"{not json")
    assert assert_error(bad_json, 400, "BAD_FRAME")["message"] == "frame is not valid JSON"
    missing = await http_.request("POST", "/v1/jobs", json={"src_lang": "en"})
    assert_error(missing, 400, "BAD_FRAME")
    envelope = await http_.request(
        "POST",
        "/v1/jobs",
        body=b"\x00\x00\x00\x40{}",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert_error(envelope, 400, "BAD_FRAME")
    wait = await http_.request("POST", "/v1/jobs?wait_ms=soon", json=job_body())
    assert_error(wait, 400, "BAD_FRAME")
    big_payload = await http_.request(
        "POST", "/v1/jobs", json=job_body(payload={"text": "x" * 70_000})
    )
    assert_error(big_payload, 413, "TOO_LARGE")
    put = await http_.request("PUT", "/v1/jobs", json=job_body())
    assert_error(put, 405, "BAD_FRAME")
    assert put.headers["allow"] == "POST"
    patch = await http_.request("PATCH", "/v1/jobs/abc", json=job_body())
    assert patch.headers["allow"] == "GET, DELETE"
    pair = await http_.request("POST", "/v1/jobs", json=job_body(tgt_lang="de"))
    assert_error(pair, 422, "NO_POOL_FOR_LANG_PAIR")
    bad_id = await http_.request("GET", "/v1/jobs/bad{id}")
    assert_error(bad_id, 404, "UNKNOWN_JOB")
    # Every refusal left the connection usable.
    assert (await http_.request("POST", "/v1/jobs", json=job_body())).status == 202


async def test_a_body_over_the_limit_gets_413(
    make_hub: Callable[..., Awaitable[Hub]], client: HttpFactory
) -> None:
    hub = await make_hub(max_frame_bytes=4096)
    http_ = await client(hub)
    reply = await http_.request("POST", "/v1/jobs", body=b"x" * 100_000)
    assert_error(reply, 413, "TOO_LARGE")
    assert reply.headers["connection"] == "close"
    assert await http_.closed()
    # Announced with Expect: 100-continue, the body is never sent.
    early = await client(hub)
    early.writer.write(
        b"POST /v1/jobs HTTP/1.1\r\nHost: hub\r\nContent-Length: 5000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert_error(await early.read(), 413, "TOO_LARGE")


async def test_malformed_and_slow_requests_are_refused(
    make_hub: Callable[..., Awaitable[Hub]], client: HttpFactory
) -> None:
    hub = await make_hub(http_idle_timeout_s=300 * MS, register_timeout_s=300 * MS)
    bad = await client(hub)
    bad.writer.write(b"POST /v1/jobs HTTP/1.1\r\nno colon here\r\n\r\n")
    assert_error(await bad.read(), 400, "BAD_FRAME")
    assert await bad.closed()
    slow = await client(hub)
    slow.writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: hub\r\nContent-Length: 10\r\n\r\n{")
    reply = await slow.read()
    assert_error(reply, 408, "BAD_FRAME")
    assert await slow.closed()
    # Silent from the start (websockets' open timeout), or after an answer (keep-alive).
    silent = await client(hub)
    assert await silent.closed(within=2000 * MS)
    idle = await client(hub)
    assert_error(await idle.request("GET", "/v1/jobs/abc"), 404, "UNKNOWN_JOB")
    assert await idle.closed(within=2000 * MS)


async def test_refusals_of_a_busy_fleet_carry_retry_after(
    make_hub: Callable[..., Awaitable[Hub]], connect: Connect, client: HttpFactory
) -> None:
    hub = await make_hub(queue_wait_ms=0, max_inflight_per_session=2, audio_budget_bytes=10)
    node = await open_node(connect, hub, "n1", max_jobs=1)
    http_ = await client(hub)
    assert (await http_.request("POST", "/v1/jobs", json=job_body())).status == 202
    busy = await http_.request("POST", "/v1/jobs", json=job_body())
    assert_error(busy, 503, "NO_AVAILABLE_NODE")
    audio = binary_job({"src_lang": "en", "tgt_lang": "fr"}, b"x" * 100)
    heavy = await http_.request(
        "POST", "/v1/jobs", body=audio, headers={"Content-Type": "application/octet-stream"}
    )
    assert assert_error(heavy, 503, "OVERLOADED")["retry_after_ms"] == 1000
    await node.close()
    await wait_for(lambda: not hub.registry.nodes, timeout=2000 * MS)
    # The node is gone, its job ended NODE_LOST: no live node serves the pair.
    empty = await http_.request("POST", "/v1/jobs", json=job_body())
    assert_error(empty, 503, "EMPTY_POOL")


async def test_a_client_over_its_limits_gets_429(
    make_hub: Callable[..., Awaitable[Hub]], connect: Connect, client: HttpFactory
) -> None:
    hub = await make_hub(max_inflight_per_session=1, session_rate_per_s=1.0, session_burst=2)
    await open_node(connect, hub, "n1")
    http_ = await client(hub)
    assert (await http_.request("POST", "/v1/jobs", json=job_body())).status == 202
    many = await http_.request("POST", "/v1/jobs", json=job_body())
    assert_error(many, 429, "TOO_MANY_JOBS")
    fast = await http_.request("POST", "/v1/jobs", json=job_body())
    assert_error(fast, 429, "RATE_LIMITED")


async def test_http_jobs_count_on_the_dashboard(
    make_hub: Callable[..., Awaitable[Hub]], connect: Connect, client: HttpFactory
) -> None:
    # protocol.md §12: every refusal counts under its code, and latencies cover
    # every job, HTTP ones included (time to accepted of a queued job too).
    hub = await make_hub(watch_interval_s=0.1)
    node = await open_node(connect, hub, "n1", max_jobs=1)
    http_ = await client(hub)
    first = await http_.request("POST", "/v1/jobs", json=job_body())
    queued = await http_.request("POST", "/v1/jobs", json=job_body())
    assert (first.json()["status"], queued.json()["status"]) == ("running", "queued")
    nopool = await http_.request("POST", "/v1/jobs", json=job_body(src_lang="xx"))
    assert_error(nopool, 422, "NO_POOL_FOR_LANG_PAIR")
    unknown = await http_.request("POST", "/v1/jobs", json=job_body(payload=[]))
    assert_error(unknown, 400, "BAD_FRAME")
    for _ in range(2):
        job = await expect(node, "job")
        await result(node, job, result={"ok": True})
    watcher = await connect(hub, "/v1/watch")
    deadline = asyncio.get_running_loop().time() + ANSWER_TIMEOUT
    while True:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            frame = orjson.loads(await watcher.recv())
        latency, totals = frame["latency"], frame["jobs"]["totals"]
        if latency["end_to_end"]["count"] == 2 and latency["accepted"]["count"] == 2:
            break
        assert asyncio.get_running_loop().time() < deadline, frame
    assert totals["refused:NO_POOL_FOR_LANG_PAIR"] == 1
    assert totals["refused:BAD_FRAME"] == 1
    assert latency["end_to_end"]["p50_ms"] > 0
    assert latency["accepted"]["p99_ms"] <= latency["end_to_end"]["p99_ms"]


async def test_a_hub_without_redis_answers_503(
    make_hub: Callable[..., Awaitable[Hub]],
    spawn_redis: Callable[..., RedisProcess],
    client: HttpFactory,
) -> None:
    server = spawn_redis()
    hub = await make_hub(redis_url=server.url)
    await asyncio.to_thread(server.stop)
    await wait_for(lambda: not hub.ready, timeout=5000 * MS)
    http_ = await client(hub)
    assert_error(await http_.request("POST", "/v1/jobs", json=job_body()), 503, "UNAVAILABLE")
    assert_error(await http_.request("GET", "/v1/jobs/abc"), 503, "UNAVAILABLE")


# Auth


async def test_a_clients_new_token_brings_its_limits(
    make_hub: Callable[..., Awaitable[Hub]], connect: Connect, client: HttpFactory
) -> None:
    hub = await make_hub(session_jwt_key=KEY, node_secret=NODE_SECRET)
    nodes_ws = await connect(
        hub, "/v1/node", additional_headers={"Authorization": f"Bearer {NODE_SECRET}"}
    )
    await register(nodes_ws, node_id="n1", max_jobs=8)
    http_ = await client(hub)
    one = mint_session_token(KEY, session_id="backend", max_inflight=1)
    assert (await http_.request("POST", "/v1/jobs", json=job_body(), token=one)).status == 202
    full = await http_.request("POST", "/v1/jobs", json=job_body(), token=one)
    assert_error(full, 429, "TOO_MANY_JOBS")
    # The backend's next token for the same session allows more.
    three = mint_session_token(KEY, session_id="backend", max_inflight=3)
    assert (await http_.request("POST", "/v1/jobs", json=job_body(), token=three)).status == 202
    assert (await http_.request("POST", "/v1/jobs", json=job_body(), token=three)).status == 202
    again = await http_.request("POST", "/v1/jobs", json=job_body(), token=three)
    assert_error(again, 429, "TOO_MANY_JOBS")


async def test_tokens_decide_who_sees_a_job(
    make_hub: Callable[..., Awaitable[Hub]], connect: Connect, client: HttpFactory
) -> None:
    hub = await make_hub(session_jwt_key=KEY, node_secret=NODE_SECRET)
    nodes_ws = await connect(
        hub, "/v1/node", additional_headers={"Authorization": f"Bearer {NODE_SECRET}"}
    )
    await register(nodes_ws, node_id="n1")
    alice = mint_session_token(KEY, session_id="alice")
    bob = mint_session_token(KEY, session_id="bob")
    http_ = await client(hub)
    missing = await http_.request("POST", "/v1/jobs", json=job_body())
    assert_error(missing, 401, "UNAUTHORIZED")
    assert missing.headers["www-authenticate"] == "Bearer"
    forged = mint_session_token("f" * 32, session_id="alice")
    wrong = await http_.request("POST", "/v1/jobs", json=job_body(), token=forged)
    assert_error(wrong, 401, "UNAUTHORIZED")
    reply = await http_.request("POST", "/v1/jobs", json=job_body(), token=alice)
    assert reply.status == 202
    jid = reply.json()["job_id"]
    job = await expect(nodes_ws, "job", job_id=jid, session_id="alice")
    assert (await http_.request("GET", f"/v1/jobs/{jid}", token=alice)).status == 200
    assert_error(await http_.request("GET", f"/v1/jobs/{jid}", token=bob), 404, "UNKNOWN_JOB")
    assert_error(await http_.request("DELETE", f"/v1/jobs/{jid}", token=bob), 404, "UNKNOWN_JOB")
    assert_error(await http_.request("GET", f"/v1/jobs/{jid}"), 401, "UNAUTHORIZED")
    await result(nodes_ws, job, result={"for": "alice"})
    done = await http_.request("GET", f"/v1/jobs/{jid}?wait_ms=3000", token=alice)
    assert done.json()["result"] == {"for": "alice"}
    only_de = mint_session_token(KEY, session_id="carol", pairs=["en:de"])
    refused = await http_.request("POST", "/v1/jobs", json=job_body(), token=only_de)
    assert_error(refused, 403, "UNAUTHORIZED")


# Several hubs


async def test_a_wait_gets_a_result_from_another_hub(
    make_hub: Callable[..., Awaitable[Hub]], connect: Connect, client: HttpFactory
) -> None:
    hub_a = await make_hub(hub_id="hub-a")
    hub_b = await make_hub(hub_id="hub-b")
    node = await open_node(connect, hub_b, "n1")
    http_ = await client(hub_a)
    send = asyncio.create_task(http_.request("POST", "/v1/jobs?wait_ms=4000", json=job_body()))
    job = await expect(node, "job")
    # The client submits to hub B meanwhile: results of its session now go there.
    other = await client(hub_b)
    assert (await other.request("POST", "/v1/jobs", json=job_body())).status == 202
    await result(node, job, result={"via": "poll"})
    reply = await send
    assert reply.status == 200, reply
    assert reply.json()["result"] == {"via": "poll"}


async def test_shutdown_answers_waiting_requests(
    make_hub: Callable[..., Awaitable[Hub]], connect: Connect, client: HttpFactory
) -> None:
    hub = await make_hub()
    node = await open_node(connect, hub, "n1")
    http_ = await client(hub)
    send = asyncio.create_task(http_.request("POST", "/v1/jobs?wait_ms=20000", json=job_body()))
    await expect(node, "job")  # the request waits from before its dispatch
    closing = asyncio.create_task(hub.close())
    reply = await send
    assert reply.status == 202
    assert reply.headers["connection"] == "close"
    await closing


def test_every_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(Code)
    for code in (Code.RATE_LIMITED, Code.TOO_MANY_JOBS):
        assert HTTP_STATUS[code] is http.HTTPStatus.TOO_MANY_REQUESTS


async def test_hub_serve_answers_the_job_api(
    processes: Processes, connect: Connect, client: HttpFactory
) -> None:
    # A real `hub serve`, on its default event loop (uvloop where installed).
    hub = await processes.hub("hub-p")
    node = await open_node(connect, hub, "n1")
    http_ = await client(hub)
    send = asyncio.create_task(http_.request("POST", "/v1/jobs?wait_ms=4000", json=job_body()))
    job = await expect(node, "job")
    await result(node, job, result={"loop": "any"})
    assert (await send).json()["result"] == {"loop": "any"}
    assert (await http_get(hub.port, "/readyz"))[0] == 200


async def test_a_client_that_leaves_does_not_cancel_its_job(
    hub: Hub, connect: Connect, client: HttpFactory
) -> None:
    node = await open_node(connect, hub, "n1")
    leaving = await client(hub)
    body = orjson.dumps(job_body())
    leaving.writer.write(
        b"POST /v1/jobs?wait_ms=5000 HTTP/1.1\r\nHost: hub\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await leaving.close()
    job = await expect(node, "job")
    await result(node, job, result={"kept": True})
    http_ = await client(hub)
    done = await http_.request("GET", f"/v1/jobs/{job['job_id']}?wait_ms=3000")
    assert done.json()["status"] == "finished"
    assert done.json()["result"] == {"kept": True}


async def test_pipelined_requests_are_answered_in_order(
    hub: Hub, connect: Connect, client: HttpFactory
) -> None:
    await open_node(connect, hub, "n1", max_jobs=4)
    http_ = await client(hub)
    body = orjson.dumps(job_body())
    post = b"POST /v1/jobs HTTP/1.1\r\nHost: hub\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    http_.writer.write(post + b"GET /v1/jobs/nope HTTP/1.1\r\nHost: hub\r\n\r\n" + post)
    first, second, third = [await http_.read() for _ in range(3)]
    assert (first.status, second.status, third.status) == (202, 404, 202)
    assert first.json()["job_id"] != third.json()["job_id"]


async def test_connection_limits_apply_to_http(
    make_hub: Callable[..., Awaitable[Hub]], client: HttpFactory
) -> None:
    hub = await make_hub(max_connections_per_ip=1)
    first = await client(hub)
    assert_error(await first.request("GET", "/v1/jobs/abc"), 404, "UNKNOWN_JOB")
    second = await client(hub)
    refused = await second.request("GET", "/v1/jobs/abc")
    assert_error(refused, 429, "RATE_LIMITED")
    assert await second.closed()
    await first.close()
    await wait_for(lambda: not hub.http.connections, timeout=2000 * MS)
    third = await client(hub)
    assert_error(await third.request("GET", "/v1/jobs/abc"), 404, "UNKNOWN_JOB")


async def test_a_request_head_over_16_kib_gets_431(hub: Hub, client: HttpFactory) -> None:
    http_ = await client(hub)
    reply = await http_.request("GET", "/v1/jobs/abc", headers={"X-Big": "x" * 20_000})
    assert_error(reply, 431, "TOO_LARGE")
    assert await http_.closed()


async def test_a_failing_handler_answers_500(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("a bug")

    server = HttpServer(
        broken,
        max_body_bytes=1024,
        idle_timeout_s=2,
        switch_timeout_s=2,
        max_connections=None,
        max_connections_per_ip=None,
    )

    class Accepting(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            server.accept(transport, b"")  # type: ignore[arg-type]

    listener = await asyncio.get_running_loop().create_server(Accepting, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        http_ = await HttpClient.open(port)
        assert_error(await http_.request("GET", "/v1/jobs/abc"), 500, "INTERNAL")
        # The connection goes on: a bug costs one answer.
        assert_error(await http_.request("GET", "/v1/jobs/abc"), 500, "INTERNAL")
        await http_.close()
        assert "HTTP handler failed" in caplog.text
    finally:
        listener.close()
        await server.close(timeout_s=1)
        await listener.wait_closed()
