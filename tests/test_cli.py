"""End-to-end tests of hub/cli.py: ``python -m hub ...`` run as child processes.

Every child runs with a bounded timeout. User errors must come out as one
line on stderr (``hub: error: …``) with a non-zero status, never a traceback.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import jwt
import orjson
import pytest

from hub.auth import Authenticator
from hub.client import Partial, SessionClient
from hub.config import Settings
from loadtest.procs import (
    CommandProcess,
    child_env,
    free_port,
    http_status,
    hub_command,
    parse_ready_line,
    run_command,
)

RUN_TIMEOUT_S = 60
SERVE = ("serve", "--port", "0")
"""``hub serve`` on a port the system picks."""
CLI_ENV = child_env(drop_hub_settings=True)
"""The environment of a user's shell: no HUB_* settings, no asyncio debug."""


def hub_cli(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = RUN_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return run_command(hub_command(*args), env=env or CLI_ENV, timeout_s=timeout_s)


def assert_one_line_error(done: subprocess.CompletedProcess[str], status: int) -> str:
    """The process failed with ``status`` and said why in one line; return it."""
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("hub: error: "), lines[0]
    return lines[0]


def hub_child(*args: str, stderr: Path) -> CommandProcess:
    """``python -m hub <args>``, started by ``async with`` and killed after it."""
    return CommandProcess(hub_command(*args), log_path=stderr, env=CLI_ENV)


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[int]:
    """``hub serve`` with its embedded Redis on a free port; yields the port."""
    async with hub_child(
        *SERVE,
        "--data-dir",
        str(tmp_path / "data"),
        "--log-level",
        "WARNING",
        stderr=tmp_path / "serve.log",
    ) as child:
        line = await child.read_line()
        ready = parse_ready_line(line)
        assert ready is not None and ready.host == "127.0.0.1", line
        yield ready.port
        assert await child.stop(20) == 0


@pytest.fixture
async def cli_node(served: int, tmp_path: Path) -> AsyncIterator[CommandProcess]:
    """``hub node`` registered with the ``served`` hub (its other hub is not there)."""
    async with hub_child(
        "node",
        "--url",
        f"ws://127.0.0.1:{free_port()},ws://127.0.0.1:{served}",
        "--node-id",
        "cli-node",
        "--languages",
        "zh,en",
        "--service-time-ms",
        "10..40",
        stderr=tmp_path / "node.log",
    ) as child:
        line = await child.read_line()
        assert line.startswith("node cli-node registered with hub "), line
        assert f" at ws://127.0.0.1:{served}/v1/node " in line, line
        yield child


# hub demo


def test_demo_prints_each_result_and_exits_0() -> None:
    done = hub_cli("demo")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    out = done.stdout
    for expected in (
        "-> 'NI HAO, SHI JIE'",
        "-> 'GOOD MORNING'",
        "-> 'WHERE IS THE STATION?'",
        "-> 'ARIGATOU GOZAIMASU'",
        "-> 'SEE YOU TOMORROW'",
        "-> 'THIS ONE CARRIES ONE SECOND OF AUDIO', audio_bytes=32000",
        "-> refused: NO_POOL_FOR_LANG_PAIR",
        "hub demo: done",
    ):
        assert expected in out, out
    assert out.count("2 partials]") == 6
    data_dir = re.search(r"embedded Redis in (\S+)", out)
    assert data_dir and not Path(data_dir[1]).exists()  # cleaned up


# Bad input: one line, exit 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "the following arguments are required: COMMAND (see hub --help)"),
        (("bogus",), "argument COMMAND: invalid choice: 'bogus'"),
        (("serve", "--port", "x"), "argument --port: invalid int value: 'x'"),
        (("serve", "--port", "70000"), "invalid setting port=70000: must be 0..65535"),
        (("serve", "--set", "nope"), "--set expects NAME=VALUE, got 'nope'"),
        (("serve", "--set", "colour=blue"), "invalid setting colour='blue': unknown setting"),
        (("serve", "--config", "/nonexistent/hub.toml"), "invalid setting config="),
        (("serve", "--redis-url", "http://x"), "scheme must be redis, rediss or unix"),
        (("serve", "--redis-wait-s", "-1"), "argument --redis-wait-s: expected a finite number"),
        (("serve", "--loop", "trio"), "argument --loop: invalid choice: 'trio'"),
        (("node", "--max-jobs", "0"), "argument --max-jobs: expected at least 1, got 0"),
        (("node", "--service-time-ms", "a..b"), "expected milliseconds like 200 or 50..300"),
        (("node", "--lang-pairs", "zhen"), "expected src:tgt pairs like zh:en, got 'zhen'"),
        (
            ("node", "--languages", "zh,en", "--lang-pairs", "zh:en"),
            "argument --lang-pairs: not allowed with argument --languages",
        ),
        (("node", "--url", "ftp://x"), "hub URL must be ws://host:port or wss://host:port"),
        (("status", "--url", "ftp://x"), "--url must be http://host:port, got 'ftp://x'"),
        (("token",), "hub token needs --key (or HUB_SESSION_JWT_KEY)"),
        (("token", "--key", "k", "--ttl", "0"), "argument --ttl: expected at least 1, got 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: Sequence[str], message: str) -> None:
    line = assert_one_line_error(hub_cli(*args), 2)
    assert message in line


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_serve_on_a_port_in_use_is_one_line_and_exit_2(busy_port: int) -> None:
    line = assert_one_line_error(hub_cli("serve", "--port", str(busy_port)), 2)
    assert line == f"hub: error: port {busy_port} on 127.0.0.1 is already in use"


def test_serve_with_an_unwritable_data_dir_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    data_dir = tmp_path / "file" / "data"
    line = assert_one_line_error(hub_cli(*SERVE, "--data-dir", str(data_dir)), 1)
    assert line == f"hub: error: cannot use data_dir {data_dir}: Not a directory"


def test_serve_with_unreachable_redis_is_one_line_and_exit_1() -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}"
    done = hub_cli(
        *SERVE, "--redis-url", unreachable, "--redis-wait-s", "0.5", "--log-level", "ERROR"
    )
    line = assert_one_line_error(done, 1)
    assert re.fullmatch(
        r"hub: error: cannot reach Redis at redis://127\.0\.0\.1:\d+/0 within 0\.5 s "
        r"\(--redis-wait-s 0 starts anyway and keeps retrying\)",
        line,
    ), line


async def test_serve_without_redis_wait_starts_and_is_not_ready(tmp_path: Path) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}"
    async with hub_child(
        *SERVE, "--redis-url", unreachable, "--redis-wait-s", "0", stderr=tmp_path / "serve.log"
    ) as child:
        line = await child.read_line()
        assert line.endswith("(not reachable yet: retrying)\n"), line
        ready = parse_ready_line(line)
        assert ready is not None and not ready.redis_reachable, line
        assert await http_status(ready.port, "/healthz", 5) == 200
        assert await http_status(ready.port, "/readyz", 5) == 503
        assert await child.stop(20) == 0
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_serve_runs_on_the_event_loop_asked_for(loop: str, tmp_path: Path) -> None:
    """uvloop is the default where installed; asyncio's own loop stays supported."""
    log = tmp_path / "serve.log"
    args = () if loop == "uvloop" else ("--loop", "asyncio")
    async with hub_child(
        *SERVE, *args, "--data-dir", str(tmp_path / "data"), "--log-level", "INFO", stderr=log
    ) as child:
        ready = parse_ready_line(await child.read_line())
        assert ready is not None
        assert await http_status(ready.port, "/readyz", 5) == 200
        assert await child.stop(20) == 0
    assert f"= event loop: {loop}" in log.read_text()


