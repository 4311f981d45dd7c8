"""``hub serve --workers N``: N hub processes on one port, and the process that keeps them.

Each worker is a whole hub (``python -m hub.worker``) with its own id,
``<hub_id>-w<k>``, listening on the same host and port with
``SO_REUSEPORT``: the Linux kernel spreads new connections over the
listening workers, and stops sending any to a worker that is gone. The
workers share Redis like any hubs do (a node and the sessions whose jobs it
runs may be on different workers: the bus carries their frames). Nothing
here coordinates them; this module only starts, restarts and stops them.

:class:`Supervisor`:

- holds the port: it binds it first (``SO_REUSEPORT``, never listening), so
  ``--port 0`` picks one port that every worker then shares, and no other
  program can take it while a worker restarts;
- owns the embedded Redis, when no URL is given: started before the
  workers, stopped after the last one exited;
- starts the workers, each given its settings on its standard input (never
  on its command line, where secrets would show), waits for each one's ready
  line, then prints one ready line for the whole server;
- restarts a worker that dies, with the same id, after a backoff of 0.5 s
  doubling up to 30 s, back to 0.5 s once a worker has stayed up 30 s; a
  worker that exits before it is ready 5 times in a row (a bad setting, a
  Redis out of reach) makes the supervisor stop the others and exit with an
  error, rather than loop forever;
- on SIGTERM or SIGINT, sends SIGTERM to every worker at once (each runs
  the shutdown order of :meth:`hub.app.Hub.close`), waits for them
  (``shutdown_grace_s`` plus 10 s, then SIGKILL), and stops Redis last.

A worker keeps its id across restarts (like a restarted hub keeps its
name): its channel is the same, and what Redis says about its old
connections is settled the way a hub restart is (their nodes and sessions
came back on its siblings). Workers get SIGTERM if the supervisor dies
(``PR_SET_PDEATHSIG``), and stay in its process group, so Ctrl-C reaches
them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import signal
import socket
import sys
import time
from typing import Any

import orjson

from .cliargs import CLIError, Unreachable, ready_line
from .config import RedisDSN, Settings
from .embedded import EmbeddedRedis, kill_on_parent_death

__all__ = ["Supervisor", "worker_ids"]

logger = logging.getLogger("hub.supervisor")

BACKOFF_MIN_S = 0.5
"""Wait before the first restart of a worker that died."""
BACKOFF_MAX_S = 30.0
"""Longest wait between two restarts of a worker."""
STABLE_S = 30.0
"""A worker up this long has its backoff reset."""
MAX_START_FAILURES = 5
"""Exits before the ready line, in a row, after which the supervisor gives up."""
READY_EXTRA_S = 30.0
"""How long a worker may take to print its ready line, on top of ``--redis-wait-s``."""
STOP_EXTRA_S = 10.0
"""How long workers may take to stop, on top of ``shutdown_grace_s``, before SIGKILL."""


def worker_ids(hub_id: str, count: int) -> tuple[str, ...]:
    """The ids of the workers of ``hub serve --workers count --hub-id hub_id``."""
    return tuple(f"{hub_id}-w{k}" for k in range(count))


@dataclasses.dataclass
class _Worker:
    """One worker slot: its id stays, its process changes at each restart."""

    index: int
    hub_id: str
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    ready: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    reachable: bool = True
    """Whether its ready line said Redis answered."""
    failures: int = 0
    """Restarts in a row without staying up :data:`STABLE_S`."""
    start_failures: int = 0
    """Exits before the ready line, in a row."""
    restarts: int = 0


class Supervisor:
    """The parent of ``hub serve --workers N``: see the module docstring.

    Args:
        settings: the server's settings (``workers`` says how many).
        redis_wait_s: each worker's ``--redis-wait-s``.
        loop: each worker's ``--loop``.
    """

    def __init__(self, settings: Settings, *, redis_wait_s: float, loop: str = "auto") -> None:
        self.settings = settings
        self.redis_wait_s = redis_wait_s
        self.loop = loop
        self.hub_id = settings.hub_id or secrets.token_hex(6)
        """The server's id; worker k is ``<hub_id>-w<k>``."""
        self.count = settings.worker_count()
        self.workers = [
            _Worker(k, wid) for k, wid in enumerate(worker_ids(self.hub_id, self.count))
        ]
        self.port = settings.port
        """The port shared by the workers (the one bound, when ``settings.port`` is 0)."""
        self._stop = asyncio.Event()
        self._failed: str | None = None
        self._watchers: set[asyncio.Task[None]] = set()

    # Public methods

    async def run(self) -> int:
        """Run the server until SIGTERM or SIGINT; returns the exit status (0).

        Raises:
            CLIError: the port cannot be bound, or a worker failed to start
                because of its settings (exit status 2).
            Unreachable: a worker could not reach Redis at start, or kept
                failing to start after a restart (exit status 1).
            EmbeddedRedisError: the embedded Redis cannot be started.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        holder = self._hold_port()
        embedded = None
        redis_url = self.settings.redis_url
        try:
            if redis_url is None:
                embedded = EmbeddedRedis(self.settings.data_dir)
                embedded.start()
                redis_url = embedded.url
            where = (
                f"embedded Redis at {redis_url}"
                if embedded
                else RedisDSN.parse(redis_url).redacted()
            )
            try:
                await self._start_all(redis_url)
                if not self._stop.is_set():
                    self._print_ready(where)
                    await self._supervise(redis_url)
            finally:
                await self._stop_all()
        finally:
            if embedded is not None:
                embedded.stop()
            holder.close()
        if self._failed is not None:
            raise Unreachable(self._failed)
        return 0

    # Private methods

    def _hold_port(self) -> socket.socket:
        """Bind the port with ``SO_REUSEPORT`` (not listening) and keep it bound.

        Raises:
            CLIError: the address cannot be bound (in use by another user or
                by a program without ``SO_REUSEPORT``, or not local).
        """
        s = self.settings
        try:
            infos = socket.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise CLIError(f"cannot listen on {s.host}: {exc.strerror or exc}") from exc
        family, kind, proto, _, address = infos[0]
        holder = socket.socket(family, kind, proto)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            holder.bind(address)
        except OSError as exc:
            holder.close()
            raise CLIError(
                f"cannot listen on {s.host}:{s.port}: {exc.strerror or exc} "
                f"(is another server on this port?)"
            ) from exc
        self.port = holder.getsockname()[1]
        return holder

    def _worker_config(self, worker: _Worker, redis_url: str) -> bytes:
        """What a worker reads on its standard input: its settings and options."""
        values: dict[str, Any] = {
            f.name: getattr(self.settings, f.name) for f in dataclasses.fields(Settings)
        }
        values.update(
            hub_id=worker.hub_id,
            port=self.port,
            redis_url=redis_url,
            reuse_port=True,
            workers="1",
        )
        return orjson.dumps(
            {
                "settings": values,
                "loop": self.loop,
                "redis_wait_s": self.redis_wait_s,
                "siblings": [w.hub_id for w in self.workers],
                "group": self.hub_id,
            }
        )

    async def _spawn(self, worker: _Worker, redis_url: str) -> None:
        worker.ready.clear()
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hub.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # Its log goes where ours goes.
            stderr=None,
            preexec_fn=kill_on_parent_death(),
        )
        worker.started_at = time.monotonic()
        process = worker.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(self._worker_config(worker, redis_url))
        with contextlib.suppress(ConnectionError):
            await process.stdin.drain()
        process.stdin.close()
        logger.info("= worker %s started: pid %d", worker.hub_id, process.pid)
        watcher = asyncio.create_task(self._read_output(worker, process.stdout))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _read_output(self, worker: _Worker, stdout: asyncio.StreamReader) -> None:
        """Read a worker's standard output: its ready line, then nothing (drained)."""
        prefix = f"hub {worker.hub_id} ready:".encode()
        while line := await stdout.readline():
            if line.startswith(prefix):
                worker.reachable = not line.rstrip().endswith(b"(not reachable yet: retrying)")
                worker.ready.set()

    async def _start_all(self, redis_url: str) -> None:
        """Start every worker and wait for their ready lines; any failure is fatal here."""
        for worker in self.workers:
            await self._spawn(worker, redis_url)
        timeout_s = self.redis_wait_s + READY_EXTRA_S
        for worker in self.workers:
            await self._wait_ready(worker, timeout_s, first=True)
            if self._stop.is_set():
                return

    async def _wait_ready(self, worker: _Worker, timeout_s: float, *, first: bool) -> bool:
        """Wait for a worker's ready line, its exit, or SIGTERM.

        Returns:
            True when it is ready.

        Raises:
            CLIError, Unreachable: at the first start (``first``), when the
                worker exited (its own message is on stderr already) or did
                not get ready in time.
        """
        process = worker.process
        assert process is not None
        waits = {
            asyncio.create_task(worker.ready.wait()),
            asyncio.create_task(process.wait()),
            asyncio.create_task(self._stop.wait()),
        }
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if worker.ready.is_set() or self._stop.is_set():
            return worker.ready.is_set()
        if process.returncode is None:
            process.kill()
            await process.wait()
            reason = f"printed no ready line in {timeout_s:g} s"
        else:
            reason = f"exited with status {process.returncode}"
        if first:
            message = f"worker {worker.hub_id} {reason} at start"
            # A worker exits 2 on a usage or setting error: so does the server.
            if process.returncode == 2:
                raise CLIError(message)
            raise Unreachable(message)
        logger.warning("! worker %s %s", worker.hub_id, reason)
        return False

    def _print_ready(self, where: str) -> None:
        reachable = all(w.reachable for w in self.workers)
        ids = [w.hub_id for w in self.workers]
        print(ready_line(self.hub_id, self.settings, self.port, where, reachable, ids), flush=True)

    async def _supervise(self, redis_url: str) -> None:
        """Restart each worker that dies until SIGTERM (or one keeps failing to start)."""
        keepers = [asyncio.create_task(self._keep(w, redis_url)) for w in self.workers]
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([stop, *keepers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, *keepers):
                task.cancel()
            await asyncio.gather(stop, *keepers, return_exceptions=True)

    async def _keep(self, worker: _Worker, redis_url: str) -> None:
        """Wait for the worker to exit and start it again, with backoff; returns on give-up."""
        while True:
            process = worker.process
            assert process is not None
            status = await process.wait()
            up_s = time.monotonic() - worker.started_at
            if up_s >= STABLE_S:
                worker.failures = 0
            worker.failures += 1
            delay = min(BACKOFF_MIN_S * 2 ** (worker.failures - 1), BACKOFF_MAX_S)
            logger.warning(
                "! worker %s (pid %d) exited with status %s after %.1f s; restarting in %g s",
                worker.hub_id,
                process.pid,
                status,
                up_s,
                delay,
            )
            await asyncio.sleep(delay)
            await self._spawn(worker, redis_url)
            worker.restarts += 1
            process = worker.process
            assert process is not None
            if await self._wait_ready(worker, self.redis_wait_s + READY_EXTRA_S, first=False):
                worker.start_failures = 0
                logger.info("= worker %s is back: pid %d", worker.hub_id, process.pid)
                continue
            worker.start_failures += 1
            if worker.start_failures >= MAX_START_FAILURES:
                self._failed = (
                    f"worker {worker.hub_id} failed to start {worker.start_failures} times "
                    f"in a row; stopping the server"
                )
                logger.error("! %s", self._failed)
                return

    async def _stop_all(self) -> None:
        """SIGTERM every worker at once, wait (bounded), SIGKILL what is left."""
        for task in list(self._watchers):
            task.cancel()
        running = [
            w.process
            for w in self.workers
            if w.process is not None and w.process.returncode is None
        ]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
        if running:
            logger.info("= stopping %d workers", len(running))
        deadline = time.monotonic() + self.settings.shutdown_grace_s + STOP_EXTRA_S
        for process in running:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.1)):
                    await process.wait()
            except TimeoutError:
                logger.warning("! worker pid %d did not stop in time: killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        await asyncio.gather(*self._watchers, return_exceptions=True)
