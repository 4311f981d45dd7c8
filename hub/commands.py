"""The ``hub`` commands besides ``serve``: ``node``, ``demo``, ``status``, ``token``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import secrets
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from .cliargs import (
    DEFAULT_HTTP_URL,
    DEFAULT_WS_URL,
    CLIError,
    Unreachable,
    csv_list,
    lang_pairs,
    positive_float,
    positive_int,
    service_time,
    start_hub,
)
from .config import Settings

__all__ = [
    "demo",
    "demo_parser",
    "node",
    "node_parser",
    "status",
    "status_parser",
    "token",
    "token_parser",
]

logger = logging.getLogger("hub.cli")


# hub node


def node_parser(sub: Any) -> None:
    p = sub.add_parser(
        "node",
        help="run a demo worker: answers every job with upper-cased text after a delay",
    )
    p.add_argument(
        "--url",
        type=csv_list,
        default=DEFAULT_WS_URL,
        help=f"the hub, or several hubs of one cell comma-separated: the node moves to "
        f"another when its hub goes away (default {DEFAULT_WS_URL})",
    )
    p.add_argument("--node-id", help="the node's id (default: node-<random>)")
    langs = p.add_mutually_exclusive_group()
    langs.add_argument(
        "--languages",
        type=csv_list,
        help="languages served, every ordered pair of them (default zh,en)",
    )
    langs.add_argument(
        "--lang-pairs", type=lang_pairs, help="language pairs served instead, e.g. zh:en,en:zh"
    )
    p.add_argument("--max-jobs", type=positive_int, default=4, help="jobs at once (default 4)")
    p.add_argument(
        "--service-time-ms",
        type=service_time,
        default="200",
        metavar="MS",
        help="time per job: 200, or a range 50..300 drawn uniformly (default 200)",
    )
    p.add_argument("--pools", type=csv_list, help="operator pools to join (default: default)")
    p.add_argument("--cell", help="the cell to join, one the hubs serve (default: the hub's)")
    p.add_argument(
        "--services", type=csv_list, default=["asr", "nmt", "tts"], help="default asr,nmt,tts"
    )
    p.add_argument("--token", help="sent as Authorization: Bearer <token>")
    p.add_argument("--log-level", default="WARNING", help="default WARNING")


async def node(args: argparse.Namespace) -> int:
    from .client import ConnectionRejected, NodeClient
    from .client.demo import demo_handler

    node_id = args.node_id or f"node-{secrets.token_hex(3)}"
    try:
        node = NodeClient(
            urls=args.url,
            node_id=node_id,
            languages=None if args.lang_pairs else (args.languages or ["zh", "en"]),
            lang_pairs=args.lang_pairs,
            services=args.services,
            max_jobs=args.max_jobs,
            pools=args.pools,
            cell=args.cell,
            token=args.token,
            handler=demo_handler(node_id, args.service_time_ms),
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with node:
        node.start()
        runner = asyncio.ensure_future(node.wait_closed())
        announcer = asyncio.ensure_future(_announce(node))
        signalled = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((runner, signalled), return_when=asyncio.FIRST_COMPLETED)
        finally:
            announcer.cancel()
            signalled.cancel()
        if runner.done():
            failure = runner.exception()
            if isinstance(failure, ConnectionRejected):
                raise Unreachable(str(failure))
            if failure is not None:
                raise failure
            return 0
        # First signal: finish the running jobs. A second one stops at once.
        print(f"node {node_id}: draining (signal again to stop now)", flush=True)
        stop.clear()
        signalled = asyncio.ensure_future(stop.wait())
        drained = asyncio.ensure_future(node.drain(timeout_s=60))
        await asyncio.wait((drained, signalled), return_when=asyncio.FIRST_COMPLETED)
        signalled.cancel()
        drained.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await drained
        runner.cancel()
    return 0


async def _announce(node: Any) -> None:
    await node.wait_registered(timeout_s=None)
    print(
        f"node {node.node_id} registered with hub {node.hub_id} at {node.url} "
        f"({node.max_jobs} slots)",
        flush=True,
    )


# hub demo

_DEMO_NODES: tuple[tuple[str, list[str]], ...] = (
    ("gpu-1", ["zh", "en"]),
    ("gpu-2", ["en", "ja"]),
    ("gpu-3", ["zh", "en", "ja"]),
)
_DEMO_JOBS: tuple[tuple[str, str, str, bool], ...] = (
    ("zh", "en", "ni hao, shi jie", False),
    ("en", "zh", "good morning", False),
    ("en", "ja", "where is the station?", False),
    ("ja", "en", "arigatou gozaimasu", False),
    ("zh", "en", "this one carries one second of audio", True),
    ("en", "ja", "see you tomorrow", False),
)


def demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="start a hub, 3 demo nodes and a session in-process, send a few jobs"
    )
    p.add_argument(
        "--service-time-ms",
        type=service_time,
        default="100..300",
        metavar="MS",
        help="demo nodes' time per job (default 100..300)",
    )
    p.add_argument("--log-level", default="WARNING", help="default WARNING")


def tone(seconds: float = 1.0, hz: float = 440.0, rate: int = 16000) -> bytes:
    """A sine tone as 16-bit little-endian PCM, mono (the browser demo's fallback too)."""
    frames = int(seconds * rate)
    return b"".join(
        int(12000 * math.sin(2 * math.pi * hz * i / rate)).to_bytes(2, "little", signed=True)
        for i in range(frames)
    )


async def demo(args: argparse.Namespace) -> int:
    from .app import Hub
    from .client import JobRefused, JobResult, NodeClient, SessionClient
    from .client.demo import demo_handler
    from .embedded import EmbeddedRedis

    data_dir = tempfile.mkdtemp(prefix="hub-demo-")
    embedded = EmbeddedRedis(data_dir, appendonly=False)
    try:
        embedded.start()
        settings = Settings(port=0, shutdown_grace_s=1.0, hub_id="demo")
        hub = Hub(settings, embedded.url)
        try:
            await start_hub(hub, settings)
            await hub.wait_ready(10)
            url = f"ws://127.0.0.1:{hub.port}"
            print(f"hub demo: hub {hub.hub_id} on {url}, embedded Redis in {data_dir}")
            nodes = [
                NodeClient(
                    url,
                    node_id=node_id,
                    languages=languages,
                    max_jobs=2,
                    handler=demo_handler(node_id, args.service_time_ms, seed=n),
                )
                for n, (node_id, languages) in enumerate(_DEMO_NODES)
            ]
            for node in nodes:
                node.start()
            for node in nodes:
                await node.wait_registered(10)
            print(
                "hub demo: nodes "
                + ", ".join(f"{n} ({'/'.join(langs)})" for n, langs in _DEMO_NODES)
            )
            async with SessionClient(url) as session:
                print(f"hub demo: session {session.session_id} sends {len(_DEMO_JOBS)} jobs")

                async def one(src: str, tgt: str, text: str, with_audio: bool) -> str:
                    started = time.monotonic()
                    partials: list[str] = []
                    audio = tone() if with_audio else None
                    result: JobResult = await session.submit(
                        src,
                        tgt,
                        {"text": text},
                        audio=audio,
                        on_partial=lambda p: partials.append(str(p.result.get("text"))),
                    )
                    ms = (time.monotonic() - started) * 1000
                    what = f"{src}->{tgt} {text!r}" + (
                        f" + {len(audio)} bytes audio" if audio else ""
                    )
                    if not result.ok:
                        return f"  {what}: failed on {result.node_id}: {result.error}"
                    out = result.result or {}
                    extra = f", audio_bytes={out.get('audio_bytes')}" if audio else ""
                    return (
                        f"  {what}\n      -> {out.get('text')!r}{extra} "
                        f"[node {result.node_id}, {ms:.0f} ms, {len(partials)} partials]"
                    )

                lines = await asyncio.gather(*(one(*job) for job in _DEMO_JOBS))
                for line in lines:
                    print(line)
                try:
                    await session.submit("fr", "de", {"text": "bonjour"})
                except JobRefused as exc:
                    print(f"  fr->de 'bonjour'\n      -> refused: {exc}")
            for node in nodes:
                await node.drain(timeout_s=5)
            for node in nodes:
                await node.close()
            print("hub demo: done; shutting down")
        finally:
            await hub.close()
    finally:
        embedded.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


# hub status


def status_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="print the nodes, queues and counters a hub sees")
    p.add_argument("--url", default=DEFAULT_HTTP_URL, help=f"the hub (default {DEFAULT_HTTP_URL})")
    p.add_argument("--once", action="store_true", help="one sample: no jobs per second")
    p.add_argument("--json", action="store_true", help="print /v1/status as JSON")
    p.add_argument("--timeout-s", type=positive_float, default=5.0, help="HTTP timeout (default 5)")