# hub serve, node and status together


async def test_serve_answers_readyz_and_serves_the_demo_page(served: int) -> None:
    assert await http_status(served, "/readyz", 5) == 200
    assert await http_status(served, "/demo", 5) == 200


async def test_node_command_answers_jobs_with_partials(
    served: int, cli_node: CommandProcess
) -> None:
    async with SessionClient(f"ws://127.0.0.1:{served}") as session:
        events = [
            e async for e in session.stream("zh", "en", {"text": "hello node"}, audio=b"\x01" * 9)
        ]
    partials, final = events[:-1], events[-1]
    assert [p.result for p in partials if isinstance(p, Partial)] == [
        {"text": "HELLO"},
        {"text": "HELLO N"},
    ]
    assert not isinstance(final, Partial)
    assert final.node_id == "cli-node"
    assert final.result == {
        "text": "HELLO NODE",
        "audio_bytes": 9,
        "node_id": "cli-node",
        "src_lang": "zh",
        "tgt_lang": "en",
    }


async def test_node_command_drains_on_sigterm_and_exits_0(
    served: int, cli_node: CommandProcess
) -> None:
    running = asyncio.Event()
    async with SessionClient(f"ws://127.0.0.1:{served}") as session:
        job = asyncio.create_task(
            session.submit("en", "zh", {"text": "last"}, on_partial=lambda _: running.set())
        )
        await asyncio.wait_for(running.wait(), 5)
        assert await cli_node.stop(20) == 0
        result = await asyncio.wait_for(job, 5)
    assert (await cli_node.read_line()).startswith("node cli-node: draining")
    assert result.ok and result.node_id == "cli-node"


