"""redis-py asyncio connections that pack commands with hiredis.

redis-py's asyncio connections parse replies with hiredis when it is installed
but always pack commands with the pure-Python packer (``pack_command`` and
``Encoder.encode``), the largest single cost in a profile of the hub under
load: every scheduling call is an EVALSHA of about twenty arguments. The classes
here pack with ``hiredis.pack_command`` instead, and fall back to redis-py's
packer for anything hiredis does not take (``bool``, ``bytearray``, other
types, which redis-py accepts or refuses with :class:`~redis.exceptions.DataError`)
and when hiredis is not installed, so the bytes on the wire are the same.
They also write without the Task redis-py's ``asyncio.wait_for()`` creates
per write on Python 3.11.

:func:`client_from_url` is ``Redis.from_url`` with these classes, for the
three URL schemes the hub accepts: ``redis://``, ``rediss://``, ``unix://``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.typing import EncodableT

from .config import RedisDSN, Settings

_hiredis_pack: Callable[..., bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis comes with redis[hiredis]
    _hiredis_pack = None

__all__ = [
    "HiredisConnection",
    "HiredisSSLConnection",
    "HiredisUnixDomainSocketConnection",
    "client_from_url",
    "redis_client",
]


class _HiredisPacking(AbstractConnection):
    """Pack commands with ``hiredis.pack_command``; redis-py's packer otherwise."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        encoder = self.encoder
        utf8 = encoder.encoding.lower().replace("_", "-") in ("utf-8", "utf8")
        self._pack = _hiredis_pack if utf8 and encoder.encoding_errors == "strict" else None
        """hiredis' packer, or None: it encodes ``str`` as strict UTF-8 only."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        """Pack one command (one ``bytes``), like redis-py's packer does.

        As in redis-py, a command name of several words (``"CLIENT SETINFO"``,
        sent during the handshake) is split into several arguments.
        """
        pack = self._pack
        if pack is None:
            return super().pack_command(*args)
        name = args[0]
        if isinstance(name, str):
            if " " in name:
                args = (*name.encode().split(), *args[1:])
        elif isinstance(name, bytes) and b" " in name:
            args = (*name.split(), *args[1:])
        try:
            return [pack(args)]
        except TypeError:
            # bool (refused), None, bytearray, IntEnum...: redis-py's packer
            # decides, as it would have anyway.
            return super().pack_command(*args)

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        """Write packed commands, like redis-py, bounded by ``socket_timeout``.

        redis-py bounds the write with ``asyncio.wait_for()``, which runs it in
        a Task of its own (Python < 3.12): a Task and an event-loop iteration
        per pipeline. ``asyncio.timeout()`` bounds it in place. Connecting and
        the errors are redis-py's: a timeout raises
        :class:`~redis.exceptions.TimeoutError`, an OSError
        :class:`~redis.exceptions.ConnectionError`, and any failure closes the
        connection (part of the command may have been written), dropping what
        is still buffered.
        """
        writer = self._writer
        timeout_s = self.socket_timeout
        if writer is None or not timeout_s or (check_health and self.health_check_interval):
            # Not connected yet, no timeout, or a health check (PING) to do first.
            await super().send_packed_command(command, check_health)
            return
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            writer.writelines(command)
            if writer.transport.get_write_buffer_size() == 0:
                return  # all written at once (the usual case): nothing to wait for
            async with asyncio.timeout(timeout_s):
                await writer.drain()
        except BaseException as exc:
            # Abort rather than close: a close would keep writing what is
            # buffered (up to a whole pipeline of audio) to a server we gave up on.
            writer.transport.abort()
            await self.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                raise redis_errors.TimeoutError("Timeout writing to socket") from None
            if isinstance(exc, OSError):
                raise redis_errors.ConnectionError(f"Error writing to socket: {exc}") from exc
            raise

    def pack_commands(self, commands: Iterable[Iterable[EncodableT]]) -> list[bytes]:
        """Pack commands for a pipeline: one ``bytes`` per command.

        Not joined: the transport's ``writelines`` takes the list as is, and a
        job's audio is then copied once, not twice.
        """
        if self._pack is None:
            return super().pack_commands(commands)
        pack = self.pack_command
        return [packed for command in commands for packed in pack(*command)]


class HiredisConnection(_HiredisPacking, Connection):
    """A TCP connection (``redis://``) packing commands with hiredis."""


class HiredisSSLConnection(_HiredisPacking, SSLConnection):
    """A TLS connection (``rediss://``) packing commands with hiredis."""


class HiredisUnixDomainSocketConnection(_HiredisPacking, UnixDomainSocketConnection):
    """A unix socket connection (``unix://``) packing commands with hiredis."""


_HIREDIS_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: HiredisConnection,
    SSLConnection: HiredisSSLConnection,
    UnixDomainSocketConnection: HiredisUnixDomainSocketConnection,
}


def client_from_url(url: str, **kwargs: Any) -> Redis:
    """``Redis.from_url(url, **kwargs)`` with connections that pack with hiredis.

    As in redis-py, options in the URL's query string win over ``kwargs``, and
    the client owns its pool (``aclose()`` disconnects it).

    Raises:
        ValueError: if the URL's scheme is not redis, rediss or unix.
    """
    kwargs.update(parse_url(url))
    connection_class = kwargs.get("connection_class", Connection)
    kwargs["connection_class"] = _HIREDIS_CLASSES.get(connection_class, connection_class)
    return Redis.from_pool(ConnectionPool(**kwargs))


def redis_client(url: str, settings: Settings, *, pubsub: bool = False) -> Redis:
    """A hub's redis-py client, with timeouts and retries set on purpose.

    Command clients get ``redis_timeout_s`` and no automatic retry (a retried
    script could run twice); the pub/sub client waits without a read timeout.

    Raises:
        ConfigError: if ``url`` is not a Redis URL (the password is redacted).
    """
    RedisDSN.parse(url)
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": settings.redis_timeout_s,
        "socket_timeout": None if pubsub else settings.redis_timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
        "health_check_interval": 0,
    }
    if not pubsub:
        kwargs["max_connections"] = 64
    return client_from_url(url, **kwargs)
