"""Command line: ``hub serve | node | demo | status | token``.

Every command turns bad input into a one-line error and a non-zero exit
status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .config import ConfigError, RedisDSN, Settings
from .errors import HubError

__all__ = ["main"]

logger = logging.getLogger("hub.cli")


class CLIError(Exception):
    """A one-line error for the user; exit status 2."""


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


async def _serve(settings: Settings) -> None:
    from .server import Hub, check_exposure

    check_exposure(settings)
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
            await hub.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CLIError(
                    f"port {settings.port} on {settings.host} is already in use"
                ) from exc
            raise CLIError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
            ) from exc
        scheme = "wss" if settings.tls_cert else "ws"
        web = "https" if settings.tls_cert else "http"
        base = f"{settings.host}:{hub.port}"
        where = (
            f"embedded Redis at {redis_url}" if embedded else RedisDSN.parse(redis_url).redacted()
        )
        print(
            f"hub {hub.hub_id} ready: nodes {scheme}://{base}/v1/node, sessions "
            f"{scheme}://{base}/v1/session, status {web}://{base}/v1/status, "
            f"demo {web}://{base}/demo; redis: {where}",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await hub.close()
    finally:
        if embedded is not None:
            embedded.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hub", description="lockless-hub: real-time job hub")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hub`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            settings = _settings(args)
            _configure_logging(settings.log_level)
            _use_uvloop()
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_serve(settings))
            return 0
        parser.error(f"unknown command {args.command}")
    except (CLIError, ConfigError, HubError) as exc:
        print(f"hub: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
