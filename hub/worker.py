"""One worker of ``hub serve --workers N``: ``python -m hub.worker``.

Started by :class:`hub.supervisor.Supervisor`, never by hand: it reads its
settings and options as one JSON object on its standard input (so that no
secret shows on a command line), then runs a hub as ``hub serve`` does,
with ``SO_REUSEPORT`` on the shared port, and prints the same ready line.
"""

from __future__ import annotations

import sys

import orjson

from .cli import serve_worker
from .config import Settings

__all__ = ["main"]


def main() -> int:
    """Read the configuration from standard input and serve until SIGTERM."""
    config = orjson.loads(sys.stdin.buffer.read())
    settings = Settings.from_mapping(config["settings"], source="the supervisor")
    return serve_worker(
        settings,
        loop=config["loop"],
        redis_wait_s=float(config["redis_wait_s"]),
        siblings=tuple(config["siblings"]),
        group=config["group"],
    )


if __name__ == "__main__":
    sys.exit(main())
