"""Child processes of the load harness and the tests: hubs, Redis servers and nodes.

One toolkit for everything that starts a process and must not leave it
behind: ``hub serve`` processes (:class:`HubProcess`), real Redis servers on
a loopback port (:class:`RedisProcess`), node workers (:class:`NodeProcess`)
and any other command (:class:`CommandProcess`). Each is stopped with
SIGTERM and a bounded wait (then SIGKILL), killed with SIGKILL, or frozen
and thawed with SIGSTOP and SIGCONT, always by its own pid. Children started
from the main thread get SIGTERM when their parent dies
(``PR_SET_PDEATHSIG``), so even a killed harness leaves nothing running.

Also here: free ports, the environment of a child Python, ``/proc``
readings of a pid, the parser of the line ``hub serve`` prints once it
listens (:func:`parse_ready_line`), ``GET`` of a status code, and the raw
WebSocket opening handshake of tests that write HTTP bytes themselves.

The hub package never imports this module.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import orjson

from hub.embedded import kill_on_parent_death

__all__ = [
    "REPO_ROOT",
    "ChildProcess",
    "CommandProcess",
    "HubProcess",
    "NodeProcess",
    "Processes",
    "ReadyLine",
    "RedisProcess",
    "aof_mark",
    "child_env",
    "child_pids",
    "cpu_seconds",
    "cut_aof",
    "free_port",
    "http_get",
    "http_status",
    "hub_command",
    "log_tail",
    "open_websocket",
    "parse_ready_line",
    "pick_port",
    "ping_tcp",
    "process_gone",
    "rss_kb",
    "run_command",
    "spawn",
    "start_redis",
    "upgrade_request",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
"""Where ``hub`` and ``loadtest`` are: the checkout, or site-packages once installed
(``hub bench``). Children import both from here."""

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# Environment, ports and /proc


def child_env(*, drop_hub_settings: bool = False) -> dict[str, str]:
    """Environment of a child Python: the checkout first on ``PYTHONPATH``, no asyncio debug.

    ``PYTHONASYNCIODEBUG`` (set by the test suite) makes every callback
    several times slower; children run as they do in production.

    Args:
        drop_hub_settings: also leave out every ``HUB_*`` variable, as in the
            shell of a user who set none.

    Returns:
        A new dict, based on ``os.environ``.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONASYNCIODEBUG" and not (drop_hub_settings and k.startswith("HUB_"))
    }
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    return env


def hub_command(*args: str) -> list[str]:
    """The command line of ``python -m hub <args>`` with this interpreter.

    Args:
        *args: the ``hub`` subcommand and its options.

    Returns:
        The argument list for :func:`spawn` or :mod:`subprocess`.
    """
    return [sys.executable, "-m", "hub", *args]


