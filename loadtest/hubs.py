"""The system under test: an embedded Redis and N hub processes, plus /proc readings.

Hubs are separate processes started the way an operator starts them
(``hub serve``, through :mod:`loadtest.launch_hub` so the harness can choose
the event loop), never inside the harness. They share one Redis: an
:class:`hub.embedded.EmbeddedRedis` in a temporary directory unless a Redis
URL is given. Every child gets ``PR_SET_PDEATHSIG`` so nothing outlives the
harness, even if it is killed (see :mod:`loadtest.procs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hub.embedded import EmbeddedRedis, find_redis_server

from .cluster import RedisCluster, cells_on_masters
from .procs import HubProcess, cpu_seconds, rss_kb

__all__ = [
    "ExternalHub",
    "Fleet",
    "load_average",
    "machine_busy_s",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")

# Settings every harness-started hub gets: the harness opens thousands of
# connections from one address and sends faster than a person speaks.
LOAD_SETTINGS = {
    "session_rate_per_s": "none",
    "max_connections": "none",
    "max_connections_per_ip": "none",
}


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


@dataclasses.dataclass
class ExternalHub:
    """A hub the harness did not start: its address only."""

    hub_id: str
    url: str
    """Base URL, ``ws://127.0.0.1:<port>``."""
    pid: int | None = None


class Fleet:
    """Starts and stops Redis and the hubs; reads their CPU and memory.

    Args:
        hubs: how many hub processes.
        out_dir: where hub logs go (``hub-<i>.log``).
        settings: extra hub settings (``NAME=VALUE`` for ``--set``).
        uvloop: run the hubs on uvloop (when installed) or on asyncio's loop.
        redis_url: a Redis to use instead of an embedded one.
        redis_aof: the embedded Redis keeps an append-only file, as ``hub serve`` does.
        redis_cluster: start a Redis Cluster of this many masters (one replica
            each) instead of one Redis; 0: one Redis.
        cells: hub ``i`` serves cell ``i % cells`` of :attr:`cell_names` (on a
            cluster, cells spread evenly over the masters); one cell: the hubs' default.
        cprofile: run each hub under cProfile (CPU clock), stats in ``hub-<i>.pstats``.
        workers: worker processes of each hub (``hub serve --workers``); a
            hub's CPU and memory are then its supervisor's plus its workers'.
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
        redis_cluster: int = 0,
        cells: int = 1,
        cprofile: bool = False,
        workers: int = 1,
    ) -> None:
        self.count = hubs
        self.workers = workers
        self.cprofile = cprofile
        self.out_dir = out_dir
        self.settings = {
            **LOAD_SETTINGS,
            **({"workers": str(workers)} if workers > 1 else {}),
            **(settings or {}),
        }
        self.uvloop = uvloop
        self.redis_url = redis_url
        self.redis_aof = redis_aof
        self.redis_cluster = redis_cluster
        self.cells = cells
        self.cluster: RedisCluster | None = None
        self.cell_names: list[str] = [f"c{i}" for i in range(cells)]
        """The cells' names."""
        self.cluster_pids: list[int] = []
        """The cluster nodes' pids (kept once they are stopped)."""
        self.redis: EmbeddedRedis | None = None
        self.redis_pid: int | None = None
        """The embedded Redis's pid (kept once it is stopped)."""
        self.hubs: list[HubProcess] = []
        self._tmp: str | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start Redis and the hubs, and wait until each hub's ``/readyz`` says ready.

        Raises:
            RuntimeError: a hub exited or did not get ready in time (see its log).
        """
        url = self.redis_url
        if self.redis_cluster:
            self._tmp = tempfile.mkdtemp(prefix="lt-cluster-")
            self.cluster = RedisCluster(
                find_redis_server(), Path(self._tmp), masters=self.redis_cluster
            )
            self.cluster.start()  # blocks a few seconds; must run in the main thread
            url = self.cluster.url
            self.cluster_pids = [n.pid for n in self.cluster.nodes]
            masters = self.redis_cluster
            per_master = cells_on_masters(self.cluster, -(-self.cells // masters))
            # Round robin over the masters: cell k on master k % masters.
            per = len(per_master) // masters
            self.cell_names = [
                per_master[(k % masters) * per + k // masters] for k in range(self.cells)
            ]
        elif url is None:
            # A short path: unix socket paths are limited to 107 bytes.
            self._tmp = tempfile.mkdtemp(prefix="lt-redis-")
            self.redis = EmbeddedRedis(self._tmp, appendonly=self.redis_aof)
            self.redis.start()  # blocks briefly; must run in the main thread
            self.redis_pid = self.redis.pid
            url = self.redis.url
        self.hubs = [self._hub(i, url) for i in range(self.count)]
        try:
            await asyncio.gather(*(h.start(timeout_s) for h in self.hubs))
            await asyncio.gather(*(h.wait_ready(timeout_s) for h in self.hubs))
        except BaseException:
            for hub in self.hubs:
                hub.kill()
            raise

    async def stop(self, timeout_s: float = 12.0) -> None:
        """SIGTERM every hub, SIGKILL what is left after ``timeout_s``, stop Redis."""
        await asyncio.gather(*(h.stop(timeout_s) for h in self.hubs))
        if self.cluster is not None:
            self.cluster.stop()
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
            "hubs": [_usage([h.pid, *h.worker_pids()]) if h.pid else {} for h in self.hubs],
            "redis": (
                {"cpu_s": cpu_seconds(self.redis_pid), "rss_kb": rss_kb(self.redis_pid)}
                if self.redis_pid
                else {}
            ),
            "redis_masters": self._masters(),
            "time": time.perf_counter(),
            "machine_busy_s": machine_busy_s(),
            "loadavg": load_average(),
        }

    # Private methods

    def _masters(self) -> dict[str, dict[str, Any]]:
        """CPU seconds and RSS of each master of the cluster, by port ({} with one Redis)."""
        if self.cluster is None:
            return {}
        found = {}
        for port in self.cluster.master_ports():
            pid = self.cluster.node_at(port).pid
            found[str(port)] = {"cpu_s": cpu_seconds(pid), "rss_kb": rss_kb(pid)}
        return found

    def _hub(self, i: int, redis_url: str) -> HubProcess:
        launcher = [
            sys.executable,
            "-m",
            "loadtest.launch_hub",
            "--uvloop" if self.uvloop else "--no-uvloop",
            *(["--cprofile", str(self.out_dir / f"hub-{i}.pstats")] if self.cprofile else []),
        ]
        settings = dict(self.settings)
        if self.cluster is not None:
            settings["redis_cluster"] = "true"
        return HubProcess(
            f"lt-{i}",
            redis_url=redis_url,
            log_dir=self.out_dir,
            port=0,
            cell=self.cell_names[i % self.cells] if self.cells > 1 else None,
            settings=settings,
            name=f"hub-{i}",
            launcher=launcher,
        )


def _usage(pids: list[int]) -> dict[str, Any]:
    """CPU seconds and RSS of a hub: its process and its workers' (``--workers``), summed."""
    cpu = [cpu_seconds(p) for p in pids]
    rss = [rss_kb(p) for p in pids]
    return {
        "cpu_s": None if cpu[0] is None else sum(c or 0.0 for c in cpu),
        "rss_kb": None if rss[0] is None else sum(r or 0 for r in rss),
    }
