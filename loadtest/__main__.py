"""``python -m loadtest`` and ``hub bench``: simulated sessions and nodes against real hubs.

Usage::

    python -m loadtest [--sessions 1000] [--nodes 40] [--duration 30]
        [--scenario steady|burst|overload|churn|chaos|soak] [--url ws://HOST:PORT ...]
        [--hubs N] [--workers N] [--service-time-ms 50..300] [--job-interval-ms 1000]
        [--max-jobs 8] [--audio-bytes 16000] [--processes K] [--out DIR]
        [--uvloop | --no-uvloop] ...
    hub bench --url wss://hub.example:443 --token-file FILE [--sessions 1000] [--nodes 50] ...

Without ``--url`` it starts the system under test itself: an embedded Redis
and N hub processes (``hub serve --port 0``). With ``--url`` it loads a
deployment it did not start (``ws://`` or ``wss://``, with the tokens of
``--token-file``: :mod:`loadtest.access`), and reports what the clients
saw. Simulated nodes register in their own pool (``--pool``, default
``bench``) and, against a deployment, serve only a private-use language pair
(``en-x-bench`` to ``zh-x-bench``) that no real node or user asks for: the
bench's jobs go to its own nodes alone, and the fleet's users' jobs never to
them. Load comes from K worker processes (:mod:`loadtest.worker`). Phases,
each bounded in time:

1. start Redis and the hubs; read hub RSS before any connection;
2. workers open every node connection, then every session connection;
   read hub RSS again (idle connections);
3. ``go``: sessions send for ``--duration`` seconds; a status line every
   second; hub, Redis and harness CPU are read at the start and the end;
4. drain: wait up to ``--drain-s`` for the last results;
5. close everything, write ``report.json`` and ``report.html`` in ``--out``,
   print the table. Exit status 0 when the verdict is OK, 1 otherwise, 2
   when the run could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import re
import secrets
import shlex
import ssl
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import deployment
from . import report as reporting
from .access import (
    Access,
    AccessError,
    check_tokens,
    preflight,
    read_token_file,
    token_file_mode_warning,
)
from .control import Status, WorkerProcess, raise_fd_limit, start_workers
from .hubs import ExternalHub, Fleet, load_average, machine_busy_s
from .procs import REPO_ROOT, HubProcess, cpu_seconds, rss_kb
from .scenarios import SCENARIOS, Plan, ServiceTime, overload_interval_ms
from .stats import Stats

__all__ = ["main"]

STATUS_INTERVAL_S = 1.0

DELEGATED = ("chaos", "soak")
"""Scenarios with a harness of their own (real node processes, faults): their modules' main."""

LOCAL_PAIR = ("en", "zh")
"""The language pair of a run against hubs the harness started."""

BENCH_PAIR = ("en-x-bench", "zh-x-bench")
"""The pair of a run against a deployment: private-use codes (BCP 47 ``-x-``) no real
node serves and no real session asks for, so the fleet and the bench keep their jobs apart."""

JOBS_PER_PROCESS = 2500
"""Offered jobs/s one load generator process carries by default (about a quarter of a
core): fewer processes wake up less often, and take less of the machine from the hub."""


