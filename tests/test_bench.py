"""``hub bench``: the load harness against a deployment it did not start.

Each run is the real command (``python -m hub bench``) as a child process,
against a hub of this test on loopback that requires tokens (and TLS in one
test), a few sessions for a second or two. The hub's fleet has a
"production" node and session of its own, through the SDK: the tests check
that the bench's jobs never reach the fleet's node, that the fleet's jobs
never reach the bench's nodes, and that every job the bench sent was
answered exactly once (its report's verdict). Every refusal (a bad token
file, a token the run cannot use, a hub that refuses the token, a pair that
would mix the bench's jobs with the fleet's) is one line on stderr and exit
status 2, before any load. They do not check speed.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.server import ServerConnection, serve

from hub.app import Hub
from hub.auth import mint_node_token, mint_session_token
from hub.client import Job, NodeClient, SessionClient
from hub.keys import Keys
from loadtest import deployment
from loadtest.access import (
    Access,
    AccessError,
    check_tokens,
    read_token_file,
    token_file_mode_warning,
)
from loadtest.procs import RedisProcess, child_env, hub_command
from tests.helpers import MS, client_for, wait_for
from tests.sdktools import FAST_BACKOFF, running_hub

pytestmark = pytest.mark.timeout(180)

NODE_KEY = "n" * 32
"""The hub's ``node_token_key``."""
SESSION_KEY = "s" * 32
"""The hub's ``session_jwt_key``."""
FLEET_SECRET = "fleet-secret-for-tests"
"""The hub's ``node_secret``."""

BENCH_TIMEOUT_S = 120.0

# Helpers


