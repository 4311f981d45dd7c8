"""Benchmark: dispatch+complete pairs per second through ``hub.scheduler.Scheduler``.

Usage::

    python -m loadtest.bench_scheduler [--redis-url URL] [--sizes 10,1000,10000]
        [--pairs N] [--seconds S] [--rounds R] [--concurrency C] [--max-jobs M]
        [--no-appendonly] [--no-uvloop] [--commands]

What it measures, for each fleet size N (a fresh cell per size):

- N nodes are registered (through the Scheduler, so in pipelines), each with
  ``--pairs`` language pairs (default 4) and ``--max-jobs`` slots (default 16).
  Every node has the same capabilities, so all N share one pool: the free
  zset the scripts pick from holds the whole fleet, the worst case for growth.
- **pipelined**: ``--concurrency`` asyncio tasks (default 64), each with its own
  session, loop ``dispatch_task`` -> ``complete_task``; the Scheduler's
  batcher sends whatever is pending in one event-loop iteration as one
  pipeline of EVALSHA calls.
- **one-at-a-time**: a single task does the same loop, so every script call
  is one round trip (p50/p99 of the pair's latency are printed too).
- **baseline**: the trivial script ``return 1``, loaded and called through the
  same Scheduler (a subclass adds it to ``sources``/``shas`` and calls
  ``_call``), so it takes the same batcher, client, pipelines and connection:
  the same ways (pipelined with the same concurrency, and one at a time).
- a diagnostic baseline: ``return 1`` sent twice per loop with the KEYS and
  ARGV of a real dispatch, then of a real complete (recorded during the
  warm-up), pipelined. The client does everything it does for a pair
  (building, packing and sending the same arguments, reading a reply) while
  Redis runs no scheduling code: this is the client's ceiling, and the gap
  from it to the pipelined pairs/s is the Lua work.

Each task changes language pair on every job, and the scripts reset a
session's pool and node preference when its pair changes: so every dispatch
takes the general path (least-loaded live node, ties broken at random) rather
than the cheap "previous node still free" shortcut.

No job ever queues: ``concurrency < nodes * max_jobs`` is checked (64 tasks
vs 160 slots at 10 nodes), and ``queue_wait_ms`` is 0 so a missing slot would
fail loudly (``NO_AVAILABLE_NODE``) instead of silently measuring the queue.
Times come from Redis ``TIME`` (``now_ms=0``), as in production.

With ``--commands``, it also prints how many Redis commands (and how many
of them writes, which Redis also appends to its AOF) one accepted dispatch
and one completion run, from ``INFO commandstats`` before and after a
hundred of each at the smallest size (each job on a new pair, as above).

Rounds: each round measures every size (pipelined, then one at a time), then
the baselines (pipelined, one at a time, then the diagnostic one), each for
``--seconds``; medians over
``--rounds`` rounds are printed. Interleaving keeps slow drifts of the machine
from favouring one size.

The percentage compares pipelined dispatch+complete pairs per second with
the rate of a trivial script called the same way, i.e.::

    pipelined pairs/s / baseline pipelined calls/s   >= 50 %

A pair is two script calls, so 50 % means a scheduling call costs about as
much as a ``return 1`` call, end to end (client included). This is the
stricter of the two readings; per script call, the rate is twice the printed
percentage.

The cost ratio is time per pair at the largest size / time per pair at the
smallest (pipelined medians): ``cost ratio 10000/10`` with the default sizes.
Target: at most 1.5.

Server: with no ``--redis-url``, an :class:`hub.embedded.EmbeddedRedis` in a
temporary directory, started exactly as ``hub serve`` starts it without a
Redis URL (unix socket, append-only file with fsync every second), and
stopped at the end. That is the hub's default deployment, so it is the
representative one; pass ``--redis-url redis://127.0.0.1:6379/0`` to measure a
server over TCP. The client is the hub's own (``hub.redisconn.redis_client``:
hiredis packing, no retries, bytes replies) and the loop is uvloop when
installed, as ``hub serve`` does.
The benchmark's cells are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from hub.config import Settings
from hub.errors import HubError
from hub.events import Accepted
from hub.keys import Keys
from hub.redisconn import redis_client
from hub.scheduler import Scheduler
from hub.scripts import load_script_sources

__all__ = [
    "BenchScheduler",
    "Fleet",
    "Results",
    "cleanup_cell",
    "commands_per_call",
    "main",
    "measure_baseline",
    "measure_pairs",
    "measure_shaped_baseline",
    "register_fleet",
    "report_lines",
    "run",
]

NOOP = "noop"
NOOP_SOURCE = "return 1"
"""The baseline: the cheapest script there is."""

LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "pl", "ja", "zh")
PAYLOAD = b'{"text":"Good morning, how are you today?"}'
RESULT = b'{"text":"Guten Morgen, wie geht es Ihnen heute?"}'


class BenchScheduler(Scheduler):
    """A Scheduler with one more script, ``return 1``, called the same way as the others."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, sources=load_script_sources() | {NOOP: NOOP_SOURCE}, **kwargs)
        self.recording = False
        """Whether :meth:`_call` records the KEYS and ARGV of each script in :attr:`shapes`."""
        self.shapes: dict[str, tuple[Sequence[str], Sequence[Any]]] = {}
        """Script name -> KEYS and ARGV of its last call while :attr:`recording`."""

    async def noop(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> int:
        """Call ``return 1`` through the batcher (by default with no KEYS and no ARGV)."""
        return int(await self._call(NOOP, keys, args))

    # A plain function returning the coroutine: no extra frame on the measured path.
    def _call(
        self, name: str, keys: Sequence[str], args: Sequence[Any], **kwargs: Any
    ) -> Coroutine[Any, Any, Any]:
        if self.recording:
            self.shapes[name] = (keys, args)
        return super()._call(name, keys, args, **kwargs)


def lang_pairs(count: int) -> list[tuple[str, str]]:
    """The first ``count`` ordered pairs of :data:`LANGUAGES`: en-de, de-en, en-fr, ..."""
    out: list[tuple[str, str]] = []
    for a, b in itertools.combinations(LANGUAGES, 2):
        out += [(a, b), (b, a)]
    if not 1 <= count <= len(out):
        raise ValueError(f"--pairs must be 1..{len(out)}")
    return out[:count]


def client(url: str) -> Redis:
    """The client the hub uses (hub/redisconn.py): hiredis packing, no retries, bytes replies."""
    return redis_client(url, Settings(redis_timeout_s=5.0))


@dataclasses.dataclass
class Fleet:
    """One cell with ``size`` registered nodes and its Scheduler."""

    size: int
    scheduler: BenchScheduler
    pairs: list[tuple[str, str]]
    max_jobs: int


async def register_fleet(
    redis: Redis,
    size: int,
    *,
    pairs: Sequence[tuple[str, str]],
    max_jobs: int,
    cell: str | None = None,
    chunk: int = 2000,
) -> Fleet:
    """Load the scripts and register ``size`` nodes in a fresh cell.

    Registrations go through :meth:`Scheduler.register_node`, ``chunk`` at a
    time, so the batcher sends them in pipelines.
    """
    settings = Settings(
        cell=cell or f"bench-{uuid.uuid4().hex[:8]}-{size}",
        queue_wait_ms=0,  # a missing slot fails loudly instead of queueing
    )
    scheduler = BenchScheduler(redis, settings, hub_id="bench")
    await scheduler.load_scripts()
    for start in range(0, size, chunk):
        await asyncio.gather(
            *(
                scheduler.register_node(
                    f"node-{i:06d}",
                    services=("asr", "nmt", "tts"),
                    lang_pairs=pairs,
                    max_jobs=max_jobs,
                )
                for i in range(start, min(start + chunk, size))
            )
        )
    return Fleet(size, scheduler, list(pairs), max_jobs)


async def _pair_loop(
    fleet: Fleet, session_id: str, offset: int, stop_at: float, latencies: list[float] | None
) -> int:
    scheduler = fleet.scheduler
    pairs = fleet.pairs
    done = 0
    clock = time.perf_counter
    started = clock()
    while started < stop_at:
        # A new pair on every job: the session's preference resets, so the
        # script picks the least-loaded node instead of the previous one.
        src, tgt = pairs[(offset + done) % len(pairs)]
        accepted = await scheduler.dispatch_task(session_id, src, tgt, PAYLOAD)
        if not isinstance(accepted, Accepted):
            raise RuntimeError(f"job queued at {fleet.size} nodes: raise --max-jobs")
        await scheduler.complete_task(
            accepted.job_id, accepted.node_id, accepted.attempt, "finished", result=RESULT
        )
        done += 1
        ended = clock()
        if latencies is not None:
            latencies.append(ended - started)
        started = ended
    return done


async def measure_pairs(
    fleet: Fleet, *, concurrency: int, seconds: float, latencies: list[float] | None = None
) -> float:
    """Pairs per second of ``concurrency`` tasks looping dispatch -> complete for ``seconds``.

    With ``concurrency=1`` every call is one round trip; pass ``latencies`` to
    collect each pair's duration in seconds.
    """
    if concurrency >= fleet.size * fleet.max_jobs:
        raise ValueError(
            f"{concurrency} tasks would queue on {fleet.size} nodes x {fleet.max_jobs} slots"
        )
    tag = uuid.uuid4().hex[:6]
    start = time.perf_counter()
    stop_at = start + seconds
    counts = await asyncio.gather(
        *(_pair_loop(fleet, f"s-{tag}-{i}", i, stop_at, latencies) for i in range(concurrency))
    )
    return sum(counts) / (time.perf_counter() - start)


async def _noop_loop(scheduler: BenchScheduler, stop_at: float) -> int:
    done = 0
    clock = time.perf_counter
    while clock() < stop_at:
        await scheduler.noop()
        done += 1
    return done


async def _shaped_noop_loop(scheduler: BenchScheduler, stop_at: float) -> int:
    dispatch_keys, dispatch_args = scheduler.shapes["dispatch_task"]
    complete_keys, complete_args = scheduler.shapes["complete_task"]
    done = 0
    clock = time.perf_counter
    while clock() < stop_at:
        await scheduler.noop(dispatch_keys, dispatch_args)
        await scheduler.noop(complete_keys, complete_args)
        done += 1
    return done


async def measure_baseline(scheduler: BenchScheduler, *, concurrency: int, seconds: float) -> float:
    """``return 1`` calls per second of ``concurrency`` looping tasks, for ``seconds``."""
    start = time.perf_counter()
    stop_at = start + seconds
    counts = await asyncio.gather(*(_noop_loop(scheduler, stop_at) for _ in range(concurrency)))
    return sum(counts) / (time.perf_counter() - start)


async def measure_shaped_baseline(
    scheduler: BenchScheduler, *, concurrency: int, seconds: float
) -> float:
    """Pairs per second of ``return 1`` sent with a dispatch's then a complete's KEYS and ARGV.

    The client does all it does for a real pair (building and packing the
    same arguments, reading a reply) but Redis runs no scheduling code: the
    gap to :func:`measure_pairs` is the cost of the Lua work. Call
    :func:`measure_pairs` with ``scheduler.recording`` set first.
    """
    start = time.perf_counter()
    stop_at = start + seconds
    counts = await asyncio.gather(
        *(_shaped_noop_loop(scheduler, stop_at) for _ in range(concurrency))
    )
    return sum(counts) / (time.perf_counter() - start)


@dataclasses.dataclass
class Results:
    """Every round's rates; :func:`report_lines` prints their medians."""

    sizes: list[int]
    pipelined: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    """Fleet size -> pipelined pairs/s of each round."""
    sequential: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    """Fleet size -> one-at-a-time pairs/s of each round."""
    latencies: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    """Fleet size -> every one-at-a-time pair's duration, seconds."""
    baseline_pipelined: list[float] = dataclasses.field(default_factory=list)
    """``return 1`` calls/s, pipelined, each round."""
    baseline_sequential: list[float] = dataclasses.field(default_factory=list)
    """``return 1`` calls/s, one at a time, each round."""
    baseline_shaped: list[float] = dataclasses.field(default_factory=list)
    """Pairs/s of ``return 1`` sent with a pair's KEYS and ARGV, pipelined, each round."""

    def cost_ratio(self) -> float:
        """Time per pipelined pair at the largest size / at the smallest."""
        small, large = min(self.sizes), max(self.sizes)
        return statistics.median(self.pipelined[small]) / statistics.median(self.pipelined[large])

    def percent_of_baseline(self, size: int) -> float:
        """Pipelined pairs/s / baseline pipelined calls/s, in percent (medians)."""
        return (
            100.0
            * statistics.median(self.pipelined[size])
            / statistics.median(self.baseline_pipelined)
        )


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report_lines(results: Results) -> list[str]:
    """One line per size, then ``cost ratio <largest>/<smallest>: X.XX``."""
    base_pipe = statistics.median(results.baseline_pipelined)
    base_seq = statistics.median(results.baseline_sequential)
    lines = []
    for size in results.sizes:
        lat = results.latencies[size]
        lines.append(
            f"nodes={size} pipelined={statistics.median(results.pipelined[size]):.0f} pairs/s "
            f"one-at-a-time={statistics.median(results.sequential[size]):.0f} pairs/s "
            f"(p50 {_quantile(lat, 0.5) * 1e3:.2f} ms p99 {_quantile(lat, 0.99) * 1e3:.2f} ms) "
            f"baseline(return 1) pipelined={base_pipe:.0f} calls/s "
            f"one-at-a-time={base_seq:.0f} calls/s "
            f"-> pipelined pairs are {results.percent_of_baseline(size):.0f}% of baseline"
        )
    lines.append(
        f"# baseline(return 1 sent with a pair's KEYS and ARGV) "
        f"pipelined={statistics.median(results.baseline_shaped):.0f} pairs/s: "
        f"the client's share; the gap to pipelined pairs/s is the Lua work"
    )
    small, large = min(results.sizes), max(results.sizes)
    lines.append(f"cost ratio {large}/{small}: {results.cost_ratio():.2f}")
    return lines


async def _command_calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.startswith("cmdstat_")
    }


