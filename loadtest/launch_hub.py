"""Run ``hub`` with or without uvloop: ``python -m loadtest.launch_hub [--no-uvloop] serve ...``.

``hub serve`` installs uvloop whenever it is importable. To measure the hub
on asyncio's own loop on a machine that has uvloop, this launcher makes
``import uvloop`` fail (``sys.modules["uvloop"] = None``) before running
:func:`hub.cli.main` unchanged. ``--uvloop`` (the default) changes nothing.

With ``--no-uvloop`` a ``serve`` command also gets ``--loop asyncio``, which
the workers of ``hub serve --workers`` (fresh processes) follow too.

``--cprofile PATH`` runs the hub under :mod:`cProfile` with a CPU-time clock
(``time.process_time``: time spent waiting for a core or for the network is
not counted) and writes the stats to PATH when the hub exits (SIGTERM).
Profiling slows the hub down several times; read the shares, not the speed.
"""

from __future__ import annotations

import sys
import time

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    use_uvloop = True
    profile_path = None
    while args and args[0] in ("--uvloop", "--no-uvloop", "--cprofile"):
        option = args.pop(0)
        if option == "--cprofile":
            profile_path = args.pop(0)
        else:
            use_uvloop = option == "--uvloop"
    if not use_uvloop:
        sys.modules["uvloop"] = None  # type: ignore[assignment]
        if args[:1] == ["serve"]:
            args[1:1] = ["--loop", "asyncio"]
    from hub.cli import main as hub_main

    if profile_path is None:
        return hub_main(args)
    import cProfile

    profiler = cProfile.Profile(time.process_time)
    try:
        return profiler.runcall(hub_main, args)
    finally:
        profiler.dump_stats(profile_path)


if __name__ == "__main__":
    sys.exit(main())
