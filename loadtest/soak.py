"""Soak run: the chaos run's load and faults for an hour, watching memory and keys.

Usage::

    python -m loadtest --scenario soak [--duration 3600] [--sessions 100]
        [--cycle-s 180] [--sample-every-s 10] [--seed N] [--out DIR]

It is :mod:`loadtest.chaos` (three hubs, twenty node processes, sessions
given every hub's URL, the same ledger and checks) with two changes:

- **Faults repeat in a fixed cycle** of ``--cycle-s`` seconds, each kind at
  the same offset in every cycle (see :func:`cycle_faults`): a node kill at
  10 %, the last hub killed at 30 % (the other hubs never are, so their
  memory is watched for the whole run), Redis stopped and restarted from its
  append-only file at 55 %, Redis SIGKILLed with its last second of writes
  cut from that file at 70 %, another node kill at 85 %.
- **Every** ``--sample-every-s`` **seconds** it records each hub's RSS,
  Redis's ``used_memory_rss`` and ``used_memory``, and the key count
  (``DBSIZE``), and judges them at the end (:func:`judge`): over the second
  half of the run, the least-squares line fitted with one intercept per
  phase of the chaos cycle must grow by less than ``max(5 % of the mean,
  floor)``. Comparing each sample only with samples taken at the same point
  of the cycle keeps the faults' own bumps (a restarted hub's fresh heap,
  Redis's RSS after reloading its file, the key count after a kill) out of
  the trend.

To keep the run's own memory bounded over an hour, jobs that ended more than
``check_after_s`` ago are checked every ``check_every_s`` (outcome, result,
Redis record, runs on the nodes) and dropped from the ledger
(:meth:`ChaosRun.check_ended_jobs`); the report adds them up.

It writes ``samples.jsonl`` as it goes, then ``chaos.json``, ``soak.json``
and ``soak.html`` (charts of the samples with their fitted trends) in
``--out``, and exits 0 only when the ledger is clean and nothing grows (1
otherwise, 2 when the run could not start).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import html
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors

from .chaos import ChaosConfig, ChaosRun, format_report
from .procs import HubProcess, rss_kb
from .report import PAGE_STYLE, _line_chart

__all__ = ["SoakConfig", "SoakRun", "cycle_faults", "fit_slope", "judge", "main", "run_soak"]

CYCLE_FAULTS: tuple[tuple[float, str], ...] = (
    (0.10, "node"),
    (0.30, "hub"),
    (0.55, "redis"),
    (0.70, "redis-kill"),
    (0.85, "node"),
)
"""(fraction of the cycle, fault kind): the faults of one chaos cycle."""


@dataclasses.dataclass
class SoakConfig(ChaosConfig):
    """The chaos run's settings, soak defaults, and what the soak adds."""

    duration_s: float = 3600.0
    sessions: int = 100
    audio_bytes: int = 16000
    cycle_s: float = 180.0
    """Period of the chaos cycle; a multiple of ``sample_every_s``."""
    sample_every_s: float = 10.0
    check_every_s: float = 30.0
    """How often ended jobs are checked and dropped from the ledger."""
    check_after_s: float = 30.0
    """How long after its end a job is checked (late duplicates still show)."""
    growth_limit: float = 0.05
    """Largest growth allowed over the second half, as a fraction of its mean."""
    floors: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"rss_kb": 4096.0, "used_kb": 2048.0, "keys": 100.0}
    )
    """Growth always allowed, by unit: noise of a few MiB of heap and of 100 keys."""


def cycle_faults(duration_s: float, cycle_s: float, last_fault_s: float) -> list[tuple[float, str]]:
    """When each fault of a soak happens, in seconds from the start of the load.

    Args:
        duration_s: length of the load.
        cycle_s: period of the cycle.
        last_fault_s: no fault starts later (every process is back before the load ends).
    """
    events = []
    start = 0.0
    while start < duration_s:
        events += [(start + f * cycle_s, kind) for f, kind in CYCLE_FAULTS]
        start += cycle_s
    return [e for e in events if e[0] <= last_fault_s]