def _status_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise CLIError(f"--url must be http://host:port, got {url!r}")
    return urlunsplit((scheme, parts.netloc, "/v1/status", "", ""))


def _fetch_status(url: str, timeout_s: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:200].decode(errors="replace").strip()
        raise Unreachable(f"{url} answered {exc.code}: {detail or exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach {url}: {reason}") from exc
    try:
        status = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Unreachable(f"{url} did not answer JSON: is it a hub?") from exc
    if not isinstance(status, dict):
        raise Unreachable(f"{url} did not answer a JSON object: is it a hub?")
    return status


async def status(args: argparse.Namespace) -> int:
    url = _status_url(args.url)
    first = await asyncio.to_thread(_fetch_status, url, args.timeout_s)
    rate = "n/a (--once)"
    status = first
    if args.json:
        print(orjson.dumps(first, option=orjson.OPT_INDENT_2).decode())
        return 0
    if not args.once:
        started = time.monotonic()
        await asyncio.sleep(1.0)
        status = await asyncio.to_thread(_fetch_status, url, args.timeout_s)
        elapsed = time.monotonic() - started
        done = _ended(status) - _ended(first)
        rate = f"{done / elapsed:.1f} (finished + failed over {elapsed:.1f} s)"
    print(_render_status(status, rate))
    return 0


