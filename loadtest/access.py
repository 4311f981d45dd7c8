"""How the harness reaches a deployment it did not start: tokens, TLS, checks before a run.

``hub bench --url wss://hub.example --token-file FILE`` loads a fleet that
requires authentication (protocol.md §10). The token file holds two tokens,
one per line, as ``name = value``; blank lines and lines starting with ``#``
are ignored::

    # hub bench tokens
    node = <the fleet's node secret, or a node token for bench-*>
    session = <a session JWT without a sid claim>

A file, not flags: a token on the command line shows in every user's
``ps``. The parent gives the tokens to its worker processes in their
environment (:data:`NODE_TOKEN_ENV`, :data:`SESSION_TOKEN_ENV`), never on
their command line, for the same reason.

Before any worker starts, :func:`check_tokens` reads the tokens' claims
(without the key, which the harness does not have: the hub checks the
signature) for the mistakes that would ruin a run, and :func:`preflight`
opens one node and one session connection to each hub, so a refused token,
a TLS failure or a wrong address is one clear error rather than thousands
of failed connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import ssl
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt

from . import wsclient

__all__ = [
    "NODE_TOKEN_ENV",
    "SESSION_TOKEN_ENV",
    "Access",
    "AccessError",
    "check_tokens",
    "node_id_allowed",
    "preflight",
    "read_token_file",
    "token_file_mode_warning",
]

NODE_TOKEN_ENV = "HUB_BENCH_NODE_TOKEN"
SESSION_TOKEN_ENV = "HUB_BENCH_SESSION_TOKEN"

MAX_TOKEN_FILE_BYTES = 64 * 1024
"""A token file is two lines; anything larger is not one."""

PREFLIGHT_TIMEOUT_S = 10.0
"""Most time for each connection of :func:`preflight`."""


class AccessError(Exception):
    """A token file, a token or a hub the run cannot use; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Access:
    """The credentials and TLS settings every simulated connection uses.

    Args:
        node_token: sent by nodes as ``Authorization: Bearer`` (None: no header).
        session_token: sent by sessions the same way.
        ca_file: PEM file of the CAs that sign the hubs' certificates
            (None: the system's).
        verify_tls: check the hubs' certificates and host names (``wss://``).
    """

    node_token: str | None = None
    session_token: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True

    def headers(self, kind: str) -> list[tuple[str, str]]:
        """The extra request headers of a ``node`` or ``session`` connection."""
        token = self.node_token if kind == "node" else self.session_token
        return [] if token is None else [("Authorization", f"Bearer {token}")]

    @functools.cached_property
    def tls(self) -> ssl.SSLContext:
        """The TLS context of ``wss://`` connections (built once, on first use)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    # Passing it to worker processes

    def child_env(self) -> dict[str, str]:
        """The tokens, as environment variables of a worker process."""
        env = {}
        if self.node_token is not None:
            env[NODE_TOKEN_ENV] = self.node_token
        if self.session_token is not None:
            env[SESSION_TOKEN_ENV] = self.session_token
        return env

    def to_json(self) -> dict[str, Any]:
        """What a worker's command line may carry: the TLS settings, no token."""
        return {"ca_file": self.ca_file, "verify_tls": self.verify_tls}

    @classmethod
    def from_child(cls, data: Mapping[str, Any], environ: Mapping[str, str]) -> Access:
        """The parent's :class:`Access` in a worker: :meth:`to_json` and :meth:`child_env`."""
        return cls(
            node_token=environ.get(NODE_TOKEN_ENV),
            session_token=environ.get(SESSION_TOKEN_ENV),
            ca_file=data.get("ca_file"),
            verify_tls=bool(data.get("verify_tls", True)),
        )


def read_token_file(path: Path) -> tuple[str | None, str | None]:
    """The node and session tokens of a token file (see the module's docstring).

    Returns:
        ``(node, session)``; either may be None when the file does not give it.

    Raises:
        AccessError: the file cannot be read, or a line is not ``node = …``
            or ``session = …``, or a name comes twice, or it gives no token.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise AccessError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise AccessError(f"{path}: larger than {MAX_TOKEN_FILE_BYTES} bytes: not a token file")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise AccessError(f"{path}: not UTF-8 text") from exc
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in ("node", "session"):
            raise AccessError(f"{path}:{number}: expected 'node = TOKEN' or 'session = TOKEN'")
        if not value:
            raise AccessError(f"{path}:{number}: {name}: empty token")
        if name in tokens:
            raise AccessError(f"{path}:{number}: {name} given twice")
        tokens[name] = value
    if not tokens:
        raise AccessError(f"{path}: no token: expected 'node = TOKEN' and 'session = TOKEN' lines")
    return tokens.get("node"), tokens.get("session")


def node_id_allowed(patterns: Sequence[str], node_id: str) -> bool:
    """Whether a node token's ``node_ids`` let a node register as ``node_id`` (hub/auth.py)."""
    return any(node_id.startswith(p[:-1]) if p.endswith("*") else p == node_id for p in patterns)


