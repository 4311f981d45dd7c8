"""Authorisation rules of protocol.md §10, each attacked by a test.

Every test runs a real hub (``make_hub``) on the shared Redis and talks to it
over real sockets. Tokens are minted with :mod:`hub.auth` (what an
application backend does) or forged by hand when the attack needs it.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis as sync_redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from hub.app import Hub
from hub.auth import TOKEN_LEEWAY_S, Authenticator, mint_node_token, mint_session_token
from hub.config import ConfigError, Settings
from hub.errors import SchedulingError, Unauthorized
from hub.gate import check_exposure
from hub.keys import Keys
from hub.scheduler import new_job_id
from loadtest.procs import RedisProcess, child_env, hub_command, run_command
from tests.helpers import MS, wait_for
from tests.hubtools import (
    expect,
    expect_closed,
    expect_silence,
    node_hash,
    register,
    result,
    send,
    submit,
)

MakeHub = Callable[..., Awaitable[Hub]]
Connect = Callable[..., Awaitable[ClientConnection]]

# HMAC keys of 32 bytes or more: PyJWT warns about shorter ones (RFC 7518 §3.2).
NODE_SECRET = "fleet-secret-4f9a1c-0123456789abcdef"
NODE_KEY = "node-token-key-7d2e90-0123456789abcdef"
SESSION_KEY = "session-jwt-key-b81c55-0123456789abcdef"
OTHER_KEY = "some-other-key-000000-0123456789abcdef"


def bearer(token: str) -> dict[str, Any]:
    """``connect()`` options that send ``Authorization: Bearer <token>``."""
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A JWT built by hand, with whatever header and signature an attacker likes."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(signature)}"


def hmac_jwt(header: dict[str, Any], claims: dict[str, Any], secret: bytes, digest: str) -> str:
    """A JWT signed with HMAC under ``secret``, without PyJWT's key checks."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def session_token(key: str, algorithm: str = "HS256", **claims: Any) -> str:
    """A session token with any claims (``mint_session_token`` has no ``burst``)."""
    return jwt.encode({"exp": int(time.time()) + 600, **claims}, key, algorithm=algorithm)


async def refused(connect: Connect, hub: Hub, path: str, **kwargs: Any) -> InvalidStatus:
    """Check that the handshake is refused with an HTTP error; return it."""
    with pytest.raises(InvalidStatus) as info:
        await connect(hub, path, **kwargs)
    return info.value


async def open_node(
    connect: Connect, hub: Hub, node_id: str, token: str | None = None, **register_kwargs: Any
) -> ClientConnection:
    """A registered node (``en``/``fr`` unless told otherwise)."""
    ws = await connect(hub, "/v1/node", **(bearer(token) if token else {}))
    await register(ws, node_id=node_id, **register_kwargs)
    return ws


async def open_session(
    connect: Connect, hub: Hub, path: str = "/v1/session", **kwargs: Any
) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(hub, path, **kwargs)
    return ws, await expect(ws, "welcome")


