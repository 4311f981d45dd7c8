"""Hub memory per idle connection: open N sessions, read the hub's RSS before and after.

Usage::

    python -m loadtest.bench_memory [--connections 10000] [--nodes 0]
        [--processes 2] [--no-uvloop] [--url ws://127.0.0.1:PORT --hub-pid PID]

With no ``--url`` it starts one hub (and an embedded Redis). Load generator
processes (:mod:`loadtest.worker` in ``hold`` mode) open the connections,
wait for each ``welcome`` (or ``registered``), and keep them idle while this
script reads ``VmRSS`` of the hub from ``/proc/<pid>/status``. Prints the
RSS before, with the connections open, and the difference per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .control import Status, raise_fd_limit, start_workers
from .hubs import Fleet
from .procs import rss_kb
from .scenarios import Plan

__all__ = ["main"]


async def run(args: argparse.Namespace) -> int:
    raise_fd_limit()
    out = Path(tempfile.mkdtemp(prefix="lt-mem-"))
    fleet = None
    workers = []
    try:
        url, pid = args.url, args.hub_pid
        if url is None:
            fleet = Fleet(1, out, uvloop=args.uvloop)
            await fleet.start()
            url, pid = fleet.hubs[0].url, fleet.hubs[0].pid
        if pid is None:
            print("bench_memory: --url needs --hub-pid to read the hub's memory", file=sys.stderr)
            return 2
        await asyncio.sleep(1.0)
        before = rss_kb(pid) or 0
        plan = Plan(
            sessions=args.connections,
            nodes=args.nodes,
            duration_s=0,
            hold=True,
            connect_timeout_s=60 + args.connections / 100,
            max_jobs=1,
        )
        started = time.perf_counter()
        workers = await start_workers(plan, [url], args.processes, out, Status(1, quiet=True))
        async with asyncio.timeout(plan.connect_timeout_s + 15):
            readies = await asyncio.gather(*(w.ready for w in workers))
        opened = sum(r["sessions"] + r["nodes"] for r in readies)
        took = time.perf_counter() - started
        await asyncio.sleep(args.settle_s)
        after = rss_kb(pid) or 0
        for w in workers:
            w.command("close")
        async with asyncio.timeout(30):
            await asyncio.gather(*(w.final for w in workers), return_exceptions=True)
        await asyncio.sleep(1.0)
        closed = rss_kb(pid) or 0
    finally:
        for w in workers:
            await w.kill()
        if fleet is not None:
            await fleet.stop()
        shutil.rmtree(out, ignore_errors=True)
    hub_loop = "uvloop" if args.uvloop else "asyncio"
    print(
        f"{opened:,} idle connections ({args.connections:,} sessions, {args.nodes} nodes) "
        f"opened in {took:.1f} s; hub on {hub_loop}"
    )
    print(
        f"hub RSS before {before:,} KiB, with the connections {after:,} KiB, after closing "
        f"them {closed:,} KiB"
    )
    if opened:
        print(f"{(after - before) / opened:.1f} KiB per idle connection")
    return 0 if opened == args.connections + args.nodes else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_memory", description=__doc__)
    p.add_argument("--connections", type=int, default=10000, help="idle sessions to open")
    p.add_argument("--nodes", type=int, default=0, help="idle registered nodes to add")
    p.add_argument("--processes", type=int, default=2, help="load generator processes")
    p.add_argument("--settle-s", type=float, default=2.0, help="wait before reading RSS")
    p.add_argument("--url", help="hub base URL ws://127.0.0.1:PORT (default: start one)")
    p.add_argument("--hub-pid", type=int, help="pid of the --url hub")
    p.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