def check_tokens(
    access: Access,
    *,
    node_ids: Sequence[str],
    pair: tuple[str, str],
    sessions: int,
    run_s: float,
    now: float | None = None,
) -> list[str]:
    """Check what the tokens' claims say against the run, before it starts.

    Args:
        node_ids: the simulated nodes' ids (empty: no node).
        pair: the sessions' language pair.
        sessions: how many sessions (0: the session token is not used).
        run_s: from now to the last connection a churn may open.
        now: the time (default: now).

    Returns:
        Warnings: what may go wrong but need not (a token that expires
        during the run: the connections it opened stay open).

    Raises:
        AccessError: a token the run cannot use: expired, a node token
            whose ``node_ids`` leave out the simulated nodes, a session token
            that names one session (``sid``: every simulated session would
            replace the previous one) or whose ``pairs`` leave out the pair.
    """
    now = time.time() if now is None else now
    warnings: list[str] = []
    checks = []
    if node_ids and access.node_token is not None:
        checks.append(("node", access.node_token))
    if sessions and access.session_token is not None:
        checks.append(("session", access.session_token))
    for kind, token in checks:
        claims = _claims(token)
        if claims is None:
            continue  # not a JWT: the fleet's node secret, checked by the hub alone
        exp = claims.get("exp")
        if isinstance(exp, int | float) and not isinstance(exp, bool):
            if exp <= now:
                raise AccessError(f"the {kind} token expired {now - exp:.0f} s ago")
            if exp < now + run_s:
                warnings.append(
                    f"the {kind} token expires in {exp - now:.0f} s, before the run ends "
                    f"(about {run_s:.0f} s): connections opened after that will be refused"
                )
        if kind == "node":
            if "node_ids" not in claims:
                raise AccessError("the node token is a session token (it has no node_ids claim)")
            patterns = claims["node_ids"]
            if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
                raise AccessError("the node token's node_ids claim is not a list of ids")
            refused = [n for n in (node_ids[0], node_ids[-1]) if not node_id_allowed(patterns, n)]
            if refused:
                raise AccessError(
                    f"the node token allows node ids {', '.join(patterns)}, not {refused[0]}: "
                    "mint one for the bench's ids (hub token --node-ids 'bench-*') or set "
                    "--node-prefix"
                )
        else:
            if "node_ids" in claims:
                raise AccessError("the session token is a node token (it has a node_ids claim)")
            if claims.get("sid") is not None:
                raise AccessError(
                    "the session token names one session (claim sid): every simulated "
                    "session would take over the previous one; mint one without it "
                    "(hub token --no-session-id)"
                )
            pairs = claims.get("pairs")
            wanted = f"{pair[0]}:{pair[1]}".lower()
            if isinstance(pairs, list) and wanted not in {str(p).lower() for p in pairs}:
                raise AccessError(
                    f"the session token allows the pairs {', '.join(map(str, pairs))}, "
                    f"not {wanted}: mint one with --pairs {wanted}"
                )
    return warnings


def _claims(token: str) -> dict[str, Any] | None:
    """A JWT's claims, unverified; None when ``token`` is not a JWT."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    return claims if isinstance(claims, dict) else None


async def preflight(access: Access, urls: Sequence[str], *, nodes: bool, sessions: bool) -> None:
    """Open and close one node and one session connection to each hub.

    Raises:
        AccessError: a hub refused a connection (its HTTP status and reason:
            ``401 … token expired``), or could not be reached.
    """
    kinds = [k for k, wanted in (("node", nodes), ("session", sessions)) if wanted]
    for url in urls:
        for kind in kinds:
            endpoint = f"{url}/v1/{kind}"
            try:
                conn = await wsclient.connect(
                    endpoint,
                    _ignore_message,
                    _ignore_close,
                    timeout_s=PREFLIGHT_TIMEOUT_S,
                    headers=access.headers(kind),
                    ssl=access.tls,
                )
            except TimeoutError:
                raise AccessError(
                    f"{endpoint}: no answer within {PREFLIGHT_TIMEOUT_S:g} s"
                ) from None
            except (OSError, ConnectionError, wsclient.HandshakeFailed) as exc:
                raise AccessError(f"{endpoint}: {exc}") from exc
            conn.close()
            # Let the closing handshake go out before the next connection.
            await asyncio.sleep(0)


def _ignore_message(binary: bool, data: bytes) -> None:
    """Preflight connections read nothing."""


def _ignore_close(code: int | None) -> None:
    """Preflight connections are closed by us."""


def token_file_mode_warning(path: Path) -> str | None:
    """A warning when other users may read the token file, else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if mode & 0o077:
        return f"{path} can be read by other users (chmod 600 {path})"
    return None
