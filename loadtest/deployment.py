"""What a deployment says about itself, when the harness did not start it.

``hub bench --url`` cannot read the deployment's Redis or its processes'
CPU. A hub's ``/v1/status`` is the one view it may have of the other side:
the cell's counters, its nodes and its queues. The harness reads it from
the first hub once every connection is open, just before the load, and
again after the drain, before closing; the report gives what changed (the
cell's counters, which count every client's jobs, not only the bench's),
the nodes in the bench's pool and the others, and the queues left. A
deployment that does not expose ``/v1/status`` (a load balancer that passes
only WebSockets) gives a note instead: the client-side report is complete
without it.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

__all__ = [
    "MAX_STATUS_BYTES",
    "STATUS_TIMEOUT_S",
    "describe",
    "read_status",
    "status_url",
    "summarize",
]

STATUS_TIMEOUT_S = 5.0
"""Most time for one read of ``/v1/status``."""

MAX_STATUS_BYTES = 32 * 1024 * 1024
"""Largest status page read (a fleet of 10,000 nodes is a few MB)."""


def status_url(hub_url: str) -> str:
    """``/v1/status`` of the hub at ``ws://`` or ``wss://`` ``hub_url`` (path prefix kept)."""
    parts = urlsplit(hub_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/v1/status", "", ""))


async def read_status(url: str, tls: ssl.SSLContext | None) -> dict[str, Any] | str:
    """The status page at ``url``, or a one-line reason why there is none.

    Runs in a thread (urllib blocks), bounded by :data:`STATUS_TIMEOUT_S`.
    """
    try:
        return await asyncio.to_thread(_fetch, url, tls)
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        return f"cannot reach {url}: {getattr(exc, 'reason', exc)}"
    except ValueError as exc:
        return f"{url}: {exc}"


def summarize(
    before: dict[str, Any] | str, after: dict[str, Any] | str, *, url: str, pool: str
) -> dict[str, Any]:
    """What the report keeps of two status pages (or the reason they are missing)."""
    for page in (before, after):
        if isinstance(page, str):
            return {"status_url": url, "unavailable": page}
    assert isinstance(before, dict) and isinstance(after, dict)
    start = _numbers(before.get("counters"))
    end = _numbers(after.get("counters"))
    nodes_at_start = _nodes(before)
    nodes_at_end = _nodes(after)
    return {
        "status_url": url,
        "counters_during_run": {k: end[k] - start.get(k, 0) for k in sorted(end)},
        "nodes_at_start": _census(nodes_at_start, pool),
        "nodes_at_end": _census(nodes_at_end, pool),
        "queues_at_end": _numbers(after.get("queues")),
    }


def describe(summary: dict[str, Any]) -> str:
    """One line of text for the report's table."""
    if "unavailable" in summary:
        return f"deployment: no status ({summary['unavailable']})"
    counters = ", ".join(f"{k} +{v:,}" for k, v in summary["counters_during_run"].items() if v)
    start, end = summary["nodes_at_start"], summary["nodes_at_end"]
    queues = sum(summary["queues_at_end"].values())
    return (
        f"deployment ({summary['status_url']}): nodes of the fleet {start['fleet']} at the "
        f"start, {end['fleet']} at the end; of the bench {start['bench']}, {end['bench']}; "
        f"jobs queued at the end {queues:,}; cell counters during the run: {counters or 'none'}"
    )


# Private functions


def _fetch(url: str, tls: ssl.SSLContext | None) -> dict[str, Any]:
    context = tls if url.startswith("https:") else None
    with urllib.request.urlopen(url, timeout=STATUS_TIMEOUT_S, context=context) as response:
        body = response.read(MAX_STATUS_BYTES + 1)
    if len(body) > MAX_STATUS_BYTES:
        raise ValueError(f"larger than {MAX_STATUS_BYTES:,} bytes")
    try:
        page = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError("not JSON: is it a hub?") from exc
    if not isinstance(page, dict):
        raise ValueError("not a JSON object: is it a hub?")
    return page


def _numbers(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)}


def _nodes(page: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = page.get("nodes")
    return [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []


def _census(nodes: list[dict[str, Any]], pool: str) -> dict[str, int]:
    """Nodes in the bench's pool, and the others."""
    bench = sum(1 for n in nodes if pool in (n.get("pools") or ()))
    return {"bench": bench, "fleet": len(nodes) - bench}
