"""What both SDKs share about the WebSocket: URLs, headers, close codes."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidStatus

__all__ = ["auth_headers", "close_of", "endpoint", "handshake_status", "hub_order", "hub_urls"]


def endpoint(url: str, path: str, query: dict[str, str] | None = None) -> str:
    """The WebSocket URL of ``path`` on the hub at ``url``.

    ``url`` may be the hub's base (``ws://127.0.0.1:8765``) or already name
    the endpoint (``ws://127.0.0.1:8765/v1/node``); ``http(s)://`` is turned
    into ``ws(s)://``.

    Raises:
        ValueError: if ``url`` is not a ws://, wss://, http:// or https:// URL.
    """
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"hub URL must be ws://host:port or wss://host:port, got {url!r}")
    base_path = parts.path.rstrip("/")
    if not base_path.endswith(path):
        base_path += path
    extra = urlencode(query or {})
    joined = "&".join(q for q in (parts.query, extra) if q)
    return urlunsplit((scheme, parts.netloc, base_path, joined, ""))


def hub_urls(url: str | None, urls: Sequence[str] | None, path: str) -> list[str]:
    """The endpoint URLs of a client given ``url`` or ``urls``, without repeats.

    Raises:
        ValueError: unless exactly one of ``url`` and ``urls`` is given, if
            ``urls`` is empty or a string, or a URL is not a WebSocket URL.
    """
    if (url is None) == (urls is None):
        raise ValueError("give exactly one of url and urls")
    if isinstance(urls, str):
        raise ValueError("urls must be a list of hub URLs, not one string")
    given = [url] if url is not None else list(urls or ())
    if not given:
        raise ValueError("give at least one hub URL")
    return list(dict.fromkeys(endpoint(u, path) for u in given))


def hub_order(urls: Sequence[str], key: str | None, rng: random.Random) -> list[str]:
    """The order in which one client tries its hubs.

    With a ``key`` (a node's id) the order is rendezvous hashing: the URLs
    sorted by a hash of key and URL. A fleet spreads evenly over the hubs, a
    node tries the same hub first after every restart, the nodes of a hub
    that dies spread over the others (each has its own second choice), and
    adding or removing one URL moves only the nodes that chose it. Without a
    key (a session, whose id the hub gives) the order is a random one.
    """
    if key is None:
        return rng.sample(list(urls), len(urls))

    def weight(url: str) -> bytes:
        return hashlib.blake2b(f"{key}\n{url}".encode(), digest_size=8).digest()

    return sorted(urls, key=weight, reverse=True)


def auth_headers(token: str | None) -> dict[str, str] | None:
    """``Authorization: Bearer <token>``, or ``None`` without a token."""
    return None if token is None else {"Authorization": f"Bearer {token}"}


def close_of(exc: ConnectionClosed) -> tuple[int | None, str]:
    """The close code and reason the hub sent, or ``(None, "")`` if it sent none."""
    if exc.rcvd is None:
        return None, ""
    return exc.rcvd.code, exc.rcvd.reason


def handshake_status(exc: BaseException) -> int | None:
    """The HTTP status of a refused handshake, or ``None``."""
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code
    return None