def write_tokens(path: Path, *, node: str | None, session: str | None) -> Path:
    lines = ["# hub bench tokens"]
    if node is not None:
        lines.append(f"node = {node}")
    if session is not None:
        lines.append(f"session = {session}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def bench_tokens(path: Path, **session_claims: Any) -> Path:
    """A token file as an operator makes it with ``hub token``."""
    return write_tokens(
        path,
        node=mint_node_token(NODE_KEY, ["bench-*"], ttl_s=600),
        session=mint_session_token(SESSION_KEY, ttl_s=600, **session_claims),
    )


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hub bench test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "hub.crt", directory / "hub.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def bench(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``hub bench ARGS`` to its end (bounded), as an operator would."""
    process = await asyncio.create_subprocess_exec(
        *hub_command("bench", *map(str, args)),
        cwd=cwd,
        env=child_env(drop_hub_settings=True),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(BENCH_TIMEOUT_S):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return subprocess.CompletedProcess(
        list(map(str, args)), process.returncode, out.decode(), err.decode()
    )


def short_run(url: str, out: Path, *extra: str) -> list[str]:
    return [
        "--url", url,
        "--sessions", "12",
        "--nodes", "3",
        "--duration", "2",
        "--drain-s", "5",
        "--service-time-ms", "20..60",
        "--job-interval-ms", "200",
        "--processes", "1",
        "--out", str(out),
        "--quiet",
        *extra,
    ]  # fmt: skip


def load_report(out: Path) -> dict[str, Any]:
    assert (out / "report.html").is_file()
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def assert_clean(done: subprocess.CompletedProcess[str], report: dict[str, Any]) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["verdict"] == {"ok": True, "problems": []}
    jobs = report["jobs"]
    assert jobs["sent"] > 0
    assert jobs["ok"] == jobs["results"] == jobs["sent"]
    assert report["errors"]["checks"] == {}


async def fleet_pools(redis_url: str, keys: Keys, src: str, tgt: str) -> set[str]:
    """The operator pools Redis indexes for a pair (each is split by capabilities: ``pool~sig``)."""
    client = client_for(redis_url)
    try:
        members = await client.smembers(f"{keys.prefix}lang:{src}:{tgt}")
    finally:
        await client.aclose()
    return {(m.decode() if isinstance(m, bytes) else m).partition("~")[0] for m in members}


# Fixtures


@pytest.fixture
async def auth_hub(redis_server: RedisProcess, keys: Keys) -> AsyncIterator[Hub]:
    """A hub that requires node tokens (or the fleet secret) and session JWTs."""
    async with running_hub(
        redis_server.url,
        keys.cell,
        node_secret=FLEET_SECRET,
        node_token_key=NODE_KEY,
        session_jwt_key=SESSION_KEY,
        session_rate_per_s=None,
    ) as hub:
        yield hub


class FleetNode:
    """The fleet's own node (SDK), serving en:zh in the default pool; records its jobs."""

    def __init__(self, url: str) -> None:
        self.jobs: list[Job] = []
        self.client = NodeClient(
            url,
            node_id="gpu-1",
            lang_pairs=[("en", "zh")],
            max_jobs=8,
            token=FLEET_SECRET,
            backoff=FAST_BACKOFF,
            handler=self.run,
        )

    async def run(self, job: Job) -> dict[str, Any]:
        self.jobs.append(job)
        return {"text": "translated", "by": "gpu-1"}


@pytest.fixture
async def fleet_node(auth_hub: Hub) -> AsyncIterator[FleetNode]:
    node = FleetNode(f"ws://127.0.0.1:{auth_hub.port}")
    async with node.client:
        node.client.start()
        await node.client.wait_registered()
        yield node


# Runs against a deployment


async def test_bench_keeps_its_jobs_and_the_fleets_apart(
    auth_hub: Hub,
    fleet_node: FleetNode,
    redis_server: RedisProcess,
    keys: Keys,
    tmp_path: Path,
) -> None:
    url = f"ws://127.0.0.1:{auth_hub.port}"
    tokens = bench_tokens(tmp_path / "tokens", pairs=["en-x-bench:zh-x-bench"])
    out = tmp_path / "report"
    running = asyncio.create_task(
        bench(*short_run(url, out, "--token-file", tokens, "--duration", "3"), cwd=tmp_path)
    )
    # While the bench's nodes are registered, the fleet's users send their jobs.
    await wait_for(
        lambda: fleet_pools(redis_server.url, keys, "en-x-bench", "zh-x-bench"),
        timeout=30_000 * MS,
        interval=50 * MS,
    )
    session_token = mint_session_token(SESSION_KEY, ttl_s=600)
    async with SessionClient(url, token=session_token, backoff=FAST_BACKOFF) as session:
        results = [await session.submit("en", "zh", {"text": f"hi {i}"}) for i in range(20)]
    done = await running

    assert_clean(done, load_report(out))
    # Every job of the fleet's session ran on the fleet's node ...
    assert [r.node_id for r in results] == ["gpu-1"] * 20
    assert all(r.ok for r in results)
    # ... which ran nothing else: the bench's jobs went to the bench's nodes.
    assert sorted(j.payload["text"] for j in fleet_node.jobs) == sorted(
        f"hi {i}" for i in range(20)
    )
    assert {(j.src_lang, j.tgt_lang) for j in fleet_node.jobs} == {("en", "zh")}
    # Redis: the bench's pool serves only the private-use pair.
    assert await fleet_pools(redis_server.url, keys, "en", "zh") == {"default"}
    assert await fleet_pools(redis_server.url, keys, "en-x-bench", "zh-x-bench") == {"bench"}
    report = load_report(out)
    assert report["meta"]["pool"] == "bench"
    assert report["meta"]["pair"] == "en-x-bench:zh-x-bench"
    assert report["meta"]["hub_loop"] == "external"
    assert "hub bench --url" in report["meta"]["command"]
    # The hub's own view (/v1/status), with the connections open: at the start and the end.
    seen = report["meta"]["deployment"]
    assert seen["status_url"] == f"http://127.0.0.1:{auth_hub.port}/v1/status"
    assert seen["nodes_at_start"] == {"fleet": 1, "bench": 3}
    assert seen["nodes_at_end"] == {"fleet": 1, "bench": 3}
    assert seen["queues_at_end"] == {}
    # The cell's counters count every client's jobs: the bench's, and some of the fleet's.
    finished = seen["counters_during_run"]["finished"]
    assert report["jobs"]["ok"] <= finished <= report["jobs"]["ok"] + 20


async def test_bench_with_no_nodes_loads_the_fleets_own_nodes(
    auth_hub: Hub, fleet_node: FleetNode, tmp_path: Path
) -> None:
    tokens = write_tokens(
        tmp_path / "tokens", node=None, session=mint_session_token(SESSION_KEY, ttl_s=600)
    )
    out = tmp_path / "report"
    url = f"ws://127.0.0.1:{auth_hub.port}"

    done = await bench(
        *short_run(url, out, "--token-file", tokens, "--nodes", "0", "--pair", "en:zh"),
        cwd=tmp_path,
    )

    report = load_report(out)
    assert_clean(done, report)
    assert len(fleet_node.jobs) == report["jobs"]["sent"]
    assert report["meta"]["node_ids"] is None


async def test_bench_over_tls_with_a_private_ca(
    redis_server: RedisProcess, keys: Keys, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    tokens = bench_tokens(tmp_path / "tokens")
    async with running_hub(
        redis_server.url,
        keys.cell,
        tls_cert=str(cert),
        tls_key=str(key),
        node_token_key=NODE_KEY,
        session_jwt_key=SESSION_KEY,
        session_rate_per_s=None,
    ) as hub:
        url = f"wss://127.0.0.1:{hub.port}"
        out = tmp_path / "report"
        done = await bench(
            *short_run(url, out, "--token-file", tokens, "--ca-file", cert), cwd=tmp_path
        )
        assert_clean(done, load_report(out))

        # Without the CA the certificate is refused before any load.
        refused = await bench(
            *short_run(url, tmp_path / "r2", "--token-file", tokens), cwd=tmp_path
        )
        assert refused.returncode == 2
        assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr
        assert not (tmp_path / "r2" / "report.json").exists()


async def test_bench_reports_a_token_the_hub_refuses(auth_hub: Hub, tmp_path: Path) -> None:
    wrong = write_tokens(
        tmp_path / "tokens",
        node=mint_node_token("x" * 32, ["bench-*"]),
        session=mint_session_token(SESSION_KEY, session_id=None),
    )
    url = f"ws://127.0.0.1:{auth_hub.port}"

    done = await bench(*short_run(url, tmp_path / "out", "--token-file", wrong), cwd=tmp_path)

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"hub bench: error: {url}/v1/node: server rejected WebSocket connection: "
        "HTTP 401 Unauthorized: unauthorized: invalid token"
    )


# Refusals before any connection


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--url", "ws://127.0.0.1:9", "--pair", "en:zh"],
            "hub bench: error: simulated nodes serving en:zh would be sent the deployment's "
            "real jobs: use a private-use pair (the default en-x-bench:zh-x-bench), or "
            "--nodes 0 to send the bench's jobs to the fleet's own nodes",
        ),
        (
            ["--url", "http://127.0.0.1:9"],
            "hub bench: error: --url must be ws://HOST:PORT or wss://HOST:PORT, "
            "got 'http://127.0.0.1:9'",
        ),
        (["--token-file", "t"], "hub bench: error: --token-file needs --url"),
        (
            ["--url", "ws://127.0.0.1:9", "--hub-set", "queue_max=5"],
            "hub bench: error: --hub-set applies to hubs the harness starts, not to --url",
        ),
        (
            ["--url", "ws://127.0.0.1:9", "--hubs", "2"],
            "hub bench: error: --hubs applies to hubs the harness starts, not to --url",
        ),
        (["--nodes", "0"], "hub bench: error: --nodes must be at least 1"),
        (
            ["--url", "ws://127.0.0.1:9", "--nodes", "0", "--scenario", "overload"],
            "hub bench: error: --scenario overload sets its rate from the simulated nodes' "
            "capacity: with --nodes 0, give --job-interval-ms",
        ),
        (
            ["--url", "ws://127.0.0.1:9", "--pair", "english"],
            "hub bench: error: --pair expects SRC:TGT language codes like en:zh, got 'english'",
        ),
        (
            ["--url", "ws://127.0.0.1:9", "--pool", "a:b"],
            "hub bench: error: --pool must be an id of letters, digits, '.', '_' or '-', got 'a:b'",
        ),
    ],
)
async def test_bench_refuses_bad_options(args: list[str], message: str, tmp_path: Path) -> None:
    done = await bench(*args, cwd=tmp_path)

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(message), done.stderr


async def test_bench_refuses_a_missing_ca_file(tmp_path: Path) -> None:
    done = await bench("--url", "wss://127.0.0.1:9", "--ca-file", "missing.pem", cwd=tmp_path)

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "hub bench: error: --ca-file missing.pem: No such file or directory"
    )


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (
            {"node": None, "session": mint_session_token(SESSION_KEY, session_id="s-1")},
            "the session token names one session (claim sid): every simulated session "
            "would take over the previous one; mint one without it (hub token --no-session-id)",
        ),
        (
            {"node": None, "session": mint_session_token(SESSION_KEY, pairs=["en:zh"])},
            "the session token allows the pairs en:zh, not en-x-bench:zh-x-bench: "
            "mint one with --pairs en-x-bench:zh-x-bench",
        ),
        (
            {"node": mint_node_token(NODE_KEY, ["gpu-*"]), "session": None},
            "the node token allows node ids gpu-*, not bench-",
        ),
        (
            {"node": mint_node_token(NODE_KEY, ["bench-*"], ttl_s=-120), "session": None},
            "the node token expired ",
        ),
        (
            {"node": mint_session_token(SESSION_KEY), "session": None},
            "the node token is a session token (it has no node_ids claim)",
        ),
    ],
)
async def test_bench_refuses_a_token_it_cannot_use(
    tokens: dict[str, str | None], message: str, tmp_path: Path
) -> None:
    path = write_tokens(tmp_path / "tokens", **tokens)

    # Nothing listens on port 9: the tokens are refused before any connection.
    done = await bench("--url", "ws://127.0.0.1:9", "--token-file", path, cwd=tmp_path)

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"hub bench: error: {message}")
    # Nothing was run: no empty report directory is left behind.
    assert not (tmp_path / "bench-reports").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no token: expected 'node = TOKEN' and 'session = TOKEN' lines"),
        ("# only a comment\n", "no token: expected 'node = TOKEN' and 'session = TOKEN' lines"),
        ("token = abc\n", "1: expected 'node = TOKEN' or 'session = TOKEN'"),
        ("node abc\n", "1: expected 'node = TOKEN' or 'session = TOKEN'"),
        ("node =\n", "1: node: empty token"),
        ("node = a\nnode = b\n", "2: node given twice"),
    ],
)
def test_token_file_errors_name_the_line(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(text)

    with pytest.raises(AccessError) as caught:
        read_token_file(path)

    assert str(caught.value).removeprefix(str(path)).lstrip(":").strip() == message.lstrip()


def test_token_file_gives_both_tokens(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "tokens", node="secret = with = equals", session="jwt")

    assert read_token_file(path) == ("secret = with = equals", "jwt")
    with pytest.raises(AccessError, match="cannot read the token file"):
        read_token_file(tmp_path / "missing")


def test_workers_get_tokens_in_their_environment_not_their_command_line() -> None:
    access = Access(node_token="n-token", session_token="s-token", ca_file="ca.pem")

    assert "n-token" not in json.dumps(access.to_json())
    child = Access.from_child(access.to_json(), {**os.environ, **access.child_env()})
    assert child == access
    assert child.headers("node") == [("Authorization", "Bearer n-token")]
    assert child.headers("session") == [("Authorization", "Bearer s-token")]
    assert Access().headers("node") == []


def test_a_token_that_expires_during_the_run_is_a_warning() -> None:
    token = mint_session_token(SESSION_KEY, ttl_s=30)
    access = Access(session_token=token)

    warnings = check_tokens(
        access, node_ids=[], pair=("en-x-bench", "zh-x-bench"), sessions=10, run_s=100
    )

    assert len(warnings) == 1
    assert warnings[0].startswith("the session token expires in ")
    assert check_tokens(access, node_ids=[], pair=("en", "zh"), sessions=10, run_s=10) == []


async def test_bench_says_when_the_deployment_has_no_status_page(tmp_path: Path) -> None:
    # A server that speaks WebSocket only: /v1/status is not a status page.
    async def handler(ws: ServerConnection) -> None:
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/v1/status"
        page = await deployment.read_status(url, None)

    assert page == f"{url} answered HTTP 426 Upgrade Required"
    summary = deployment.summarize(page, {"counters": {}}, url=url, pool="bench")
    assert summary == {"status_url": url, "unavailable": page}
    assert deployment.describe(summary) == f"deployment: no status ({page})"
    assert deployment.status_url("wss://hub.example/prefix") == (
        "https://hub.example/prefix/v1/status"
    )


def test_a_token_file_others_can_read_gets_a_warning(tmp_path: Path) -> None:
    path = write_tokens(tmp_path / "tokens", node="n", session="s")
    assert token_file_mode_warning(path) is None

    path.chmod(0o644)

    assert token_file_mode_warning(path) == (
        f"{path} can be read by other users (chmod 600 {path})"
    )
