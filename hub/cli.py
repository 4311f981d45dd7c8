"""Command line: ``hub serve | node | demo | status | token``.

Every command turns bad input into a one-line error (``hub: error: …``) and
a non-zero exit status, never a traceback: 2 for usage and configuration
errors, 1 when something it needs cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import orjson

from .config import ConfigError, RedisDSN, Settings
from .errors import HubError

__all__ = ["main"]

logger = logging.getLogger("hub.cli")

DEFAULT_WS_URL = "ws://127.0.0.1:8765"
DEFAULT_HTTP_URL = "http://127.0.0.1:8765"


class CLIError(Exception):
    """A one-line error for the user; exit status 2."""


class Unreachable(Exception):
    """Something the command needs cannot be reached; exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``hub: error: …`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("hub").strip()
        where = f" {command}" if command else ""
        self.exit(2, f"hub: error: {message} (see hub{where} --help)\n")


# hub serve


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run a hub (starts its own Redis when no URL is given)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8765; 0 picks a free one)")
    p.add_argument("--redis-url", help="redis://, rediss:// or unix:// (default: embedded)")
    p.add_argument("--data-dir", help="embedded Redis data directory (default ./.hub-data)")
    p.add_argument("--config", help="TOML file with settings (a [hub] table or top level)")
    p.add_argument("--hub-id", help="this hub's id (default: random)")
    p.add_argument("--cell", help="scheduling cell (Redis hash tag)")
    p.add_argument("--tls-cert", help="PEM certificate: serve wss:// directly")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow open mode (no auth) on a non-loopback address",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument(
        "--redis-wait-s",
        type=_non_negative_float,
        default=10.0,
        metavar="SECONDS",
        help="at start, wait this long for Redis to answer, else exit with an error; "
        "0 starts at once and keeps retrying (not ready on /readyz meanwhile). Default 10",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other setting, e.g. --set queue_wait_ms=500 (repeatable)",
    )


def _settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {}
    for name in (
        "host",
        "port",
        "redis_url",
        "data_dir",
        "hub_id",
        "cell",
        "tls_cert",
        "tls_key",
        "insecure",
        "log_level",
    ):
        value = getattr(args, name, None)
        if value is not None:
            flags[name] = value
    for item in getattr(args, "set", []):
        name, sep, value = item.partition("=")
        if not sep:
            raise CLIError(f"--set expects NAME=VALUE, got {item!r}")
        flags[name.strip()] = value
    return Settings.load(flags=flags, config_file=getattr(args, "config", None))


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # One line per connection from websockets is noise at INFO.
    logging.getLogger("websockets").setLevel(logging.WARNING)


def _use_uvloop() -> bool:
    try:
        import uvloop
    except ImportError:
        return False
    uvloop.install()
    return True


async def _serve(settings: Settings, redis_wait_s: float) -> None:
    from .server import Hub, check_exposure

    check_exposure(settings)
    _check_port(settings)
    embedded = None
    redis_url = settings.redis_url
    if redis_url is None:
        from .embedded import EmbeddedRedis

        embedded = EmbeddedRedis(settings.data_dir)
        embedded.start()
        redis_url = embedded.url
    try:
        hub = Hub(settings, redis_url)
        stop = asyncio.Event()
        hub.install_signal_handlers(stop)
        try:
            await _start_hub(hub, settings)
            where = (
                f"embedded Redis at {redis_url}"
                if embedded
                else RedisDSN.parse(redis_url).redacted()
            )
            if redis_wait_s > 0:
                try:
                    await hub.wait_ready(redis_wait_s)
                except TimeoutError:
                    raise Unreachable(
                        f"cannot reach Redis at {where} within {redis_wait_s:g} s "
                        f"(--redis-wait-s 0 starts anyway and keeps retrying)"
                    ) from None
            scheme = "wss" if settings.tls_cert else "ws"
            web = "https" if settings.tls_cert else "http"
            base = f"{settings.host}:{hub.port}"
            waiting = "" if hub.ready else " (not reachable yet: retrying)"
            print(
                f"hub {hub.hub_id} ready: nodes {scheme}://{base}/v1/node, sessions "
                f"{scheme}://{base}/v1/session, status {web}://{base}/v1/status, "
                f"demo {web}://{base}/demo; redis: {where}{waiting}",
                flush=True,
            )
            await stop.wait()
        finally:
            await hub.close()
    finally:
        if embedded is not None:
            embedded.stop()


def _check_port(settings: Settings) -> None:
    """Fail before starting anything when the port is taken (the usual mistake)."""
    if settings.port == 0:
        return
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CLIError(f"cannot listen on {settings.host}: {exc.strerror or exc}") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As asyncio's create_server does: a port in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CLIError(
                    f"port {settings.port} on {settings.host} is already in use"
                ) from exc
            raise CLIError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from exc


async def _start_hub(hub: Any, settings: Settings) -> None:
    try:
        await hub.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CLIError(f"port {settings.port} on {settings.host} is already in use") from exc
        raise CLIError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc


# hub node


def _node_parser(sub: Any) -> None:
    p = sub.add_parser(
        "node",
        help="run a demo worker: answers every job with upper-cased text after a delay",
    )
    p.add_argument("--url", default=DEFAULT_WS_URL, help=f"the hub (default {DEFAULT_WS_URL})")
    p.add_argument("--node-id", help="the node's id (default: node-<random>)")
    langs = p.add_mutually_exclusive_group()
    langs.add_argument(
        "--languages",
        type=_csv,
        help="languages served, every ordered pair of them (default zh,en)",
    )
    langs.add_argument(
        "--lang-pairs", type=_pairs, help="language pairs served instead, e.g. zh:en,en:zh"
    )
    p.add_argument("--max-jobs", type=_positive_int, default=4, help="jobs at once (default 4)")
    p.add_argument(
        "--service-time-ms",
        type=_service_time,
        default="200",
        metavar="MS",
        help="time per job: 200, or a range 50..300 drawn uniformly (default 200)",
    )
    p.add_argument("--pools", type=_csv, help="operator pools to join (default: default)")
    p.add_argument(
        "--services", type=_csv, default=["asr", "nmt", "tts"], help="default asr,nmt,tts"
    )
    p.add_argument("--token", help="sent as Authorization: Bearer <token>")
    p.add_argument("--log-level", default="WARNING", help="default WARNING")


async def _node(args: argparse.Namespace) -> int:
    from .client import ConnectionRejected, NodeClient
    from .client.demo import demo_handler

    node_id = args.node_id or f"node-{secrets.token_hex(3)}"
    try:
        node = NodeClient(
            args.url,
            node_id=node_id,
            languages=None if args.lang_pairs else (args.languages or ["zh", "en"]),
            lang_pairs=args.lang_pairs,
            services=args.services,
            max_jobs=args.max_jobs,
            pools=args.pools,
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


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="start a hub, 3 demo nodes and a session in-process, send a few jobs"
    )
    p.add_argument(
        "--service-time-ms",
        type=_service_time,
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


async def _demo(args: argparse.Namespace) -> int:
    from .client import JobRefused, JobResult, NodeClient, SessionClient
    from .client.demo import demo_handler
    from .embedded import EmbeddedRedis
    from .server import Hub

    data_dir = tempfile.mkdtemp(prefix="hub-demo-")
    embedded = EmbeddedRedis(data_dir, appendonly=False)
    try:
        embedded.start()
        settings = Settings(port=0, shutdown_grace_s=1.0, hub_id="demo")
        hub = Hub(settings, embedded.url)
        try:
            await _start_hub(hub, settings)
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


def _status_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="print the nodes, queues and counters a hub sees")
    p.add_argument("--url", default=DEFAULT_HTTP_URL, help=f"the hub (default {DEFAULT_HTTP_URL})")
    p.add_argument("--once", action="store_true", help="one sample: no jobs per second")
    p.add_argument("--json", action="store_true", help="print /v1/status as JSON")
    p.add_argument(
        "--timeout-s", type=_positive_float, default=5.0, help="HTTP timeout (default 5)"
    )


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


async def _status(args: argparse.Namespace) -> int:
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
        + (", ".join(f"{pool} {depth}" for pool, depth in sorted(queues.items())) or "empty")
    )
    counters = status.get("counters") or {}
    lines.append(
        "counters: " + (", ".join(f"{k} {v}" for k, v in sorted(counters.items())) or "none")
    )
    lines.append(f"jobs/s: {rate}")
    return "\n".join(lines)


# hub token


def _token_parser(sub: Any) -> None:
    p = sub.add_parser(
        "token",
        help="mint a development token: a session JWT, or with --node-ids a node token",
    )
    p.add_argument(
        "--key",
        help="HS256 key (default: HUB_SESSION_JWT_KEY, or HUB_NODE_TOKEN_KEY with --node-ids)",
    )
    p.add_argument("--session-id", help="the session id, claim 'sid' (default: random)")
    p.add_argument(
        "--pairs", type=_pairs, help="allowed language pairs, claim 'pairs', e.g. zh:en,en:zh"
    )
    p.add_argument("--rate", type=float, help="jobs per second, claim 'rate'")
    p.add_argument(
        "--max-inflight", type=_positive_int, help="unfinished jobs, claim 'max_inflight'"
    )
    p.add_argument(
        "--node-ids",
        type=_csv,
        help="mint a node token for these ids instead (a trailing * is a prefix), e.g. gpu-*",
    )
    p.add_argument(
        "--ttl", type=_positive_int, default=3600, help="seconds until it expires (default 3600)"
    )


def _token(args: argparse.Namespace) -> int:
    from .auth import mint_node_token, mint_session_token

    env = Settings.from_env()
    if args.node_ids:
        key = args.key or env.get("node_token_key")
        if not key:
            raise CLIError("hub token --node-ids needs --key (or HUB_NODE_TOKEN_KEY)")
        print(mint_node_token(key, args.node_ids, ttl_s=args.ttl))
        return 0
    key = args.key or env.get("session_jwt_key")
    if not key:
        raise CLIError("hub token needs --key (or HUB_SESSION_JWT_KEY)")
    print(
        mint_session_token(
            key,
            session_id=args.session_id or f"s-{secrets.token_hex(6)}",
            pairs=[f"{s}:{t}" for s, t in args.pairs] if args.pairs else None,
            rate=args.rate,
            max_inflight=args.max_inflight,
            ttl_s=args.ttl,
        )
    )
    return 0


# Argument types: each raises ArgumentTypeError with a one-line reason.


def _csv(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in _csv(text):
        src, sep, tgt = item.partition(":")
        if not sep or not src or not tgt:
            raise argparse.ArgumentTypeError(f"expected src:tgt pairs like zh:en, got {item!r}")
        pairs.append((src, tgt))
    return pairs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive number, got 0")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _service_time(text: str) -> Any:
    from .client.demo import ServiceTime

    try:
        return ServiceTime.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# Entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hub", description="lockless-hub: real-time job hub")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _node_parser(sub)
    _demo_parser(sub)
    _status_parser(sub)
    _token_parser(sub)
    return parser


def _run(coro: Coroutine[Any, Any, int]) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(coro)
    return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hub`` console script."""
    args = build_parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": _main_serve,
        "node": lambda a: _with_logging(a, lambda: _run(_node(a))),
        "demo": lambda a: _with_logging(a, lambda: _run(_demo(a))),
        "status": lambda a: _run(_status(a)),
        "token": _token,
    }
    try:
        return commands[args.command](args)
    except (CLIError, ConfigError) as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        return 2
    except (Unreachable, HubError) as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        return 1


def _main_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_logging(settings.log_level)
    _use_uvloop()
    return _run(_serve_and_exit(settings, args.redis_wait_s))


async def _serve_and_exit(settings: Settings, redis_wait_s: float) -> int:
    await _serve(settings, redis_wait_s)
    return 0


def _with_logging(args: argparse.Namespace, run: Callable[[], int]) -> int:
    _configure_logging(args.log_level)
    return run()


if __name__ == "__main__":
    sys.exit(main())