async def run_job(
    session: ClientConnection, node: ClientConnection, ref: str, **submit_kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit a job, let ``node`` finish it; return (accepted, result) frames."""
    await submit(session, ref, **submit_kwargs)
    accepted = await expect(session, "accepted", ref=ref)
    job = await expect(node, "job", job_id=accepted["job_id"])
    await result(node, job, result={"echo": ref})
    done = await expect(session, "result", ref=ref, status="finished")
    return accepted, done


async def run_job_after_submit(
    session: ClientConnection, node: ClientConnection, ref: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    accepted = await expect(session, "accepted", ref=ref)
    job = await expect(node, "job", job_id=accepted["job_id"])
    await result(node, job)
    return accepted, await expect(session, "result", ref=ref)


# Nodes: who may connect (protocol.md §10)


async def test_node_without_token_is_refused_401(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(node_secret=NODE_SECRET)
    exc = await refused(connect, hub, "/v1/node")
    assert exc.response.status_code == 401
    assert exc.response.headers["WWW-Authenticate"] == "Bearer"
    # A scheme other than Bearer, or an empty token, is no token either.
    for value in (f"Basic {NODE_SECRET}", "Bearer ", NODE_SECRET):
        exc = await refused(connect, hub, "/v1/node", additional_headers={"Authorization": value})
        assert exc.response.status_code == 401


async def test_node_with_wrong_secret_is_refused_401(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(node_secret=NODE_SECRET)
    for wrong in (NODE_SECRET[:-1], NODE_SECRET + "x", NODE_SECRET.upper(), "x" * 4096):
        exc = await refused(connect, hub, "/v1/node", **bearer(wrong))
        assert exc.response.status_code == 401
    # A node token is no fleet secret when no node_token_key is configured.
    exc = await refused(connect, hub, "/v1/node", **bearer(mint_node_token(NODE_SECRET, ["*"])))
    assert exc.response.status_code == 401


async def test_node_with_shared_secret_registers_any_id(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(node_secret=NODE_SECRET)
    for node_id in ("gpu-1", "gpu-eu-9", "Z.z_0-9"):
        await open_node(connect, hub, node_id, NODE_SECRET)


async def test_node_token_allows_its_ids_and_prefixes_only(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(node_token_key=NODE_KEY)
    token = mint_node_token(NODE_KEY, ["gpu-1", "gpu-eu-*"])
    for allowed in ("gpu-1", "gpu-eu-1", "gpu-eu-west.7", "gpu-eu-"):
        await open_node(connect, hub, allowed, token)
    # Exact ids are exact (no prefix, no suffix, no case folding); patterns
    # match only their own prefix.
    for denied in ("gpu-2", "gpu-1x", "gpu-", "GPU-1", "gpu-e", "gpu-us-1", "xgpu-eu-1"):
        ws = await connect(hub, "/v1/node", **bearer(token))
        await send(
            ws,
            type="register",
            node_id=denied,
            services=["asr"],
            max_jobs=1,
            languages=["en", "fr"],
        )
        frames = await expect_closed(ws, 1008)
        assert [f["code"] for f in frames] == ["UNAUTHORIZED"], frames
        assert await node_hash(redis, keys, denied) == {}
    # A token naming ids no register can match (an issuer's typo) allows nothing.
    odd = mint_node_token(NODE_KEY, ["gpü-1", "gpu 1", "gpu-1\n"])
    ws = await connect(hub, "/v1/node", **bearer(odd))
    await send(
        ws, type="register", node_id="gpu-1", services=["asr"], max_jobs=1, languages=["en", "fr"]
    )
    frames = await expect_closed(ws, 1008)
    assert [f["code"] for f in frames] == ["UNAUTHORIZED"], frames


async def test_node_token_without_node_ids_is_refused(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(node_token_key=NODE_KEY, session_jwt_key=NODE_KEY)
    now = int(time.time())
    for claims in (
        {"exp": now + 60},
        {"exp": now + 60, "node_ids": []},
        {"exp": now + 60, "node_ids": "gpu-1"},
        {"exp": now + 60, "node_ids": [""]},
        {"exp": now + 60, "node_ids": [1]},
    ):
        exc = await refused(connect, hub, "/v1/node", **bearer(jwt.encode(claims, NODE_KEY)))
        assert exc.response.status_code == 401, claims
    # Even under the same key, a session token is not a node token.
    exc = await refused(connect, hub, "/v1/node", **bearer(mint_session_token(NODE_KEY)))
    assert exc.response.status_code == 401


async def test_node_cannot_take_over_a_live_node_id(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(node_token_key=NODE_KEY)
    gpu1 = await open_node(connect, hub, "gpu-1", mint_node_token(NODE_KEY, ["gpu-1"]))
    session, _ = await open_session(connect, hub)
    await submit(session, "c-1")
    accepted = await expect(session, "accepted", ref="c-1", node_id="gpu-1")
    job = await expect(gpu1, "job", job_id=accepted["job_id"])
    before = await node_hash(redis, keys, "gpu-1")
    link = hub.registry.nodes["gpu-1"]

    # An attacker holding a valid token for another id, and one whose pattern
    # is a near miss, try to register as gpu-1 (which would replace it, 4002).
    for ids in (["gpu-2"], ["gpu-1?"], ["gpu-10*"]):
        attacker = await connect(hub, "/v1/node", **bearer(mint_node_token(NODE_KEY, ids)))
        await send(
            attacker,
            type="register",
            node_id="gpu-1",
            services=["asr"],
            max_jobs=8,
            languages=["en", "fr"],
        )
        frames = await expect_closed(attacker, 1008)
        assert [f["code"] for f in frames] == ["UNAUTHORIZED"]

    # gpu-1 keeps its connection, its registration and its job.
    await expect_silence(gpu1, 100 * MS)
    assert hub.registry.nodes["gpu-1"] is link
    after = await node_hash(redis, keys, "gpu-1")
    for field in ("epoch", "hub", "state", "running", "max_jobs"):
        assert after[field] == before[field], field
    await result(gpu1, job, result={"text": "mine"})
    done = await expect(session, "result", ref="c-1", status="finished")
    assert done["result"] == {"text": "mine"}
    await run_job(session, gpu1, "c-2")


async def test_expired_node_token_is_refused(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(node_token_key=NODE_KEY)
    # ttl well past the hub's leeway for clock skew.
    token = mint_node_token(NODE_KEY, ["gpu-1"], ttl_s=-2 * TOKEN_LEEWAY_S)
    exc = await refused(connect, hub, "/v1/node", **bearer(token))
    assert exc.response.status_code == 401
    assert b"expired" in exc.response.body
    # A token without exp never expires, so it is refused too.
    exc = await refused(
        connect, hub, "/v1/node", **bearer(jwt.encode({"node_ids": ["gpu-1"]}, NODE_KEY))
    )
    assert exc.response.status_code == 401


async def test_tokens_are_taken_across_30_s_of_clock_skew(
    make_hub: MakeHub, connect: Connect
) -> None:
    # Tokens from an issuer whose clock is 30 s ahead of the hub's (or a hub
    # 30 s behind): iat in the hub's future; from one 30 s behind: exp a
    # little in the hub's past. Neither is refused (protocol.md §10).
    hub = await make_hub(node_token_key=NODE_KEY, session_jwt_key=SESSION_KEY)
    now = int(time.time())
    for skew in (30, -30):
        claims = {"iat": now + skew, "exp": now + skew + 10}
        node = jwt.encode({"node_ids": ["gpu-1"], **claims}, NODE_KEY, algorithm="HS256")
        ws = await open_node(connect, hub, "gpu-1", node)
        await ws.close()
        ws, _ = await open_session(connect, hub, **bearer(session_token(SESSION_KEY, **claims)))
        await ws.close()
    # Past the leeway, a token is expired whatever the skew.
    late = session_token(SESSION_KEY, exp=now - TOKEN_LEEWAY_S - 5)
    assert (await refused(connect, hub, "/v1/session", **bearer(late))).response.status_code == 401


async def test_token_signed_with_another_key_is_refused(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(node_token_key=NODE_KEY, session_jwt_key=SESSION_KEY)
    exc = await refused(
        connect, hub, "/v1/node", **bearer(mint_node_token(NODE_KEY + "x", ["gpu-1"]))
    )
    assert exc.response.status_code == 401
    exc = await refused(connect, hub, "/v1/session", **bearer(mint_session_token(OTHER_KEY)))
    assert exc.response.status_code == 401
    # A valid token with one byte of its signature changed.
    good = mint_session_token(SESSION_KEY)
    head, _, sig = good.rpartition(".")
    tampered = f"{head}.{('A' if sig[0] != 'A' else 'B')}{sig[1:]}"
    exc = await refused(connect, hub, "/v1/session", **bearer(tampered))
    assert exc.response.status_code == 401
    # Claims changed under the original signature.
    claims = b64url(json.dumps({"exp": int(time.time()) + 60, "sid": "victim"}).encode())
    header = good.split(".")[0]
    exc = await refused(connect, hub, "/v1/session", **bearer(f"{header}.{claims}.{sig}"))
    assert exc.response.status_code == 401


async def test_alg_none_token_is_refused(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(node_token_key=NODE_KEY, session_jwt_key=SESSION_KEY)
    exp = int(time.time()) + 600
    for alg in ("none", "None", "NONE"):
        node = forge({"alg": alg, "typ": "JWT"}, {"node_ids": ["*"], "exp": exp})
        exc = await refused(connect, hub, "/v1/node", **bearer(node))
        assert exc.response.status_code == 401
        sess = forge({"alg": alg, "typ": "JWT"}, {"sid": "victim", "exp": exp})
        exc = await refused(connect, hub, "/v1/session", **bearer(sess))
        assert exc.response.status_code == 401
        exc = await refused(connect, hub, f"/v1/session?token={sess}")
        assert exc.response.status_code == 401
    # Another HMAC size is another algorithm: refused.
    hs512 = hmac_jwt({"alg": "HS512", "typ": "JWT"}, {"exp": exp}, SESSION_KEY.encode(), "sha512")
    exc = await refused(connect, hub, "/v1/session", **bearer(hs512))
    assert exc.response.status_code == 401


async def test_garbage_tokens_are_refused(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(node_token_key=NODE_KEY, session_jwt_key=SESSION_KEY)
    for token in ("x", "a.b.c", "...", "e30.e30.", "\u00e9" * 10, "a" * 6000):
        for path in ("/v1/node", "/v1/session"):
            try:
                exc = await refused(connect, hub, path, **bearer(token))
            except UnicodeEncodeError:
                continue  # the client cannot even send a non-latin-1 header
            assert exc.response.status_code == 401, (path, token[:20])


# Sessions: tokens and claims (protocol.md §10)


async def test_session_without_token_is_refused_when_session_auth_is_on(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(session_jwt_key=SESSION_KEY)
    for path in ("/v1/session", "/v1/session?token=", "/v1/session?session_id=s-1"):
        exc = await refused(connect, hub, path)
        assert exc.response.status_code == 401
        assert exc.response.headers["WWW-Authenticate"] == "Bearer"
    # Nodes are still open when only sessions authenticate.
    await open_node(connect, hub, "gpu-1")


async def test_session_token_via_header_and_query(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(session_jwt_key=SESSION_KEY)
    node = await open_node(connect, hub, "gpu-1")
    via_header, _ = await open_session(connect, hub, **bearer(mint_session_token(SESSION_KEY)))
    await run_job(via_header, node, "h-1")
    via_query, _ = await open_session(
        connect, hub, f"/v1/session?token={mint_session_token(SESSION_KEY)}"
    )
    await run_job(via_query, node, "q-1")
    # The header wins over the query: a bad header is not rescued by a good query.
    exc = await refused(
        connect,
        hub,
        f"/v1/session?token={mint_session_token(SESSION_KEY)}",
        **bearer("bad-token"),
    )
    assert exc.response.status_code == 401


async def test_expired_session_token_is_refused(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(session_jwt_key=SESSION_KEY)
    exc = await refused(
        connect,
        hub,
        "/v1/session",
        **bearer(mint_session_token(SESSION_KEY, ttl_s=-2 * TOKEN_LEEWAY_S)),
    )
    assert exc.response.status_code == 401
    exc = await refused(connect, hub, "/v1/session", **bearer(jwt.encode({}, SESSION_KEY)))
    assert exc.response.status_code == 401


async def test_session_claims_with_bad_values_are_refused(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(session_jwt_key=SESSION_KEY)
    for claims in (
        {"sid": "a:b"},
        {"sid": "{cell}"},
        {"sid": "x" * 65},
        {"sid": 7},
        {"pairs": "en:fr"},
        {"pairs": [1]},
        {"rate": 0},
        {"rate": -1},
        {"rate": True},
        {"burst": "9"},
        {"max_inflight": 0},
        {"cell": "a.b"},
        {"cell": ""},
        {"cell": ["a"]},
    ):
        token = session_token(SESSION_KEY, **claims)
        exc = await refused(connect, hub, "/v1/session", **bearer(token))
        assert exc.response.status_code == 401, claims


async def test_session_pairs_claim_is_enforced_per_job(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(session_jwt_key=SESSION_KEY)
    node = await open_node(connect, hub, "gpu-1", languages=["en", "fr", "de"], max_jobs=4)
    token = mint_session_token(SESSION_KEY, pairs=["en:fr"])
    session, _ = await open_session(connect, hub, **bearer(token))
    for ref, src, tgt in (("c-1", "fr", "en"), ("c-2", "en", "de"), ("c-3", "de", "fr")):
        await submit(session, ref, src_lang=src, tgt_lang=tgt)
        await expect(session, "error", ref=ref, code="UNAUTHORIZED")
    await expect_silence(node, 50 * MS)
    # The connection stays open, the allowed pair works (case-insensitively),
    # and a refused ref can be used again.
    await run_job(session, node, "c-1", src_lang="EN", tgt_lang="Fr")
    await submit(session, "c-4", src_lang="fr", tgt_lang="en")
    await expect(session, "error", ref="c-4", code="UNAUTHORIZED")


async def test_session_sid_claim_fixes_the_session_id(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(session_jwt_key=SESSION_KEY)
    token = mint_session_token(SESSION_KEY, session_id="s-alice")
    _, welcome = await open_session(connect, hub, **bearer(token))
    assert welcome["session_id"] == "s-alice"
    # Naming the same session is fine; naming another one is a policy violation.
    _, welcome = await open_session(connect, hub, "/v1/session?session_id=s-alice", **bearer(token))
    assert welcome["session_id"] == "s-alice"
    other = await connect(hub, "/v1/session?session_id=s-bob", **bearer(token))
    assert await expect_closed(other, 1008) == []
    # A resume token for another session does not help either.
    forged = await connect(hub, "/v1/session?session_id=s-bob&resume_token=x", **bearer(token))
    assert await expect_closed(forged, 1008) == []
    # Without sid, the hub picks a random id.
    _, anon = await open_session(connect, hub, **bearer(mint_session_token(SESSION_KEY)))
    assert anon["session_id"] not in ("s-alice", "s-bob")


async def burst_codes(session: ClientConnection, refs: list[str]) -> list[str]:
    """Send a job per ref back to back (no token comes back in between), then
    return the error code of each; the answers may come in any order."""
    for ref in refs:
        await submit(session, ref)
    codes = {}
    for _ in refs:
        frame = await expect(session, "error")
        codes[frame["ref"]] = frame["code"]
    return [codes[ref] for ref in refs]


async def test_session_rate_claim_is_enforced(make_hub: MakeHub, connect: Connect) -> None:
    # No node: the jobs are refused by scheduling, after the rate check.
    hub = await make_hub(session_jwt_key=SESSION_KEY, session_burst=3)
    session, _ = await open_session(
        connect, hub, **bearer(mint_session_token(SESSION_KEY, rate=0.5))
    )
    codes = await burst_codes(session, [f"c-{i}" for i in range(5)])
    assert codes == ["NO_POOL_FOR_LANG_PAIR"] * 3 + ["RATE_LIMITED"] * 2
    # The burst claim overrides the hub's session_burst.
    session, _ = await open_session(
        connect, hub, **bearer(session_token(SESSION_KEY, rate=0.5, burst=1))
    )
    codes = await burst_codes(session, ["c-0", "c-1"])
    assert codes == ["NO_POOL_FOR_LANG_PAIR", "RATE_LIMITED"]


async def test_session_max_inflight_claim_is_enforced(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(session_jwt_key=SESSION_KEY, max_inflight_per_session=10)
    node = await open_node(connect, hub, "gpu-1", max_jobs=8)
    session, _ = await open_session(
        connect, hub, **bearer(mint_session_token(SESSION_KEY, max_inflight=2))
    )
    for ref in ("c-1", "c-2"):
        await submit(session, ref)
        await expect(session, "accepted", ref=ref)
    await submit(session, "c-3")
    await expect(session, "error", ref="c-3", code="TOO_MANY_JOBS")
    # Once a job ends, there is room again.
    job = await expect(node, "job")
    await result(node, job)
    await expect(session, "result", job_id=job["job_id"])
    await submit(session, "c-3")
    await expect(session, "accepted", ref="c-3")


def ed25519_pems() -> tuple[str, str]:
    """(private key PEM, public key PEM) of a fresh Ed25519 key."""
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    public_pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return private_pem.decode(), public_pem.decode()


async def test_eddsa_session_tokens_are_verified_with_the_public_key(
    make_hub: MakeHub, connect: Connect
) -> None:
    private_pem, public_pem = ed25519_pems()
    hub = await make_hub(session_jwt_key=public_pem, session_jwt_algorithm="EdDSA")
    node = await open_node(connect, hub, "gpu-1")
    token = mint_session_token(private_pem, session_id="s-ed", algorithm="EdDSA")
    session, welcome = await open_session(connect, hub, **bearer(token))
    assert welcome["session_id"] == "s-ed"
    await run_job(session, node, "c-1")
    # Signed by another key.
    other_private, _ = ed25519_pems()
    exc = await refused(
        connect, hub, "/v1/session", **bearer(mint_session_token(other_private, algorithm="EdDSA"))
    )
    assert exc.response.status_code == 401
    # Algorithm confusion: HS256 with the public key as the HMAC secret.
    confused = hmac_jwt(
        {"alg": "HS256", "typ": "JWT"},
        {"exp": int(time.time()) + 600},
        public_pem.encode(),
        "sha256",
    )
    exc = await refused(connect, hub, "/v1/session", **bearer(confused))
    assert exc.response.status_code == 401
    # An HS256 token under some other secret: the hub accepts EdDSA only.
    exc = await refused(connect, hub, "/v1/session", **bearer(mint_session_token(OTHER_KEY)))
    assert exc.response.status_code == 401


# Origins (protocol.md §10)


async def test_origin_allowlist(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(allowed_origins=("https://app.example",))
    exc = await refused(connect, hub, "/v1/session", origin="https://evil.example")
    assert exc.response.status_code == 403
    for near_miss in (
        "https://app.example.evil",
        "http://app.example",
        "https://APP.example",
        "null",
    ):
        exc = await refused(connect, hub, "/v1/session", origin=near_miss)
        assert exc.response.status_code == 403, near_miss
    await open_session(connect, hub, origin="https://app.example")
    await open_session(connect, hub)  # no Origin: not a browser


async def test_origin_is_checked_before_the_token(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub(allowed_origins=("https://app.example",), session_jwt_key=SESSION_KEY)
    token = mint_session_token(SESSION_KEY)
    exc = await refused(connect, hub, f"/v1/session?token={token}", origin="https://evil.example")
    assert exc.response.status_code == 403
    await open_session(connect, hub, f"/v1/session?token={token}", origin="https://app.example")


async def test_browsers_cannot_connect_as_nodes(make_hub: MakeHub, connect: Connect) -> None:
    hub = await make_hub()
    exc = await refused(connect, hub, "/v1/node", origin="https://any.example")
    assert exc.response.status_code == 403


# Everything a connection does is checked against its identity


async def test_session_sees_only_its_own_jobs(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(resume_window_s=5.0)
    node = await open_node(connect, hub, "gpu-1", max_jobs=4)
    alice, welcome_a = await open_session(connect, hub)
    bob, welcome_b = await open_session(connect, hub)
    sid_a, sid_b = welcome_a["session_id"], welcome_b["session_id"]

    _, done = await run_job(alice, node, "a-1")
    await submit(alice, "a-2")
    running = await expect(alice, "accepted", ref="a-2")
    job_a2 = await expect(node, "job", job_id=running["job_id"])

    # Bob names Alice's ref (refs are per session): unknown to him.
    await send(bob, type="cancel", ref="a-2")
    await expect(bob, "error", ref="a-2", code="UNKNOWN_JOB")
    # Even knowing Alice's job id, the scheduler refuses Bob's cancel.
    with pytest.raises(SchedulingError) as info:
        await hub.scheduler.cancel_task(running["job_id"], sid_b)
    assert info.value.code == "UNKNOWN_JOB"
    assert (await redis.hget(keys.job(running["job_id"]), "status")) == b"running"
    # Bob acknowledging Alice's result does not drop it from Alice's resume.
    await send(bob, type="ack", job_ids=[done["job_id"], running["job_id"]])
    await expect_silence(bob, 50 * MS)
    await expect_silence(alice, 50 * MS)

    # Alice resumes: her unacknowledged result comes back, and her running job
    # still ends for her.
    token = welcome_a["resume_token"]
    await alice.close()
    alice, again = await open_session(
        connect, hub, f"/v1/session?session_id={sid_a}&resume_token={token}"
    )
    assert again["session_id"] == sid_a
    replay = await expect(alice, "result", ref="a-1", job_id=done["job_id"])
    assert replay["result"] == {"echo": "a-1"}
    await result(node, job_a2, result={"echo": "a-2"})
    await expect(alice, "result", ref="a-2", status="finished")
    await expect_silence(bob, 50 * MS)


async def test_node_completes_only_jobs_dispatched_to_it(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub(node_secret=NODE_SECRET)
    gpu1 = await open_node(connect, hub, "gpu-1", NODE_SECRET, languages=["en", "fr"])
    gpu2 = await open_node(connect, hub, "gpu-2", NODE_SECRET, languages=["de", "it"])
    session, _ = await open_session(connect, hub)
    await submit(session, "c-1")
    accepted = await expect(session, "accepted", ref="c-1", node_id="gpu-1")
    job = await expect(gpu1, "job", job_id=accepted["job_id"])

    # gpu-2 learned the job id somehow and reports a result for it.
    await result(gpu2, job, result={"text": "forged"})
    await expect(gpu2, "error", code="NODE_MISMATCH")
    await result(gpu2, job, status="failed", error="forged")
    await expect(gpu2, "error", code="NODE_MISMATCH")
    await send(gpu2, type="partial", job_id=job["job_id"], attempt=1, result={"t": "forged"})
    error = await expect(gpu2, "error")
    assert error["code"] in ("NODE_MISMATCH", "UNKNOWN_JOB")
    # Nothing reached the session, the job still runs on gpu-1, and gpu-2's
    # slot count did not move.
    await expect_silence(session, 100 * MS)
    assert (await redis.hget(keys.job(job["job_id"]), "status")) == b"running"
    assert (await node_hash(redis, keys, "gpu-2"))["running"] == "0"
    assert (await node_hash(redis, keys, "gpu-1"))["running"] == "1"
    await result(gpu1, job, result={"text": "real"})
    done = await expect(session, "result", ref="c-1", status="finished")
    assert done["result"] == {"text": "real"}


async def test_node_cannot_resume_another_nodes_job(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub()
    gpu1 = await open_node(connect, hub, "gpu-1", languages=["en", "fr"])
    session, _ = await open_session(connect, hub)
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1", node_id="gpu-1")
    job = await expect(gpu1, "job")
    # gpu-2 registers claiming to still run gpu-1's job (protocol.md §3.1 resume).
    gpu2 = await connect(hub, "/v1/node")
    registered = await register(
        gpu2, node_id="gpu-2", languages=["en", "fr"], resume=[job["job_id"]]
    )
    assert registered["resumed"] == []
    assert registered["dropped"] == [job["job_id"]]
    assert (await redis.hget(keys.job(job["job_id"]), "node")) == b"gpu-1"
    await result(gpu2, job)
    await expect(gpu2, "error", code="NODE_MISMATCH")
    await result(gpu1, job, result={"by": "gpu-1"})
    done = await expect(session, "result", ref="c-1")
    assert done["result"] == {"by": "gpu-1"}


async def test_job_ids_are_unguessable(make_hub: MakeHub, connect: Connect) -> None:
    ids = [new_job_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    for jid in ids:
        # 22 URL-safe base64 characters: 132 bits, of which 128 are random.
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", jid), jid
    # Every character takes many values (no counter, no timestamp); the last
    # one carries the remaining 2 of the 128 random bits.
    for position in range(21):
        assert len({jid[position] for jid in ids}) > 40, position
    assert len({jid[21] for jid in ids}) == 4
    # The hub gives real jobs ids of this form, never one the client chose.
    hub = await make_hub()
    node = await open_node(connect, hub, "gpu-1", max_jobs=8)
    session, _ = await open_session(connect, hub)
    seen = set()
    for i in range(20):
        await send(
            session, type="job", ref=f"c-{i}", src_lang="en", tgt_lang="fr", job_id=f"chosen-{i}"
        )
        accepted, _ = await run_job_after_submit(session, node, f"c-{i}")
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", accepted["job_id"])
        seen.add(accepted["job_id"])
    assert len(seen) == 20


async def test_no_frame_can_name_another_session_or_node(
    make_hub: MakeHub, connect: Connect, redis: Redis, keys: Keys
) -> None:
    hub = await make_hub()
    gpu1 = await open_node(connect, hub, "gpu-1", languages=["en", "fr"])
    gpu2 = await open_node(connect, hub, "gpu-2", languages=["de", "it"])
    victim, welcome_v = await open_session(connect, hub)
    mallory, welcome_m = await open_session(connect, hub)
    sid_v, sid_m = welcome_v["session_id"], welcome_m["session_id"]

    # A job frame naming the victim's session, a node, a job id and an attempt.
    await send(
        mallory,
        type="job",
        ref="m-1",
        src_lang="en",
        tgt_lang="fr",
        session_id=sid_v,
        node_id="gpu-2",
        job_id="chosen",
        attempt=7,
        hub_id="other-hub",
    )
    accepted = await expect(mallory, "accepted", ref="m-1", node_id="gpu-1", attempt=1)
    assert accepted["job_id"] != "chosen"
    job = await expect(gpu1, "job", job_id=accepted["job_id"], session_id=sid_m, attempt=1)
    assert (await redis.hget(keys.job(job["job_id"]), "session")) == sid_m.encode()
    assert not await redis.exists(keys.job("chosen"))

    # gpu-2 claims to be gpu-1 inside its result frame: its connection says otherwise.
    await send(
        gpu2,
        type="result",
        job_id=job["job_id"],
        attempt=1,
        status="finished",
        result={"t": "forged"},
        node_id="gpu-1",
    )
    await expect(gpu2, "error", code="NODE_MISMATCH")
    # gpu-1's result names the victim's session: it still goes to the job's session.
    await send(
        gpu1,
        type="result",
        job_id=job["job_id"],
        attempt=1,
        status="finished",
        result={"t": "real"},
        session_id=sid_v,
        ref="v-1",
    )
    done = await expect(mallory, "result", ref="m-1", status="finished")
    assert done["result"] == {"t": "real"}
    # Cancel and ack frames naming the victim act on Mallory's own jobs only.
    await submit(victim, "v-1")
    victim_job = await expect(victim, "accepted", ref="v-1")
    await send(mallory, type="cancel", ref="v-1", session_id=sid_v)
    await expect(mallory, "error", ref="v-1", code="UNKNOWN_JOB")
    await send(mallory, type="ack", job_ids=[victim_job["job_id"]], session_id=sid_v)
    await expect_silence(victim, 100 * MS)
    assert (await redis.hget(keys.job(victim_job["job_id"]), "status")) == b"running"
    # A register frame cannot be sent again to switch ids mid-connection.
    await send(
        gpu2, type="register", node_id="gpu-1", services=["asr"], max_jobs=1, languages=["en", "fr"]
    )
    await expect(gpu2, "error", code="ALREADY_REGISTERED")
    assert hub.registry.nodes["gpu-1"].ws is not hub.registry.nodes["gpu-2"].ws
    await expect(gpu1, "job", job_id=victim_job["job_id"])


async def test_resume_with_a_wrong_token_is_closed_4007(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(resume_window_s=5.0)
    alice, welcome_a = await open_session(connect, hub)
    _, welcome_b = await open_session(connect, hub)
    sid_a, token_a = welcome_a["session_id"], welcome_a["resume_token"]
    sid_b = welcome_b["session_id"]
    await alice.close()
    # The last hex digit changed (a fixed "0" would be right one time in 16).
    near_miss = token_a[:-1] + ("1" if token_a.endswith("0") else "0")
    for query in (
        f"session_id={sid_a}&resume_token={near_miss}",
        f"session_id={sid_a}&resume_token=",
        f"session_id={sid_a}",
        f"session_id={sid_a}&resume_token={token_a.upper()}x",
        f"session_id={sid_b}&resume_token={token_a}",  # Alice's token for Bob's session
        f"session_id=unknown&resume_token={token_a}",
        f"session_id={sid_a}&resume_token=%C3%A9{token_a[1:]}",  # non-ASCII
        f"session_id=%C3%A9&resume_token={token_a}",
    ):
        ws = await connect(hub, f"/v1/session?{query}")
        frames = await expect_closed(ws, 4007)
        assert frames == [], query  # no welcome, nothing about anyone's jobs
    # The right token still works.
    _, again = await open_session(
        connect, hub, f"/v1/session?session_id={sid_a}&resume_token={token_a}"
    )
    assert again["session_id"] == sid_a


# Open mode only on loopback (protocol.md §10)


def test_check_exposure_refuses_open_mode_beyond_loopback() -> None:
    for host in ("0.0.0.0", "::", "192.0.2.7", "example.com"):
        with pytest.raises(ConfigError) as info:
            check_exposure(Settings(host=host))
        assert info.value.name == "host"
    # Half the auth is not enough.
    for partial in ({"node_secret": "s"}, {"node_token_key": "k"}, {"session_jwt_key": "k"}):
        with pytest.raises(ConfigError):
            check_exposure(Settings(host="0.0.0.0", **partial))


def test_check_exposure_allows_loopback_without_auth(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hub")
    for host in ("127.0.0.1", "127.1.2.3", "::1", "localhost"):
        check_exposure(Settings(host=host))
    assert caplog.records == []


def test_check_exposure_insecure_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hub")
    check_exposure(Settings(host="0.0.0.0", insecure=True))
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.name == "hub.gate"
    assert "0.0.0.0" in record.getMessage()


def test_check_exposure_passes_with_node_and_session_auth(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="hub")
    check_exposure(Settings(host="0.0.0.0", node_secret="s", session_jwt_key=SESSION_KEY))
    check_exposure(Settings(host="0.0.0.0", node_token_key=NODE_KEY, session_jwt_key=SESSION_KEY))
    assert caplog.records == []


def test_hub_serve_on_all_interfaces_without_auth_exits_with_one_line(tmp_path: Path) -> None:
    # No HUB_* settings, and no asyncio debug (its slow-callback warnings are
    # not the CLI's output).
    proc = run_command(
        hub_command(
            "serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "data")
        ),
        cwd=tmp_path,
        env=child_env(drop_hub_settings=True),
        timeout_s=30,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hub: error:"), lines
    assert "0.0.0.0" in lines[0]
    assert "Traceback" not in proc.stderr
    # It refused before starting anything: no embedded Redis data directory.
    assert not (tmp_path / "data").exists()


# Secrets never logged


def hub_log_text(records: list[logging.LogRecord]) -> str:
    """Everything the hub's side logged (the test's own clients excluded), tracebacks included."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(
        formatter.format(r) for r in records if not r.name.startswith("websockets.client")
    )


