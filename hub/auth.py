"""Who may connect, and as whom (protocol.md §10).

Nodes present ``Authorization: Bearer <token>``: either the fleet's shared
secret (any node id) or a per-node JWT (HS256, key ``node_token_key``) whose
``node_ids`` claim lists the ids it may register as (``"gpu-*"`` matches a
prefix). Sessions present a short-lived JWT signed by the application's
backend (HS256 secret or EdDSA public key ``session_jwt_key``), in the
``Authorization`` header or, for browsers, the ``token`` query parameter.

Claims of a session token:

``sid``           the session id (optional; random when absent)
``pairs``         allowed language pairs, ``["zh:en", ...]`` (optional: all)
``rate``          jobs per second (optional: the hub's ``session_rate_per_s``)
``burst``         token bucket size (optional)
``max_inflight``  unfinished jobs (optional)
``cell``          the session's cell (optional: ``?cell=``, else the hub's default)
``exp``           expiry, required

A node token may also name a ``cell``: the node joins it, and may not name
another in its ``register``.
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt

from .config import Settings
from .errors import Unauthorized
from .keys import is_cell

__all__ = [
    "Authenticator",
    "NodeGrant",
    "SessionGrant",
    "mint_admin_token",
    "mint_node_token",
    "mint_session_token",
]

TOKEN_LEEWAY_S = 60
"""Clock skew allowed between a token's issuer and the hub, in seconds, when
``exp`` and ``nbf`` are checked against the hub's wall clock (protocol.md §10)."""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeGrant:
    """What a node connection may register as."""

    any_id: bool
    node_ids: tuple[str, ...] = ()
    cell: str | None = None
    """The cell the token puts the node in; ``None``: its register's, else the hub's."""

    def allows(self, node_id: str) -> bool:
        """Whether the connection may register as ``node_id``."""
        if self.any_id:
            return True
        for pattern in self.node_ids:
            if pattern.endswith("*"):
                if node_id.startswith(pattern[:-1]):
                    return True
            elif hmac.compare_digest(pattern.encode(), node_id.encode()):  # str: ASCII only
                return True
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class SessionGrant:
    """What a session connection may do."""

    session_id: str | None = None
    pairs: frozenset[str] | None = None
    rate_per_s: float | None = None
    burst: int | None = None
    max_inflight: int | None = None
    cell: str | None = None
    """The session's cell; ``None``: the URL's ``?cell=``, else the hub's default."""

    def allows_pair(self, src: str, tgt: str) -> bool:
        """Whether the session may submit jobs for ``src`` -> ``tgt``."""
        return self.pairs is None or f"{src.lower()}:{tgt.lower()}" in self.pairs


OPEN_NODE = NodeGrant(any_id=True)
OPEN_SESSION = SessionGrant()