def build_parser(prog: str = "python -m loadtest") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Load-test lockless-hub with simulated sessions and nodes: hubs it "
        "starts itself, or a deployment given by --url.",
    )
    p.add_argument(
        "--scenario",
        choices=(*SCENARIOS, *DELEGATED),
        default="steady",
        help="chaos runs loadtest.chaos, soak loadtest.soak "
        "(see python -m loadtest --scenario chaos|soak --help)",
    )
    p.add_argument("--sessions", type=int, default=1000, help="simulated sessions (default 1000)")
    p.add_argument(
        "--nodes",
        type=int,
        default=40,
        help="simulated nodes (default 40); with --url, 0 sends the jobs to the fleet's "
        "own nodes of --pair",
    )
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load (default 30)")
    p.add_argument(
        "--service-time-ms",
        default="50..300",
        help="node service time: A..B uniform, A fixed, 0 instant (default 50..300)",
    )
    p.add_argument(
        "--job-interval-ms",
        type=float,
        default=None,
        help="per-session interval between jobs (default 1000; 0: closed loop, "
        "the next job on each result); overload computes its own",
    )
    p.add_argument(
        "--inflight", type=int, default=1, help="closed loop: jobs in flight per session"
    )
    p.add_argument(
        "--max-outstanding",
        type=int,
        default=16,
        help="open loop: a session with this many unfinished jobs skips its tick",
    )
    p.add_argument("--audio-bytes", type=int, default=16000, help="audio per job; 0: text jobs")
    p.add_argument("--max-jobs", type=int, default=8, help="slots per node (default 8)")
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="load generator processes (default: one per "
        f"{JOBS_PER_PROCESS:,} offered jobs/s, at most one per core; 2 in closed loop)",
    )
    p.add_argument("--drain-s", type=float, default=10.0, help="wait for last results (s)")
    p.add_argument("--churn-per-s", type=float, default=0.05, help="churn: fraction per second")
    p.add_argument(
        "--overload-factor", type=float, default=2.0, help="overload: offered / capacity"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (0: random)")
    p.add_argument(
        "--url",
        action="append",
        default=[],
        help="a deployment's hub, ws://HOST:PORT or wss://HOST:PORT (repeatable or "
        "comma-separated; connections are spread over them); default: start hubs",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="with --url: file of 'node = TOKEN' and 'session = TOKEN' lines "
        "(the session token without a sid claim)",
    )
    p.add_argument("--ca-file", help="with wss://: PEM file of the CAs of the hubs' certificates")
    p.add_argument(
        "--no-verify-tls",
        action="store_true",
        help="with wss://: do not check the hubs' certificates (a test deployment)",
    )
    p.add_argument(
        "--pool", default="bench", help="operator pool of the simulated nodes (default bench)"
    )
    p.add_argument(
        "--pair",
        metavar="SRC:TGT",
        help=f"the jobs' language pair (default {':'.join(BENCH_PAIR)} with --url, "
        f"else {':'.join(LOCAL_PAIR)})",
    )
    p.add_argument(
        "--node-prefix",
        help="simulated node ids are this prefix and a number (default bench-<random>-)",
    )
    p.add_argument("--hub-pid", type=int, action="append", default=[], help="external hub pid")
    p.add_argument("--hubs", type=int, help="hub processes to start (default 1)")
    p.add_argument(
        "--workers",
        type=int,
        help="workers of each started hub (hub serve --workers N, one port); its CPU "
        "counts the supervisor's and its workers' (default 1: no supervisor)",
    )
    p.add_argument("--redis-url", help="Redis for the started hubs (default: embedded)")
    p.add_argument(
        "--redis-cluster",
        type=int,
        default=0,
        metavar="MASTERS",
        help="start a Redis Cluster of MASTERS masters (one replica each) for the hubs "
        "instead of one Redis (default 0: one Redis)",
    )
    p.add_argument(
        "--cells",
        type=int,
        default=1,
        help="scheduling cells: hub i serves cell i %% CELLS, with its share of the nodes "
        "and sessions (default 1)",
    )
    p.add_argument(
        "--redis-aof",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="embedded Redis keeps an append-only file, like hub serve (default on)",
    )
    p.add_argument(
        "--hub-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for the started hubs (repeatable)",
    )
    p.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the started hubs on uvloop when installed (default on)",
    )
    p.add_argument(
        "--worker-uvloop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the load generators on uvloop when installed (default on)",
    )
    p.add_argument(
        "--hub-cprofile",
        action="store_true",
        help="profile the started hubs with cProfile (CPU clock): hub-<i>.pstats in --out",
    )
    p.add_argument(
        "--worker-cprofile",
        action="store_true",
        help="profile the load generators during the load with cProfile (CPU clock): "
        "worker-<i>.pstats in --out",
    )
    p.add_argument("--connect-concurrency", type=int, default=32)
    p.add_argument("--out", type=Path, help="report directory (default loadtest/reports/<time>)")
    p.add_argument("--quiet", action="store_true", help="no status line")
    return p


