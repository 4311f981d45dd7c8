"""End-to-end tests of hub/client/: NodeClient and SessionClient against real hubs.

Every test runs real hubs (in-process, or a ``hub serve`` child process when
a crash is needed) on the shared test Redis, on a fresh cell. No mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from hub.app import Hub
from hub.client import (
    Backoff,
    ClientClosed,
    Job,
    JobRefused,
    JobResult,
    NodeClient,
    Partial,
    SessionClient,
    SessionLost,
)
from hub.client.transport import endpoint
from hub.keys import Keys
from hub.protocol import SessionResult, ToSessionFrame
from loadtest.procs import Processes, RedisProcess, free_port
from tests.helpers import MS, wait_for
from tests.sdktools import FAST_BACKOFF, Gate, running_hub

ALL_BYTES = bytes(range(256))
Handler = Callable[[Job], Awaitable[dict[str, Any] | None]]


@pytest.fixture
async def hub(redis_server: RedisProcess, keys: Keys) -> AsyncIterator[Hub]:
    async with running_hub(redis_server.url, keys.cell) as hub:
        yield hub


def url_of(hub: Hub) -> str:
    return f"ws://127.0.0.1:{hub.port}"


async def echo(job: Job) -> dict[str, Any]:
    return {"text": str(job.payload.get("text", "")).upper(), "attempt": job.attempt}


def node_for(
    hub: Hub | str, handler: Handler = echo, *, node_id: str = "n1", **kwargs: Any
) -> NodeClient:
    kwargs.setdefault("languages", ["zh", "en"])
    kwargs.setdefault("backoff", FAST_BACKOFF)
    url = hub if isinstance(hub, str) else url_of(hub)
    return NodeClient(url, node_id=node_id, handler=handler, **kwargs)


@contextlib.asynccontextmanager
async def node_and_session(
    hub: Hub, handler: Handler = echo, **node_options: Any
) -> AsyncIterator[tuple[NodeClient, SessionClient]]:
    """A node registered with ``hub`` (as :func:`node_for` makes it) and a session on it."""
    async with (
        node_for(hub, handler, **node_options) as node,
        SessionClient(url_of(hub)) as session,
    ):
        node.start()
        await node.wait_registered()
        yield node, session


# Submit and results


async def test_submit_returns_the_result_of_the_node_that_ran_it(hub: Hub) -> None:
    async with node_and_session(hub) as (_node, session):
        result = await session.submit("zh", "en", {"text": "ni hao"})
    assert result == JobResult(
        ref=result.ref,
        job_id=result.job_id,
        status="finished",
        result={"text": "NI HAO", "attempt": 1},
        error=None,
        node_id="n1",
    )
    assert result.ok


async def test_many_concurrent_submits_each_get_their_own_result(hub: Hub) -> None:
    async with node_and_session(hub, max_jobs=8) as (_node, session):
        results = await asyncio.gather(
            *(session.submit("en", "zh", {"text": f"job {i}"}) for i in range(40))
        )
    assert [r.result["text"] if r.result else None for r in results] == [
        f"JOB {i}" for i in range(40)
    ]
    assert len({r.ref for r in results}) == 40
    assert session.unfinished == 0


async def test_stream_yields_partials_in_order_then_the_result(hub: Hub) -> None:
    async def handler(job: Job) -> dict[str, Any]:
        for i in range(3):
            await job.partial({"i": i})
        return {"text": "end"}

    async with node_and_session(hub, handler) as (_node, session):
        events = [event async for event in session.stream("zh", "en", {"text": "x"})]
    assert [type(e) for e in events] == [Partial, Partial, Partial, JobResult]
    assert [e.result for e in events[:3]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert all(isinstance(e, Partial) and e.node_id == "n1" for e in events[:3])
    final = events[-1]
    assert isinstance(final, JobResult) and final.result == {"text": "end"}


async def test_submit_calls_on_partial_for_each_partial(hub: Hub) -> None:
    async def handler(job: Job) -> dict[str, Any]:
        await job.partial({"text": "he"})
        await job.partial({"text": "hell"})
        return {"text": "hello"}

    seen: list[Partial] = []
    async with node_and_session(hub, handler) as (_node, session):
        result = await session.submit("zh", "en", on_partial=seen.append)
    assert [p.result["text"] for p in seen] == ["he", "hell"]
    assert {p.job_id for p in seen} == {result.job_id}


async def test_audio_reaches_the_node_byte_exact(hub: Hub) -> None:
    received: list[bytes | None] = []

    async def handler(job: Job) -> dict[str, Any]:
        received.append(job.audio)
        return {"audio_bytes": len(job.audio or b"")}

    audio = ALL_BYTES * 300  # every byte value, 76 800 bytes
    async with node_and_session(hub, handler) as (_node, session):
        with_audio = await session.submit("zh", "en", {"text": "a"}, audio=audio)
        without = await session.submit("zh", "en", {"text": "b"})
    assert received == [audio, None]
    assert with_audio.result == {"audio_bytes": len(audio)}
    assert without.result == {"audio_bytes": 0}


async def test_job_carries_every_field_of_the_job_frame(hub: Hub) -> None:
    jobs: list[Job] = []

    async def handler(job: Job) -> None:
        jobs.append(job)

    async with node_and_session(hub, handler) as (_node, session):
        result = await session.submit("ZH", "en", {"k": [1, 2]}, timeout_ms=5000)
    (job,) = jobs
    assert (job.job_id, job.attempt, job.session_id) == (result.job_id, 1, session.session_id)
    assert (job.src_lang, job.tgt_lang, job.payload) == ("zh", "en", {"k": [1, 2]})
    assert job.deadline_ms > 0
    assert result.status == "finished" and result.result is None


async def test_handler_exception_fails_the_job_with_its_message(hub: Hub) -> None:
    async def handler(job: Job) -> dict[str, Any]:
        raise RuntimeError("model exploded")

    async with node_and_session(hub, handler) as (node, session):
        result = await session.submit("zh", "en", {"text": "x"})
        assert node.running == 0
    assert (result.status, result.error, result.result) == ("failed", "model exploded", None)


async def test_handler_returning_a_non_dict_fails_the_job(hub: Hub) -> None:
    async def handler(job: Job) -> Any:
        return ["not", "an", "object"]

    async with node_and_session(hub, handler) as (_node, session):
        result = await session.submit("zh", "en")
    assert (result.status, result.error) == ("failed", "the handler returned list, not a dict")


async def test_job_for_a_pair_nobody_serves_raises_job_refused(hub: Hub) -> None:
    async with node_and_session(hub) as (_node, session):
        with pytest.raises(JobRefused) as refused:
            await session.submit("fr", "de", {"text": "x"})
        # The session goes on after a refusal.
        assert (await session.submit("zh", "en")).ok
    assert refused.value.code == "NO_POOL_FOR_LANG_PAIR"
    assert str(refused.value) == "NO_POOL_FOR_LANG_PAIR: no pool serves this language pair"


async def test_node_runs_at_most_max_jobs_at_once(hub: Hub) -> None:
    running = peak = 0

    async def handler(job: Job) -> dict[str, Any]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(30 * MS)
        running -= 1
        return {}

    async with node_and_session(hub, handler, max_jobs=2) as (_node, session):
        results = await asyncio.gather(*(session.submit("zh", "en") for _ in range(6)))
    assert all(r.ok for r in results)
    assert peak == 2


async def test_token_is_sent_as_a_bearer_header_by_both_clients(hub: Hub) -> None:
    gate = Gate()
    async with (
        node_for(hub, gate, token="node-secret") as node,
        SessionClient(url_of(hub), token="session-jwt") as session,
    ):
        node.start()
        await node.wait_registered()
        node_ws = hub.registry.nodes["n1"].ws
        assert session.session_id is not None
        session_ws = hub.registry.sessions[session.session_id].ws
        assert node_ws.request is not None and session_ws.request is not None
        assert node_ws.request.headers["Authorization"] == "Bearer node-secret"
        assert session_ws.request.headers["Authorization"] == "Bearer session-jwt"
        gate.opened.set()


# Cancel


async def test_cancelling_a_submit_cancels_the_job_on_the_node(hub: Hub) -> None:
    gate = Gate()
    async with node_and_session(hub, gate) as (node, session):
        task = asyncio.create_task(session.submit("zh", "en", {"text": "x"}))
        await asyncio.wait_for(gate.started.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: gate.cancelled, timeout=2000 * MS, what="the handler cancelled")
        assert node.running == 0
        # The slot is free again: the next job runs on the same node.
        gate.opened.set()
        assert (await session.submit("zh", "en")).result == {"text": "done", "attempt": 1}
    assert gate.cancelled == [gate.jobs[0].job_id]


async def test_leaving_a_stream_early_cancels_the_job(hub: Hub) -> None:
    cancelled = asyncio.Event()

    async def handler(job: Job) -> dict[str, Any]:
        await job.partial({"text": "first"})
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    async with node_and_session(hub, handler) as (_node, session):
        stream = session.stream("zh", "en")
        async for event in stream:
            assert isinstance(event, Partial)
            break
        await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.wait_for(cancelled.wait(), 2)


# Drain and close


async def test_drain_finishes_the_running_job_then_run_returns(hub: Hub) -> None:
    gate = Gate()
    async with node_and_session(hub, gate) as (node, session):
        task = asyncio.create_task(session.submit("zh", "en"))
        await asyncio.wait_for(gate.started.wait(), 2)
        drain = asyncio.create_task(node.drain(timeout_s=5))
        await asyncio.sleep(50 * MS)
        assert not drain.done()
        gate.opened.set()
        await drain
        assert (await task).ok
        await node.wait_closed()
        assert not node.registered
        await wait_for(lambda: "n1" not in hub.registry.nodes, what="the node gone from the hub")
        # A drained node takes no new jobs: nothing serves the pair now.
        with pytest.raises(JobRefused):
            await session.submit("zh", "en")


async def test_closing_the_session_fails_unfinished_submits(hub: Hub) -> None:
    gate = Gate()
    async with node_for(hub, gate) as node:
        node.start()
        await node.wait_registered()
        session = SessionClient(url_of(hub))
        await session.connect()
        task = asyncio.create_task(session.submit("zh", "en"))
        await asyncio.wait_for(gate.started.wait(), 2)
        await session.close()
        with pytest.raises(ClientClosed):
            await task
        gate.opened.set()


# Reconnection: nodes


async def test_node_keeps_retrying_until_the_hub_appears(
    redis_server: RedisProcess, keys: Keys
) -> None:
    port = free_port()
    async with node_for(f"ws://127.0.0.1:{port}") as node:
        node.start()
        await asyncio.sleep(300 * MS)  # several failed attempts
        assert not node.registered
        async with running_hub(redis_server.url, keys.cell, port=port) as hub:
            await node.wait_registered(timeout_s=2)
            async with SessionClient(url_of(hub)) as session:
                assert (await session.submit("zh", "en", {"text": "late"})).ok


async def test_node_resumes_its_running_job_on_a_new_hub_after_its_hub_crashes(
    redis_server: RedisProcess, keys: Keys, processes: Processes
) -> None:
    # Hub A is a child process, killed with SIGKILL: nothing tells Redis the
    # node left. The node reconnects to hub B on the same port and resumes
    # the job; the session, on hub C, gets the result computed across both.
    hub_a = await processes.hub(timeout_s=10_000 * MS)
    port = hub_a.port
    gate = Gate()
    async with (
        running_hub(redis_server.url, keys.cell) as hub_c,
        node_for(f"ws://127.0.0.1:{port}", gate) as node,
        SessionClient(url_of(hub_c)) as session,
    ):
        node.start()
        await node.wait_registered()
        task = asyncio.create_task(session.submit("zh", "en", {"text": "x"}))
        await asyncio.wait_for(gate.started.wait(), 2)
        hub_a.kill()
        await hub_a.wait(5000 * MS)
        await wait_for(lambda: not node.registered, what="the node to see the crash")
        async with running_hub(redis_server.url, keys.cell, port=port):
            await wait_for(lambda: node.connections == 2, timeout=3000 * MS, what="re-registration")
            assert node.running == 1  # the job went on meanwhile
            gate.opened.set()
            result = await asyncio.wait_for(task, 5)
    assert result.ok and result.result == {"text": "done", "attempt": 1}
    assert result.node_id == "n1"
    assert gate.cancelled == [] and len(gate.jobs) == 1


async def test_node_cancels_a_job_the_hub_dropped_while_it_was_away(hub: Hub) -> None:
    # The hub sees the socket close: the job is lost (NODE_LOST, no other
    # node), so when the node registers again it is in ``dropped``.
    gate = Gate()
    async with node_and_session(hub, gate) as (node, session):
        task = asyncio.create_task(session.submit("zh", "en"))
        await asyncio.wait_for(gate.started.wait(), 2)
        await hub.registry.nodes["n1"].ws.close(1011, "test closes the node")
        result = await asyncio.wait_for(task, 5)
        await wait_for(lambda: node.connections == 2, what="re-registration")
        await wait_for(lambda: gate.cancelled, what="the dropped job cancelled")
        assert node.running == 0
        assert (result.status, result.error) == ("failed", "NODE_LOST")
        # The node serves again after that.
        gate.opened.set()
        assert (await session.submit("zh", "en")).ok


async def test_hub_holds_a_result_while_redis_is_down_and_records_it_when_back(
    spawn_redis: Callable[..., RedisProcess], keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hub.client.node")
    redis = spawn_redis(appendonly=True)
    gate = Gate()
    async with (
        running_hub(redis.url, keys.cell, heartbeat_interval_ms=60000) as hub,
        node_for(hub, gate, backoff=Backoff(min_s=200 * MS, max_s=400 * MS, jitter=False)) as node,
        SessionClient(url_of(hub)) as session,
    ):
        node.start()
        await node.wait_registered()
        task = asyncio.create_task(session.submit("zh", "en", timeout_ms=20000))
        await asyncio.wait_for(gate.started.wait(), 2)
        await asyncio.to_thread(redis.stop)
        await wait_for(lambda: not hub.ready, timeout=3000 * MS, what="the hub to see Redis go")
        held = hub.metrics.results_held._value.get()
        gate.opened.set()  # the hub holds the result and tries again
        await wait_for(
            lambda: hub.metrics.results_held._value.get() > held + 1,
            timeout=3000 * MS,
            what="the result held",
        )
        await asyncio.to_thread(redis.start)
        result = await asyncio.wait_for(task, 10)
    assert result.ok and result.result == {"text": "done", "attempt": 1}
    # The node was never asked to send it again.
    assert "refused (UNAVAILABLE)" not in caplog.text


# Reconnection: sessions


async def test_session_resumes_and_gets_a_result_completed_while_it_was_away(hub: Hub) -> None:
    gate = Gate()
    slow = Backoff(min_s=300 * MS, max_s=300 * MS, jitter=False)
    async with (
        node_for(hub, gate) as node,
        SessionClient(url_of(hub), backoff=slow) as session,
    ):
        node.start()
        await node.wait_registered()
        session_id = session.session_id
        assert session_id is not None
        task = asyncio.create_task(session.submit("zh", "en", {"text": "x"}))
        await asyncio.wait_for(gate.started.wait(), 2)
        await hub.registry.sessions[session_id].ws.close(1001, "test closes the session")
        await wait_for(lambda: not session.connected, what="the session to see the close")
        gate.opened.set()  # the result completes while the session is away
        await wait_for(lambda: node.running == 0, what="the result sent")
        assert not session.connected
        result = await asyncio.wait_for(task, 5)
        assert session.connections == 2 and session.session_id == session_id
    assert result.ok and result.result == {"text": "done", "attempt": 1}


class RecordingSession(SessionClient):
    """A session client that records the result frames it receives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.result_frames: list[str] = []

    def _on_frame(self, ws: Any, frame: ToSessionFrame) -> None:
        if isinstance(frame, SessionResult):
            self.result_frames.append(frame.job_id)
        super()._on_frame(ws, frame)


