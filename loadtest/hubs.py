"""The system under test: an embedded Redis and N hub processes, plus /proc readings.

Hubs are separate processes started the way an operator starts them
(``hub serve``, through :mod:`loadtest.launch_hub` so the harness can choose
the event loop), never inside the harness. They share one Redis: an
:class:`hub.embedded.EmbeddedRedis` in a temporary directory unless a Redis
URL is given. Every child gets ``PR_SET_PDEATHSIG`` so nothing outlives the
harness, even if it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from hub.embedded import EmbeddedRedis, kill_on_parent_death

__all__ = [
    "Fleet",
    "HubProcess",
    "child_env",
    "cpu_seconds",
    "load_average",
    "machine_busy_s",
    "rss_kb",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_READY_LINE = re.compile(r"ready: nodes ws://([^/\s]+):(\d+)/v1/node")

# Settings every harness-started hub gets: the harness opens thousands of
# connections from one address and sends faster than a person speaks.
LOAD_SETTINGS = {
    "session_rate_per_s": "none",
    "max_connections": "none",
    "max_connections_per_ip": "none",
}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``), or ``None``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces; fields after it are counted from ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_kb(pid: int) -> int | None:
    """Resident set size of a process in KiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def machine_busy_s() -> float | None:
    """CPU seconds every process of the machine used since boot (``/proc/stat``)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle, iowait.
    values = [int(x) for x in fields[1:9]]
    return (sum(values) - values[3] - values[4]) / _CLK_TCK


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def child_env() -> dict[str, str]:
    """Environment of child processes: the repository on ``PYTHONPATH``, no asyncio debug.

    ``PYTHONASYNCIODEBUG`` (set by the test suite) makes every callback
    several times slower; the harness measures the hub as it runs in production.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    return env


@dataclasses.dataclass
class HubProcess:
    """One hub process started by the harness (or an external one, pid only)."""

    hub_id: str
    url: str
    """Base URL, ``ws://127.0.0.1:<port>``."""
    pid: int | None
    process: asyncio.subprocess.Process | None = None
    log_path: Path | None = None


class Fleet:
    """Starts and stops Redis and the hubs; reads their CPU and memory.

    Args:
        hubs: how many hub processes.
        out_dir: where hub logs go (``hub-<i>.log``).
        settings: extra hub settings (``NAME=VALUE`` for ``--set``).
        uvloop: run the hubs on uvloop (when installed) or on asyncio's loop.
        redis_url: a Redis to use instead of an embedded one.
        redis_aof: the embedded Redis keeps an append-only file, as ``hub serve`` does.
        cprofile: run each hub under cProfile (CPU clock), stats in ``hub-<i>.pstats``.
    """

    def __init__(
        self,
        hubs: int,
        out_dir: Path,
        *,
        settings: dict[str, str] | None = None,
        uvloop: bool = True,
        redis_url: str | None = None,
        redis_aof: bool = True,
        cprofile: bool = False,
    ) -> None:
        self.count = hubs
        self.cprofile = cprofile
        self.out_dir = out_dir
        self.settings = {**LOAD_SETTINGS, **(settings or {})}
        self.uvloop = uvloop
        self.redis_url = redis_url
        self.redis_aof = redis_aof
        self.redis: EmbeddedRedis | None = None
        self.hubs: list[HubProcess] = []
        self._tmp: str | None = None
        self._logs: list[IO[bytes]] = []

    @property
    def redis_pid(self) -> int | None:
        return self.redis.pid if self.redis is not None else None

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start Redis and the hubs, and wait until each hub's ``/readyz`` says ready.

        Raises:
            RuntimeError: a hub exited or did not get ready in time (see its log).
        """
        url = self.redis_url
        if url is None:
            # A short path: unix socket paths are limited to 107 bytes.
            self._tmp = tempfile.mkdtemp(prefix="lt-redis-")
            self.redis = EmbeddedRedis(self._tmp, appendonly=self.redis_aof)
            self.redis.start()  # blocks briefly; must run in the main thread
            url = self.redis.url
        self.hubs = await asyncio.gather(
            *(self._start_hub(i, url, timeout_s) for i in range(self.count))
        )

    async def stop(self, timeout_s: float = 12.0) -> None:
        """SIGTERM every hub, SIGKILL what is left after ``timeout_s``, stop Redis."""
        procs = [h.process for h in self.hubs if h.process is not None]
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                async with asyncio.timeout(timeout_s):
                    await p.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                await p.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self.redis is not None:
            self.redis.stop()
            with contextlib.suppress(OSError):
                shutil.copyfile(self.redis.log_path, self.out_dir / "redis.log")
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def sample(self) -> dict[str, Any]:
        """CPU seconds and RSS of each hub and of Redis, right now."""
        return {
            "hubs": [
                {"cpu_s": cpu_seconds(h.pid), "rss_kb": rss_kb(h.pid)} if h.pid else {}
                for h in self.hubs
            ],
            "redis": (
                {"cpu_s": cpu_seconds(self.redis_pid), "rss_kb": rss_kb(self.redis_pid)}
                if self.redis_pid
                else {}
            ),
            "time": time.perf_counter(),
            "machine_busy_s": machine_busy_s(),
            "loadavg": load_average(),
        }

    # Private methods

    async def _start_hub(self, i: int, redis_url: str, timeout_s: float) -> HubProcess:
        hub_id = f"lt-{i}"
        log_path = self.out_dir / f"hub-{i}.log"
        log = open(log_path, "wb")  # noqa: SIM115, ASYNC230 - closed in stop(); tiny
        self._logs.append(log)
        args = [
            sys.executable,
            "-m",
            "loadtest.launch_hub",
            "--uvloop" if self.uvloop else "--no-uvloop",
            *(["--cprofile", str(self.out_dir / f"hub-{i}.pstats")] if self.cprofile else []),
            "serve",
            "--port",
            "0",
            "--redis-url",
            redis_url,
            "--hub-id",
            hub_id,
            "--log-level",
            "WARNING",
        ]
        for name, value in self.settings.items():
            args += ["--set", f"{name}={value}"]
        process = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env=child_env(),
            cwd=self.out_dir,
            preexec_fn=kill_on_parent_death(),
        )
        hub = HubProcess(hub_id, "", process.pid, process, log_path)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await process.stdout.readline()
                    if not line:
                        raise RuntimeError(f"hub {hub_id} exited at start; see {log_path}")
                    match = _READY_LINE.search(line.decode(errors="replace"))
                    if match:
                        hub.url = f"ws://{match.group(1)}:{match.group(2)}"
                        break
                await _wait_ready(match.group(1), int(match.group(2)))
        except TimeoutError:
            raise RuntimeError(
                f"hub {hub_id} not ready in {timeout_s:g} s; see {log_path}"
            ) from None
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            raise
        return hub


async def _wait_ready(host: str, port: int) -> None:
    """Poll ``GET /readyz`` until it answers 200 (Redis answered, scripts loaded)."""
    while True:
        with contextlib.suppress(OSError):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(f"GET /readyz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                status = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if status.split()[1:2] == [b"200"]:
                return
        await asyncio.sleep(0.05)