async def test_secrets_are_never_logged(
    make_hub: MakeHub,
    connect: Connect,
    spawn_redis: Callable[..., RedisProcess],
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = "redis-pw-93e1d7"
    default_password = "default-pw-41b2e8"
    server = spawn_redis()

    def protect() -> None:
        # An ACL user for the hub, and a password on the default user, so
        # only the URL's credentials get in.
        client = sync_redis.Redis(port=server.port, socket_timeout=5)
        client.acl_setuser(
            "hub",
            enabled=True,
            passwords=[f"+{password}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
        client.config_set("requirepass", default_password)
        client.close()

    protect()
    url = f"redis://hub:{password}@127.0.0.1:{server.port}/0"
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="websockets")
    caplog.set_level(logging.DEBUG, logger="hub")
    caplog.set_level(logging.DEBUG, logger="redis")

    # A hub with the wrong password never gets ready, and says nothing secret.
    wrong = Hub(
        Settings(host="127.0.0.1", port=0, cell="t-secrets", node_secret=NODE_SECRET),
        url.replace(password, password + "-wrong"),
    )
    await wrong.start()
    await wait_for(lambda: not wrong.ready, timeout=300 * MS)
    await asyncio.sleep(300 * MS)
    await wrong.close()

    resume_secret = "resume-secret-51aa0c"
    hub = await make_hub(
        redis_url=url,
        node_secret=NODE_SECRET,
        session_jwt_key=SESSION_KEY,
        resume_secret=resume_secret,
    )
    session_jwt = mint_session_token(SESSION_KEY, session_id="s-logged")
    # Auth failures with the right secret nearby, and successes.
    await refused(connect, hub, "/v1/node", **bearer(NODE_SECRET + "x"))
    await refused(connect, hub, "/v1/session", **bearer(SESSION_KEY))
    await refused(connect, hub, f"/v1/session?token={SESSION_KEY}")
    node = await open_node(connect, hub, "gpu-1", NODE_SECRET)
    session, welcome = await open_session(connect, hub, **bearer(session_jwt))
    await run_job(session, node, "c-1")
    resumable, _ = await open_session(connect, hub, f"/v1/session?token={session_jwt}")
    await resumable.close()
    # Redis goes away and comes back.
    await asyncio.to_thread(server.stop)
    await wait_for(lambda: not hub.ready, timeout=3000 * MS)
    await asyncio.to_thread(server.start)
    await asyncio.to_thread(protect)
    await wait_for(lambda: hub.ready, timeout=5000 * MS)

    text = hub_log_text(caplog.records)
    # The handshakes were logged at DEBUG (so the check below is not vacuous).
    assert "websockets.server DEBUG < GET /v1/session" in text
    assert "***" in text  # the Redis URL is logged, redacted
    for secret in (
        password,
        default_password,
        NODE_SECRET,
        SESSION_KEY,
        resume_secret,
        session_jwt,
        welcome["resume_token"],
    ):
        assert secret not in text, f"{secret!r} was logged"


def test_redis_url_password_is_redacted_in_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(redis_url="redis://user:pw-c0ffee@127.0.0.1:notaport/0")
    assert "pw-c0ffee" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        Settings(redis_url="redis://user:pw-c0ffee@127.0.0.1:6379/db")
    assert "pw-c0ffee" not in str(info.value)
    assert "***" in str(info.value)


def test_settings_repr_hides_secrets() -> None:
    settings = Settings(
        redis_url="redis://:pw-c0ffee@127.0.0.1:6379/0",
        node_secret="ns-c0ffee",
        node_token_key="nk-c0ffee-0123456789abcdef-0123456789",
        session_jwt_key="sk-c0ffee-0123456789abcdef-0123456789",
        resume_secret="rs-c0ffee",
    )
    assert "c0ffee" not in repr(settings)


@pytest.mark.parametrize("field", ["node_token_key", "session_jwt_key"])
def test_settings_refuse_short_hs256_keys(field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(**{field: "short"})
    assert str(info.value) == f"invalid setting {field}='***': an HS256 key needs at least 32 bytes"


async def test_node_token_cannot_open_a_session() -> None:
    auth = Authenticator(Settings(node_token_key=NODE_KEY, session_jwt_key=NODE_KEY))
    token = mint_node_token(NODE_KEY, ["gpu-1"])
    with pytest.raises(Unauthorized) as info:
        auth.session({"Authorization": f"Bearer {token}"}, {})
    assert info.value.message == "a node token cannot open a session"


def test_admin_token_key_and_watch_settings_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(admin_token_key="short")
    assert str(info.value) == (
        "invalid setting admin_token_key='***': an HS256 key needs at least 32 bytes"
    )
    for name, value in (("watch_interval_s", 0.0), ("latency_window_s", 7200.0)):
        with pytest.raises(ConfigError) as info:
            Settings(**{name: value})
        assert info.value.name == name
    with pytest.raises(ConfigError):
        Settings(watch_max_nodes=0)


async def test_cell_claims_are_read_and_checked() -> None:
    auth = Authenticator(Settings(node_token_key=NODE_KEY, session_jwt_key=SESSION_KEY))
    node = mint_node_token(NODE_KEY, ["gpu-1"], cell="eu")
    assert auth.node({"Authorization": f"Bearer {node}"}).cell == "eu"
    plain = mint_node_token(NODE_KEY, ["gpu-1"])
    assert auth.node({"Authorization": f"Bearer {plain}"}).cell is None
    bad = jwt.encode({"node_ids": ["gpu-1"], "cell": "e{u}", "exp": int(time.time()) + 60},
                     NODE_KEY, algorithm="HS256")  # fmt: skip
    with pytest.raises(Unauthorized) as info:
        auth.node({"Authorization": f"Bearer {bad}"})
    assert info.value.message == "invalid cell claim"
    session = mint_session_token(SESSION_KEY, cell="eu")
    assert auth.session({}, {"token": [session]}).cell == "eu"
    assert auth.session({}, {"token": [mint_session_token(SESSION_KEY)]}).cell is None