def fit_slope(points: Sequence[tuple[float, int, float]]) -> float | None:
    """Least-squares slope of ``y = slope * t + offset[phase]`` (one offset per phase).

    Each sample is compared only with samples of the same phase of the
    chaos cycle, so a bump that every cycle repeats at the same point does
    not tilt the line.

    Args:
        points: (t, phase, y) samples.

    Returns:
        The slope (units of y per unit of t), or ``None`` when no phase has
        two samples at different times.
    """
    by_phase: dict[int, list[tuple[float, float]]] = {}
    for t, phase, y in points:
        by_phase.setdefault(phase, []).append((t, y))
    num = den = 0.0
    for group in by_phase.values():
        if len(group) < 2:
            continue
        mt = sum(t for t, _ in group) / len(group)
        my = sum(y for _, y in group) / len(group)
        num += sum((t - mt) * (y - my) for t, y in group)
        den += sum((t - mt) ** 2 for t, _ in group)
    return num / den if den > 0 else None


SERIES_UNITS = {"hub": "rss_kb", "redis_rss_kb": "rss_kb", "redis_used_kb": "used_kb"}


def _unit(name: str) -> str:
    if name == "redis_keys":
        return "keys"
    return SERIES_UNITS.get(name.split(":", 1)[0], "rss_kb")


