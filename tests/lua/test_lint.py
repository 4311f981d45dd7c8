"""Lint of lua/: every script states its contract, and the loader inlines includes.

Every script starts with a ``--[[`` header listing KEYS, ARGV and Returns; a
Lua file and its Python wrapper have the same name; includes are inlined once
each and cycles are rejected; each kind of event is built in one place.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import hub.scripts as scripts_module
from hub.scheduler import Scheduler
from hub.scripts import SCRIPT_NAMES, load_script_sources

LUA_DIR = Path(__file__).resolve().parents[2] / "lua"
SCRIPTS = sorted(LUA_DIR.glob("*.lua"))
INCLUDES = sorted((LUA_DIR / "includes").glob("*.lua"))
INCLUDE = re.compile(r'^--- @include "([\w/.-]+)"\s*$', re.MULTILINE)
FUNCTION = re.compile(r"^local function (\w+)", re.MULTILINE)


def header_of(source: str) -> str:
    assert source.startswith("--[[\n"), "the file must start with a --[[ header"
    end = source.find("]]")
    assert end > 0, "the header must be closed with ]]"
    return source[5:end]


def test_the_loader_reads_this_checkouts_lua_dir():
    assert scripts_module._lua_dir() == LUA_DIR
    assert SCRIPTS and INCLUDES


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_starts_with_its_contract(path: Path):
    source = path.read_text(encoding="utf-8")
    header = header_of(source)
    body = source[source.find("]]") + 2 :]

    summary = header.strip().splitlines()[0]
    assert summary.strip(), "the header starts with a summary line"
    key_docs = [int(n) for n in re.findall(r"^\s*KEYS\[(\d+)\]", header, re.MULTILINE)]
    argv_docs = [int(n) for n in re.findall(r"^\s*ARGV\[(\d+)\]", header, re.MULTILINE)]
    assert key_docs, "KEYS section missing"
    assert argv_docs, "ARGV section missing"
    assert key_docs == list(range(1, len(key_docs) + 1)), "KEYS numbered 1..n in order"
    assert argv_docs == list(range(1, len(argv_docs) + 1)), "ARGV numbered 1..n in order"
    returns = re.search(r"^\s*Returns:\s*\n((?:[ \t]+\S.*\n?)+)", header, re.MULTILINE)
    assert returns, "Returns section missing or empty"
    # What the body reads is documented.
    used_keys = {int(n) for n in re.findall(r"KEYS\[(\d+)\]", body)}
    used_argv = {int(n) for n in re.findall(r"ARGV\[(\d+)\]", body)}
    assert used_keys <= set(key_docs)
    assert used_argv <= set(argv_docs)


@pytest.mark.parametrize("path", SCRIPTS + INCLUDES, ids=lambda p: p.name)
def test_includes_exist_and_start_with_a_header(path: Path):
    for name in INCLUDE.findall(path.read_text(encoding="utf-8")):
        include = LUA_DIR / f"{name}.lua"
        assert include.is_file(), f"{path.name} includes missing {name}"
        header_of(include.read_text(encoding="utf-8"))


def test_every_script_has_a_file_and_a_wrapper_of_the_same_name():
    assert len(set(SCRIPT_NAMES)) == len(SCRIPT_NAMES)
    assert {p.stem for p in SCRIPTS} == set(SCRIPT_NAMES), "no script without a wrapper"
    for name in SCRIPT_NAMES:
        assert (LUA_DIR / f"{name}.lua").is_file()
        method = getattr(Scheduler, name, None)
        assert method is not None, f"Scheduler.{name}() missing"
        assert inspect.iscoroutinefunction(method), f"Scheduler.{name}() must be async"
        assert f"{name}.lua" in (method.__doc__ or ""), f"Scheduler.{name}() names its script"


def includes_of(name: str) -> set[str]:
    """Every include a file pulls in, directly or through another include."""
    found: set[str] = set()
    todo = [name]
    while todo:
        for include in INCLUDE.findall((LUA_DIR / f"{todo.pop()}.lua").read_text()):
            if include not in found:
                found.add(include)
                todo.append(include)
    return found


CALL = re.compile(r"\b(\w+)\(")
COMMENT = re.compile(r"--\[\[.*?\]\]|--[^\n]*", re.DOTALL)


def test_loaded_sources_inline_each_used_helper_once_and_keep_no_directive():
    sources = load_script_sources()
    helpers = {
        function
        for path in INCLUDES
        for function in FUNCTION.findall(path.read_text(encoding="utf-8"))
    }

    assert set(sources) == set(SCRIPT_NAMES)
    assert INCLUDES
    for name, source in sources.items():
        assert not INCLUDE.search(source)
        used = includes_of(name)
        defined = FUNCTION.findall(source)
        assert len(defined) == len(set(defined)), name
        for path in INCLUDES:
            functions = FUNCTION.findall(path.read_text(encoding="utf-8"))
            assert functions, path.name
            if f"includes/{path.stem}" not in used:
                assert not set(functions) & set(defined), (name, path.name)
        code = COMMENT.sub("", source)
        # Every helper the script calls is defined, before the calls.
        for called in set(CALL.findall(code)) & helpers:
            assert called in defined, (name, called)
            first_call = re.search(rf"(?<!function )\b{called}\(", code)
            assert first_call and code.index(f"local function {called}(") < first_call.start()
        # Every helper left in is called somewhere else in the script.
        for function in defined:
            calls = re.findall(rf"\b{function}\b", code)
            assert len(calls) > 1, (name, function)


def test_the_loader_leaves_out_unused_helpers():
    source = (
        "local rcall = redis.call\n"
        "local USED = { 'x',\n  'y' }\n"
        "local UNUSED = { 'z',\n  'w' }\n"
        "local function a()\n  return USED\nend\n"
        "local function b()\n  return a() -- c() only in a comment\nend\n"
        "local function c()\n  if true then\n    return 3\n  end\nend\n"
        "local function d()\n  return c()\nend\n"
        "return b()\n"
    )

    kept = scripts_module.drop_unused_functions(source)

    assert FUNCTION.findall(kept) == ["a", "b"]
    assert kept.startswith(
        "local rcall = redis.call\nlocal USED = { 'x',\n  'y' }\nlocal function a()"
    )
    assert kept.endswith("return b()\n")


def test_each_helper_is_defined_in_one_include():
    defined: dict[str, str] = {}
    for path in INCLUDES:
        for function in FUNCTION.findall(path.read_text(encoding="utf-8")):
            assert function not in defined, (function, defined.get(function), path.name)
            defined[function] = path.name


def test_every_include_is_used():
    used = set().union(*(includes_of(name) for name in SCRIPT_NAMES))
    assert {f"includes/{p.stem}" for p in INCLUDES} == used


@pytest.mark.parametrize("kind", ["dispatch", "result", "cancel", "replaced", "lost"])
def test_each_event_kind_is_built_in_events_lua_only(kind: str):
    literal = re.compile(rf"\{{\s*'{kind}'\s*,")
    builders = [
        path.relative_to(LUA_DIR).as_posix()
        for path in sorted(LUA_DIR.rglob("*.lua"))
        if literal.search(path.read_text(encoding="utf-8"))
    ]
    assert builders == ["includes/events.lua"]


# The include loader, on made-up files.


def fake_reader(files: dict[str, str]):
    def read(name: str) -> str:
        return files[name]

    return read


def test_inline_includes_each_file_once(monkeypatch):
    monkeypatch.setattr(
        scripts_module,
        "_read_lua",
        fake_reader(
            {
                "inc/a": '--- @include "inc/b"\nA_BODY\n',
                "inc/b": "B_BODY\n",
            }
        ),
    )
    source = '--- @include "inc/a"\n--- @include "inc/b"\n--- @include "inc/a"\nMAIN\n'

    inlined = scripts_module._inline(source, ("main",), set())

    assert inlined.count("A_BODY") == 1
    assert inlined.count("B_BODY") == 1
    assert inlined.index("B_BODY") < inlined.index("A_BODY") < inlined.index("MAIN")
    assert "@include" not in inlined


def test_inline_rejects_a_cycle(monkeypatch):
    monkeypatch.setattr(
        scripts_module,
        "_read_lua",
        fake_reader(
            {
                "inc/a": '--- @include "inc/b"\nA\n',
                "inc/b": '--- @include "inc/c"\nB\n',
                "inc/c": '--- @include "inc/a"\nC\n',
            }
        ),
    )

    with pytest.raises(
        ValueError, match=r"^include cycle: main -> inc/a -> inc/b -> inc/c -> inc/a$"
    ):
        scripts_module._inline('--- @include "inc/a"\n', ("main",), set())


def test_inline_rejects_a_script_including_itself(monkeypatch):
    monkeypatch.setattr(scripts_module, "_read_lua", fake_reader({"main": '--- @include "main"\n'}))

    with pytest.raises(ValueError, match="include cycle: main -> main"):
        scripts_module._inline('--- @include "main"\n', ("main",), set())


def test_load_script_sources_rejects_a_cycle(monkeypatch):
    files = {name: f"-- {name}\n" for name in SCRIPT_NAMES}
    files["sweep"] = '--- @include "inc/x"\n'
    files["inc/x"] = '--- @include "inc/y"\n'
    files["inc/y"] = '--- @include "inc/x"\n'
    monkeypatch.setattr(scripts_module, "_read_lua", fake_reader(files))

    with pytest.raises(ValueError, match="include cycle: sweep -> inc/x -> inc/y -> inc/x"):
        load_script_sources()
