"""Test helpers: time units, polling, and Redis servers run as child processes.

Import them as ``from helpers import MS, wait_for`` (``tests/`` is on
``sys.path`` because ``tests/conftest.py`` lives there).
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hub.embedded import kill_on_parent_death

__all__ = [
    "CONNECT_TIMEOUT_S",
    "MS",
    "SOCKET_TIMEOUT_S",
    "RedisProcess",
    "client_for",
    "free_port",
    "glob_escape",
    "ping_tcp",
    "process_gone",
    "wait_for",
    "wait_for_sync",
]

MS = 0.001 * float(os.environ.get("HUB_TESTS_TIMEOUT_FACTOR", "1"))
"""One millisecond, scaled by ``HUB_TESTS_TIMEOUT_FACTOR`` for slow machines."""

SOCKET_TIMEOUT_S = 5.0
"""Read timeout of test clients."""
CONNECT_TIMEOUT_S = 2.0
"""Connect timeout of test clients."""


def client_for(url: str) -> Redis:
    """An asyncio client with explicit timeouts and no retries; close it with ``aclose()``.

    redis-py 8 gives ``Redis(host=...)`` ten retries with exponential backoff
    by default (``Redis.from_url`` gets none), so a test against a dead server
    could hang for seconds instead of failing at once. Spell everything out.
    """
    return Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


# Polling


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    # A polling helper, not a cancellable operation: asyncio.timeout() would
    # not give the "waiting for X; last result: Y" message.
    timeout: float = 500 * MS,  # noqa: ASYNC109
    interval: float = 5 * MS,
    what: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns a truthy value.

    Args:
        predicate: called with no argument; may return an awaitable.
        timeout: seconds before giving up; use multiples of :data:`MS`.
        interval: seconds between calls.
        what: description for the failure message (default: the predicate).
        ignore: exceptions that count as "not yet" instead of propagating.

    Returns:
        The first truthy value.

    Raises:
        AssertionError: on timeout, naming what was awaited and the last value
            or exception seen.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:
            value, last = None, exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.3f} s waiting for {what or _describe(predicate)}; "
                f"last result: {last!r}"
            )
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], Any],
    *,
    timeout: float = 500 * MS,
    interval: float = 5 * MS,
    what: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Blocking twin of :func:`wait_for`, for sync tests and fixtures."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except ignore as exc:
            value, last = None, exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.3f} s waiting for {what or _describe(predicate)}; "
                f"last result: {last!r}"
            )
        time.sleep(interval)


def _describe(predicate: Callable[..., Any]) -> str:
    name = getattr(predicate, "__qualname__", None) or repr(predicate)
    return f"{name}() to be true"


# Processes and sockets


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited. A zombie counts as gone: in containers, PID 1
    may never reap the orphans it inherits."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        pass
    else:
        # The state follows the parenthesised command name, which may contain ")".
        return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ping_tcp(port: int, timeout: float = 0.5) -> bool:
    """Whether a server on 127.0.0.1:``port`` answers ``PING`` with ``+PONG``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return reply == b"+PONG\r\n"
    except OSError:
        return False


def glob_escape(text: str) -> str:
    """Escape ``text`` for a Redis glob pattern (``SCAN MATCH``, ``KEYS``)."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


class RedisProcess:
    """A real Redis server on a loopback TCP port, for tests. Never a system service.

    Every method is synchronous and blocks for at most a few seconds (the
    server starts in tens of milliseconds). In an async test that needs the
    event loop to keep running meanwhile (a hub reconnecting during a
    failover), use ``await asyncio.to_thread(server.restart)``.

    Servers started from the main thread get SIGTERM if pytest dies
    (``PR_SET_PDEATHSIG``), so a crashed run leaves no process behind.

    Args:
        binary: server binary.
        dir: working directory (append-only file, log).
        port: TCP port on 127.0.0.1; ``None`` picks a free one.
        appendonly: keep an append-only file (``appendfsync always``, so a
            SIGKILL loses nothing that was acknowledged).
        extra_args: more ``--name value`` arguments.
    """

    def __init__(
        self,
        binary: str,
        dir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: Sequence[str] = (),
    ):
        self.binary = binary
        self.dir = Path(dir)
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """Process id of the running server."""
        assert self.process is not None, "server not started"
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.dir / f"redis-{self.port}.log"

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10_000 * MS) -> None:
        """Start the server and wait until it answers PING.

        Raises:
            RuntimeError: if it exits or does not answer in time (then it is
                killed); the message quotes the end of its log.
        """
        assert not self.is_running(), "already running"
        self.dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            *self.extra_args,
        ]  # fmt: skip
        preexec = kill_on_parent_death()
        if threading.current_thread() is not threading.main_thread():
            preexec = None  # PDEATHSIG would fire when this worker thread exits.
        with open(self.log_path, "ab") as stderr:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.dir,
                preexec_fn=preexec,
            )
        deadline = time.monotonic() + timeout
        while not ping_tcp(self.port, timeout=0.5):
            code = self.process.poll()
            if code is not None or time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"redis-server {self.binary} on port {self.port} "
                    f"{'exited with code ' + str(code) if code is not None else 'did not start'}"
                    f": {self._log_tail()}"
                )
            time.sleep(0.005)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Idempotent."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, like a crash: no AOF rewrite, no goodbye to clients."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(5.0)

    def restart(self, timeout: float = 10_000 * MS) -> None:
        """Stop if running, then start again on the same port and directory."""
        self.stop()
        self.start(timeout)

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "nothing logged"

    def __repr__(self) -> str:
        return f"<RedisProcess {self.url} running={self.is_running()}>"
