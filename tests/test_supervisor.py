"""``hub serve --workers N`` (hub/supervisor.py, hub/worker.py), as real processes.

The supervisor and its workers run as child processes on loopback, with
their embedded Redis or a test Redis; workers are SIGKILLed by pid. The
load test reuses the chaos run's ledger (loadtest/chaos.py): every job one
outcome, no duplicate, no attempt run twice, nothing leaked.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from hub.config import ConfigError, Settings
from hub.supervisor import MAX_START_FAILURES, worker_ids
from loadtest.chaos import ChaosConfig, ChaosRun, format_report
from loadtest.procs import (
    CommandProcess,
    ReadyLine,
    RedisProcess,
    child_env,
    child_pids,
    free_port,
    http_get,
    hub_command,
    parse_ready_line,
    ping_tcp,
    process_gone,
    run_command,
)
from tests.helpers import MS, wait_for

CLI_ENV = child_env(drop_hub_settings=True)
_WORKERS = re.compile(r", workers (\d+) \(([^)]*)\); redis: ")


def serve_workers(tmp_path: Path, *args: str) -> CommandProcess:
    """``hub serve --workers …`` on a free port, its log in ``tmp_path``."""
    command = hub_command(
        "serve", "--port", "0", "--log-level", "INFO",
        "--set", "watch_interval_s=0.2", "--set", "shutdown_grace_s=1", *args,
    )  # fmt: skip
    return CommandProcess(command, log_path=tmp_path / "serve.log", env=CLI_ENV)


async def status_of(port: int) -> dict[str, Any]:
    """``/v1/status`` of whichever worker answers; ``{}`` when the connection
    reached a worker as it died (the kernel had queued it there)."""
    status, body = await http_get(port, "/v1/status")
    if status is None:
        return {}
    assert status == 200, (status, body)
    data: dict[str, Any] = orjson.loads(body)
    return data


def worker_processes(supervisor: int) -> list[int]:
    return [p for p in child_pids(supervisor) if b"hub.worker" in _cmdline(p)]


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


Start = Callable[[CommandProcess], Awaitable[ReadyLine]]


@pytest.fixture
async def started() -> AsyncIterator[Start]:
    """Start a child and read its ready line; the child is killed at teardown."""
    children: list[CommandProcess] = []

    async def start(child: CommandProcess) -> ReadyLine:
        await child.start()
        children.append(child)
        line = await child.read_line(timeout_s=60)
        ready = parse_ready_line(line)
        assert ready is not None, (line, child.log_path.read_text()[-3000:])
        return ready

    yield start
    for child in children:
        child.kill()
        await child.wait()


# Settings


def test_workers_setting_takes_a_number_or_auto() -> None:
    assert Settings().worker_count() == 1
    assert Settings(workers="3").worker_count() == 3
    assert Settings(workers="auto").worker_count() == len(os.sched_getaffinity(0))
    assert Settings.load(environ={"HUB_WORKERS": "2"}).worker_count() == 2
    assert Settings.load(flags={"workers": "4"}, environ={"HUB_WORKERS": "2"}).workers == "4"


@pytest.mark.parametrize("value", ["0", "-1", "two", "1025", ""])
def test_workers_setting_rejects_anything_else(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(workers=value)
    assert str(caught.value) == f"invalid setting workers={value!r}: must be auto or 1..1024"


def test_worker_ids_derive_from_the_servers_id() -> None:
    assert worker_ids("edge-3", 3) == ("edge-3-w0", "edge-3-w1", "edge-3-w2")


def test_serve_with_a_bad_worker_count_is_a_one_line_error() -> None:
    done = run_command(hub_command("serve", "--workers", "zero"), env=CLI_ENV, timeout_s=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "hub: error: invalid setting workers='zero': must be auto or 1..1024"
    ]


def test_serve_workers_on_a_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_command(
            hub_command("serve", "--workers", "2", "--port", str(port)), env=CLI_ENV, timeout_s=60
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"hub: error: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(is another server on this port?)"
    ]


# One port, one ready line, the whole server on every worker


async def test_workers_share_one_port_and_each_answers_for_all(
    tmp_path: Path, started: Start
) -> None:
    child = serve_workers(tmp_path, "--workers", "2", "--data-dir", str(tmp_path / "data"))
    ready = await started(child)
    hub_id, port = ready.hub_id, ready.port
    assert port != 0, ready
    ids = worker_ids(hub_id, 2)
    assert child.pid is not None
    assert len(worker_processes(child.pid)) == 2

    # Status from Redis: both workers listed, whichever answers.
    async def both_listed() -> bool:
        hubs = (await status_of(port)).get("hubs", [])
        return {h["hub_id"] for h in hubs if h["ready"] and h["group"] == hub_id} == set(ids)

    await wait_for(both_listed, timeout=20_000 * MS)
    # The kernel spreads new connections over both workers.
    answered = set()
    for _ in range(200):
        answered.add((await status_of(port)).get("hub_id"))
        if answered == set(ids):
            break
    assert answered == set(ids)
    # /metrics: every worker's series, labelled, whichever worker answers.
    for _ in range(4):
        status, body = await http_get(port, "/metrics")
        assert status == 200
        text = body.decode()
        for wid in ids:
            assert f'hub_ready{{hub="{wid}"}} 1.0' in text, text[-2000:]
        assert text.count("# TYPE hub_ready gauge") == 1

    # SIGTERM: every worker and the embedded Redis stop, then the supervisor.
    children = child_pids(child.pid)
    assert len(children) == 3  # two workers and Redis
    assert await child.stop(30) == 0
    assert all(process_gone(p) for p in children)
    assert not ping_tcp(port)
    log = (tmp_path / "serve.log").read_text()
    assert "= stopping 2 workers" in log
    assert log.index("= stopping 2 workers") < log.index("stopped Redis server")


async def test_ready_line_names_the_workers(tmp_path: Path) -> None:
    child = serve_workers(
        tmp_path, "--workers", "2", "--hub-id", "edge", "--data-dir", str(tmp_path / "d")
    )
    await child.start()
    try:
        line = await child.read_line(timeout_s=60)
    finally:
        child.kill()
        await child.wait()
    match = _WORKERS.search(line)
    assert match is not None, line
    assert match.group(1) == "2"
    assert match.group(2) == "edge-w0, edge-w1"
    assert line.startswith("hub edge ready: nodes ws://127.0.0.1:")


async def test_sigkilled_supervisor_leaves_nothing_running(tmp_path: Path, started: Start) -> None:
    # Workers and the embedded Redis get SIGTERM from the kernel when their
    # parent dies (PR_SET_PDEATHSIG), even of a SIGKILL.
    child = serve_workers(tmp_path, "--workers", "2", "--data-dir", str(tmp_path / "data"))
    ready = await started(child)
    assert child.pid is not None
    children = child_pids(child.pid)
    assert len(children) == 3
    child.kill()
    await child.wait()
    await wait_for(lambda: all(process_gone(p) for p in children), timeout=15_000 * MS)
    assert not ping_tcp(ready.port)


# Failures at start and restarts


async def test_worker_that_cannot_reach_redis_at_start_fails_the_server(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    done = await asyncio.to_thread(
        run_command,
        hub_command(
            "serve",
            "--workers",
            "2",
            "--port",
            "0",
            "--hub-id",
            "h",
            "--redis-url",
            url,
            "--redis-wait-s",
            "0.3",
            "--log-level",
            "ERROR",
        ),
        env=CLI_ENV,
        timeout_s=90,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"hub: error: worker h-w[01] exited with status 1 at start", last), last


async def test_killed_worker_comes_back_with_its_id_and_a_crash_loop_ends_the_server(
    tmp_path: Path,
    spawn_redis: Callable[..., RedisProcess],
    started: Start,
) -> None:
    redis = spawn_redis()
    child = serve_workers(
        tmp_path, "--workers", "2", "--hub-id", "k", "--redis-url", redis.url,
        "--redis-wait-s", "0.3",
    )  # fmt: skip
    ready = await started(child)
    assert child.pid is not None
    supervisor = child.pid
    port = ready.port

    async def listed() -> dict[int, str]:
        hubs = (await status_of(port)).get("hubs", [])
        pids = set(worker_processes(supervisor))
        return {h["pid"]: h["hub_id"] for h in hubs if h["pid"] in pids and h["ready"]}

    await wait_for(lambda: _len_is(listed, 2), timeout=20_000 * MS)
    before = await listed()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)

    # Back under the same supervisor, with the same id and a new pid.
    async def back() -> bool:
        now = await listed()
        return len(now) == 2 and victim not in now and set(now.values()) == set(before.values())

    await wait_for(back, timeout=30_000 * MS)
    assert child.alive and child.pid == supervisor
    log = (tmp_path / "serve.log").read_text()
    assert f"! worker {before[victim]} (pid {victim}) exited with status -9" in log

    # With Redis gone, a killed worker cannot start again: after
    # MAX_START_FAILURES tries the supervisor stops the other and exits.
    others = worker_processes(supervisor)
    redis.stop()
    os.kill(others[0], signal.SIGKILL)
    status = await child.wait(timeout_s=120)
    assert status == 1
    log = (tmp_path / "serve.log").read_text()
    assert f"failed to start {MAX_START_FAILURES} times in a row; stopping the server" in log, log[
        -3000:
    ]
    assert log.rstrip().splitlines()[-1].startswith("hub: error: worker k-w")
    assert all(process_gone(p) for p in others)
    assert worker_processes(supervisor) == []


async def _len_is(read: Callable[[], Awaitable[dict[int, str]]], n: int) -> bool:
    return len(await read()) == n


# Under load: a SIGKILLed worker loses nothing


async def test_sigkilled_workers_under_load_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    # One `hub serve --workers 2`; the nodes and sessions are given its one
    # URL: after a kill they reconnect to it, and the kernel sends them to
    # the live sibling. Two kills, no other fault.
    config = ChaosConfig(
        duration_s=24.0,
        hubs=1,
        workers=2,
        nodes=4,
        sessions=8,
        seed=20261206,
        service_ms=(200.0, 600.0),
        job_interval_s=0.3,
        node_kill_every_s=0,
        hub_kills=2,
        redis_restart=False,
        redis_kills=0,
        settle_s=20.0,
        out_dir=tmp_path,
        quiet=True,
    )
    run = ChaosRun(config)
    try:
        await run.start()
        [server] = run.hubs
        supervisor = server.pid
        report = await run.run()
        text = format_report(report)
        print(text)
        assert report["clean"], text
        assert report["faults"] == {"hub": 2}, text
        assert report["duplicates"] == report["leaks"] == report["mismatches"] == 0
        assert report["double_runs"] == 0
        assert report["submitted"] > 100 and report["finished"] > 0.8 * report["submitted"]
        # The supervisor brought each killed worker back, and was never restarted.
        assert all(f.back_at is not None for f in run.faults), run.faults
        assert server.alive and server.pid == supervisor and server.launches == 1
        # Sessions of a killed worker resumed on its sibling.
        assert report["failover"]["hub_kill_to_session_resumed_s"] is not None, text
        # SIGTERM to the supervisor: nothing is left running.
        assert supervisor is not None
        workers = worker_processes(supervisor)
        assert len(workers) == 2
        assert await server.stop(30) == 0
        assert all(process_gone(p) for p in workers)
    finally:
        await run.close()
