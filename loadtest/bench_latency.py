"""Light-load latency: one session, one job at a time, to one instant node.

Usage::

    python -m loadtest.bench_latency [--jobs 5000] [--warmup 500]
        [--audio-bytes 16000] [--url ws://127.0.0.1:PORT] [--no-uvloop]

With no ``--url`` it starts one hub (and an embedded Redis) the way
``python -m loadtest`` does. The session and the node live in this process,
on one event loop (uvloop when installed): the session sends a binary job,
the node answers as soon as the job arrives, the session sends the next job
when the result arrives. Prints p50/p90/p99/p99.9/max of the time to
``accepted`` and of the end-to-end time (job sent -> result received), and
the hub's CPU time per job. Like websockets' ``experiments/broadcast``: a
small script that prints its numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import orjson

from hub.protocol import join_binary, split_binary

from . import wsclient
from .hdr import Histogram
from .hubs import Fleet, machine_busy_s
from .procs import cpu_seconds

__all__ = ["main"]


async def run(args: argparse.Namespace) -> None:
    fleet = None
    url = args.url
    hub_pid = args.hub_pid
    logs = tempfile.mkdtemp(prefix="lt-bench-")
    try:
        if url is None:
            fleet = Fleet(1, Path(logs), uvloop=args.uvloop)
            await fleet.start()
            url = fleet.hubs[0].url
            hub_pid = fleet.hubs[0].pid
        await measure(url, hub_pid, args)
    finally:
        if fleet is not None:
            await fleet.stop()
        shutil.rmtree(logs, ignore_errors=True)


async def measure(url: str, hub_pid: int | None, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    node_conn: wsclient.Connection | None = None
    registered: asyncio.Future[None] = loop.create_future()

    def node_message(binary: bool, data: bytes) -> None:
        if binary:
            header, audio = split_binary(data)
            job = orjson.loads(header)
        else:
            job, audio = orjson.loads(data), b""
        if job["type"] == "registered":
            registered.set_result(None)
        elif job["type"] == "job":
            assert node_conn is not None
            node_conn.send_text(
                orjson.dumps(
                    {
                        "type": "result",
                        "job_id": job["job_id"],
                        "attempt": job["attempt"],
                        "status": "finished",
                        "result": {"echo": job["payload"], "audio_len": len(audio)},
                    }
                )
            )

    node_conn = await wsclient.connect(url + "/v1/node", node_message, lambda code: None)
    node_conn.send_text(
        orjson.dumps(
            {
                "type": "register",
                "node_id": "bench-node",
                "services": ["asr"],
                "lang_pairs": [["en", "zh"]],
                "max_jobs": 1,
            }
        )
    )
    await asyncio.wait_for(registered, 10)

    waiter: asyncio.Future[dict[str, object]] | None = None
    accepted_at = 0.0
    welcomed: asyncio.Future[None] = loop.create_future()

    def session_message(binary: bool, data: bytes) -> None:
        nonlocal accepted_at
        frame = orjson.loads(data)
        kind = frame["type"]
        if kind == "welcome":
            welcomed.set_result(None)
        elif kind == "accepted":
            accepted_at = time.perf_counter()
        elif kind in ("result", "error") and waiter is not None and not waiter.done():
            waiter.set_result(frame)

    session = await wsclient.connect(url + "/v1/session", session_message, lambda code: None)
    await asyncio.wait_for(welcomed, 10)

    audio_rest = bytes(max(0, args.audio_bytes - 8))
    e2e, accept = Histogram(), Histogram()
    errors = 0
    cpu_before = cpu_after = None
    busy_before = busy_after = None
    started = ended = 0.0
    for i in range(args.warmup + args.jobs):
        if i == args.warmup:
            cpu_before = cpu_seconds(hub_pid) if hub_pid else None
            busy_before = machine_busy_s()
            started = time.perf_counter()
        ref = str(i)
        header = orjson.dumps(
            {"type": "job", "ref": ref, "src_lang": "en", "tgt_lang": "zh", "payload": {"i": i}}
        )
        waiter = loop.create_future()
        sent = time.perf_counter()
        if args.audio_bytes:
            session.send_binary(join_binary(header, struct.pack(">Q", i) + audio_rest))
        else:
            session.send_text(header)
        frame = await asyncio.wait_for(waiter, 10)
        now = time.perf_counter()
        if frame["type"] != "result" or frame.get("status") != "finished" or frame["ref"] != ref:
            errors += 1
            continue
        if i >= args.warmup:
            e2e.record(int((now - sent) * 1e6))
            accept.record(int((accepted_at - sent) * 1e6))
    ended = time.perf_counter()
    cpu_after = cpu_seconds(hub_pid) if hub_pid else None
    busy_after = machine_busy_s()
    session.close()
    node_conn.close()
    await asyncio.sleep(0.1)

    print(
        f"{args.jobs} jobs one at a time, audio {args.audio_bytes} B, instant node, "
        f"hub on {'uvloop' if args.uvloop else 'asyncio'}, client on "
        f"{type(loop).__module__.split('.')[0]}; {errors} errors"
    )
    print(f"{'':18}{'p50':>8}{'p90':>8}{'p99':>8}{'p99.9':>8}{'max':>8}  (ms)")
    for name, h in (("time to accepted", accept), ("end to end", e2e)):
        print(
            f"{name:18}"
            + "".join(f"{h.percentile(q) / 1000:8.3f}" for q in (50, 90, 99, 99.9))
            + f"{h.max / 1000:8.3f}"
        )
    elapsed = ended - started
    line = f"{args.jobs / elapsed:,.0f} jobs/s"
    if cpu_before is not None and cpu_after is not None:
        line += f"; hub CPU {1e6 * (cpu_after - cpu_before) / args.jobs:.0f} us/job"
    if busy_before is not None and busy_after is not None:
        line += f"; whole machine busy {100 * (busy_after - busy_before) / elapsed:.0f}% of a core"
    print(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_latency", description=__doc__)
    p.add_argument("--jobs", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--audio-bytes", type=int, default=16000)
    p.add_argument("--url", help="hub base URL ws://127.0.0.1:PORT (default: start one)")
    p.add_argument("--hub-pid", type=int, help="pid of the --url hub, for its CPU time")
    p.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)

    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
