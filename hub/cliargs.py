"""What every ``hub`` command shares: errors, the parser, argument types, logging."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import math
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn

from .config import Settings

__all__ = [
    "DEFAULT_HTTP_URL",
    "DEFAULT_WS_URL",
    "CLIError",
    "Parser",
    "Unreachable",
    "configure_logging",
    "csv_list",
    "lang_pairs",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "ready_line",
    "run_command",
    "service_time",
    "start_hub",
]


DEFAULT_WS_URL = "ws://127.0.0.1:8765"
DEFAULT_HTTP_URL = "http://127.0.0.1:8765"


class CLIError(Exception):
    """A one-line error for the user; exit status 2."""


class Unreachable(Exception):
    """Something the command needs cannot be reached; exit status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``hub: error: …`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("hub").strip()
        where = f" {command}" if command else ""
        self.exit(2, f"hub: error: {message} (see hub{where} --help)\n")


def configure_logging(level: str) -> None:
    """Log to stderr at ``level``; websockets only from WARNING."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # One line per connection from websockets is noise at INFO.
    logging.getLogger("websockets").setLevel(logging.WARNING)


def run_command(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine; Ctrl-C exits with 130 and no traceback."""
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(coro)
    return 130


# Argument types: each raises ArgumentTypeError with a one-line reason.


def csv_list(text: str) -> list[str]:
    """Argument type: a comma-separated list."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def lang_pairs(text: str) -> list[tuple[str, str]]:
    """Argument type: ``src:tgt`` pairs, comma-separated."""
    pairs = []
    for item in csv_list(text):
        src, sep, tgt = item.partition(":")
        if not sep or not src or not tgt:
            raise argparse.ArgumentTypeError(f"expected src:tgt pairs like zh:en, got {item!r}")
        pairs.append((src, tgt))
    return pairs


def positive_int(text: str) -> int:
    """Argument type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """Argument type: a finite number above 0."""
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive number, got 0")
    return value


def non_negative_float(text: str) -> float:
    """Argument type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def service_time(text: str) -> Any:
    """Argument type: a service time, ``200`` or ``50..300`` (ms)."""
    from .client.demo import ServiceTime

    try:
        return ServiceTime.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ready_line(
    hub_id: str,
    settings: Settings,
    port: int,
    redis: str,
    reachable: bool,
    workers: Sequence[str] = (),
) -> str:
    """The line ``hub serve`` prints once it listens (tools parse it: keep its shape).

    Args:
        hub_id: the hub's id (the supervisor's, with ``--workers``).
        settings: where it listens, and whether with TLS.
        port: the port it listens on.
        redis: where its Redis is, for people (a redacted URL).
        reachable: whether Redis answered.
        workers: the workers' ids, with ``--workers``.
    """
    scheme = "wss" if settings.tls_cert else "ws"
    web = "https" if settings.tls_cert else "http"
    base = f"{settings.host}:{port}"
    waiting = "" if reachable else " (not reachable yet: retrying)"
    ids = f", workers {len(workers)} ({', '.join(workers)})" if workers else ""
    return (
        f"hub {hub_id} ready: nodes {scheme}://{base}/v1/node, sessions "
        f"{scheme}://{base}/v1/session, status {web}://{base}/v1/status, "
        f"demo {web}://{base}/demo, dashboard {web}://{base}/dashboard{ids}; "
        f"redis: {redis}{waiting}"
    )


async def start_hub(hub: Any, settings: Settings) -> None:
    """Start ``hub``; a port in use or a bad address is a one-line :class:`CLIError`."""
    try:
        await hub.start()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise CLIError(f"port {settings.port} on {settings.host} is already in use") from exc
        raise CLIError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc
