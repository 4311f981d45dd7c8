"""Packaging: the wheel carries the Lua scripts and the load harness, and runs outside the checkout.

These tests build the wheel from a copy of the checkout, install it into a
fresh venv outside the checkout (dependencies come from the package index),
and run that venv's Python from a directory outside the checkout, so nothing
can be read from the source tree by accident. An editable install into
another fresh venv checks the ``hub.lua`` -> ``lua/`` mapping the other way.
``hub bench`` runs from the installed wheel against a hub the test starts
(with tokens), and on its own (its own Redis and hub), as an operator who
ran ``pip install lockless-hub`` would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
import redis as sync_redis

from hub.auth import mint_node_token, mint_session_token
from hub.scripts import SCRIPT_NAMES, load_script_sources
from loadtest.procs import RedisProcess, parse_ready_line

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
"""The checkout."""

INSTALL_TIMEOUT_S = 300.0
"""Building a wheel or installing one with its dependencies from the index."""
RUN_TIMEOUT_S = 60.0
"""Running the installed code."""

# Top-level entries of the checkout that are not sources (caches, venvs, builds).
_NOT_SOURCES = {
    ".git",
    ".hub-data",
    ".hypothesis",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".venv",
    ".venv-ci",
    "build",
    "dist",
    "env",
    "venv",
}

_INCLUDE_LINE = re.compile(r"^--- @include ", re.MULTILINE)

# Run in the installed venv: which hub was imported, the scripts it read, and
# their SHAs as Redis computes them (SCRIPT LOAD).
_PROBE = """
import json, sys
from importlib import resources
import redis
import hub
from hub.scripts import SCRIPT_NAMES, load_script_sources

sources = load_script_sources()
try:
    lua = str(resources.files("hub.lua").joinpath("dispatch_task.lua"))
except ModuleNotFoundError:  # a lenient editable install maps hub.lua only with lua/__init__.py
    lua = None
client = redis.Redis.from_url(sys.argv[1], socket_timeout=5, socket_connect_timeout=5)
shas = {name: client.script_load(source) for name, source in sources.items()}
client.close()
print(json.dumps({
    "hub": hub.__file__,
    "lua": lua,
    "names": list(SCRIPT_NAMES),
    "sources": sources,
    "shas": shas,
}))
"""


# Helpers


def copy_sources(dst: Path) -> Path:
    """Copy the checkout to ``dst`` without caches, venvs and build output.

    Builds run on the copy because setuptools writes ``build/`` and
    ``*.egg-info`` next to the sources.
    """

    def ignore(directory: str, names: list[str]) -> set[str]:
        ignored = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(directory) == ROOT:
            ignored |= _NOT_SOURCES.intersection(names)
        return ignored

    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def clean_env() -> dict[str, str]:
    """The environment, minus what would point Python at the checkout or our venv."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(args: Sequence[str | Path], *, cwd: Path, timeout: float) -> str:
    """Run a command; fail the test with its output when it exits non-zero."""
    try:
        done = subprocess.run(
            [str(a) for a in args],
            cwd=cwd,
            env=clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(map(str, args))} took more than {timeout:g} s: {exc.stderr!r}")
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited with {done.returncode}\n"
            f"stdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
        )
    return done.stdout


def make_venv(path: Path) -> Path:
    """A fresh venv at ``path``; returns its python."""
    run([sys.executable, "-m", "venv", path], cwd=path.parent, timeout=INSTALL_TIMEOUT_S)
    return path / "bin" / "python"