async def commands_per_call(
    redis: Redis, fleet: Fleet, *, jobs: int = 96, sessions: int = 8
) -> dict[str, dict[str, float]]:
    """Redis commands per accepted ``dispatch_task`` and per ``complete_task`` call.

    ``sessions`` sessions, each started with one job first (not counted),
    then ``jobs`` dispatches one at a time, a session's next job on its next
    language pair (as in the pipelined runs), then their completions;
    ``INFO commandstats`` before and after each batch. Other clients of the
    same server are counted too.

    Returns:
        Script name -> command name -> calls per script call (EVALSHA itself
        and INFO left out).
    """
    if jobs > fleet.size * fleet.max_jobs:
        raise ValueError(f"{jobs} jobs would queue on {fleet.size} nodes x {fleet.max_jobs} slots")
    scheduler = fleet.scheduler
    tag = uuid.uuid4().hex[:6]

    async def dispatch(i: int) -> Accepted:
        src, tgt = fleet.pairs[(i // sessions) % len(fleet.pairs)]
        reply = await scheduler.dispatch_task(f"c-{tag}-{i % sessions}", src, tgt, PAYLOAD)
        if not isinstance(reply, Accepted):
            raise RuntimeError(f"job queued at {fleet.size} nodes: raise --max-jobs")
        return reply

    async def complete(accepted: list[Accepted]) -> None:
        for a in accepted:
            await scheduler.complete_task(a.job_id, a.node_id, a.attempt, "finished", result=RESULT)
        await scheduler.flush_stats()

    await complete([await dispatch(i) for i in range(sessions)])
    before = await _command_calls(redis)
    accepted = [await dispatch(i) for i in range(sessions, sessions + jobs)]
    middle = await _command_calls(redis)
    await complete(accepted)
    after = await _command_calls(redis)
    out: dict[str, dict[str, float]] = {}
    for name, start, end in (("dispatch_task", before, middle), ("complete_task", middle, after)):
        out[name] = {
            command: (calls - start.get(command, 0)) / jobs
            for command, calls in sorted(end.items())
            if command not in ("evalsha", "info") and calls > start.get(command, 0)
        }
    return out


async def _write_commands(redis: Redis, names: Sequence[str]) -> set[str]:
    """Which of ``names`` are write commands (COMMAND INFO flags, as redis-py parses them)."""
    writes = set()
    for name in names:
        reply = await redis.execute_command("COMMAND", "INFO", name)  # type: ignore[no-untyped-call]
        info = reply.get(name) if isinstance(reply, dict) else None
        flags = info.get("flags", []) if isinstance(info, dict) else []
        if any((f.decode() if isinstance(f, bytes) else str(f)) == "write" for f in flags):
            writes.add(name)
    return writes


async def command_lines(redis: Redis, fleet: Fleet) -> list[str]:
    """``# commands per ...`` lines: :func:`commands_per_call`, writes counted apart."""
    counts = await commands_per_call(redis, fleet)
    writes = await _write_commands(redis, sorted({c for per in counts.values() for c in per}))
    lines = []
    for script, what in (("dispatch_task", "accepted dispatch"), ("complete_task", "completion")):
        per = counts[script]
        total = sum(per.values())
        written = sum(n for c, n in per.items() if c in writes)
        detail = ", ".join(f"{c} {n:g}" for c, n in per.items())
        lines.append(
            f"# commands per {what}: {total:g} ({written:g} writes) at {fleet.size} nodes: {detail}"
        )
    return lines


async def cleanup_cell(redis: Redis, keys: Keys) -> int:
    """Delete every key of the cell (SCAN + UNLINK); returns how many."""
    deleted = 0
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=keys.scan_pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += await redis.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


async def run(
    url: str,
    sizes: Sequence[int],
    *,
    pairs: int = 4,
    seconds: float = 1.0,
    rounds: int = 5,
    concurrency: int = 64,
    max_jobs: int = 16,
    warmup_s: float = 0.2,
    commands: bool = False,
    out: Callable[[str], None] = print,
) -> Results:
    """Run the benchmark against ``url``, print its lines with ``out``, return the rates.

    With ``commands``, the :func:`command_lines` of the smallest fleet follow.
    """
    if not sizes:
        raise ValueError("no fleet size given")
    if rounds < 1 or seconds <= 0 or concurrency < 1:
        raise ValueError("--rounds, --seconds and --concurrency must be positive")
    if concurrency >= min(sizes) * max_jobs:
        raise ValueError(
            f"--concurrency {concurrency} needs more than {min(sizes)} nodes x "
            f"{max_jobs} slots, or jobs would queue"
        )
    redis = client(url)
    fleets: list[Fleet] = []
    try:
        info = await redis.info("server")
        version = info.get("valkey_version") or info.get("redis_version")
        out(
            f"# {info.get('server_name', 'redis')} {version} at {url}; "
            f"{pairs} language pairs per node, max_jobs {max_jobs}, "
            f"{concurrency} tasks pipelined; {rounds} rounds of {seconds:g} s, medians"
        )
        language_pairs = lang_pairs(pairs)
        for size in sizes:
            started = time.perf_counter()
            fleet = await register_fleet(redis, size, pairs=language_pairs, max_jobs=max_jobs)
            fleets.append(fleet)
            out(f"# registered {size} nodes in {time.perf_counter() - started:.2f} s")
        results = Results(list(sizes))
        noop_scheduler = fleets[0].scheduler
        for fleet in fleets:  # warm up: connections, script cache, allocator
            fleet.scheduler.recording = fleet.scheduler is noop_scheduler
            await measure_pairs(fleet, concurrency=concurrency, seconds=warmup_s)
            fleet.scheduler.recording = False
            results.pipelined[fleet.size] = []
            results.sequential[fleet.size] = []
            results.latencies[fleet.size] = []
        await measure_baseline(noop_scheduler, concurrency=concurrency, seconds=warmup_s)
        await measure_shaped_baseline(noop_scheduler, concurrency=concurrency, seconds=warmup_s)
        for _ in range(rounds):
            for fleet in fleets:
                results.pipelined[fleet.size].append(
                    await measure_pairs(fleet, concurrency=concurrency, seconds=seconds)
                )
                results.sequential[fleet.size].append(
                    await measure_pairs(
                        fleet,
                        concurrency=1,
                        seconds=seconds,
                        latencies=results.latencies[fleet.size],
                    )
                )
            results.baseline_pipelined.append(
                await measure_baseline(noop_scheduler, concurrency=concurrency, seconds=seconds)
            )
            results.baseline_sequential.append(
                await measure_baseline(noop_scheduler, concurrency=1, seconds=seconds)
            )
            results.baseline_shaped.append(
                await measure_shaped_baseline(
                    noop_scheduler, concurrency=concurrency, seconds=seconds
                )
            )
        for line in report_lines(results):
            out(line)
        if commands:
            smallest = min(fleets, key=lambda f: f.size)
            for line in await command_lines(redis, smallest):
                out(line)
        return results
    finally:
        for fleet in fleets:
            await fleet.scheduler.close()
            with contextlib.suppress(Exception):
                await cleanup_cell(redis, fleet.scheduler.keys)
        await redis.aclose()


@contextlib.contextmanager
def embedded_server(*, appendonly: bool = True) -> Iterator[str]:
    """An EmbeddedRedis in a temporary directory, as ``hub serve`` runs it; yields its URL."""
    from hub.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="hub-bench-") as data_dir:
        server = EmbeddedRedis(data_dir, appendonly=appendonly)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected sizes like 10,1000,10000, got {text!r}"
        ) from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("sizes must be positive")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench_scheduler",
        description="dispatch+complete pairs per second through hub.scheduler.Scheduler",
    )
    parser.add_argument(
        "--redis-url", help="server to use (default: an embedded one, stopped at the end)"
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=[10, 1000, 10000],
        help="fleet sizes (default 10,1000,10000)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=4,
        help="language pairs per node (default 4); with 1, sessions never change pair "
        "and keep their previous node (the scripts' shortcut)",
    )
    parser.add_argument(
        "--seconds", type=float, default=1.0, help="length of one measurement (default 1)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="measurements per figure; medians are printed (default 5)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="tasks of the pipelined runs (default 64)"
    )
    parser.add_argument("--max-jobs", type=int, default=16, help="slots per node (default 16)")
    parser.add_argument(
        "--no-appendonly",
        action="store_true",
        help="embedded server without its append-only file (hub serve keeps one)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    parser.add_argument(
        "--commands",
        action="store_true",
        help="also print the Redis commands (and writes) per accepted dispatch and per completion",
    )
    args = parser.parse_args(argv)

    loop_factory = None
    if not args.no_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            loop_factory = uvloop.new_event_loop

    def bench(url: str) -> None:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(
                run(
                    url,
                    args.sizes,
                    pairs=args.pairs,
                    seconds=args.seconds,
                    rounds=args.rounds,
                    concurrency=args.concurrency,
                    max_jobs=args.max_jobs,
                    commands=args.commands,
                )
            )

    try:
        if args.redis_url:
            bench(args.redis_url)
        else:
            with embedded_server(appendonly=not args.no_appendonly) as url:
                bench(url)
    except (ValueError, OSError, HubError, RedisError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
