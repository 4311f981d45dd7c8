"""What a refusal costs the hub, next to what a dispatched job costs.

Usage::

    python -m loadtest.bench_refusal [--jobs 20000] [--inflight 32]
        [--audio-bytes 16000] [--rounds 3] [--no-uvloop]

Starts one hub (and an embedded Redis) per phase, the way ``python -m
loadtest`` does, with one session and one instant node in this process:

- **dispatch**: every job runs (``dispatch_task``, the job frame to the
  node, its result, ``complete_task``, the result frame);
- **refusal**: the same job frames to a hub whose audio budget
  (``audio_budget_bytes=1000``) cannot take any of them, so each is refused
  ``OVERLOADED`` at once, with no Redis call: the path a shedding hub takes.

Both phases keep ``--inflight`` jobs in flight and read the hub's CPU time
over ``--jobs`` jobs after a warm-up. Phases alternate for ``--rounds``;
prints each round and the medians, with their ratio (the issue's bound: a
refusal costs less than a tenth of a dispatch).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import orjson

from hub.protocol import join_binary, split_binary

from . import wsclient
from .hubs import Fleet
from .procs import cpu_seconds

__all__ = ["main"]

_WARMUP = 1000


async def phase(refuse: bool, args: argparse.Namespace) -> float:
    """Hub CPU microseconds per job in one phase."""
    logs = tempfile.mkdtemp(prefix="lt-refusal-")
    settings = {"audio_budget_bytes": "1000"} if refuse else {}
    fleet = Fleet(1, Path(logs), settings=settings, uvloop=args.uvloop)
    try:
        await fleet.start()
        return await measure(fleet.hubs[0].url, fleet.hubs[0].pid, args)
    finally:
        await fleet.stop()
        shutil.rmtree(logs, ignore_errors=True)


async def measure(url: str, hub_pid: int, args: argparse.Namespace) -> float:
    loop = asyncio.get_running_loop()
    node: wsclient.Connection | None = None
    registered: asyncio.Future[None] = loop.create_future()

    def node_message(binary: bool, data: bytes) -> None:
        frame = orjson.loads(split_binary(data)[0] if binary else data)
        if frame["type"] == "registered":
            registered.set_result(None)
        elif frame["type"] == "job":
            assert node is not None
            node.send_text(
                orjson.dumps(
                    {
                        "type": "result",
                        "job_id": frame["job_id"],
                        "attempt": frame["attempt"],
                        "status": "finished",
                        "result": None,
                    }
                )
            )

    node = await wsclient.connect(url + "/v1/node", node_message, lambda code: None)
    node.send_text(
        orjson.dumps(
            {
                "type": "register",
                "node_id": "bench-node",
                "services": ["asr"],
                "lang_pairs": [["en", "zh"]],
                "max_jobs": 2 * args.inflight,
            }
        )
    )
    await asyncio.wait_for(registered, 10)

    total = _WARMUP + args.jobs
    sent = answered = 0
    cpu_start = 0.0
    done: asyncio.Future[None] = loop.create_future()
    welcomed: asyncio.Future[None] = loop.create_future()
    audio = bytes(args.audio_bytes)
    session: wsclient.Connection | None = None

    def send_one() -> None:
        nonlocal sent
        assert session is not None
        header = orjson.dumps({"type": "job", "ref": str(sent), "src_lang": "en", "tgt_lang": "zh"})
        session.send_binary(join_binary(header, audio))
        sent += 1

    def session_message(binary: bool, data: bytes) -> None:
        nonlocal answered, cpu_start
        kind = orjson.loads(data)["type"]
        if kind == "welcome":
            welcomed.set_result(None)
        elif kind in ("result", "error"):
            answered += 1
            if answered == _WARMUP:
                cpu_start = cpu_seconds(hub_pid)
            if answered == total:
                done.set_result(None)
            elif sent < total:
                send_one()

    session = await wsclient.connect(url + "/v1/session", session_message, lambda code: None)
    await asyncio.wait_for(welcomed, 10)
    for _ in range(args.inflight):
        send_one()
    await asyncio.wait_for(done, 300)
    used = cpu_seconds(hub_pid) - cpu_start
    session.close()
    node.close()
    await asyncio.sleep(0.1)
    return 1e6 * used / args.jobs


async def run(args: argparse.Namespace) -> None:
    costs: dict[str, list[float]] = {"dispatch": [], "refusal": []}
    for i in range(args.rounds):
        for name in ("dispatch", "refusal"):
            cost = await phase(name == "refusal", args)
            costs[name].append(cost)
            print(f"round {i + 1}: {name:8} {cost:7.1f} us/job of hub CPU", flush=True)
    dispatch = statistics.median(costs["dispatch"])
    refusal = statistics.median(costs["refusal"])
    print(
        f"median: dispatch {dispatch:.1f} us/job, refusal {refusal:.1f} us/job, "
        f"ratio {refusal / dispatch:.3f} (audio {args.audio_bytes} B, {args.inflight} in flight)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench_refusal", description=__doc__)
    p.add_argument("--jobs", type=int, default=20000)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--audio-bytes", type=int, default=16000)
    p.add_argument("--rounds", type=int, default=3)
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