async def test_status_prints_the_node_table_and_jobs_per_second(
    served: int, cli_node: CommandProcess
) -> None:
    async with SessionClient(f"ws://127.0.0.1:{served}") as session:
        await session.submit("zh", "en", {"text": "count me"})
    done = await asyncio.to_thread(hub_cli, "status", "--url", f"http://127.0.0.1:{served}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"hub \S+ \(ready\): 1 nodes and 0 sessions connected here", lines[0])
    header = next(i for i, line in enumerate(lines) if line.startswith("NODE"))
    assert lines[header].split() == ["NODE", "HUB", "RUNNING", "LOAD", "POOLS", "PAIRS", "STATE"]
    assert lines[header + 1].split()[0] == "cli-node"
    assert lines[header + 1].split()[2:] == ["0/4", "0%", "default", "2", "live"]
    assert "queues: " in done.stdout
    assert re.search(r"counters: .*finished 1", done.stdout)
    assert re.search(r"^jobs/s: \d+\.\d \(finished \+ failed over 1\.\d s\)$", done.stdout, re.M)


async def test_status_once_and_json(served: int) -> None:
    once = await asyncio.to_thread(hub_cli, "status", "--once", "--url", f"ws://127.0.0.1:{served}")
    assert once.returncode == 0, once.stderr
    assert "no nodes" in once.stdout and "jobs/s: n/a (--once)" in once.stdout
    as_json = await asyncio.to_thread(
        hub_cli, "status", "--json", "--url", f"http://127.0.0.1:{served}"
    )
    assert as_json.returncode == 0, as_json.stderr
    assert orjson.loads(as_json.stdout)["ready"] is True


def test_status_of_an_unreachable_hub_is_one_line_and_exit_1() -> None:
    port = free_port()
    line = assert_one_line_error(hub_cli("status", "--url", f"http://127.0.0.1:{port}"), 1)
    assert line.startswith(f"hub: error: cannot reach http://127.0.0.1:{port}/v1/status: ")


# hub token


def test_token_mints_an_hs256_jwt_for_a_session() -> None:
    key = "k" * 32
    done = hub_cli(
        "token", "--key", key, "--session-id", "s-1", "--pairs", "zh:en,en:zh", "--ttl", "60"
    )
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), key, algorithms=["HS256"])
    assert claims["sid"] == "s-1"
    assert claims["pairs"] == ["zh:en", "en:zh"]
    assert claims["exp"] - claims["iat"] == 60


def test_token_reads_the_key_from_the_environment() -> None:
    key = "e" * 32
    done = hub_cli("token", env={**CLI_ENV, "HUB_SESSION_JWT_KEY": key})
    assert done.returncode == 0, done.stderr
    assert jwt.decode(done.stdout.strip(), key, algorithms=["HS256"])["sid"].startswith("s-")


def test_token_without_a_session_id_gives_each_connection_its_own() -> None:
    # One token for many sessions (hub bench): the hub draws each one's id.
    key = "s" * 32
    done = hub_cli("token", "--key", key, "--no-session-id", "--pairs", "en-x-bench:zh-x-bench")
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), key, algorithms=["HS256"])
    assert "sid" not in claims
    grant = Authenticator(Settings(session_jwt_key=key)).session(
        {"Authorization": f"Bearer {done.stdout.strip()}"}, {}
    )
    assert grant.session_id is None
    assert grant.allows_pair("en-x-bench", "zh-x-bench")
    both = hub_cli("token", "--key", key, "--no-session-id", "--session-id", "s-1")
    assert "not allowed with argument" in assert_one_line_error(both, 2)


