"""The scheduling scripts' sources: read from ``lua/``, includes inlined.

A script pulls in shared helpers with a line ``--- @include "includes/<name>"``;
the loader replaces it with that file's text, each file once per script (a
later include of the same file is dropped), and rejects include cycles. Then
it leaves out the helpers the script never calls: Redis runs a script's whole
text on every call, so each ``local function`` costs a closure (and garbage)
per call whether it is used or not.
Scripts are read from the checkout's ``lua/`` when running from source, else
from the installed ``hub.lua`` package.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

__all__ = ["SCRIPT_NAMES", "drop_unused_functions", "load_script_sources", "script_shas"]

SCRIPT_NAMES = (
    "register_node",
    "heartbeat",
    "dispatch_task",
    "complete_task",
    "cancel_task",
    "node_lost",
    "drain_node",
    "sweep",
    "session_closed",
    "resume_session",
    "ack_results",
    "route_partial",
    "end_lost_job",
    "add_session_cell",
)
"""Every script, by file name without ``.lua`` (also its Scheduler method's name)."""

_INCLUDE = re.compile(r'^--- @include "([\w/.-]+)"\s*$', re.MULTILINE)
_FUNCTION = re.compile(r"^local function (\w+)\b.*?^end\n", re.MULTILINE | re.DOTALL)
"""A top-level helper: from ``local function <name>`` to the first ``end`` in column 0."""
_CONSTANT = re.compile(r"^local ([A-Z][A-Z0-9_]*) = .*?\n(?=\S|\Z)", re.MULTILINE | re.DOTALL)
"""A top-level constant: ``local NAME = ...`` up to the next line in column 0."""
_COMMENT = re.compile(r"--\[\[.*?\]\]|--[^\n]*", re.DOTALL)
_NAME = re.compile(r"\w+")


def _lua_dir() -> Path | None:
    """The checkout's ``lua/`` directory when running from source."""
    here = Path(__file__).resolve().parent.parent / "lua"
    return here if (here / "dispatch_task.lua").is_file() else None


def _read_lua(name: str) -> str:
    source_dir = _lua_dir()
    if source_dir is not None:
        return (source_dir / f"{name}.lua").read_text(encoding="utf-8")
    return resources.files("hub.lua").joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _inline(source: str, seen: tuple[str, ...], done: set[str]) -> str:
    """Replace the include lines of ``source``.

    Args:
        source: the text of the file named last in ``seen``.
        seen: the chain of files being inlined, the script first (for cycles).
        done: the includes already inlined into this script (each goes in once).

    Raises:
        ValueError: on an include cycle.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in seen:
            raise ValueError(f"include cycle: {' -> '.join((*seen, name))}")
        if name in done:
            return ""
        done.add(name)
        return _inline(_read_lua(name), (*seen, name), done)

    return _INCLUDE.sub(replace, source)


def drop_unused_functions(source: str) -> str:
    """Leave out the top-level ``local function`` helpers that ``source`` never calls,
    and the upper-case constants (``local NAME = ...``) it never names.

    A helper or constant is kept when the rest of the script (outside
    helpers and constants), or a kept helper or constant, names it outside
    comments. The includes keep to the layout this relies on: a helper
    starts with ``local function`` in column 0 and ends with the first
    ``end`` in column 0; a constant ends before the next line in column 0.

    Args:
        source: a script with its includes inlined.

    Returns:
        The script without the unused helpers.
    """
    helpers = {m.group(1): m.group(0) for m in _FUNCTION.finditer(source)}
    helpers |= {m.group(1): m.group(0) for m in _CONSTANT.finditer(source)}
    used: set[str] = set()
    todo = [_CONSTANT.sub("", _FUNCTION.sub("", source))]
    while todo:
        for name in _NAME.findall(_COMMENT.sub("", todo.pop())):
            if name in helpers and name not in used:
                used.add(name)
                todo.append(helpers[name])

    def keep(match: re.Match[str]) -> str:
        return match.group(0) if match.group(1) in used else ""

    return _CONSTANT.sub(keep, _FUNCTION.sub(keep, source))


def load_script_sources() -> dict[str, str]:
    """Read every script, with its ``--- @include`` lines inlined (each once) and
    the helpers it never calls left out (:func:`drop_unused_functions`).

    Returns:
        Script name -> source, for every name of :data:`SCRIPT_NAMES`.

    Raises:
        ValueError: on an include cycle.
    """
    return {
        name: drop_unused_functions(_inline(_read_lua(name), (name,), set()))
        for name in SCRIPT_NAMES
    }


def script_shas(sources: Mapping[str, str]) -> dict[str, str]:
    """The SHA1 digest Redis names each script by (what EVALSHA takes).

    Args:
        sources: script name -> source.

    Returns:
        Script name -> hex digest of its source.
    """
    return {name: hashlib.sha1(src.encode()).hexdigest() for name, src in sources.items()}