def judge(
    samples: Sequence[dict[str, Any]],
    *,
    duration_s: float,
    growth_limit: float = 0.05,
    floors: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Whether any sampled series grows over the second half of the run.

    Args:
        samples: ``{"t": s, "phase": n, "values": {series: value or None}}``.
        duration_s: length of the load (the second half starts at half of it).
        growth_limit: fraction of the second half's mean the fitted line may grow by.
        floors: growth always allowed, per unit (``rss_kb``, ``used_kb``, ``keys``).

    Returns:
        Per series: first and last value of the run, mean, slope per hour
        and growth over the second half, the limit, and ``ok``; plus
        ``ok`` for all of them. A series with too few samples to fit is not
        ok (the run was too short, or the sampling failed).
    """
    floors = floors or SoakConfig().floors
    half = duration_s / 2
    names = sorted({name for s in samples for name in s["values"]})
    series: dict[str, Any] = {}
    for name in names:
        every = [(s["t"], s["phase"], s["values"][name]) for s in samples]
        present = [(t, p, float(v)) for t, p, v in every if v is not None]
        second = [(t, p, v) for t, p, v in present if t >= half]
        slope = fit_slope(second)
        mean = sum(v for _, _, v in second) / len(second) if second else None
        growth = None if slope is None else slope * (duration_s - half)
        limit = None if mean is None else max(growth_limit * mean, floors[_unit(name)])
        series[name] = {
            "first": present[0][2] if present else None,
            "last": present[-1][2] if present else None,
            "second_half_mean": None if mean is None else round(mean, 1),
            "slope_per_hour": None if slope is None else round(slope * 3600, 1),
            "growth_second_half": None if growth is None else round(growth, 1),
            "limit": None if limit is None else round(limit, 1),
            "samples_second_half": len(second),
            "ok": growth is not None and limit is not None and growth <= limit,
        }
    return {
        "rule": f"fitted growth over the second half <= max({growth_limit:.0%} of its mean, "
        f"floor {floors})",
        "series": series,
        "ok": bool(series) and all(s["ok"] for s in series.values()),
    }


class SoakRun(ChaosRun):
    """One soak run: see the module docstring."""

    config: SoakConfig

    def __init__(self, config: SoakConfig) -> None:
        steps = config.cycle_s / config.sample_every_s
        if config.sample_every_s <= 0 or abs(steps - round(steps)) > 1e-9:
            raise ValueError("cycle_s must be a whole multiple of sample_every_s")
        super().__init__(config)
        self.samples: list[dict[str, Any]] = []
        self.jobs_checked = 0
        self._checker_task: asyncio.Task[None] | None = None

    def schedule(self) -> list[tuple[float, str]]:
        c = self.config
        last = c.duration_s - max(c.hub_down_s, c.node_down_s, c.redis_down_s) - 3
        return cycle_faults(c.duration_s, c.cycle_s, last)

    def _hub_to_kill(self, live: list[HubProcess]) -> HubProcess:
        # Always the last hub: the others live through the whole run, so a
        # leak in a hub shows in their RSS; the killed one restarts at the
        # same point of every cycle, so its samples stay comparable by phase.
        last = self.hubs[-1]
        return last if last in live else live[-1]

    async def _sample(self) -> dict[str, Any]:
        assert self.redis is not None
        values: dict[str, Any] = {
            f"hub:{h.hub_id}": rss_kb(h.pid) if h.alive else None for h in self.hubs
        }
        try:
            async with asyncio.timeout(2):
                pipe = self.redis.pipeline(transaction=False)
                pipe.info("memory")
                pipe.dbsize()
                memory, keys = await pipe.execute()
            values["redis_rss_kb"] = int(memory["used_memory_rss"]) // 1024
            values["redis_used_kb"] = int(memory["used_memory"]) // 1024
            values["redis_keys"] = int(keys)
        except (redis_errors.RedisError, OSError, TimeoutError):
            # Redis is down (a fault): no sample of it this time.
            values.update(redis_rss_kb=None, redis_used_kb=None, redis_keys=None)
        return values

    async def _sampler(self, begin: float) -> None:
        c = self.config
        steps = round(c.cycle_s / c.sample_every_s)
        k = 0
        while self._load_on:
            await asyncio.sleep(max(0.0, begin + k * c.sample_every_s - time.monotonic()))
            if not self._load_on:
                break
            t = time.monotonic() - begin
            values = await self._sample()
            sample = {"t": round(t, 2), "phase": k % steps, "values": values}
            self.samples.append(sample)
            if self.out_dir is not None:
                # As they come: a run stopped early still leaves its samples.
                with (self.out_dir / "samples.jsonl").open("a") as f:
                    f.write(json.dumps(sample) + "\n")
            k += 1

    async def _checker(self) -> None:
        c = self.config
        while True:
            await asyncio.sleep(c.check_every_s)
            try:
                self.jobs_checked += await self.check_ended_jobs(time.time() - c.check_after_s)
            except (redis_errors.RedisError, OSError) as exc:
                self.log(f"checking ended jobs failed, will retry: {exc!r}")

    async def run(self) -> dict[str, Any]:
        # The sampler starts with the load, as the chaos schedule does.
        begin = time.monotonic()
        self._load_on = True
        sampler = self._spawn(self._sampler(begin))
        checker = self._spawn(self._checker())
        self._checker_task = checker
        try:
            report = await super().run()
        finally:
            sampler.cancel()
            checker.cancel()
        verdict = judge(
            self.samples,
            duration_s=self.config.duration_s,
            growth_limit=self.config.growth_limit,
            floors=self.config.floors,
        )
        report["soak"] = {
            "cycle_s": self.config.cycle_s,
            "sample_every_s": self.config.sample_every_s,
            "jobs_checked_during_the_run": self.jobs_checked,
            "growth": verdict,
            "samples": self.samples,
        }
        report["ok"] = bool(report["clean"] and verdict["ok"])
        if self.out_dir is not None:
            (self.out_dir / "soak.json").write_text(json.dumps(report, indent=1, default=str))
            (self.out_dir / "soak.html").write_text(render_html(report), encoding="utf-8")
        return report

    async def _settle_and_audit(self) -> dict[str, Any]:
        # No check of ended jobs may run while the final report reads the ledger.
        if self._checker_task is not None:
            self._checker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker_task
        return await super()._settle_and_audit()


async def run_soak(config: SoakConfig) -> dict[str, Any]:
    """Run the soak and return its report (``report["ok"]`` is the verdict)."""
    run = SoakRun(config)
    try:
        await run.start()
        return await run.run()
    finally:
        await run.close()


def format_soak(report: dict[str, Any]) -> str:
    """The chaos tally, then each series' start, end and trend."""
    growth = report["soak"]["growth"]
    lines = [
        format_report(report),
        f"soak: {'OK' if report['ok'] else 'FAILED'}; growth rule: {growth['rule']}",
    ]
    for name, s in growth["series"].items():
        lines.append(
            f"  {name:<16} first {s['first']}, last {s['last']}, second-half mean "
            f"{s['second_half_mean']}, slope {s['slope_per_hour']}/h, growth "
            f"{s['growth_second_half']} (limit {s['limit']}, n={s['samples_second_half']}) "
            + ("ok" if s["ok"] else "GROWS")
        )
    return "\n".join(lines)


def _trend(samples: list[dict[str, Any]], name: str, s: dict[str, Any], half: float, end: float,
           scale: float) -> list[tuple[float, float]]:  # fmt: skip
    if s["slope_per_hour"] is None or s["second_half_mean"] is None:
        return []
    ts = [p["t"] for p in samples if p["t"] >= half and p["values"].get(name) is not None]
    mid = sum(ts) / len(ts)
    slope = s["slope_per_hour"] / 3600
    y = s["second_half_mean"]
    return [(t, (y + slope * (t - mid)) / scale) for t in (half, end)]


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: the tally, and each sampled series with its fitted trend."""
    soak = report["soak"]
    samples = soak["samples"]
    growth = soak["growth"]["series"]
    end = samples[-1]["t"] if samples else 1.0
    half = end / 2

    def points(name: str, scale: float) -> list[tuple[float, float]]:
        return [(p["t"], p["values"][name] / scale) for p in samples if p["values"].get(name)]

    def chart(title: str, names: list[str], scale: float, unit: str) -> str:
        series: list[tuple[str, list[tuple[float, float]]]] = []
        for name in names:
            series.append((name, points(name, scale)))
            series.append((f"{name} trend", _trend(samples, name, growth[name], half, end, scale)))
        return _line_chart(title, series, "seconds since the load started", unit)

    hubs = [n for n in growth if n.startswith("hub:")]
    rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{s['first']}</td><td>{s['last']}</td>"
        f"<td>{s['second_half_mean']}</td><td>{s['growth_second_half']}</td>"
        f"<td>{s['limit']}</td><td>{'ok' if s['ok'] else 'GROWS'}</td></tr>"
        for name, s in growth.items()
    )
    status = "ok" if report["ok"] else "bad"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lockless-hub soak</title>
{PAGE_STYLE}</head><body>
<h1>Soak: {"OK" if report["ok"] else "FAILED"}</h1>
<p class="{status}">{html.escape(soak["growth"]["rule"])}</p>
<table><tr><th>series</th><th>first</th><th>last</th><th>second-half mean</th>
<th>fitted growth, second half</th><th>limit</th><th></th></tr>{rows}</table>
{chart("Hub RSS", hubs, 1024, "MiB")}
{chart("Redis memory", ["redis_rss_kb", "redis_used_kb"], 1024, "MiB")}
{chart("Redis keys (DBSIZE)", ["redis_keys"], 1, "keys")}
<pre>{html.escape(format_soak(report))}</pre>
</body></html>
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest --scenario soak",
        description="Steady load with a cycle of faults for a long time; fail on growth.",
    )
    d = SoakConfig()
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds of load")
    p.add_argument("--hubs", type=int, default=d.hubs, help="hub processes (default 3)")
    p.add_argument("--nodes", type=int, default=d.nodes, help="node processes (default 20)")
    p.add_argument("--sessions", type=int, default=d.sessions, help="sessions (default 100)")
    p.add_argument("--audio-bytes", type=int, default=d.audio_bytes, help="audio per job")
    p.add_argument("--cycle-s", type=float, default=d.cycle_s, help="chaos cycle (default 180)")
    p.add_argument("--sample-every-s", type=float, default=d.sample_every_s, help="default 10")
    p.add_argument("--seed", type=int, default=None, help="seed of the sessions and node picks")
    p.add_argument(
        "--hub-set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra hub setting (repeatable), e.g. job_ttl_ms=30000",
    )
    p.add_argument("--out", type=Path, default=None, help="logs and reports (default: temp)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if ns.hubs < 2:
        print("soak: error: --hubs must be at least 2 (one stays up)", file=sys.stderr)
        return 2
    settings: dict[str, Any] = {}
    for item in ns.hub_set:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"soak: error: --hub-set expects NAME=VALUE, got {item!r}", file=sys.stderr)
            return 2
        settings[name.strip()] = value
    try:
        config = SoakConfig(
            duration_s=ns.duration,
            hubs=ns.hubs,
            nodes=ns.nodes,
            sessions=ns.sessions,
            audio_bytes=ns.audio_bytes,
            cycle_s=ns.cycle_s,
            sample_every_s=ns.sample_every_s,
            seed=ns.seed,
            hub_settings=settings,
            out_dir=ns.out,
        )
        report = asyncio.run(run_soak(config))
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"soak: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, default=str) if ns.json else format_soak(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