def test_token_mints_a_node_token_that_the_hub_accepts() -> None:
    key = "n" * 32
    done = hub_cli(
        "token", "--key", key, "--node-ids", "gpu-1,gpu-eu-*", "--ttl", "60", "--cell", "eu"
    )
    assert done.returncode == 0, done.stderr
    grant = Authenticator(Settings(node_token_key=key)).node(
        {"Authorization": f"Bearer {done.stdout.strip()}"}
    )
    assert grant.cell == "eu"
    assert grant.allows("gpu-1")
    assert grant.allows("gpu-eu-7")
    assert not grant.allows("gpu-2")


def test_token_mints_a_session_token_that_the_hub_accepts() -> None:
    key = "s" * 32
    done = hub_cli("token", "--key", key, "--session-id", "s-9", "--pairs", "zh:en", "--rate", "5")
    assert done.returncode == 0, done.stderr
    grant = Authenticator(Settings(session_jwt_key=key)).session(
        {"Authorization": f"Bearer {done.stdout.strip()}"}, {}
    )
    assert grant.session_id == "s-9"
    assert grant.cell is None
    assert grant.allows_pair("zh", "en")
    assert not grant.allows_pair("en", "zh")
    assert grant.rate_per_s == 5.0


def test_token_mints_an_admin_token_that_the_hub_accepts() -> None:
    key = "a" * 32
    done = hub_cli("token", "--admin", "--ttl", "60", env={**CLI_ENV, "HUB_ADMIN_TOKEN_KEY": key})
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    claims = jwt.decode(token, key, algorithms=["HS256"])
    assert claims["admin"] is True
    assert claims["exp"] - claims["iat"] == 60
    Authenticator(Settings(admin_token_key=key)).admin({"Authorization": f"Bearer {token}"}, {})


def test_token_admin_needs_a_key() -> None:
    done = hub_cli("token", "--admin")
    assert done.returncode == 2
    assert "hub token --admin needs --key (or HUB_ADMIN_TOKEN_KEY)" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--admin", "--node-ids", "gpu-*", "--pairs", "zh:en"],
            "hub token --admin takes no --node-ids, --pairs: an admin token has no other claim",
        ),
        (
            ["--admin", "--cell", "eu"],
            "hub token --admin takes no --cell: an admin token has no other claim",
        ),
        (
            ["--node-ids", "gpu-*", "--session-id", "s-1", "--rate", "5"],
            "hub token --node-ids takes no --session-id, --rate: those are session claims",
        ),
    ],
)
def test_token_refuses_claims_the_kind_of_token_cannot_carry(args: list[str], message: str) -> None:
    done = hub_cli("token", "--key", "k" * 32, *args)
    assert done.returncode == 2
    assert message in done.stderr, done.stderr
    assert done.stdout == ""


async def test_serve_with_cells_spills_a_job_to_a_node_command_of_another_cell(
    tmp_path: Path,
) -> None:
    async with hub_child(
        *SERVE,
        "--data-dir",
        str(tmp_path / "data"),
        "--cell",
        "eu",
        "--cells",
        "eu,us",
        "--spill",
        "1",
        stderr=tmp_path / "serve.log",
    ) as served:
        ready = parse_ready_line(await served.read_line())
        assert ready is not None
        async with hub_child(
            "node",
            "--url",
            f"ws://127.0.0.1:{ready.port}",
            "--node-id",
            "us-node",
            "--cell",
            "us",
            "--languages",
            "zh,en",
            "--service-time-ms",
            "10..20",
            stderr=tmp_path / "node.log",
        ) as node:
            line = await node.read_line()
            assert line.startswith("node us-node registered with hub "), line
            # A session of the default cell (eu, no node) gets the us node.
            async with SessionClient(f"ws://127.0.0.1:{ready.port}") as session:
                events = [e async for e in session.stream("zh", "en", {"text": "hi"})]
        final = events[-1]
        assert not isinstance(final, Partial)
        assert final.node_id == "us-node" and final.job_id.startswith("us.")
        assert await served.stop(20) == 0
