"""The end of a run: numbers, a verdict, a text table, JSON and a self-contained HTML page.

:func:`build` turns the merged worker stats and the /proc readings into one
JSON-ready dict; :func:`table` prints it for a terminal; :func:`write`
saves ``report.json`` and ``report.html`` (inline SVG charts, no external
asset: it opens from a mail attachment or a CI artifact as it is).
"""

from __future__ import annotations

import html
import itertools
import json
import math
from pathlib import Path
from typing import Any

from hub.errors import Code

from .hdr import Histogram
from .stats import Stats

__all__ = ["EXPECTED", "build", "table", "write"]

# Errors a scenario expects (protocol.md §6): counted, not problems.
EXPECTED: dict[str, dict[str, frozenset[str]]] = {
    "steady": {"refused": frozenset(), "failed": frozenset()},
    "burst": {"refused": frozenset(), "failed": frozenset()},
    "overload": {
        "refused": frozenset({Code.QUEUE_FULL, Code.NO_AVAILABLE_NODE, Code.TOO_MANY_JOBS}),
        "failed": frozenset({Code.NO_AVAILABLE_NODE}),
    },
    "churn": {
        "refused": frozenset({Code.QUEUE_FULL, Code.NO_AVAILABLE_NODE}),
        "failed": frozenset({Code.NODE_LOST, Code.NO_AVAILABLE_NODE}),
    },
}

_NO_RESULT = "session: no result before the drain time ran out"
_LOST_ON_DROP = "session: jobs lost with a dropped connection"


def _ms(h: Histogram) -> dict[str, float]:
    return {k: round(v, 3) for k, v in h.summary(scale=1000).items()}


def _delta(before: float | None, after: float | None) -> float | None:
    if before is None or after is None:
        return None
    return round(after - before, 3)