def _ended(status: dict[str, Any]) -> int:
    counters = status.get("counters") or {}
    return int(counters.get("finished", 0)) + int(counters.get("failed", 0))


def _render_status(status: dict[str, Any], rate: str) -> str:
    conns = status.get("connections") or {}
    lines = [
        f"hub {status.get('hub_id')} ({'ready' if status.get('ready') else 'NOT READY'}): "
        f"{conns.get('nodes', 0)} nodes and {conns.get('sessions', 0)} sessions connected here",
        "",
    ]
    header = ("NODE", "HUB", "RUNNING", "LOAD", "POOLS", "PAIRS", "STATE")
    rows: list[tuple[str, ...]] = []
    for node in sorted(status.get("nodes") or [], key=lambda n: str(n.get("node_id"))):
        running, max_jobs = int(node.get("running", 0)), int(node.get("max_jobs", 0))
        load = f"{100 * running / max_jobs:.0f}%" if max_jobs else "-"
        rows.append(
            (
                str(node.get("node_id")),
                str(node.get("hub_id")),
                f"{running}/{max_jobs}",
                load,
                ",".join(str(p) for p in node.get("pools") or []) or "-",
                str(len(node.get("lang_pairs") or [])),
                str(node.get("state") or "-"),
            )
        )
    if rows:
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    else:
        lines.append("no nodes")
    queues = status.get("queues") or {}
    lines.append("")
    lines.append(
        "queues: "
        + (", ".join(f"{pair} {depth}" for pair, depth in sorted(queues.items())) or "empty")
    )
    counters = status.get("counters") or {}
    lines.append(
        "counters: " + (", ".join(f"{k} {v}" for k, v in sorted(counters.items())) or "none")
    )
    lines.append(f"jobs/s: {rate}")
    return "\n".join(lines)