class Authenticator:
    """Checks credentials against the settings; open mode when none are configured."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node_auth = bool(settings.node_secret or settings.node_token_key)
        """Whether nodes must authenticate."""
        self.session_auth = bool(settings.session_jwt_key)
        """Whether sessions must authenticate."""
        self.admin_auth = bool(settings.admin_token_key)
        """Whether the dashboard and ``/v1/watch`` take admin tokens."""

    def node(self, headers: Mapping[str, str]) -> NodeGrant:
        """Check a node's handshake.

        Raises:
            Unauthorized: no token, or one that is neither the fleet secret
                nor a valid node token.
        """
        if not self.node_auth:
            return OPEN_NODE
        token = _bearer(headers)
        if token is None:
            raise Unauthorized("missing bearer token")
        s = self.settings
        if s.node_secret and hmac.compare_digest(token.encode(), s.node_secret.encode()):
            return OPEN_NODE
        if s.node_token_key:
            claims = _decode(token, s.node_token_key, "HS256")
            ids = claims.get("node_ids")
            cell = claims.get("cell")
            if cell is not None and not is_cell(cell):
                raise Unauthorized("invalid cell claim")
            if isinstance(ids, list) and ids and all(isinstance(i, str) and i for i in ids):
                return NodeGrant(any_id=False, node_ids=tuple(ids), cell=cell)
            raise Unauthorized("node token has no node_ids")
        raise Unauthorized("invalid token")

    def session(
        self, headers: Mapping[str, str], query: Mapping[str, Sequence[str]]
    ) -> SessionGrant:
        """Check a session's handshake (header first, then ``?token=``).

        Raises:
            Unauthorized: no token, a bad signature, an expired token or bad claims.
        """
        if not self.session_auth:
            return OPEN_SESSION
        token = _bearer(headers)
        if token is None:
            values = query.get("token")
            token = values[0] if values else None
        if not token:
            raise Unauthorized("missing session token")
        key = self.settings.session_jwt_key
        assert key is not None
        claims = _decode(token, key, self.settings.session_jwt_algorithm)
        if "node_ids" in claims:
            # A node token is not a session token, even under a shared key.
            raise Unauthorized("a node token cannot open a session")
        return _session_grant(claims)

    def admin(self, headers: Mapping[str, str], query: Mapping[str, Sequence[str]]) -> None:
        """Check the admin token of a ``/dashboard`` or ``/v1/watch`` request.

        The token comes in the ``Authorization`` header or, for browsers
        (which cannot set headers on a WebSocket), the ``token`` query
        parameter. It must be signed with ``admin_token_key`` and carry
        ``"admin": true``.

        Raises:
            Unauthorized: no admin key configured, no token, a bad signature,
                an expired token, or a token that is not an admin's.
        """
        key = self.settings.admin_token_key
        if not key:
            raise Unauthorized("admin tokens need admin_token_key")
        token = _bearer(headers)
        if token is None:
            values = query.get("token")
            token = values[0] if values else None
        if not token:
            raise Unauthorized("missing admin token")
        if _decode(token, key, "HS256").get("admin") is not True:
            raise Unauthorized("not an admin token")


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _decode(token: str, key: str, algorithm: str) -> dict[str, Any]:
    try:
        # The only comparisons of the hub's wall clock with another's: with a
        # leeway, so that a hub whose clock is off by tens of seconds takes
        # tokens as their issuer meant them. ``iat`` (RFC 7519 §4.1.6) says
        # when the token was made, not from when it is valid: PyJWT would
        # refuse a fresh token on a hub whose clock is behind, so it is not
        # checked.
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            options={"require": ["exp"], "verify_iat": False},
            leeway=TOKEN_LEEWAY_S,
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("token expired") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthorized("invalid token") from exc
    if not isinstance(claims, dict):
        raise Unauthorized("invalid token")
    return claims


def _session_grant(claims: Mapping[str, Any]) -> SessionGrant:
    sid = claims.get("sid")
    if sid is not None and not (isinstance(sid, str) and _valid_id(sid)):
        raise Unauthorized("invalid sid claim")
    pairs = claims.get("pairs")
    if pairs is not None:
        if not isinstance(pairs, list) or not all(isinstance(p, str) for p in pairs):
            raise Unauthorized("invalid pairs claim")
        pairs = frozenset(p.lower() for p in pairs)
    numbers: dict[str, Any] = {}
    for claim, kind in (("rate", float), ("burst", int), ("max_inflight", int)):
        value = claims.get(claim)
        if value is None:
            numbers[claim] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise Unauthorized(f"invalid {claim} claim")
        numbers[claim] = kind(value)
    cell = claims.get("cell")
    if cell is not None and not is_cell(cell):
        raise Unauthorized("invalid cell claim")
    return SessionGrant(
        sid, pairs, numbers["rate"], numbers["burst"], numbers["max_inflight"], cell
    )


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in value)


def mint_session_token(
    key: str,
    *,
    session_id: str | None = None,
    pairs: Sequence[str] | None = None,
    rate: float | None = None,
    max_inflight: int | None = None,
    cell: str | None = None,
    ttl_s: int = 3600,
    algorithm: str = "HS256",
) -> str:
    """Sign a session token (what an application backend does; ``hub token`` for development)."""
    claims: dict[str, Any] = {"exp": int(time.time()) + ttl_s, "iat": int(time.time())}
    if session_id is not None:
        claims["sid"] = session_id
    if pairs is not None:
        claims["pairs"] = list(pairs)
    if rate is not None:
        claims["rate"] = rate
    if max_inflight is not None:
        claims["max_inflight"] = max_inflight
    if cell is not None:
        claims["cell"] = cell
    return jwt.encode(claims, key, algorithm=algorithm)


def mint_node_token(
    key: str, node_ids: Sequence[str], *, ttl_s: int = 30 * 86400, cell: str | None = None
) -> str:
    """Sign a per-node token naming the ids (or ``prefix*`` patterns) it may register as,
    and optionally the cell it joins."""
    now = int(time.time())
    claims: dict[str, Any] = {"node_ids": list(node_ids), "exp": now + ttl_s, "iat": now}
    if cell is not None:
        claims["cell"] = cell
    return jwt.encode(claims, key, algorithm="HS256")


def mint_admin_token(key: str, *, ttl_s: int = 86400) -> str:
    """Sign an admin token: ``/dashboard`` and ``/v1/watch`` when auth is on."""
    now = int(time.time())
    return jwt.encode({"admin": True, "exp": now + ttl_s, "iat": now}, key, algorithm="HS256")
