"""What both SDKs share about the WebSocket: URLs, headers, close codes."""

from __future__ import annotations

from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.exceptions import ConnectionClosed, InvalidStatus

__all__ = ["auth_headers", "close_of", "endpoint", "handshake_status"]


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
