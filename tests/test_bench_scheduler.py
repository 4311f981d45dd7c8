"""loadtest/bench_scheduler.py runs end to end at a tiny size (a smoke test, not a speed test)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import redis as sync_redis

from loadtest.procs import RedisProcess


def _load_bench() -> ModuleType:
    # loadtest/ is not part of the installed package: import it from the
    # checkout, whatever the current directory and sys.path.
    path = Path(__file__).resolve().parents[1] / "loadtest" / "bench_scheduler.py"
    spec = importlib.util.spec_from_file_location("loadtest_bench_scheduler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

LINE = re.compile(
    r"^nodes=(\d+) pipelined=(\d+) pairs/s one-at-a-time=(\d+) pairs/s "
    r"\(p50 [\d.]+ ms p99 [\d.]+ ms\) "
    r"baseline\(return 1\) pipelined=(\d+) calls/s one-at-a-time=(\d+) calls/s "
    r"-> pipelined pairs are (\d+)% of baseline$"
)

SHAPED = re.compile(
    r"^# baseline\(return 1 sent with a pair's KEYS and ARGV\) pipelined=(\d+) pairs/s"
)


def bench_keys(redis_server: RedisProcess) -> list[bytes]:
    client = sync_redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    try:
        return list(client.scan_iter(match="hub:v1:{bench-*", count=1000))
    finally:
        client.close()


async def test_bench_prints_one_line_per_size_then_the_cost_ratio(
    redis_server: RedisProcess,
) -> None:
    lines: list[str] = []

    results = await bench.run(
        redis_server.url, [5, 50], seconds=0.2, rounds=2, warmup_s=0.05, out=lines.append
    )

    assert lines[0].startswith("# ")
    assert lines[1].startswith("# registered 5 nodes")
    assert lines[2].startswith("# registered 50 nodes")
    table = lines[3:]
    assert len(table) == 4
    for size, line in zip([5, 50], table[:2], strict=True):
        match = LINE.match(line)
        assert match, line
        assert int(match[1]) == size
        assert all(int(rate) > 0 for rate in match.groups()[1:5])
    match = SHAPED.match(table[2])
    assert match, table[2]
    assert int(match[1]) > 0
    match = re.fullmatch(r"cost ratio 50/5: (\d+\.\d\d)", table[3])
    assert match, table[3]
    assert float(match[1]) > 0
    # The rounds behind the medians, and the same figures as printed.
    assert len(results.pipelined[5]) == len(results.baseline_pipelined) == 2
    assert len(results.baseline_shaped) == 2
    assert f"{results.cost_ratio():.2f}" == match[1]
    assert bench_keys(redis_server) == []


async def test_bench_refuses_a_concurrency_that_would_queue_jobs(
    redis_server: RedisProcess,
) -> None:
    with pytest.raises(ValueError, match="would queue"):
        await bench.run(redis_server.url, [2], concurrency=64, max_jobs=16, out=print)


def test_bench_command_line(redis_server: RedisProcess, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--redis-url", redis_server.url, "--sizes", "3", "--seconds", "0.1", "--rounds", "1"]
    argv += ["--concurrency", "4", "--max-jobs", "2", "--no-uvloop"]

    assert bench.main(argv) == 0

    out = capsys.readouterr().out.splitlines()
    assert LINE.match(out[-3]), out
    assert SHAPED.match(out[-2]), out
    assert out[-1] == "cost ratio 3/3: 1.00"
    assert bench_keys(redis_server) == []