def build(
    *,
    meta: dict[str, Any],
    plan: dict[str, Any],
    stats: Stats,
    samples: dict[str, Any],
    workers: list[dict[str, Any]],
    window_s: float,
    connections: list[int],
) -> dict[str, Any]:
    """Everything measured, as one JSON-ready dict.

    Args:
        samples: /proc readings ``baseline`` (before connecting),
            ``connected`` (every connection open, idle), ``go`` and ``end``
            (the load window), ``peak_rss_kb`` per hub; plus ``harness``
            CPU seconds at ``go`` and ``end``.
        workers: each worker's ``final`` message (minus its stats).
        window_s: seconds from the start of the load to the end of the drain.
        connections: connections opened on each hub.
    """
    c = stats.counters
    results = c["results"]
    answered_jobs = results + c["refused"]
    ncpu = meta.get("cpus") or 1

    # CPU over the load window.
    go, end = samples.get("go", {}), samples.get("end", {})
    hubs_cpu = [
        _delta(a.get("cpu_s"), b.get("cpu_s"))
        for a, b in zip(go.get("hubs", []), end.get("hubs", []), strict=False)
    ]
    hub_cpu = sum(x for x in hubs_cpu if x is not None) if any(hubs_cpu) else None
    redis_cpu = _delta(go.get("redis", {}).get("cpu_s"), end.get("redis", {}).get("cpu_s"))
    # A Redis Cluster: each master's CPU, and its part of the masters' total.
    masters_cpu = {
        port: _delta(a.get("cpu_s"), end.get("redis_masters", {}).get(port, {}).get("cpu_s"))
        for port, a in go.get("redis_masters", {}).items()
    }
    masters_total = sum(x for x in masters_cpu.values() if x is not None)
    if masters_cpu and redis_cpu is None:
        redis_cpu = round(masters_total, 3)
    masters_part = {
        port: round((x or 0.0) / masters_total, 3) if masters_total else None
        for port, x in masters_cpu.items()
    }
    harness_cpu = _delta(samples.get("harness_go"), samples.get("harness_end"))
    machine_cpu = _delta(go.get("machine_busy_s"), end.get("machine_busy_s"))
    other_cpu = (
        None
        if machine_cpu is None
        else round(
            max(0.0, machine_cpu - (hub_cpu or 0.0) - (redis_cpu or 0.0) - (harness_cpu or 0.0)),
            3,
        )
    )

    def per_job(cpu: float | None) -> float | None:
        return round(cpu * 1e6 / answered_jobs, 1) if cpu is not None and answered_jobs else None

    def share(cpu: float | None) -> float | None:
        return round(100 * cpu / (window_s * ncpu), 1) if cpu is not None and window_s else None

    # Memory.
    mem_hubs = []
    idle_per_conn = []
    peak_per_conn = []
    base_hubs = samples.get("baseline", {}).get("hubs", [])
    conn_hubs = samples.get("connected", {}).get("hubs", [])
    peaks = samples.get("peak_rss_kb", [])
    for i, base in enumerate(base_hubs):
        b = base.get("rss_kb")
        conn_kb = conn_hubs[i].get("rss_kb") if i < len(conn_hubs) else None
        peak = peaks[i] if i < len(peaks) else None
        n = connections[i] if i < len(connections) else 0
        entry = {"baseline_kb": b, "connected_kb": conn_kb, "peak_kb": peak, "connections": n}
        if b is not None and conn_kb is not None and n:
            entry["idle_kb_per_connection"] = round((conn_kb - b) / n, 2)
            idle_per_conn.append(entry["idle_kb_per_connection"])
        if b is not None and peak is not None and n:
            entry["peak_kb_per_connection"] = round((peak - b) / n, 2)
            peak_per_conn.append(entry["peak_kb_per_connection"])
        mem_hubs.append(entry)

    # Throughput: whole window, and the median of full seconds of load.
    duration = float(plan["duration_s"])
    seconds = sorted(stats.seconds.items())
    full = [s.ok for i, s in seconds if 1 <= i < int(duration) - 1]
    steady = sorted(full)[len(full) // 2] if full else None

    series = [
        {
            "t": i,
            "sent": s.sent,
            "ok": s.ok,
            "failed": s.failed,
            "refused": s.refused,
            "e2e_p50_ms": round(s.e2e.percentile(50) / 1000, 3),
            "e2e_p99_ms": round(s.e2e.percentile(99) / 1000, 3),
            "e2e_max_ms": round(s.e2e.max / 1000, 3),
            "accept_p99_ms": round(s.accept.percentile(99) / 1000, 3),
            "harness_lag_ms": round(s.lag_us / 1000, 1),
        }
        for i, s in seconds
    ]

    # CPU per interval between status samples, as % of one core.
    cpu_series = []
    raw = samples.get("cpu_series", [])
    for a, b in itertools.pairwise(raw):
        dt = b["t"] - a["t"]
        if dt <= 0:
            continue

        def pct(x: float | None, y: float | None, dt: float = dt) -> float | None:
            return None if x is None or y is None else round(100 * (y - x) / dt, 1)

        cpu_series.append(
            {
                "t": b["t"],
                "hubs_pct": sum(
                    p or 0.0
                    for p in (
                        pct(x, y) for x, y in zip(a["hubs_cpu_s"], b["hubs_cpu_s"], strict=False)
                    )
                ),
                "redis_pct": pct(a["redis_cpu_s"], b["redis_cpu_s"]),
                "harness_pct": pct(a["harness_cpu_s"], b["harness_cpu_s"]),
            }
        )

    # Verdict: correctness first, then errors the scenario does not expect.
    problems = [f"{n} x {name}" for name, n in sorted(stats.checks.items())]
    expected = EXPECTED.get(plan["scenario"], EXPECTED["steady"])
    for kind in ("refused", "failed"):
        for code, n in sorted(getattr(stats, kind).items()):
            if code not in expected[kind]:
                problems.append(f"{n} x {kind} {code}")
    for what, n in sorted(stats.disconnects.items()):
        problems.append(f"{n} x hub closed {what}")
    accounted = (
        results
        + c["refused"]
        + c["abandoned"]
        + stats.checks.get(_NO_RESULT, 0)
        + stats.checks.get(_LOST_ON_DROP, 0)
    )
    if accounted != c["sent"]:
        problems.append(
            f"accounting: {c['sent']} jobs sent but {accounted} answered, refused, "
            f"abandoned or missing"
        )
    if c["sent"] == 0:
        problems.append("no job was sent")

    return {
        "meta": meta,
        "plan": plan,
        "verdict": {"ok": not problems, "problems": problems},
        "jobs": dict(sorted(c.items())),
        "throughput": {
            "window_s": round(window_s, 3),
            "jobs_per_s": (
                round(sum(s.ok for i, s in seconds if i < duration) / duration, 1)
                if duration
                else None
            ),
            "steady_jobs_per_s": steady,
            "offered_jobs_per_s": meta.get("offered_per_s"),
            "capacity_jobs_per_s": meta.get("capacity_per_s"),
        },
        "latency_ms": {
            "accepted": _ms(stats.total("accept")),
            "answer": _ms(stats.hists["answer"]),
            "end_to_end": _ms(stats.total("e2e")),
            "end_to_end_minus_service": _ms(stats.hists["overhead"]),
            "connect": _ms(stats.hists["connect"]),
        },
        "errors": {
            "refused": dict(stats.refused),
            "failed": dict(stats.failed),
            "checks": dict(stats.checks),
            "node_errors": dict(stats.node_errors),
            "disconnects": dict(stats.disconnects),
        },
        "cpu": {
            "window_s": round(window_s, 3),
            "cpus": ncpu,
            "hubs_s": hubs_cpu,
            "hub_s": None if hub_cpu is None else round(hub_cpu, 3),
            "hub_us_per_job": per_job(hub_cpu),
            "redis_s": redis_cpu,
            "redis_us_per_job": per_job(redis_cpu),
            "redis_masters_s": masters_cpu,
            "redis_masters_part": masters_part,
            "harness_s": harness_cpu,
            "harness_us_per_job": per_job(harness_cpu),
            "other_s": other_cpu,
            "share_percent": {
                "hubs": share(hub_cpu),
                "redis": share(redis_cpu),
                "harness": share(harness_cpu),
                "other": share(other_cpu),
            },
            "loadavg_before": go.get("loadavg"),
            "loadavg_after": end.get("loadavg"),
            "workers": workers,
        },
        "memory": {
            "hubs": mem_hubs,
            "idle_kb_per_connection": (
                round(sum(idle_per_conn) / len(idle_per_conn), 2) if idle_per_conn else None
            ),
            "peak_kb_per_connection": (
                round(sum(peak_per_conn) / len(peak_per_conn), 2) if peak_per_conn else None
            ),
            "redis_kb": end.get("redis", {}).get("rss_kb"),
        },
        "timeseries": series,
        "cpu_timeseries": cpu_series,
        "histograms": {
            "end_to_end": stats.total("e2e").to_dict(),
            "accepted": stats.total("accept").to_dict(),
        },
    }


# Text


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return (f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}") + unit
    return f"{v:,}{unit}"


def table(report: dict[str, Any]) -> str:
    """The report as aligned text for a terminal."""
    lines = []
    p = report["plan"]
    m = report["meta"]
    lines.append(
        f"scenario {p['scenario']}: {p['sessions']} sessions, {p['nodes']} nodes x "
        f"{p['max_jobs']} slots, {m.get('hubs')} hub(s)"
        + (f" x {m['workers_per_hub']} workers" if (m.get("workers_per_hub") or 1) > 1 else "")
        + f" ({m.get('hub_loop')}), "
        f"{p['duration_s']:g} s, service {p['service_time']} ms, "
        + (
            f"1 job / {p['job_interval_ms']:g} ms / session"
            if p["job_interval_ms"]
            else f"closed loop, {p['inflight']} in flight / session"
        )
        + f", audio {p['audio_bytes']} B, {m.get('processes')} worker process(es)"
    )
    t = report["throughput"]
    j = report["jobs"]
    lines.append(
        f"throughput (finished jobs): {_fmt(t['jobs_per_s'])} jobs/s over the run, "
        f"{_fmt(t['steady_jobs_per_s'])} jobs/s median second"
        + (f" (offered {_fmt(t['offered_jobs_per_s'])}" if t["offered_jobs_per_s"] else "")
        + (f", capacity {_fmt(t['capacity_jobs_per_s'])})" if t["offered_jobs_per_s"] else "")
    )
    lines.append(
        f"jobs: sent {j.get('sent', 0):,}, ok {j.get('ok', 0):,}, failed {j.get('failed', 0):,}, "
        f"refused {j.get('refused', 0):,}, queued {j.get('queued', 0):,}, "
        f"re-dispatched {j.get('redispatched', 0):,}, abandoned {j.get('abandoned', 0):,}, "
        f"skipped ticks {j.get('skipped', 0):,}"
    )
    lines.append("")
    head = f"{'latency (ms)':<28}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'count':>10}"
    lines.append(head)
    lines.append("-" * len(head))
    names = {
        "answer": "time to accepted/queued",
        "accepted": "time to accepted",
        "end_to_end": "end to end",
        "end_to_end_minus_service": "end to end - service time",
    }
    for key, label in names.items():
        s = report["latency_ms"][key]
        lines.append(
            f"{label:<28}{s['p50']:>9.2f}{s['p90']:>9.2f}{s['p99']:>9.2f}"
            f"{s['p99.9']:>9.2f}{s['max']:>9.2f}{s['count']:>10,}"
        )
    lines.append("")
    cpu = report["cpu"]
    sh = cpu["share_percent"]
    lines.append(
        f"CPU over {cpu['window_s']:.1f} s ({cpu['cpus']} cores): "
        f"hubs {_fmt(cpu['hub_s'], ' s')} ({_fmt(sh['hubs'], '%')}, "
        f"{_fmt(cpu['hub_us_per_job'], ' us/job')}), "
        f"redis {_fmt(cpu['redis_s'], ' s')} ({_fmt(sh['redis'], '%')}, "
        f"{_fmt(cpu['redis_us_per_job'], ' us/job')}), "
        f"harness {_fmt(cpu['harness_s'], ' s')} ({_fmt(sh['harness'], '%')}, "
        f"{_fmt(cpu['harness_us_per_job'], ' us/job')}); "
        f"other processes {_fmt(cpu['other_s'], ' s')} ({_fmt(sh['other'], '%')}), "
        f"load average {cpu['loadavg_before']} -> {cpu['loadavg_after']}"
    )
    for port, part in (cpu.get("redis_masters_part") or {}).items():
        lines.append(
            f"cluster master :{port}: {_fmt(cpu['redis_masters_s'][port], ' s')} CPU, "
            f"{_fmt(None if part is None else round(part * 100, 1), '%')} of the masters' CPU"
        )
    mem = report["memory"]
    for i, h in enumerate(mem["hubs"]):
        lines.append(
            f"hub {i} RSS: {_fmt(h['baseline_kb'], ' KiB')} before connecting, "
            f"{_fmt(h['connected_kb'], ' KiB')} with {h['connections']:,} idle connections "
            f"({_fmt(h.get('idle_kb_per_connection'), ' KiB/conn')}), "
            f"peak {_fmt(h['peak_kb'], ' KiB')} "
            f"({_fmt(h.get('peak_kb_per_connection'), ' KiB/conn')})"
        )
    e = report["errors"]
    for kind in ("refused", "failed", "node_errors", "disconnects", "checks"):
        if e[kind]:
            items = ", ".join(f"{k} {v:,}" for k, v in sorted(e[kind].items()))
            lines.append(f"errors {kind}: {items}")
    v = report["verdict"]
    lines.append("")
    if v["ok"]:
        lines.append("verdict: OK (every job answered exactly once, no unexpected error)")
    else:
        lines.append("verdict: PROBLEMS")
        lines.extend(f"  - {p}" for p in v["problems"])
    return "\n".join(lines)


# HTML


def write(report: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` in ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


PAGE_STYLE = """<style>
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { text-align: left; background: #f4f4f4; }
pre { background: #f8f8f8; padding: 1em; white-space: pre-wrap; }
.ok { color: #186a18; font-weight: bold; } .bad { color: #a01010; font-weight: bold; }
</style>"""
"""The style sheet of every HTML report."""

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd")


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for step in (1, 2, 2.5, 5, 10):
        if v <= step * exp:
            return step * exp
    return 10 * exp  # pragma: no cover


def _line_chart(
    title: str,
    series: list[tuple[str, list[tuple[float, float]]]],
    x_label: str,
    y_label: str,
    width: int = 900,
    height: int = 280,
) -> str:
    left, right, top, bottom = 60, 150, 30, 40
    w, h = width - left - right, height - top - bottom
    xs = [x for _, pts in series for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, pts in series for _, y in pts] or [1.0]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y1 = _nice_max(max(ys))

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return top + h - min(y, y1) / y1 * h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
    ]
    for k in range(5):
        y = y1 * k / 4
        out.append(
            f'<line x1="{left}" x2="{left + w}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eee"/>'
            f'<text x="{left - 5}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>'
        )
    for k in range(6):
        x = x0 + (x1 - x0) * k / 5
        out.append(f'<text x="{px(x):.1f}" y="{top + h + 15}" text-anchor="middle">{x:.3g}</text>')
    out.append(
        f'<text x="{left + w / 2}" y="{height - 5}" text-anchor="middle">'
        f"{html.escape(x_label)}</text>"
        f'<text x="14" y="{top + h / 2}" transform="rotate(-90 14 {top + h / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>'
    )
    for n, (name, pts) in enumerate(series):
        color = _COLORS[n % len(_COLORS)]
        if pts:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
            out.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>'
            )
        ly = top + 12 + 16 * n
        out.append(
            f'<line x1="{left + w + 10}" x2="{left + w + 30}" y1="{ly}" y2="{ly}" '
            f'stroke="{color}" stroke-width="2"/>'
            f'<text x="{left + w + 35}" y="{ly + 4}">{html.escape(name)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _histogram_chart(title: str, h: Histogram, width: int = 900, height: int = 260) -> str:
    """Counts per log-spaced latency bin (milliseconds on a log axis)."""
    left, right, top, bottom = 60, 20, 30, 40
    w, ht = width - left - right, height - top - bottom
    if h.count == 0:
        return f"<p>{html.escape(title)}: no samples</p>"
    lo = max(h.min, 1)
    hi = max(h.max, lo + 1)
    l0, l1 = math.log10(lo), math.log10(hi) + 1e-9
    nbins = 60
    bins = [0] * nbins
    for low, high, n in h.buckets():
        mid = max((low + high) / 2, 1)
        k = int((math.log10(mid) - l0) / (l1 - l0) * nbins)
        bins[min(max(k, 0), nbins - 1)] += n
    top_count = max(bins) or 1
    bw = w / nbins
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{w}" height="{ht}" fill="none" stroke="#999"/>',
    ]
    for k, n in enumerate(bins):
        if n:
            bh = n / top_count * ht
            out.append(
                f'<rect x="{left + k * bw:.1f}" y="{top + ht - bh:.1f}" width="{bw - 1:.1f}" '
                f'height="{bh:.1f}" fill="{_COLORS[0]}"><title>{n:,}</title></rect>'
            )
    decade = math.floor(l0)
    while decade <= l1:
        for m in (1, 2, 5):
            v = m * 10**decade
            if lo <= v <= hi:
                x = left + (math.log10(v) - l0) / (l1 - l0) * w
                out.append(
                    f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + ht}" y2="{top + ht + 4}" '
                    f'stroke="#333"/><text x="{x:.1f}" y="{top + ht + 15}" '
                    f'text-anchor="middle">{v / 1000:g}</text>'
                )
        decade += 1
    for q, color in ((50, "#2ca02c"), (99, "#d62728"), (99.9, "#9467bd")):
        v = max(h.percentile(q), 1)
        x = left + (math.log10(v) - l0) / (l1 - l0) * w
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ht}" stroke="{color}" '
            f'stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{top + 12}" fill="{color}">'
            f"p{q:g}</text>"
        )
    out.append(
        f'<text x="{left + w / 2}" y="{height - 5}" text-anchor="middle">'
        f"milliseconds (log scale); bar height: jobs</text></svg>"
    )
    return "".join(out)


def _kv_table(rows: list[tuple[str, Any]]) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows
    )
    return f"<table>{cells}</table>"


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page: summary, tables, latency over time and histograms."""
    ts = report["timeseries"]
    lat_series = [
        ("end to end p50", [(p["t"], p["e2e_p50_ms"]) for p in ts]),
        ("end to end p99", [(p["t"], p["e2e_p99_ms"]) for p in ts]),
        ("accepted p99", [(p["t"], p["accept_p99_ms"]) for p in ts]),
    ]
    rate_series = [
        ("sent / s", [(p["t"], p["sent"]) for p in ts]),
        ("ok / s", [(p["t"], p["ok"]) for p in ts]),
        ("failed+refused / s", [(p["t"], p["failed"] + p["refused"]) for p in ts]),
    ]
    cpu_ts = report.get("cpu_timeseries", [])
    cpu_series = [
        ("hubs", [(p["t"], p["hubs_pct"]) for p in cpu_ts]),
        ("redis", [(p["t"], p["redis_pct"] or 0.0) for p in cpu_ts]),
        ("harness", [(p["t"], p["harness_pct"] or 0.0) for p in cpu_ts]),
        ("harness loop lag (ms)", [(p["t"], p["harness_lag_ms"]) for p in ts]),
    ]
    lat_rows = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td>{s[k]:.2f}</td>" for k in ("p50", "p90", "p99", "p99.9", "max"))
        + f"<td>{s['count']:,}</td></tr>"
        for name, s in report["latency_ms"].items()
    )
    cpu = report["cpu"]
    mem = report["memory"]
    v = report["verdict"]
    verdict = (
        '<p class="ok">OK: every job answered exactly once, no unexpected error.</p>'
        if v["ok"]
        else '<p class="bad">Problems:</p><ul>'
        + "".join(f"<li>{html.escape(p)}</li>" for p in v["problems"])
        + "</ul>"
    )
    errors = "".join(
        f"<h3>{html.escape(kind)}</h3>" + _kv_table(sorted(e.items()))
        for kind, e in report["errors"].items()
        if e
    )
    e2e = Histogram.from_dict(report["histograms"]["end_to_end"])
    acc = Histogram.from_dict(report["histograms"]["accepted"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>lockless-hub load test: {html.escape(report["plan"]["scenario"])}</title>
{PAGE_STYLE}</head><body>
<h1>Load test: {html.escape(report["plan"]["scenario"])}</h1>
<pre>{html.escape(table(report))}</pre>
{verdict}
<h2>Latency (ms)</h2>
<table><tr><th></th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th>
<th>count</th></tr>{lat_rows}</table>
{_line_chart("Latency over time", lat_series, "seconds since the load started", "ms")}
{_line_chart("Jobs per second", rate_series, "seconds since the load started", "jobs / s")}
{_line_chart("CPU (% of one core) and harness stalls", cpu_series, "seconds", "%")}
{_histogram_chart("End-to-end latency distribution", e2e)}
{_histogram_chart("Time to accepted distribution", acc)}
<h2>CPU</h2>
{
        _kv_table(
            [
                ("window (s)", cpu["window_s"]),
                ("hubs CPU (s)", cpu["hub_s"]),
                ("hub CPU per job (us)", cpu["hub_us_per_job"]),
                ("redis CPU (s)", cpu["redis_s"]),
                ("redis CPU per job (us)", cpu["redis_us_per_job"]),
                *(
                    (f"cluster master :{port}: CPU (s)", seconds)
                    for port, seconds in (cpu.get("redis_masters_s") or {}).items()
                ),
                *(
                    (f"cluster master :{port}: part of the masters' CPU", part)
                    for port, part in (cpu.get("redis_masters_part") or {}).items()
                ),
                ("harness CPU (s)", cpu["harness_s"]),
                ("harness CPU per job (us)", cpu["harness_us_per_job"]),
                ("share of the machine: hubs %", cpu["share_percent"]["hubs"]),
                ("share of the machine: redis %", cpu["share_percent"]["redis"]),
                ("share of the machine: harness %", cpu["share_percent"]["harness"]),
                ("share of the machine: other processes %", cpu["share_percent"]["other"]),
            ]
        )
    }
<h2>Memory</h2>
{
        _kv_table(
            [
                ("idle KiB per connection", mem["idle_kb_per_connection"]),
                ("peak KiB per connection", mem["peak_kb_per_connection"]),
                ("redis RSS (KiB)", mem["redis_kb"]),
            ]
        )
    }
<h2>Errors</h2>
{errors or "<p>none</p>"}
<h2>Run</h2>
<pre>{html.escape(json.dumps({"meta": report["meta"], "plan": report["plan"]}, indent=1))}</pre>
</body></html>
"""
