"""Command line: ``hub serve | node | demo | status | token | bench``.

Every command turns bad input into a one-line error (``hub: error: …``) and
a non-zero exit status, never a traceback: 2 for usage and configuration
errors, 1 when something it needs cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import commands
from .cliargs import (
    CLIError,
    Parser,
    Unreachable,
    configure_logging,
    non_negative_float,
    ready_line,
    run_command,
    start_hub,
)
from .config import ConfigError, RedisDSN, Settings
from .errors import HubError

__all__ = ["main"]

logger = logging.getLogger("hub.cli")

# hub serve


_GC_YOUNG = 5_000
"""Allocations between two collections of the young generation (default 700)."""


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run a hub (starts its own Redis when no URL is given)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8765; 0 picks a free one)")
    p.add_argument("--redis-url", help="redis://, rediss:// or unix:// (default: embedded)")
    p.add_argument("--data-dir", help="embedded Redis data directory (default ./.hub-data)")
    p.add_argument("--config", help="TOML file with settings (a [hub] table or top level)")
    p.add_argument("--hub-id", help="this hub's id (default: random)")
    p.add_argument("--cell", help="scheduling cell (Redis hash tag): the hub's default cell")
    p.add_argument(
        "--cells",
        metavar="A,B,...",
        help="every cell this hub serves, comma-separated (--cell included); nodes and "
        "sessions join one by register/token/?cell= (default: --cell only)",
    )
    p.add_argument(
        "--spill",
        type=int,
        metavar="K",
        help="a job whose cell has no free node for its pair tries up to K other cells "
        "served here before it queues (default 0)",
    )
    p.add_argument(
        "--workers",
        metavar="N",
        help="hub processes on the port (SO_REUSEPORT), each with its own id <hub-id>-w<k>, "
        "under a supervisor that restarts them: a number, or auto for one per CPU (default 1)",
    )
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        default=None,
        help="--redis-url is a seed node of a Redis Cluster (the cell's slot's master "
        "is found from it)",
    )
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
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop (installed by default on Linux and macOS), asyncio's "
        "own, or auto: uvloop when it is installed (default)",
    )
    p.add_argument(
        "--redis-wait-s",
        type=non_negative_float,
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
        "workers",
        "cell",
        "cells",
        "spill",
        "redis_cluster",
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


def _tune_gc() -> None:
    """Fewer, shorter garbage collections in a long-lived server process.

    Thousands of connections are thousands of long-lived objects: with the
    default thresholds the collector runs often and a full collection
    stalls the loop for a noticeable time. Objects alive at startup are
    frozen out of the collections, the young generation is larger, and the
    middle one is collected every 5 young collections, so that it never
    holds more than some 25,000 objects: 20 (with a young generation of
    20,000) let it hold a whole ramp of new connections, and collecting
    them stalled a loaded hub for a quarter of a second.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_YOUNG, 5, 100)


def _use_loop(choice: str) -> str:
    """Install the event loop ``--loop`` asks for; returns the one used.

    Raises:
        CLIError: uvloop was asked for and is not installed.
    """
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise CLIError("--loop uvloop: uvloop is not installed") from None
        return "asyncio"
    uvloop.install()
    return "uvloop"


async def _serve(
    settings: Settings,
    redis_wait_s: float,
    *,
    siblings: tuple[str, ...] = (),
    group: str | None = None,
) -> None:
    from .app import Hub
    from .gate import check_exposure

    check_exposure(settings)
    _check_port(settings)
    embedded = None
    redis_url = settings.redis_url
    if redis_url is None and settings.redis_cluster:
        raise CLIError("--redis-cluster needs --redis-url (a seed node of the cluster)")
    if redis_url is None:
        from .embedded import EmbeddedRedis

        embedded = EmbeddedRedis(settings.data_dir)
        embedded.start()
        redis_url = embedded.url
    try:
        hub = Hub(settings, redis_url, siblings=siblings, group=group)
        stop = asyncio.Event()
        hub.install_signal_handlers(stop)
        try:
            await start_hub(hub, settings)
            _tune_gc()
            loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
            logging.getLogger("hub.cli").info("= event loop: %s", loop)
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
            print(ready_line(hub.hub_id, settings, hub.port, where, hub.ready), flush=True)
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
        if settings.reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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


# Entry point


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hub", description="lockless-hub: real-time job hub")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    commands.node_parser(sub)
    commands.demo_parser(sub)
    commands.status_parser(sub)
    commands.token_parser(sub)
    # Listed for --help; its options are the load harness's own (_bench).
    sub.add_parser(
        "bench",
        add_help=False,
        help="load-test a deployment (--url) or hubs it starts: simulated nodes and "
        "sessions, a JSON and HTML report (hub bench --help)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hub`` console script."""
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["bench"]:
        return _bench(raw[1:])
    args = build_parser().parse_args(raw)
    runners: dict[str, Callable[[argparse.Namespace], int]] = {
        "serve": _main_serve,
        "node": lambda a: _with_logging(a, lambda: run_command(commands.node(a))),
        "demo": lambda a: _with_logging(a, lambda: run_command(commands.demo(a))),
        "status": lambda a: run_command(commands.status(a)),
        "token": commands.token,
    }
    return _one_line_errors(lambda: runners[args.command](args))


def _one_line_errors(run: Callable[[], int]) -> int:
    """Run a command; its errors become ``hub: error: …`` and an exit status."""
    try:
        return run()
    except (CLIError, ConfigError) as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        return 2
    except (Unreachable, HubError) as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        return 1


def _main_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    configure_logging(settings.log_level)
    if settings.worker_count() > 1:
        from .gate import check_exposure
        from .supervisor import Supervisor

        check_exposure(settings)
        supervisor = Supervisor(settings, redis_wait_s=args.redis_wait_s, loop=args.loop)
        return run_command(supervisor.run())
    _use_loop(args.loop)
    return run_command(_serve_and_exit(settings, args.redis_wait_s))


async def _serve_and_exit(settings: Settings, redis_wait_s: float, **options: Any) -> int:
    await _serve(settings, redis_wait_s, **options)
    return 0


def _bench(argv: list[str]) -> int:
    """``hub bench``: the load harness (``python -m loadtest``), loaded only now.

    ``hub/`` never imports ``loadtest`` at import time (docs/architecture.md):
    a hub process does not load the harness.
    """
    try:
        from loadtest.__main__ import main as bench_main
    except ImportError as exc:
        print(f"hub: error: hub bench needs the loadtest package: {exc}", file=sys.stderr)
        return 2
    return int(bench_main(argv, prog="hub bench"))


def serve_worker(
    settings: Settings,
    *,
    loop: str,
    redis_wait_s: float,
    siblings: tuple[str, ...],
    group: str,
) -> int:
    """Run one worker of ``hub serve --workers`` (hub/worker.py) until SIGTERM.

    Returns:
        The exit status, as ``hub serve``'s; errors are one line on stderr.
    """

    def run() -> int:
        configure_logging(settings.log_level)
        _use_loop(loop)
        return run_command(_serve_and_exit(settings, redis_wait_s, siblings=siblings, group=group))

    return _one_line_errors(run)


def _with_logging(args: argparse.Namespace, run: Callable[[], int]) -> int:
    configure_logging(args.log_level)
    return run()


if __name__ == "__main__":
    sys.exit(main())