def probe(python: Path, redis_url: str, cwd: Path) -> dict[str, object]:
    """Run :data:`_PROBE` with ``python -I`` (no PYTHONPATH, no cwd on sys.path)."""
    out = run([python, "-I", "-c", _PROBE, redis_url], cwd=cwd, timeout=RUN_TIMEOUT_S)
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def assert_scripts_loaded(found: dict[str, object], redis_server: RedisProcess) -> None:
    """The probe read every script, inlined its includes, and Redis accepted each one."""
    sources = found["sources"]
    shas = found["shas"]
    assert isinstance(sources, dict)
    assert isinstance(shas, dict)
    assert found["names"] == list(SCRIPT_NAMES)
    assert sorted(sources) == sorted(SCRIPT_NAMES)
    for name, source in sources.items():
        assert not _INCLUDE_LINE.search(source), f"{name}: include not inlined"
    # The includes' helpers were inlined where a script includes them (pools.lua's here).
    assert "local function pick_node(" in sources["dispatch_task"]
    # Same text as the loader produces from the checkout: nothing lost or doubled.
    assert sources == load_script_sources()
    assert shas == {n: hashlib.sha1(s.encode()).hexdigest() for n, s in sources.items()}
    client = sync_redis.Redis(host="127.0.0.1", port=redis_server.port, socket_timeout=5)
    try:
        assert client.script_exists(*shas.values()) == [True] * len(shas)
    finally:
        client.close()


# Fixtures


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout."""
    base = tmp_path_factory.mktemp("wheel")
    sources = copy_sources(base / "src")
    dist = base / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dist, sources],
        cwd=base,
        timeout=INSTALL_TIMEOUT_S,
    )
    (built,) = dist.glob("lockless_hub-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A fresh venv outside the checkout with the wheel and its dependencies installed."""
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    python = make_venv(venv)
    run([python, "-m", "pip", "install", wheel], cwd=venv.parent, timeout=INSTALL_TIMEOUT_S)
    return venv


# Tests


def test_wheel_carries_every_lua_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for name in SCRIPT_NAMES:
        assert f"hub/lua/{name}.lua" in names
    assert "hub/lua/includes/jobs.lua" in names
    # Every script of the checkout, including ones SCRIPT_NAMES may not list yet.
    for path in (ROOT / "lua").rglob("*.lua"):
        assert f"hub/{path.relative_to(ROOT).as_posix()}" in names
    # lua/ stays at the top of the repo but lives under hub/ once installed.
    assert not any(n.startswith("lua/") for n in names)
    # The demo page served at /demo (hub/gate.py reads it from hub.static).
    assert "hub/static/demo.html" in names
    # The dashboard and its vendored charting library, with its licence.
    for name in ("dashboard.html", "uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE.txt"):
        assert f"hub/static/{name}" in names
    # The hub package and the harness of hub bench: tests stay out.
    top_level = {n.split("/", 1)[0] for n in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"hub", "loadtest"}
    for path in (ROOT / "loadtest").glob("*.py"):
        assert f"loadtest/{path.name}" in names


def test_installed_wheel_loads_every_script_from_the_package(
    wheel_venv: Path, redis_server: RedisProcess
) -> None:
    found = probe(wheel_venv / "bin" / "python", redis_server.url, cwd=wheel_venv.parent)
    site_packages = wheel_venv.resolve()
    hub_file = Path(str(found["hub"])).resolve()
    assert hub_file.is_relative_to(site_packages), hub_file
    assert not hub_file.is_relative_to(ROOT), hub_file
    assert found["lua"] is not None
    lua_file = Path(str(found["lua"])).resolve()
    assert lua_file.is_relative_to(site_packages), lua_file
    assert_scripts_loaded(found, redis_server)


def test_installed_wheel_has_the_hub_command(wheel_venv: Path) -> None:
    out = run([wheel_venv / "bin" / "hub", "--help"], cwd=wheel_venv.parent, timeout=RUN_TIMEOUT_S)
    assert "serve" in out


def test_installed_wheel_runs_the_demo_outside_the_checkout(wheel_venv: Path) -> None:
    # A newcomer's first command after installing: an embedded hub, demo
    # nodes and a session, all from the installed package.
    out = run([wheel_venv / "bin" / "hub", "demo"], cwd=wheel_venv.parent, timeout=120)
    assert "'WHERE IS THE STATION?'" in out
    assert "audio_bytes=32000" in out
    assert "refused: NO_POOL_FOR_LANG_PAIR" in out
    assert "hub demo: done" in out


