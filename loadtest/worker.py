"""A load generator process: ``python -m loadtest.worker CONFIG_JSON``.

The parent (:mod:`loadtest.__main__`) starts K of these. Each runs one
asyncio loop (uvloop when installed) holding its share of the simulated
nodes and sessions, and talks to the parent through its standard streams,
one JSON object or command per line:

worker -> parent (stdout)
    ``{"t": "ready", ...}`` once every connection is open;
    ``{"t": "progress", ...}`` every second while the load runs;
    ``{"t": "drained", ...}`` when the load stopped and the last results came
    (or the drain time ran out); ``{"t": "final", "stats": ...}`` at the end.
parent -> worker (stdin)
    ``go <unix time>``: start the load at that instant;
    ``close``: close every connection, send ``final`` and exit;
    ``stop``: end the load now (Ctrl-C in the parent).

Every wait is bounded: a worker that hears nothing from its parent exits on
its own after the connect timeout plus the duration plus the drain time.
Logs and tracebacks go to stderr, which the parent sends to a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from typing import Any

import orjson

from .access import Access
from .nodes import SimNode
from .peer import SimPeer
from .scenarios import Plan, ServiceTime
from .sessions import SimSession
from .stats import Stats
from .wheel import TimerWheel
from .wsclient import Flusher, HandshakeFailed, MaskedTail

__all__ = ["Worker", "main"]

CONNECT_ATTEMPTS = 3
RECONNECT_ATTEMPTS = 5
PROGRESS_INTERVAL_S = 1.0
CLOSE_WAIT_S = 5.0


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    t = os.times()
    return t.user + t.system


class Worker:
    """One process's share of the simulated fleet.

    Args:
        config: ``plan`` (a :class:`Plan` as JSON), ``urls`` (hub base URLs,
            ``ws://host:port`` or ``wss://``), ``index`` and ``count`` of this
            worker, and ``access`` (TLS settings, :meth:`Access.to_json`; the
            tokens come in the environment).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.plan = plan = Plan.from_json(config["plan"])
        self.index: int = config["index"]
        self.count: int = config["count"]
        urls: list[str] = config["urls"]
        self.loop = asyncio.get_running_loop()
        self.rng = random.Random(plan.seed * 1000 + self.index if plan.seed else None)
        self.service = ServiceTime.parse(plan.service_time)
        self.instant = self.service.instant
        self.service_min_s = self.service.low_ms / 1000
        self.service_span_s = (self.service.high_ms - self.service.low_ms) / 1000
        """Service times are uniform in [min, min + span] (ServiceTime.draw_s, inline)."""
        self.interval_s = plan.job_interval_ms / 1000
        self.open_loop = plan.open_loop
        if plan.audio_bytes and plan.audio_bytes < 8:
            raise ValueError("--audio-bytes must be 0 or at least 8")
        self.audio_rest: bytes | None = (
            self.rng.randbytes(plan.audio_bytes - 8) if plan.audio_bytes else None
        )
        """The audio of every job after its 8-byte tag (see :mod:`loadtest.sessions`)."""
        self.audio_tail = None if self.audio_rest is None else MaskedTail(self.audio_rest)
        """The same, masked once for every job (see :class:`loadtest.wsclient.MaskedTail`)."""
        self.flusher = Flusher(self.loop)
        """Where every connection's writes wait for the end of the loop iteration."""
        # Slots of one millisecond per worker, offset from the other workers'
        # slots: the hub gets sends and results every millisecond, as from
        # loop timers, and each worker wakes for its timer only every `count`
        # milliseconds (see loadtest.wheel).
        self.wheel = TimerWheel(
            self.loop,
            resolution_s=self.count / 1000,
            offset_s=self.index / 1000,
            batch=self.flusher,
            on_late=self._late,
        )
        """The one timer of the sessions' ticks and the nodes' service times."""
        self.access = Access.from_child(config.get("access", {}), os.environ)
        """Tokens and TLS settings of every connection (see :mod:`loadtest.access`)."""
        self.stats = Stats()
        # Connection i of each kind goes to hub i % len(urls): round robin
        # over the whole fleet, whichever worker holds it.
        self.nodes = [
            SimNode(self, i, urls[i % len(urls)]) for i in range(self.index, plan.nodes, self.count)
        ]
        self.sessions = [
            SimSession(self, i, urls[i % len(urls)])
            for i in range(self.index, plan.sessions, self.count)
        ]
        self.end_at = float("inf")
        """perf_counter() when sessions stop sending."""
        self.running = False
        self.closing = False
        """Set when the run ends: disconnections are expected from now on."""
        self.connect_failures = 0
        self._reported_seconds = 0
        """Seconds of the load whose latencies went to the parent in a progress report."""
        self._lag_window = False
        """Whether the loop's lag is recorded: from the start of the load to the drain's end."""
        self.profile_path: str | None = config.get("cprofile")
        """Where to write a cProfile of the load window (CPU clock), if asked."""
        self._go: asyncio.Future[float | None] = self.loop.create_future()
        self._stop_now = False
        self._close: asyncio.Event = asyncio.Event()
        self._stop: asyncio.Event = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._limit = asyncio.Semaphore(plan.connect_concurrency)

    # Output to the parent

    def emit(self, message: dict[str, Any]) -> None:
        sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
        sys.stdout.buffer.flush()

    # Main

    async def run(self) -> None:
        plan = self.plan
        reader = self._spawn(self._read_commands())
        started = time.perf_counter()
        cpu_start = cpu_seconds()
        try:
            async with asyncio.timeout(plan.connect_timeout_s):
                await asyncio.gather(*(self._connect(n) for n in self.nodes))
                await asyncio.gather(*(self._connect(s) for s in self.sessions))
        except TimeoutError:
            self.stats.checks["worker: connections not open within connect timeout"] += 1
        self.emit(
            {
                "t": "ready",
                "index": self.index,
                "nodes": sum(n.is_open for n in self.nodes),
                "sessions": sum(s.is_open for s in self.sessions),
                "connect_failures": self.connect_failures,
                "connect_s": time.perf_counter() - started,
                "pid": os.getpid(),
            }
        )
        go_wall: float | None = None
        if plan.hold:
            # Keep the connections idle until the parent measured memory.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(plan.duration_s + 120):
                    await self._close.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(plan.connect_timeout_s + 30):
                    go_wall = await self._go
        cpu_go = cpu_seconds()
        cpu_drained = cpu_go
        if go_wall is not None:
            profile_path = self.profile_path
            profiler = None
            if profile_path is not None:
                import cProfile

                profiler = cProfile.Profile(time.process_time)
                profiler.enable()
            await self._run_load(go_wall)
            cpu_drained = cpu_seconds()
            if profiler is not None and profile_path is not None:
                profiler.disable()
                profiler.dump_stats(profile_path)
            self.emit({"t": "drained", "index": self.index, "outstanding": self._outstanding()})
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    await self._close.wait()
        await self._close_all()
        reader.cancel()
        self.emit(
            {
                "t": "final",
                "index": self.index,
                "stats": self.stats.to_json(),
                "cpu": {
                    "total_s": cpu_seconds(),
                    "connect_s": cpu_go - cpu_start,
                    "load_s": cpu_drained - cpu_go,
                },
                "connect_failures": self.connect_failures,
            }
        )

    async def _run_load(self, go_wall: float) -> None:
        plan = self.plan
        st = self.stats
        now = time.perf_counter()
        go = now + max(0.0, go_wall - time.time())
        st.go = go
        self.end_at = go + plan.duration_s
        self.running = True
        await asyncio.sleep(max(0.0, go - time.perf_counter()))
        for s in self.sessions:
            phase = 0.0 if plan.burst else self.rng.uniform(0, self.interval_s)
            s.start(go + phase)
        progress = self._spawn(self._progress())
        self._lag_window = True
        # The wheel measures the loop's lag at every slot; only a closed loop of
        # instant nodes leaves it idle.
        lag = self._spawn(self._watch_lag()) if self.instant and not plan.open_loop else None
        churn = self._spawn(self._churn()) if plan.churn else None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, self.end_at - time.perf_counter())):
                await self._stop.wait()
        self.end_at = min(self.end_at, time.perf_counter())
        self.running = False
        for s in self.sessions:
            s.stop()
        if churn is not None:
            churn.cancel()
        # Drain: bounded wait for the results of jobs still out.
        for _ in range(int(plan.drain_s / 0.05) + 1):
            if not self._outstanding() or self._stop_now:
                break
            await asyncio.sleep(0.05)
        progress.cancel()
        self._lag_window = False
        if lag is not None:
            lag.cancel()
        left = self._outstanding()
        if left:
            st.checks["session: no result before the drain time ran out"] += left
            now = time.perf_counter()
            for s in self.sessions:
                for ref, job in list(s.jobs.items())[:20]:
                    print(
                        f"no result: session {s.sid} ref {ref} job {job.job_id} "
                        f"attempt {job.attempt} sent {now - job.sent_at:.3f} s ago, "
                        f"accepted {job.accepted_at is not None}",
                        file=sys.stderr,
                        flush=True,
                    )
        self._send_progress(last=True)

    def _outstanding(self) -> int:
        return sum(len(s.jobs) for s in self.sessions)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            self._send_progress()

    def _send_progress(self, last: bool = False) -> None:
        """Report counts, and the latencies of the seconds of results not reported yet.

        Only whole seconds are reported (all of them with ``last``), so the
        parent's running p99 lags by up to a second and misses nothing.
        """
        st = self.stats
        c = st.counters
        first = self._reported_seconds
        end = max(st.seconds, default=-1) + 1 if last else int(time.perf_counter() - st.go)
        self._reported_seconds = max(first, end)
        self.emit(
            {
                "t": "progress",
                "index": self.index,
                "sent": c["sent"],
                "ok": c["ok"],
                "results": c["results"],
                "refused": c["refused"],
                "outstanding": self._outstanding(),
                "errors": st.errors(),
                "recent": st.since(first, end).to_dict(),
            }
        )

    def _late(self, now: float, late_s: float) -> None:
        """Record how late the loop woke up: a stalled harness shows here, not in the hub."""
        if self._lag_window:
            late_us = int(late_s * 1e6)
            second = self.stats.second(now)
            if late_us > second.lag_us:
                second.lag_us = late_us

    async def _watch_lag(self) -> None:
        """Measure the loop's lag with a timer of its own, when the wheel has nothing to do."""
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.05)
            now = time.perf_counter()
            self._late(now, now - before - 0.05)

    async def _churn(self) -> None:
        """Each 100 ms, disconnect a few random open nodes and sessions on purpose."""
        rate = self.plan.churn_per_s / 10
        owed_nodes = owed_sessions = 0.0
        while True:
            await asyncio.sleep(0.1)
            owed_nodes += rate * len(self.nodes)
            owed_sessions += rate * len(self.sessions)
            owed_nodes = self._leave(self.nodes, owed_nodes)
            owed_sessions = self._leave(self.sessions, owed_sessions)

    def _leave(self, peers: list[Any], owed: float) -> float:
        while owed >= 1:
            owed -= 1
            open_peers = [p for p in self.rng.sample(peers, min(len(peers), 8)) if p.is_open]
            if open_peers:
                open_peers[0].leave()
        return owed

    # Connections

    async def _connect(self, peer: SimPeer, attempts: int = CONNECT_ATTEMPTS) -> bool:
        for attempt in range(attempts):
            if self.closing:
                return False
            try:
                async with self._limit:
                    await peer.connect()
            except (OSError, TimeoutError, ConnectionError, Exception) as exc:
                if attempt == attempts - 1:
                    self.connect_failures += 1
                    # A refusal's status says why (401: the token, 503: a connection limit).
                    why = str(exc)[:120] if isinstance(exc, HandshakeFailed) else ""
                    self.stats.checks[f"connect failed: {type(exc).__name__} {why}".strip()] += 1
                    return False
                await asyncio.sleep(0.2 * (attempt + 1))
            else:
                self.stats.counters["connects"] += 1
                return True
        return False

    def reconnect_later(self, peer: SimPeer) -> None:
        """Connect ``peer`` again after a short random pause (churn or a drop)."""
        if self.closing:
            return

        async def again() -> None:
            await asyncio.sleep(self.rng.uniform(0.1, 1.0))
            if self.closing or not await self._connect(peer, RECONNECT_ATTEMPTS):
                return
            self.stats.counters["reconnects"] += 1
            if isinstance(peer, SimSession) and self.running and not self.plan.open_loop:
                peer.start(time.perf_counter())

        self._spawn(again())

    async def _close_all(self) -> None:
        self.closing = True
        self.running = False
        for s in self.sessions:
            s.stop()
            s.leaving = True
            if s.conn is not None:
                s.conn.close()
        for n in self.nodes:
            n.leaving = True
            if n.conn is not None:
                n.conn.close()
        conns = [p.conn for p in (*self.sessions, *self.nodes) if p.conn is not None]
        for _ in range(int(CLOSE_WAIT_S / 0.05)):
            if not any(c.transport is not None and not c.transport.is_closing() for c in conns):
                break
            await asyncio.sleep(0.05)
        for c in conns:
            c.abort()
        for task in list(self._tasks):
            task.cancel()

    # Commands from the parent

    async def _read_commands(self) -> None:
        reader = asyncio.StreamReader()
        await self.loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(0), "rb")
        )
        while True:
            line = await reader.readline()
            if not line:  # the parent is gone
                self._stop_now = True
                self._stop.set()
                self._close.set()
                if not self._go.done():
                    self._go.set_result(None)
                return
            command, _, arg = line.decode().strip().partition(" ")
            if command == "go" and not self._go.done():
                self._go.set_result(float(arg))
            elif command == "stop":
                self._stop.set()
            elif command == "close":
                self._stop_now = True
                self._stop.set()
                self._close.set()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = orjson.loads(args[0])
    plan = Plan.from_json(config["plan"])

    async def run() -> None:
        await Worker(config).run()

    if plan.worker_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(run())
            return 0
    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