def run_command(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end, its output captured as text, no stdin.

    Args:
        args: the command line (see :func:`hub_command`).
        cwd: its working directory (default: the checkout).
        env: its environment (default: :func:`child_env`).
        timeout_s: how long it may run.

    Returns:
        Its exit status, stdout and stderr.

    Raises:
        subprocess.TimeoutExpired: if it runs too long (it is killed).
    """
    return subprocess.run(
        list(args),
        cwd=cwd if cwd is not None else REPO_ROOT,
        env=dict(env) if env is not None else child_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bind port 0, read it, release it).

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pick_port() -> int:
    """A free loopback port outside the ephemeral range.

    A killed hub comes back on the same port; a port in the ephemeral range
    could meanwhile be the local end of some client connection, and the new
    hub could not bind it.

    Returns:
        The port number.

    Raises:
        RuntimeError: if no free port turned up in 200 tries.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    lo, hi = (20000, low - 1) if low > 21000 else (high + 1, 65000)
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(lo, hi)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found outside the ephemeral range")


def _proc_stat(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and ")": the fields after it count from the last ")".
    return stat[stat.rindex(b")") + 2 :]


def rss_kb(pid: int | None) -> int | None:
    """Resident set size of a process in KiB (``VmRSS`` of ``/proc/<pid>/status``).

    Args:
        pid: the process; ``None`` gives ``None``.

    Returns:
        The size, or ``None`` when the process is gone or unknown.
    """
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``).

    Args:
        pid: the process.

    Returns:
        The seconds, or ``None`` when the process is gone.
    """
    fields = _proc_stat(pid)
    if fields is None:
        return None
    values = fields.split()
    return (int(values[11]) + int(values[12])) / _CLK_TCK


def child_pids(pid: int) -> list[int]:
    """The children of ``pid`` now (``/proc/<pid>/task/*/children``); empty when it is gone.

    Args:
        pid: the parent.

    Returns:
        Their pids, in ascending order.
    """
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.update(int(p) for p in f.read().split())
        except (OSError, ValueError):
            continue
    return sorted(found)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited.

    A zombie counts as gone: in containers, PID 1 may never reap the orphans
    it inherits.

    Args:
        pid: the process.

    Returns:
        True once the process no longer runs.
    """
    fields = _proc_stat(pid)
    if fields is not None:
        return fields[:1] in (b"Z", b"X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def log_tail(path: Path, size: int = 2000) -> str:
    """The last ``size`` characters of a log file, for error messages.

    Args:
        path: the log.
        size: how many characters.

    Returns:
        The text, or ``"(no log)"``.
    """
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


# Talking to a server by hand


def ping_tcp(port: int, timeout: float = 0.5) -> bool:
    """Whether a Redis server on 127.0.0.1:``port`` answers ``PING`` with ``+PONG``.

    Args:
        port: the TCP port.
        timeout: seconds for the connection and the answer.

    Returns:
        True on ``+PONG``.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            with sock.makefile("rb") as replies:
                return replies.readline() == b"+PONG\r\n"
    except OSError:
        return False


async def http_status(
    port: int, path: str, timeout_s: float = 2.0, *, host: str = "127.0.0.1"
) -> int | None:
    """HTTP status of ``GET http://<host>:<port><path>``.

    Args:
        port: the TCP port.
        path: the request path.
        timeout_s: bound of the whole exchange.
        host: the address to connect to.

    Returns:
        The status code, or ``None`` if the server is unreachable or mute.
    """
    return (await http_get(port, path, timeout_s, host=host, body=False))[0]


async def http_get(
    port: int, path: str, timeout_s: float = 2.0, *, host: str = "127.0.0.1", body: bool = True
) -> tuple[int | None, bytes]:
    """Status and body of ``GET http://<host>:<port><path>`` (as :func:`http_status`).

    Args:
        body: read the body (to the end of the connection); else only the status line.
    """
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                line = await reader.readline()
                rest = await reader.read() if body else b""
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None, b""
    parts = line.split()
    status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None
    return status, rest.partition(b"\r\n\r\n")[2]


def aof_mark(data_dir: Path) -> tuple[Path, int]:
    """Where a server's append-only file ends now: its newest incremental file and size.

    Args:
        data_dir: the server's ``--dir`` (the files are in ``appendonlydir``).

    Raises:
        FileNotFoundError: if the server keeps no append-only file there.
    """
    aof_dir = Path(data_dir) / "appendonlydir"
    (manifest,) = aof_dir.glob("*.manifest")
    incremental = [
        line.split()[1] for line in manifest.read_text().splitlines() if line.endswith(" type i")
    ]
    path = aof_dir / incremental[-1]
    return path, path.stat().st_size


def cut_aof(mark: tuple[Path, int]) -> int:
    """Cut a killed server's append-only file back to ``mark`` (:func:`aof_mark`).

    This is what an operating system crash does to writes Redis had not yet
    fsynced (``appendfsync everysec``: up to a second of them): a SIGKILL of
    the process alone loses nothing the kernel holds. Cutting the file takes
    the writes made since the mark out, as that crash would; the server
    loads what is left (``aof-load-truncated``).

    Returns:
        How many bytes were cut.
    """
    path, size = mark
    cut = path.stat().st_size - size
    os.truncate(path, size)
    return cut


def upgrade_request(
    path: str,
    *,
    host: str = "127.0.0.1",
    key: str | None = None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
) -> bytes:
    """The bytes of a WebSocket opening handshake request (RFC 6455 §4.1).

    Args:
        path: the request target, with its query if any.
        host: the ``Host`` header.
        key: ``Sec-WebSocket-Key``; a random one by default.
        headers: more header fields, after ``Host``.

    Returns:
        The whole request, ending with the empty line.
    """
    if key is None:
        key = base64.b64encode(os.urandom(16)).decode()
    items = headers.items() if isinstance(headers, Mapping) else headers
    extra = "".join(f"{name}: {value}\r\n" for name, value in items)
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def open_websocket(
    port: int,
    path: str,
    *,
    host: str = "127.0.0.1",
    rcvbuf: int | None = None,
    timeout_s: float = 2.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and do the WebSocket opening handshake by hand.

    What follows is up to the caller: no library reads, answers pings or
    masks frames on this connection.

    Args:
        port: the hub's TCP port.
        path: ``/v1/node`` or ``/v1/session``, with a query if any.
        host: the address to connect to.
        rcvbuf: a small ``SO_RCVBUF`` (and stream limit), for a peer that reads slowly.
        timeout_s: bound of the connection and the handshake.

    Returns:
        The stream pair, positioned after the server's response head.

    Raises:
        AssertionError: if the server does not answer ``101``.
    """
    async with asyncio.timeout(timeout_s):
        if rcvbuf is None:
            reader, writer = await asyncio.open_connection(host, port)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=rcvbuf)
        writer.write(upgrade_request(path, host=f"{host}:{port}"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


# The ready line of hub serve


@dataclasses.dataclass(frozen=True)
class ReadyLine:
    """What the line ``hub serve`` prints once it listens tells.

    The line reads ``hub <id> ready: nodes ws://<host>:<port>/v1/node,
    sessions ..., status ..., demo ..., dashboard ...; redis: <where>``, with
    `` (not reachable yet: retrying)`` at the end while Redis is out of reach.
    """

    hub_id: str
    scheme: str
    """``ws`` or ``wss``."""
    host: str
    port: int
    redis: str
    """Where the hub's Redis is (a redacted URL, or the embedded server)."""
    redis_reachable: bool

    @property
    def url(self) -> str:
        """The hub's base URL, ``ws://<host>:<port>``."""
        return f"{self.scheme}://{self.host}:{self.port}"


_READY_LINE = re.compile(
    r"hub (?P<hub_id>\S+) ready: nodes (?P<scheme>wss?)://(?P<host>\S+):(?P<port>\d+)/v1/node, "
    r".*?; redis: (?P<redis>.*?)(?P<waiting> \(not reachable yet: retrying\))?"
)


def parse_ready_line(line: str | bytes) -> ReadyLine | None:
    """Parse the line ``hub serve`` prints once it listens.

    Args:
        line: one line of its standard output, with or without the newline.

    Returns:
        The hub's id, address and Redis, or ``None`` for any other line.
    """
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    match = _READY_LINE.fullmatch(text.rstrip("\r\n"))
    if match is None:
        return None
    return ReadyLine(
        hub_id=match["hub_id"],
        scheme=match["scheme"],
        host=match["host"],
        port=int(match["port"]),
        redis=match["redis"],
        redis_reachable=match["waiting"] is None,
    )


# Signals


class _Signalled(Protocol):
    def send_signal(self, sig: int) -> None: ...


class _Signals:
    """Signals to one's own child process, by pid, only while it runs."""

    def _running(self) -> _Signalled | None:
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        """Send ``sig`` if the process runs.

        Args:
            sig: the signal number.
        """
        process = self._running()
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, like a crash: no goodbye to anyone."""
        self.signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: the process stops, its sockets stay open and nobody answers."""
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT after :meth:`freeze`."""
        self.signal(signal.SIGCONT)


def _death_signal() -> Callable[[], None] | None:
    # PR_SET_PDEATHSIG tracks the parent thread: from a worker thread it would
    # fire when that thread exits.
    if threading.current_thread() is not threading.main_thread():
        return None
    return kill_on_parent_death()


# Redis servers (blocking)


class RedisProcess(_Signals):
    """A real Redis server on a loopback TCP port. Never a system service.

    Every method is synchronous and blocks for at most a few seconds (the
    server starts in tens of milliseconds). In async code that needs the
    event loop to keep running meanwhile (a hub reconnecting during a
    failover), use ``await asyncio.to_thread(server.restart)``.

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
        """The server's log file."""
        return self.dir / f"redis-{self.port}.log"

    def is_running(self) -> bool:
        """Whether the server process runs."""
        return self.process is not None and self.process.poll() is None

    def _running(self) -> _Signalled | None:
        return self.process if self.is_running() else None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING.

        Args:
            timeout: seconds to wait for the first PONG.

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
        with open(self.log_path, "ab") as stderr:
            self.process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.dir,
                preexec_fn=_death_signal(),
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
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Idempotent.

        Args:
            timeout: seconds to wait for each signal to take effect.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, like a crash (no AOF rewrite, no goodbye to clients), and reap it."""
        process = self._running()
        super().kill()
        if process is not None:
            assert self.process is not None
            self.process.wait(5.0)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop if running, then start again on the same port and directory.

        Args:
            timeout: as :meth:`start`.
        """
        self.stop()
        self.start(timeout)

    def _log_tail(self) -> str:
        lines = log_tail(self.log_path).strip().splitlines()
        return " | ".join(lines[-3:]) or "nothing logged"

    def __repr__(self) -> str:
        return f"<RedisProcess {self.url} running={self.is_running()}>"


def start_redis(
    binary: str,
    dir: Path,
    *,
    appendonly: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = 10.0,
) -> RedisProcess:
    """Start a :class:`RedisProcess` on a free port, trying another if that one is taken.

    The free port is released before the server binds it; if something else
    took it meanwhile, the server exits at once and another port is tried.

    Args:
        binary: server binary.
        dir: working directory.
        appendonly: as :class:`RedisProcess`.
        extra_args: as :class:`RedisProcess`.
        timeout: as :meth:`RedisProcess.start`.

    Returns:
        The running server.

    Raises:
        RuntimeError: if three ports in a row failed.
    """
    for attempt in range(3):
        server = RedisProcess(binary, dir, appendonly=appendonly, extra_args=extra_args)
        try:
            server.start(timeout)
        except RuntimeError:
            if attempt == 2:
                raise
        else:
            return server
    raise AssertionError("unreachable")


# Child processes of the event loop


async def spawn(
    args: Sequence[str],
    *,
    log_path: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    stdin_pipe: bool = False,
    limit: int = 2**16,
) -> asyncio.subprocess.Process:
    """Start a child whose stdout is a pipe and whose stderr is appended to a log file.

    The child gets SIGTERM when this process dies (when started from the
    main thread).

    Args:
        args: the command line.
        log_path: where its stderr goes (created, appended to).
        cwd: its working directory (default: the checkout).
        env: its environment (default: :func:`child_env`).
        stdin_pipe: give it a stdin pipe (else ``/dev/null``).
        limit: the line length limit of its stdout reader.

    Returns:
        The process.
    """
    # A raw descriptor: the child writes its log there, nobody reads a pipe.
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if stdin_pipe else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=dict(env) if env is not None else child_env(),
            cwd=cwd if cwd is not None else REPO_ROOT,
            preexec_fn=_death_signal(),
            limit=limit,
        )
    finally:
        os.close(log)


class ChildProcess(_Signals):
    """A child of the running event loop: stdout read by the parent, stderr to a log.

    Subclasses build the command line and read the output; this class
    stops, kills and waits. As an async context manager it starts the
    process on entry and kills it (by pid) on exit.

    Args:
        log_path: where its stderr goes (appended to across restarts).
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self.process: asyncio.subprocess.Process | None = None
        self.launches = 0
        """How many times it was started."""
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the latest incarnation."""
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        """Whether the process runs."""
        return self.process is not None and self.process.returncode is None

    def _running(self) -> _Signalled | None:
        return self.process if self.alive else None

    async def start(self) -> None:
        """Start the process (subclasses say how and what they wait for)."""
        raise NotImplementedError

    async def _spawn(self, args: Sequence[str], **options: Any) -> asyncio.StreamReader:
        assert not self.alive, f"{self!r} already runs"
        self.process = await spawn(args, log_path=self.log_path, **options)
        self.launches += 1
        assert self.process.stdout is not None
        return self.process.stdout

    def _read_in_background(self, reading: Any) -> None:
        self._reader = asyncio.get_running_loop().create_task(reading)

    async def read_line(self, timeout_s: float = 20.0) -> str:
        """The next line of its stdout (``""`` at its end).

        Args:
            timeout_s: how long to wait.

        Returns:
            The line, with its newline.

        Raises:
            TimeoutError: if no line comes in time.
        """
        assert self.process is not None and self.process.stdout is not None
        async with asyncio.timeout(timeout_s):
            line = await self.process.stdout.readline()
        return line.decode(errors="replace")

    async def wait(self, timeout_s: float = 10.0) -> int | None:
        """Wait for the process to exit; SIGKILL it after ``timeout_s``.

        Args:
            timeout_s: how long it may take.

        Returns:
            Its exit status (negative: the signal that ended it), or ``None``
            if it never started.
        """
        process = self.process
        if process is None:
            return None
        try:
            async with asyncio.timeout(timeout_s):
                await process.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        reader, self._reader = self._reader, None
        if reader is not None:
            # Its output up to the exit is read (bounded: a grandchild may hold the pipe).
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await reader
            reader.cancel()
        return process.returncode

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM (an orderly shutdown), then SIGKILL after ``timeout_s``.

        Args:
            timeout_s: how long the shutdown may take.

        Returns:
            As :meth:`wait`.
        """
        self.signal(signal.SIGTERM)
        return await self.wait(timeout_s)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()
        await self.wait()


class CommandProcess(ChildProcess):
    """Any command as a :class:`ChildProcess`; the caller reads its stdout line by line.

    Args:
        args: the command line (see :func:`hub_command`).
        log_path: where its stderr goes.
        cwd: its working directory (default: the checkout).
        env: its environment (default: :func:`child_env`).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(log_path)
        self.args = list(args)
        self.cwd = cwd
        self.env = env

    async def start(self) -> None:
        """Start the command; nothing is read from it."""
        await self._spawn(self.args, cwd=self.cwd, env=self.env)

    def __repr__(self) -> str:
        return f"<CommandProcess {self.args[:4]!r} pid={self.pid}>"


class HubProcess(ChildProcess):
    """``python -m hub serve`` as a child process that may be killed and started again.

    Its port is kept across restarts, as its id is (a pod's name and
    address). It starts with ``--redis-wait-s 0``: it prints its ready line
    at once and :meth:`wait_ready` waits for Redis through ``/readyz``.

    Args:
        hub_id: the hub's id; ``None`` lets the hub choose one.
        redis_url: the shared Redis.
        log_dir: where its log goes (and its working directory).
        cell: the scheduling cell; ``None`` for the hub's default.
        port: the TCP port on 127.0.0.1; ``None`` picks one with
            :func:`pick_port`, 0 lets the hub choose at each start.
        settings: ``--set NAME=VALUE`` settings (``None`` values become ``none``).
        name: the log's file name without ``.log`` (default: the hub id, else ``hub``).
        launcher: the command that takes ``serve ...`` (default ``python -m hub``).
        log_level: the hub's ``--log-level``.
    """

    def __init__(
        self,
        hub_id: str | None = None,
        *,
        redis_url: str,
        log_dir: Path,
        cell: str | None = None,
        port: int | None = None,
        settings: Mapping[str, Any] | None = None,
        name: str | None = None,
        launcher: Sequence[str] | None = None,
        log_level: str = "WARNING",
    ) -> None:
        super().__init__(Path(log_dir) / f"{name or hub_id or 'hub'}.log")
        self.hub_id = hub_id
        self.redis_url = redis_url
        self.cell = cell
        self.log_dir = Path(log_dir)
        self.fixed_port = port != 0
        self.port = pick_port() if port is None else port
        self.settings = dict(settings or {})
        self.launcher = list(launcher) if launcher is not None else hub_command()
        self.log_level = log_level
        self.ready_line: ReadyLine | None = None
        """What its latest ready line said."""

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:<port>``."""
        return f"ws://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """Its command line.

        Returns:
            The argument list.
        """
        args = [
            *self.launcher, "serve",
            "--host", "127.0.0.1",
            "--port", str(self.port if self.fixed_port else 0),
            "--redis-url", self.redis_url,
            "--redis-wait-s", "0",
            "--log-level", self.log_level,
        ]  # fmt: skip
        if self.cell is not None:
            args += ["--cell", self.cell]
        if self.hub_id is not None:
            args += ["--hub-id", self.hub_id]
        for name, value in self.settings.items():
            args += ["--set", f"{name}={'none' if value is None else value}"]
        return args

    async def start(self, timeout_s: float = 20.0) -> None:
        """Start the hub and wait for its ready line (not for Redis: see :meth:`wait_ready`).

        Args:
            timeout_s: how long it may take to print the line.

        Raises:
            RuntimeError: if it exits or prints no ready line in time (then
                it is killed); the end of its log is quoted.
        """
        stdout = await self._spawn(self.command(), cwd=self.log_dir)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await stdout.readline()
                    if not line:
                        raise RuntimeError(
                            f"hub {self.hub_id} exited at start: {log_tail(self.log_path)}"
                        )
                    ready = parse_ready_line(line)
                    if ready is not None:
                        break
        except TimeoutError:
            self.kill()
            raise RuntimeError(
                f"hub {self.hub_id} printed no ready line in {timeout_s:g} s: "
                f"{log_tail(self.log_path)}"
            ) from None
        except BaseException:
            self.kill()
            raise
        assert not self.fixed_port or ready.port == self.port, (ready, self.port)
        self.ready_line = ready
        self.port = ready.port
        self.hub_id = ready.hub_id
        self._read_in_background(_read_to_end(stdout))

    async def wait_ready(self, timeout_s: float = 20.0) -> None:
        """Wait until ``/readyz`` answers 200 (Redis reached, scripts loaded).

        Args:
            timeout_s: how long it may take.

        Raises:
            RuntimeError: if the hub exits or is not ready in time.
        """
        try:
            async with asyncio.timeout(timeout_s):
                while await http_status(self.port, "/readyz") != 200:
                    if not self.alive:
                        raise RuntimeError(f"hub {self.hub_id} exited: {log_tail(self.log_path)}")
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise RuntimeError(
                f"hub {self.hub_id} not ready in {timeout_s:g} s: {log_tail(self.log_path)}"
            ) from None

    def worker_pids(self) -> list[int]:
        """The pids of its workers (``hub serve --workers``): children running ``hub.worker``."""
        if self.pid is None:
            return []
        return [p for p in child_pids(self.pid) if "hub.worker" in _cmdline(p)]

    def __repr__(self) -> str:
        return f"<HubProcess {self.hub_id} {self.url} pid={self.pid}>"


async def _read_to_end(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


NodeEventCallback = Callable[["NodeProcess", dict[str, Any]], None]

NODE_WORKER = ("-m", "loadtest.chaos", "node-worker")
"""How a node worker starts: ``python -m loadtest.chaos node-worker CONFIG``."""


class NodeProcess(ChildProcess):
    """A node worker child process (``python -m loadtest.chaos node-worker``).

    The worker runs one :class:`~hub.client.NodeClient` given every hub (it
    moves to the next when its hub dies)
    and reports on its stdout, one JSON object a line (``t`` is Unix time):

    - ``{"e": "reg", "hub": ..., "n": connections, "running": jobs, "t": ...}``
      after each registration;
    - ``{"e": "start" | "end" | "cancel", "job": ..., "a": attempt, "t": ...}``
      per handler invocation;
    - ``{"e": "status", "running": ..., "unsent": ..., "registered": ...}``
      in answer to ``status`` on its stdin.

    A job's payload may carry ``"ms"``: its service time, else one is drawn
    from ``service_ms``. Closing its stdin makes it drain and exit.

    Args:
        node_id: the node's id (kept across restarts).
        urls: hub base URLs, tried in turn from ``start_index`` (``spread=False``).
        log_dir: where ``<node_id>.log`` (stderr) goes.
        max_jobs: the node's slots.
        service_ms: (low, high) service time, drawn uniformly.
        start_index: the first hub to try.
        languages: the languages it serves (every pair among them).
        on_event: called with every event, in the parent's loop.
    """

    def __init__(
        self,
        node_id: str,
        urls: Sequence[str],
        *,
        log_dir: Path,
        max_jobs: int = 4,
        service_ms: tuple[float, float] = (100.0, 400.0),
        start_index: int = 0,
        languages: Sequence[str] = ("en", "fr"),
        on_event: NodeEventCallback | None = None,
    ) -> None:
        super().__init__(Path(log_dir) / f"{node_id}.log")
        self.node_id = node_id
        self.urls = list(urls)
        self.max_jobs = max_jobs
        self.service_ms = service_ms
        self.start_index = start_index
        self.languages = list(languages)
        self.on_event = on_event
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=10000)
        """The latest events received, over every incarnation of the process
        (bounded: a soak runs for hours)."""
        self.starts: collections.Counter[tuple[str, int]] = collections.Counter()
        """Handler invocations per (job id, attempt), over every incarnation."""
        self.inflight: set[tuple[str, int]] = set()
        """(job id, attempt) its handler runs right now, in the current incarnation."""
        self.hub_id: str | None = None
        self.registrations = 0
        self._registered = asyncio.Event()
        self._status: asyncio.Future[dict[str, Any]] | None = None

    @property
    def registered(self) -> bool:
        """Whether the current incarnation has registered."""
        return self._registered.is_set()

    async def start(self) -> None:
        """Start the worker (without waiting for its registration: see :meth:`wait_registered`)."""
        config = {
            "node_id": self.node_id,
            "urls": self.urls,
            "start_index": self.start_index,
            "max_jobs": self.max_jobs,
            "service_ms": list(self.service_ms),
            "languages": self.languages,
        }
        self._registered.clear()
        self.inflight.clear()
        stdout = await self._spawn(
            [sys.executable, *NODE_WORKER, json.dumps(config)], stdin_pipe=True
        )
        self._read_in_background(self._read(stdout))

    async def wait_registered(self, timeout_s: float = 20.0) -> None:
        """Wait for the current incarnation's first registration.

        Args:
            timeout_s: how long it may take.

        Raises:
            RuntimeError: if it does not register in time (its log is quoted).
        """
        try:
            async with asyncio.timeout(timeout_s):
                await self._registered.wait()
        except TimeoutError:
            raise RuntimeError(
                f"node {self.node_id} did not register in {timeout_s:g} s: "
                f"{log_tail(self.log_path)}"
            ) from None

    async def status(self, timeout_s: float = 5.0) -> dict[str, Any] | None:
        """Ask the worker how many jobs it really runs.

        Args:
            timeout_s: how long it may take to answer.

        Returns:
            Its ``status`` event, or ``None`` if it is not running or mute.
        """
        process = self.process
        if process is None or process.returncode is not None or process.stdin is None:
            return None
        self._status = asyncio.get_running_loop().create_future()
        try:
            process.stdin.write(b"status\n")
            await process.stdin.drain()
            async with asyncio.timeout(timeout_s):
                return await self._status
        except (OSError, TimeoutError):
            return None
        finally:
            self._status = None

    async def stop(self, timeout_s: float = 10.0) -> int | None:
        """Close its stdin (the worker drains, then exits), then SIGKILL after ``timeout_s``.

        Args:
            timeout_s: how long the drain may take.

        Returns:
            As :meth:`ChildProcess.wait`.
        """
        process = self.process
        if process is not None and process.stdin is not None and process.returncode is None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        return await self.wait(timeout_s)

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self._on_event(event)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("e")
        if kind == "status":
            if self._status is not None and not self._status.done():
                self._status.set_result(event)
            return
        self.events.append(event)
        if kind == "reg":
            self.hub_id = str(event.get("hub"))
            self.registrations += 1
            self._registered.set()
        elif kind == "start":
            self.starts[(str(event["job"]), int(event["a"]))] += 1
            self.inflight.add((str(event["job"]), int(event["a"])))
        elif kind in ("end", "cancel"):
            self.inflight.discard((str(event["job"]), int(event["a"])))
        if self.on_event is not None:
            self.on_event(self, event)

    def __repr__(self) -> str:
        return f"<NodeProcess {self.node_id} pid={self.pid} hub={self.hub_id}>"


class Processes:
    """The hub and node processes of one test or run, killed by pid at :meth:`close`.

    Args:
        log_dir: where their logs go.
        redis_url: the Redis of the hubs.
        cell: the hubs' cell.
        hub_settings: settings of every hub, under those given per hub.
    """

    def __init__(
        self,
        log_dir: Path,
        redis_url: str,
        cell: str | None = None,
        hub_settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.redis_url = redis_url
        self.cell = cell
        self.hub_settings = dict(hub_settings or {})
        self.started: list[ChildProcess] = []

    async def hub(
        self,
        hub_id: str | None = None,
        *,
        redis_url: str | None = None,
        port: int | None = None,
        timeout_s: float = 20.0,
        launcher: Sequence[str] | None = None,
        **settings: Any,
    ) -> HubProcess:
        """A ``hub serve`` process, started and ready.

        Args:
            hub_id: its id; ``None`` lets it choose.
            redis_url: its Redis (default: the group's).
            port: as :class:`HubProcess`.
            timeout_s: bound of its start, then of its first ``/readyz`` 200.
            launcher: as :class:`HubProcess` (e.g. under ``faketime``).
            **settings: more settings, over the group's.

        Returns:
            The running hub.
        """
        process = HubProcess(
            hub_id,
            redis_url=redis_url or self.redis_url,
            log_dir=self.log_dir,
            cell=self.cell,
            port=port,
            settings=self.hub_settings | settings,
            launcher=launcher,
        )
        self.started.append(process)
        await process.start(timeout_s)
        await process.wait_ready(timeout_s)
        return process

    async def node(
        self, node_id: str, urls: Sequence[str], *, timeout_s: float = 20.0, **kwargs: Any
    ) -> NodeProcess:
        """A node worker process, started and registered.

        Args:
            node_id: its id.
            urls: its hubs.
            timeout_s: bound of its first registration.
            **kwargs: as :class:`NodeProcess`.

        Returns:
            The running node.
        """
        process = NodeProcess(node_id, urls, log_dir=self.log_dir, **kwargs)
        self.started.append(process)
        await process.start()
        await process.wait_registered(timeout_s)
        return process

    async def close(self, timeout_s: float = 5.0) -> None:
        """SIGKILL each process (a frozen one dies of it too) and reap it.

        Args:
            timeout_s: bound of each wait.
        """
        for process in self.started:
            process.kill()
        for process in self.started:
            await process.wait(timeout_s)