BENCH_ARGS = [
    "--sessions", "8",
    "--nodes", "2",
    "--duration", "2",
    "--drain-s", "5",
    "--service-time-ms", "20..60",
    "--job-interval-ms", "250",
    "--processes", "1",
    "--quiet",
]  # fmt: skip
"""A short run: a few seconds, a few jobs."""


def assert_bench_report(out_dir: Path) -> dict[str, object]:
    """``hub bench`` wrote one report, under ``out_dir``, whose verdict is OK."""
    (report_json,) = out_dir.glob("*/report.json")
    assert (report_json.parent / "report.html").is_file()
    report: dict[str, object] = json.loads(report_json.read_text())
    assert report["verdict"] == {"ok": True, "problems": []}
    jobs = report["jobs"]
    assert isinstance(jobs, dict)
    assert jobs["sent"] > 0
    assert jobs["ok"] == jobs["sent"]
    return report


def test_installed_wheel_benches_a_deployment_outside_the_checkout(
    wheel_venv: Path, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # The deployment: a hub of the installed package that requires tokens.
    node_key, session_key = "n" * 32, "s" * 32
    env = clean_env() | {"HUB_NODE_TOKEN_KEY": node_key, "HUB_SESSION_JWT_KEY": session_key}
    hub = subprocess.Popen(
        [wheel_venv / "bin" / "hub", "serve", "--port", "0", "--redis-url", redis_server.url,
         "--cell", f"bench{os.getpid()}", "--log-level", "WARNING"],
        cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert hub.stdout is not None
        ready = parse_ready_line(hub.stdout.readline())
        assert ready is not None, "hub serve printed no ready line"
        elsewhere = tmp_path / "operator"
        elsewhere.mkdir()
        tokens = elsewhere / "tokens"
        tokens.write_text(
            f"node = {mint_node_token(node_key, ['bench-*'], ttl_s=600)}\n"
            f"session = {mint_session_token(session_key, ttl_s=600)}\n"
        )
        tokens.chmod(0o600)

        out = run(
            [wheel_venv / "bin" / "hub", "bench", "--url", f"ws://127.0.0.1:{ready.port}",
             "--token-file", tokens, *BENCH_ARGS],
            cwd=elsewhere,
            timeout=120,
        )  # fmt: skip
    finally:
        hub.terminate()
        hub.wait(timeout=30)
        if hub.stdout is not None:
            hub.stdout.close()
    assert "verdict: OK" in out
    report = assert_bench_report(elsewhere / "bench-reports")
    meta = report["meta"]
    assert isinstance(meta, dict)
    assert meta["pool"] == "bench"
    assert meta["pair"] == "en-x-bench:zh-x-bench"


def test_installed_wheel_benches_hubs_of_its_own(wheel_venv: Path, tmp_path: Path) -> None:
    # No --url: an embedded Redis and a hub, started from the installed package.
    out = run([wheel_venv / "bin" / "hub", "bench", *BENCH_ARGS], cwd=tmp_path, timeout=120)
    assert "verdict: OK" in out
    assert_bench_report(tmp_path / "bench-reports")


def test_editable_install_reads_the_scripts_from_the_sources(
    tmp_path: Path, redis_server: RedisProcess
) -> None:
    sources = copy_sources(tmp_path / "src")
    python = make_venv(tmp_path / "venv")
    run([python, "-m", "pip", "install", "-e", sources], cwd=tmp_path, timeout=INSTALL_TIMEOUT_S)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    found = probe(python, redis_server.url, cwd=outside)

    assert Path(str(found["hub"])).resolve() == (sources / "hub" / "__init__.py").resolve()
    assert_scripts_loaded(found, redis_server)