async def test_result_sent_again_after_a_resume_is_delivered_once(hub: Hub) -> None:
    # The result arrives, the connection drops before the ack goes out, so
    # the hub sends it again on resume: the client drops the repeat.
    async with (
        node_for(hub) as node,
        RecordingSession(url_of(hub), backoff=FAST_BACKOFF, ack_interval_s=30) as session,
    ):
        node.start()
        await node.wait_registered()
        seen: list[JobResult] = []
        first = await session.submit("zh", "en", {"text": "once"})
        seen.append(first)
        assert session.session_id is not None
        await hub.registry.sessions[session.session_id].ws.close(1001, "test closes the session")
        await wait_for(lambda: session.connections == 2, what="the resume")
        await wait_for(
            lambda: session.result_frames == [first.job_id, first.job_id],
            what="the result sent again",
        )
        second = await session.submit("zh", "en", {"text": "twice"})
    assert session.result_frames == [first.job_id, first.job_id, second.job_id]
    assert first.result == {"text": "ONCE", "attempt": 1}
    assert second.result == {"text": "TWICE", "attempt": 1}


class DroppingSession(SessionClient):
    """A session client whose connection drops right after its first job frame.

    With ``lose_frame`` the frame never reaches the hub.
    """

    def __init__(self, *args: Any, lose_frame: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lose_frame = lose_frame
        self.dropped = False

    async def _send_job(self, ws: Any, pending: Any) -> None:
        if self.dropped:
            await super()._send_job(ws, pending)
            return
        self.dropped = True
        if self.lose_frame:
            pending.sent_on = self.connections
        else:
            await super()._send_job(ws, pending)
        await ws.close()


@pytest.mark.parametrize("lose_frame", [False, True], ids=["frame-arrived", "frame-lost"])
async def test_job_sent_as_the_connection_drops_runs_exactly_once(
    hub: Hub, lose_frame: bool
) -> None:
    calls: list[str] = []

    async def handler(job: Job) -> dict[str, Any]:
        calls.append(job.job_id)
        return {"text": "ran"}

    async with (
        node_for(hub, handler) as node,
        DroppingSession(url_of(hub), backoff=FAST_BACKOFF, lose_frame=lose_frame) as session,
    ):
        node.start()
        await node.wait_registered()
        result = await asyncio.wait_for(session.submit("zh", "en"), 5)
        assert session.connections == 2
        # Nothing else runs later: a second job is the next one the node sees.
        second = await session.submit("zh", "en")
    assert result.ok and result.result == {"text": "ran"}
    assert calls == [result.job_id, second.job_id]


async def test_session_refused_resume_fails_pending_jobs_and_starts_afresh(
    redis_server: RedisProcess, keys: Keys
) -> None:
    # The second hub signs resume tokens with another secret: 4007.
    port = free_port()
    gate = Gate()
    async with running_hub(redis_server.url, keys.cell, port=port, resume_secret="one") as hub_a:
        node = node_for(hub_a, gate)
        session = SessionClient(url_of(hub_a), backoff=FAST_BACKOFF)
        node.start()
        await node.wait_registered()
        await session.connect()
        old_id = session.session_id
        task = asyncio.create_task(session.submit("zh", "en"))
        await asyncio.wait_for(gate.started.wait(), 2)
    try:
        async with running_hub(redis_server.url, keys.cell, port=port, resume_secret="two"):
            with pytest.raises(SessionLost) as lost:
                await asyncio.wait_for(task, 5)
            assert str(lost.value) == (
                "session lost: the hub refused the resume token (4007); submit the job again"
            )
            await wait_for(lambda: session.connected, timeout=2000 * MS, what="a new session")
            assert session.session_id != old_id
            await node.wait_registered()
            gate.opened.set()
            assert (await session.submit("zh", "en")).ok
    finally:
        await session.close()
        await node.close()


async def test_session_connect_to_nothing_raises_os_error() -> None:
    with pytest.raises(OSError):
        async with SessionClient(f"ws://127.0.0.1:{free_port()}", open_timeout_s=2):
            pass


# URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://h:1", "ws://h:1/v1/session"),
        ("ws://h:1/", "ws://h:1/v1/session"),
        ("ws://h:1/v1/session", "ws://h:1/v1/session"),
        ("http://h:1", "ws://h:1/v1/session"),
        ("https://h:1/prefix", "wss://h:1/prefix/v1/session"),
    ],
)
def test_endpoint_adds_the_path_to_a_base_url(url: str, expected: str) -> None:
    assert endpoint(url, "/v1/session") == expected


def test_endpoint_keeps_a_query_and_adds_its_own() -> None:
    assert endpoint("ws://h:1?token=t", "/v1/session", {"session_id": "s"}) == (
        "ws://h:1/v1/session?token=t&session_id=s"
    )


def test_endpoint_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="hub URL must be"):
        endpoint("ftp://h:1", "/v1/node")


def test_node_needs_exactly_one_of_languages_and_lang_pairs() -> None:
    with pytest.raises(ValueError, match="exactly one of languages and lang_pairs"):
        NodeClient("ws://h:1", node_id="n")
    with pytest.raises(ValueError, match="exactly one of languages and lang_pairs"):
        NodeClient("ws://h:1", node_id="n", languages=["zh", "en"], lang_pairs=[("zh", "en")])


@pytest.mark.parametrize(("attempt", "bound"), [(1, 0.1), (2, 0.2), (3, 0.4), (7, 5.0), (500, 5.0)])
def test_backoff_bound_doubles_up_to_the_maximum(attempt: int, bound: float) -> None:
    backoff = Backoff()
    assert Backoff(jitter=False).delay_s(attempt) == pytest.approx(bound)
    assert all(0 <= backoff.delay_s(attempt) <= bound for _ in range(100))