def make_plan(args: argparse.Namespace) -> tuple[Plan, dict[str, str]]:
    """The workers' plan and the started hubs' extra settings."""
    ServiceTime.parse(args.service_time_ms)  # fail early on bad syntax
    interval = 1000.0 if args.job_interval_ms is None else args.job_interval_ms
    plan = Plan(
        scenario=args.scenario,
        sessions=args.sessions,
        nodes=args.nodes,
        duration_s=args.duration,
        service_time=args.service_time_ms,
        job_interval_ms=interval,
        inflight=args.inflight,
        max_outstanding=args.max_outstanding,
        audio_bytes=args.audio_bytes,
        max_jobs=args.max_jobs,
        churn_per_s=args.churn_per_s,
        drain_s=args.drain_s,
        connect_timeout_s=30.0 + (args.sessions + args.nodes) / 100,
        connect_concurrency=args.connect_concurrency,
        seed=args.seed,
        worker_uvloop=args.worker_uvloop,
        src_lang=args.pair[0],
        tgt_lang=args.pair[1],
        pool=args.pool,
        node_prefix=args.node_prefix,
        # No simulated node: the fleet's own nodes answer, and not with an echo.
        echo_checked=args.nodes > 0,
    )
    settings: dict[str, str] = {}
    if args.scenario == "overload" and args.job_interval_ms is None:
        plan = Plan.from_json(
            {**plan.to_json(), "job_interval_ms": overload_interval_ms(plan, args.overload_factor)}
        )
    if args.scenario == "burst":
        # A burst of `sessions` jobs should queue, not be refused.
        settings["queue_max"] = str(max(1000, args.sessions))
        settings["max_queued_per_session"] = "64"
    for item in args.hub_set:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--hub-set expects NAME=VALUE, got {item!r}")
        settings[name.strip()] = value
    return plan, settings


def default_processes(plan: Plan) -> int:
    """Load generator processes for ``plan`` when ``--processes`` is not given."""
    cores = os.cpu_count() or 1
    offered = plan.offered_per_s()
    if offered is None:  # closed loop: as fast as the hub answers
        return min(2, cores)
    return max(1, min(cores, math.ceil(offered / JOBS_PER_PROCESS)))


def connections_per_hub(plan: Plan, hubs: int) -> list[int]:
    return [
        len(range(i, plan.nodes, hubs)) + len(range(i, plan.sessions, hubs)) for i in range(hubs)
    ]


