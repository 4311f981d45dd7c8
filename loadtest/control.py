"""The parent's side of the worker processes: start them, read their reports, command them.

See :mod:`loadtest.worker` for the line protocol on their standard streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from .access import Access
from .hdr import Histogram
from .procs import child_env, spawn
from .scenarios import Plan

__all__ = ["Status", "WorkerProcess", "raise_fd_limit", "start_workers"]


def raise_fd_limit() -> None:
    """Let this process and its children open as many sockets as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Status:
    """Merges workers' progress reports into one refreshing status line."""

    def __init__(self, workers: int, quiet: bool) -> None:
        self.latest: dict[int, dict[str, Any]] = {}
        self.e2e = Histogram()
        self.quiet = quiet
        self.tty = sys.stdout.isatty()
        self.last_results = 0
        self.last_time = time.perf_counter()
        self.printed = 0.0

    def progress(self, message: dict[str, Any]) -> None:
        self.latest[message["index"]] = message
        self.e2e.merge(Histogram.from_dict(message["recent"]))

    def line(self, elapsed: float, phase: str) -> str:
        total = {
            k: sum(m.get(k, 0) for m in self.latest.values())
            for k in ("sent", "ok", "results", "refused", "outstanding", "errors")
        }
        now = time.perf_counter()
        rate = (total["results"] - self.last_results) / max(now - self.last_time, 1e-6)
        self.last_results, self.last_time = total["results"], now
        return (
            f"[{phase} {elapsed:5.1f}s] {rate:8,.0f} jobs/s  in flight {total['outstanding']:6,}"
            f"  ok {total['ok']:9,}  p99 {self.e2e.percentile(99) / 1000:7.2f} ms"
            f"  errors {total['errors']:,}"
        )

    def show(self, elapsed: float, phase: str) -> None:
        text = self.line(elapsed, phase)
        if self.quiet:
            return
        if self.tty:
            sys.stdout.write("\r\x1b[2K" + text)
            sys.stdout.flush()
        elif elapsed - self.printed >= 5 or elapsed < 1.5:
            self.printed = elapsed
            print(text, flush=True)

    def end(self) -> None:
        if self.tty and not self.quiet:
            sys.stdout.write("\n")


class WorkerProcess:
    """One load generator process and what it said."""

    def __init__(self, index: int, process: asyncio.subprocess.Process, status: Status) -> None:
        self.index = index
        self.process = process
        self.status = status
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.drained: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.final: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while True:
            line = await self.process.stdout.readline()
            if not line:
                break
            try:
                message = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            kind = message.get("t")
            if kind == "progress":
                self.status.progress(message)
            else:
                future = {"ready": self.ready, "drained": self.drained, "final": self.final}.get(
                    kind
                )
                if future is not None and not future.done():
                    future.set_result(message)
        gone = RuntimeError(f"worker {self.index} exited")
        for future in (self.ready, self.drained, self.final):
            if not future.done():
                future.set_exception(gone)
                future.exception()

    def command(self, text: str) -> None:
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            with contextlib.suppress(OSError):
                stdin.write(text.encode() + b"\n")

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


async def start_workers(
    plan: Plan,
    urls: list[str],
    count: int,
    out_dir: Path,
    status: Status,
    *,
    cprofile: bool = False,
    access: Access | None = None,
) -> list[WorkerProcess]:
    """Start ``count`` workers; with ``cprofile``, each profiles its load in ``out_dir``.

    ``access`` gives the workers' connections their tokens (in the workers'
    environment, not on their command line) and TLS settings.
    """
    access = Access() if access is None else access
    env = {**child_env(), **access.child_env()}
    workers = []
    for i in range(count):
        config: dict[str, Any] = {
            "plan": plan.to_json(),
            "urls": urls,
            "index": i,
            "count": count,
            "access": access.to_json(),
        }
        if cprofile:
            config["cprofile"] = str(out_dir / f"worker-{i}.pstats")
        process = await spawn(
            [sys.executable, "-m", "loadtest.worker", orjson.dumps(config).decode()],
            log_path=out_dir / f"worker-{i}.log",
            env=env,
            stdin_pipe=True,
            limit=256 * 1024 * 1024,
        )
        workers.append(WorkerProcess(i, process, status))
    return workers