# hub token


def token_parser(sub: Any) -> None:
    p = sub.add_parser(
        "token",
        help="mint a development token: a session JWT, with --node-ids a node token, "
        "with --admin an admin token (the dashboard)",
    )
    p.add_argument(
        "--key",
        help="HS256 key (default: HUB_SESSION_JWT_KEY, or HUB_NODE_TOKEN_KEY with --node-ids, "
        "or HUB_ADMIN_TOKEN_KEY with --admin)",
    )
    sid = p.add_mutually_exclusive_group()
    sid.add_argument("--session-id", help="the session id, claim 'sid' (default: random)")
    sid.add_argument(
        "--no-session-id",
        action="store_true",
        help="no 'sid' claim: each connection gets a session id of its own "
        "(one token for many sessions, e.g. hub bench)",
    )
    p.add_argument(
        "--pairs", type=lang_pairs, help="allowed language pairs, claim 'pairs', e.g. zh:en,en:zh"
    )
    p.add_argument("--rate", type=float, help="jobs per second, claim 'rate'")
    p.add_argument(
        "--max-inflight", type=positive_int, help="unfinished jobs, claim 'max_inflight'"
    )
    p.add_argument(
        "--node-ids",
        type=csv_list,
        help="mint a node token for these ids instead (a trailing * is a prefix), e.g. gpu-*",
    )
    p.add_argument("--cell", help="the cell the session or node joins, claim 'cell'")
    p.add_argument(
        "--admin",
        action="store_true",
        help="mint an admin token instead: /dashboard and /v1/watch (signed with admin_token_key)",
    )
    p.add_argument(
        "--ttl", type=positive_int, default=3600, help="seconds until it expires (default 3600)"
    )


def token(args: argparse.Namespace) -> int:
    from .auth import mint_admin_token, mint_node_token, mint_session_token

    env = Settings.from_env()
    session_only = [
        flag
        for flag, value in (
            ("--session-id", args.session_id),
            ("--no-session-id", args.no_session_id),
            ("--pairs", args.pairs),
            ("--rate", args.rate),
            ("--max-inflight", args.max_inflight),
        )
        if value
    ]
    if args.admin:
        # Claims it would drop: a token that silently lacks them misleads.
        other = ["--node-ids"] * bool(args.node_ids) + session_only + ["--cell"] * bool(args.cell)
        if other:
            raise CLIError(
                f"hub token --admin takes no {', '.join(other)}: an admin token has no other claim"
            )
        key = args.key or env.get("admin_token_key")
        if not key:
            raise CLIError("hub token --admin needs --key (or HUB_ADMIN_TOKEN_KEY)")
        print(mint_admin_token(key, ttl_s=args.ttl))
        return 0
    if args.node_ids:
        if session_only:
            raise CLIError(
                f"hub token --node-ids takes no {', '.join(session_only)}: those are session claims"
            )
        key = args.key or env.get("node_token_key")
        if not key:
            raise CLIError("hub token --node-ids needs --key (or HUB_NODE_TOKEN_KEY)")
        print(mint_node_token(key, args.node_ids, ttl_s=args.ttl, cell=args.cell))
        return 0
    key = args.key or env.get("session_jwt_key")
    if not key:
        raise CLIError("hub token needs --key (or HUB_SESSION_JWT_KEY)")
    print(
        mint_session_token(
            key,
            session_id=None
            if args.no_session_id
            else args.session_id or f"s-{secrets.token_hex(6)}",
            pairs=[f"{s}:{t}" for s, t in args.pairs] if args.pairs else None,
            rate=args.rate,
            max_inflight=args.max_inflight,
            cell=args.cell,
            ttl_s=args.ttl,
        )
    )
    return 0