async def run(args: argparse.Namespace) -> int:
    plan, settings = make_plan(args)
    out_dir: Path = args.out
    raise_fd_limit()
    quiet = args.quiet
    say = (lambda *_: None) if quiet else (lambda text: print(text, flush=True))

    capacity = plan.capacity_per_s()
    offered = plan.offered_per_s()
    say(
        f"loadtest {plan.scenario}: {plan.sessions} sessions, {plan.nodes} nodes x "
        f"{plan.max_jobs} slots, {plan.duration_s:g} s"
        + (f", offered {offered:,.0f} jobs/s" if offered else ", closed loop")
        + (
            ", no simulated node"
            if not plan.nodes
            else f", node capacity {capacity:,.0f} jobs/s"
            if capacity
            else ", instant nodes"
        )
        + f"; report in {out_dir}"
    )
    if offered and capacity and offered > 0.9 * capacity and plan.scenario != "overload":
        say(
            f"warning: offered load is {100 * offered / capacity:.0f}% of the nodes' capacity; "
            "expect queueing (raise --nodes or --max-jobs)"
        )

    fleet: Fleet | None = None
    hubs: list[HubProcess] | list[ExternalHub]
    workers: list[WorkerProcess] = []
    status = Status(args.processes, quiet)
    samples: dict[str, Any] = {}
    finals: list[dict[str, Any]] = []
    window_s = 0.0
    harness_pids: list[int] = []

    def harness_cpu() -> float:
        own = os.times()
        total = own.user + own.system
        for pid in harness_pids:
            total += cpu_seconds(pid) or 0.0
        return total

    def sample() -> dict[str, Any]:
        if fleet is not None:
            return fleet.sample()
        return {
            "hubs": [{"cpu_s": cpu_seconds(p), "rss_kb": rss_kb(p)} for p in args.hub_pid],
            "redis": {},
            "machine_busy_s": machine_busy_s(),
            "loadavg": load_average(),
        }

    access = Access()
    status_before: dict[str, Any] | str = "not read"
    status_after: dict[str, Any] | str = "not read"
    try:
        if args.url:
            urls = args.url
            access = await _deployment_access(args, plan, say)
            hubs = [ExternalHub(f"external-{i}", u) for i, u in enumerate(urls)]
        else:
            fleet = Fleet(
                args.hubs,
                out_dir,
                settings=settings,
                uvloop=args.uvloop,
                redis_url=args.redis_url,
                redis_aof=args.redis_aof,
                redis_cluster=args.redis_cluster,
                cells=args.cells,
                cprofile=args.hub_cprofile,
                workers=args.workers,
            )
            await fleet.start()
            hubs = fleet.hubs
            urls = [h.url for h in hubs]
            say(
                f"started {len(hubs)} hub(s) {', '.join(urls)} "
                f"(pids {', '.join(str(h.pid) for h in hubs)}; redis pid {fleet.redis_pid})"
            )
        await asyncio.sleep(0.5)  # let the hubs settle before the baseline
        samples["baseline"] = sample()

        workers = await start_workers(
            plan,
            urls,
            args.processes,
            out_dir,
            status,
            cprofile=args.worker_cprofile,
            access=access,
        )
        harness_pids = [w.process.pid for w in workers]
        started = time.perf_counter()
        async with asyncio.timeout(plan.connect_timeout_s + 15):
            readies = await asyncio.gather(*(w.ready for w in workers))
        opened = sum(r["nodes"] + r["sessions"] for r in readies)
        failures = sum(r["connect_failures"] for r in readies)
        say(
            f"connected {opened:,} of {plan.nodes + plan.sessions:,} in "
            f"{time.perf_counter() - started:.1f} s"
            + (f" ({failures} failed: see the report)" if failures else "")
        )
        await asyncio.sleep(0.5)
        samples["connected"] = sample()
        peak = [h.get("rss_kb") or 0 for h in samples["connected"]["hubs"]]

        if args.url:
            # Before "go": the read's time is not the load's.
            status_before = await deployment.read_status(deployment.status_url(urls[0]), access.tls)
        go_wall = time.time() + 0.3
        for w in workers:
            w.command(f"go {go_wall!r}")
        await asyncio.sleep(max(0.0, go_wall - time.time()))
        go_perf = time.perf_counter()
        samples["go"] = sample()
        samples["harness_go"] = harness_cpu()
        cpu_series = samples["cpu_series"] = [
            {
                "t": 0.0,
                "hubs_cpu_s": [h.get("cpu_s") for h in samples["go"]["hubs"]],
                "redis_cpu_s": samples["go"]["redis"].get("cpu_s"),
                "harness_cpu_s": samples["harness_go"],
            }
        ]

        deadline = go_perf + plan.duration_s + plan.drain_s + 15
        drained = asyncio.gather(*(w.drained for w in workers), return_exceptions=True)
        while not drained.done() and time.perf_counter() < deadline:
            await asyncio.wait([drained], timeout=STATUS_INTERVAL_S)
            now = time.perf_counter()
            current = sample()
            for i, h in enumerate(current["hubs"]):
                peak[i] = max(peak[i], h.get("rss_kb") or 0)
            elapsed = now - go_perf
            cpu_series.append(
                {
                    "t": round(elapsed, 3),
                    "hubs_cpu_s": [h.get("cpu_s") for h in current["hubs"]],
                    "redis_cpu_s": current["redis"].get("cpu_s"),
                    "harness_cpu_s": harness_cpu(),
                }
            )
            status.show(elapsed, "load" if elapsed <= plan.duration_s else "drain")
        status.end()
        samples["end"] = sample()
        samples["harness_end"] = harness_cpu()
        samples["peak_rss_kb"] = peak
        window_s = time.perf_counter() - go_perf
        if args.url:
            status_after = await deployment.read_status(deployment.status_url(urls[0]), access.tls)
        if not drained.done():
            drained.cancel()
            say("warning: workers did not finish draining in time")

        for w in workers:
            w.command("close")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                results = await asyncio.gather(*(w.final for w in workers), return_exceptions=True)
                finals = [r for r in results if isinstance(r, dict)]
    except TimeoutError:
        print(f"{args.prog}: error: workers not connected in time; see {out_dir}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, AccessError) as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        for w in workers:
            await w.kill()
        if fleet is not None:
            await fleet.stop()

    if len(finals) != len(workers):
        print(
            f"{args.prog}: error: {len(workers) - len(finals)} worker(s) sent no results; "
            f"see {out_dir}/worker-*.log",
            file=sys.stderr,
        )
        return 2

    stats = Stats()
    for f in finals:
        stats.merge(Stats.from_json(f["stats"]))
    meta = {
        "command": f"{args.prog} {shlex.join(args.argv)}",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "hubs": len(hubs),
        "workers_per_hub": args.workers if fleet is not None else None,
        "hub_pids": [h.pid for h in hubs],
        "hub_urls": urls,
        "hub_loop": ("uvloop" if args.uvloop and _has_uvloop() else "asyncio")
        if fleet is not None
        else "external",
        "hub_settings": fleet.settings if fleet is not None else None,
        "redis_pid": fleet.redis_pid if fleet is not None else None,
        "redis_cluster_pids": fleet.cluster_pids if fleet is not None else [],
        "cells": fleet.cell_names if fleet is not None else None,
        "worker_loop": "uvloop" if args.worker_uvloop and _has_uvloop() else "asyncio",
        "worker_pids": harness_pids,
        "processes": args.processes,
        "offered_per_s": None if offered is None else round(offered, 1),
        "capacity_per_s": None if capacity is None else round(capacity, 1),
        "pool": plan.pool,
        "pair": f"{plan.src_lang}:{plan.tgt_lang}",
        "node_ids": f"{plan.node_prefix}0..{plan.node_prefix}{plan.nodes - 1}"
        if plan.nodes
        else None,
        "note": "other processes of this machine may run at the same time (cpu.other_s): "
        "numbers are noisy then",
    }
    if args.url:
        meta["deployment"] = deployment.summarize(
            status_before, status_after, url=deployment.status_url(urls[0]), pool=plan.pool
        )
    workers_info = [
        {"index": f["index"], "cpu": f["cpu"], "connect_failures": f["connect_failures"]}
        for f in finals
    ]
    result = reporting.build(
        meta=meta,
        plan=plan.to_json(),
        stats=stats,
        samples=samples,
        workers=workers_info,
        window_s=window_s,
        connections=connections_per_hub(plan, len(hubs)),
    )
    json_path, html_path = reporting.write(result, out_dir)
    print(reporting.table(result))
    if args.url:
        print(deployment.describe(meta["deployment"]))

    print(f"\nreport: {json_path}\n        {html_path}")
    return 0 if result["verdict"]["ok"] else 1


def profile_summary(path: Path, top: int = 30) -> str:
    """The functions of a cProfile dump that used the most CPU themselves, as text."""
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def default_out_dir() -> Path:
    """``loadtest/reports/<time>`` in a checkout, else ``bench-reports/<time>`` here."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if (REPO_ROOT / "pyproject.toml").is_file():
        return REPO_ROOT / "loadtest" / "reports" / stamp
    # Installed (hub bench from a wheel): never inside site-packages.
    return Path("bench-reports") / stamp


def _check_args(args: argparse.Namespace) -> None:
    """Check and complete the options that depend on each other.

    Raises:
        ValueError: a bad value or combination; the message names the option.
    """
    args.url = [_hub_url(u) for item in args.url for u in item.split(",") if u.strip()]
    if args.url:
        # Settings of the hubs the harness starts: a deployment has its own.
        started_only = {
            "hubs": args.hubs is not None,
            "workers": args.workers is not None,
            "redis_url": args.redis_url is not None,
            "hub_set": bool(args.hub_set),
            "hub_cprofile": args.hub_cprofile,
        }
        for option, given in started_only.items():
            if given:
                raise ValueError(
                    f"--{option.replace('_', '-')} applies to hubs the harness starts, not to --url"
                )
    if args.hubs is None:
        args.hubs = 1
    if args.workers is None:
        args.workers = 1
    if args.hub_cprofile and args.workers > 1:
        raise ValueError("--hub-cprofile profiles one process: use it without --workers")
    for name in ("sessions", "nodes", "max_jobs", "inflight", "hubs", "workers"):
        low = 0 if name == "sessions" or (name == "nodes" and args.url) else 1
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {low}")
    if args.scenario == "overload" and not args.nodes and args.job_interval_ms is None:
        raise ValueError(
            "--scenario overload sets its rate from the simulated nodes' capacity: "
            "with --nodes 0, give --job-interval-ms"
        )
    if args.processes is not None and args.processes < 1:
        raise ValueError("--processes must be at least 1")
    if not args.url:
        for option in ("token_file", "ca_file"):
            if getattr(args, option) is not None:
                raise ValueError(f"--{option.replace('_', '-')} needs --url")
    pair = args.pair
    if pair is None:
        args.pair = BENCH_PAIR if args.url else LOCAL_PAIR
    else:
        src, sep, tgt = pair.partition(":")
        if not sep or not _LANG.fullmatch(src) or not _LANG.fullmatch(tgt):
            raise ValueError(f"--pair expects SRC:TGT language codes like en:zh, got {pair!r}")
        args.pair = (src.lower(), tgt.lower())
    if args.url and args.nodes and not all(_private_use(code) for code in args.pair):
        # protocol.md §8: a pair's jobs go to any node that serves it, in any pool.
        raise ValueError(
            f"simulated nodes serving {':'.join(args.pair)} would be sent the deployment's "
            "real jobs: use a private-use pair (the default "
            f"{':'.join(BENCH_PAIR)}), or --nodes 0 to send the bench's jobs to the "
            "fleet's own nodes"
        )
    if not _ID.fullmatch(args.pool):
        raise ValueError(
            f"--pool must be an id of letters, digits, '.', '_' or '-', got {args.pool!r}"
        )
    if args.node_prefix is None:
        args.node_prefix = f"bench-{secrets.token_hex(2)}-"
    elif not _ID.fullmatch(args.node_prefix + "0"):
        raise ValueError(f"--node-prefix must start an id, got {args.node_prefix!r}")


_LANG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8}){0,3}")
"""A language code (protocol.md §5)."""

_ID = re.compile(r"[A-Za-z0-9._-]{1,58}")
"""An id (protocol.md §5), with room for a node's number after a prefix."""


def _private_use(code: str) -> bool:
    """Whether a language code has a private-use part (``en-x-bench``): no real language."""
    return "x" in code.lower().split("-")[1:]


def _hub_url(text: str) -> str:
    """A hub's base URL: ``ws://`` or ``wss://``, host, optional port and path prefix."""
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"--url must be ws://HOST:PORT or wss://HOST:PORT, got {text!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"--url must have no query or fragment, got {text!r}")
    return url


async def _deployment_access(args: argparse.Namespace, plan: Plan, say: Any) -> Access:
    """The tokens and TLS settings for ``--url``, checked before any worker starts.

    Raises:
        AccessError: a bad token file or token, or a hub that refuses a connection.
    """
    node_token = session_token = None
    if args.token_file is not None:
        node_token, session_token = read_token_file(args.token_file)
        warning = token_file_mode_warning(args.token_file)
        if warning:
            say(f"warning: {warning}")
    access = Access(
        node_token=node_token,
        session_token=session_token,
        ca_file=args.ca_file,
        verify_tls=not args.no_verify_tls,
    )
    try:
        access.tls  # noqa: B018 - built now, so a bad --ca-file is one error here
    except (OSError, ssl.SSLError) as exc:
        raise AccessError(f"--ca-file {args.ca_file}: {exc.strerror or exc}") from exc
    node_ids = [f"{plan.node_prefix}{i}" for i in range(plan.nodes)]
    run_s = plan.connect_timeout_s + plan.duration_s + plan.drain_s
    for warning in check_tokens(
        access,
        node_ids=node_ids,
        pair=(plan.src_lang, plan.tgt_lang),
        sessions=plan.sessions,
        run_s=run_s,
    ):
        say(f"warning: {warning}")
    await preflight(access, args.url, nodes=plan.nodes > 0, sessions=plan.sessions > 0)
    say(
        f"target: {', '.join(args.url)}; "
        + (
            f"nodes {node_ids[0]}..{node_ids[-1]} in pool {plan.pool}"
            if node_ids
            else "no simulated node: the fleet's nodes answer"
        )
        + f"; pair {plan.src_lang}:{plan.tgt_lang}"
    )
    return access


def _drop_if_empty(out: Path, *, parent: bool) -> None:
    """Remove the report directory of a run that failed before writing anything
    (a refused token: nothing to keep), and its parent too when it made it empty."""
    with contextlib.suppress(OSError):  # not empty: kept
        out.rmdir()
        if parent:
            out.parent.rmdir()


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def _delegated_args(argv: list[str]) -> tuple[str, list[str]] | None:
    """(scenario, its arguments) when ``--scenario chaos`` or ``soak`` is asked for, else None."""
    for i, arg in enumerate(argv):
        for name in DELEGATED:
            if arg == f"--scenario={name}":
                return name, argv[:i] + argv[i + 1 :]
            if arg == "--scenario" and argv[i + 1 : i + 2] == [name]:
                return name, argv[:i] + argv[i + 2 :]
    return None


def main(argv: list[str] | None = None, prog: str = "python -m loadtest") -> int:
    """Run the harness; ``prog`` names it in messages (``hub bench`` runs it too)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    delegated = _delegated_args(raw)
    if delegated is not None:
        # Their own harness: hubs, nodes and Redis killed and restarted on a schedule.
        name, rest = delegated
        if any(a == "--url" or a.startswith("--url=") for a in rest):
            print(
                f"{prog}: error: --scenario {name} starts its own hubs: no --url", file=sys.stderr
            )
            return 2
        if name == "soak":
            from .soak import main as soak_main

            return soak_main(rest)
        from .chaos import main as chaos_main

        return chaos_main(rest)
    parser = build_parser(prog)
    args = parser.parse_args(raw)
    args.prog, args.argv = prog, raw
    try:
        _check_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    default_out = args.out is None
    if default_out:
        args.out = default_out_dir()
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.processes is None:
        args.processes = default_processes(make_plan(args)[0])
    try:
        rc = asyncio.run(run(args))
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    if rc:
        _drop_if_empty(args.out, parent=default_out)
    profiled = [
        *(["hub-*.pstats"] if args.hub_cprofile else []),
        *(["worker-*.pstats"] if args.worker_cprofile else []),
    ]
    for pattern in profiled:
        for path in sorted(args.out.glob(pattern)):
            text = profile_summary(path)
            path.with_suffix(".txt").write_text(text)
            print(f"\n{path.name}, by CPU time in the function itself:\n{text}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
