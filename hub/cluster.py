"""Redis clients by cell: one Redis for every cell, or the master of each cell's slot.

Every key of a cell shares one hash tag (``hub:v1:{cell}:``), so a cell lives
in one slot of a Redis Cluster and every script of the cell runs on the
master that owns that slot. The hub does not use redis-py's ``RedisCluster``
for this: its pipelines split by node and run command by command, which
would break the one-pipeline-per-loop-iteration fast path of
:mod:`hub.batcher`. Since a cell's calls all go to one slot, routing by slot
is a matter of knowing one address: a :class:`SlotOwner` per cell, which the
connections of the cell's clients read each time they connect.

- The address comes from ``CLUSTER SLOTS``, asked of the seed node of the
  URL, then of every node the last answer named (:meth:`ClusterLinks.locate`,
  a step of the Redis watch before the hub is ready: after a failover the
  old master's address stops answering and the watch locates the new one).
- A ``MOVED`` reply names the new owner: the connection that read it
  updates the :class:`SlotOwner` at once, and raises :class:`ClusterRedirect`
  (a ``ConnectionError``: the command did not run, every caller already
  treats that as Redis being briefly away). The batcher retries its script
  calls on the new owner itself (:mod:`hub.batcher`); connections opened to
  the old owner reconnect before their next use.
- An ``ASK`` reply (the cell's slot is being migrated) sends the call once to
  the node named, preceded by ``ASKING``; ``TRYAGAIN`` (the slot's keys are
  split between two nodes for the moment of a migration) waits and retries.

:class:`SingleRedis` is the same interface on one Redis server: one client
for every cell.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from .config import ConfigError, RedisDSN, Settings
from .errors import RedisUnavailable
from .keys import Keys
from .redisconn import HiredisConnection, HiredisSSLConnection, redis_client

__all__ = [
    "ClusterLinks",
    "ClusterRedirect",
    "RedisLinks",
    "SingleRedis",
    "SlotOwner",
    "cell_slot",
    "redis_links",
]

logger = logging.getLogger("hub.cluster")

_MAX_NODES_ASKED = 16
"""Most nodes asked for the slot map in one :meth:`ClusterLinks.locate`."""


def cell_slot(cell: str) -> int:
    """The cluster slot of every key of ``cell`` (CRC16 of its hash tag, mod 16384)."""
    return int(key_slot(Keys(cell).prefix.encode()))


class ClusterRedirect(redis_errors.ConnectionError):
    """A cluster reply saying the command did not run here: ``MOVED``, ``ASK``,
    ``TRYAGAIN`` or ``CLUSTERDOWN``.

    A ``ConnectionError``, so that a caller that does not follow redirects
    treats it as Redis being away for a moment (retry later), never as a bug.

    Args:
        error: the reply, as redis-py parsed it (``error.host``/``error.port``
            for ``MOVED`` and ``ASK``).
    """

    def __init__(self, error: redis_errors.ResponseError) -> None:
        super().__init__(str(error))
        self.error = error


class SlotOwner:
    """The address of the master that owns one slot, shared by a cell's connections.

    Args:
        slot: the slot.
        host, port: where to look first (the seed node: a node that does not
            own the slot answers ``MOVED`` with the owner).
    """

    def __init__(self, slot: int, host: str, port: int) -> None:
        self.slot = slot
        self.host = host
        self.port = port
        self.generation = 0
        """Grows each time the address changes: a connection opened at an
        older generation reconnects before its next use."""
        self.on_moved: list[Callable[[], None]] = []
        """Called after the address changed (the hub reconciles: a new
        master may have lost the last writes)."""

    def move(self, host: str, port: int) -> bool:
        """Record a new owner; returns whether the address changed."""
        if (host, port) == (self.host, self.port):
            return False
        if self.generation:
            logger.warning(
                "! slot %d moved from %s:%d to %s:%d", self.slot, self.host, self.port, host, port
            )
        else:
            logger.info("= slot %d is on %s:%d", self.slot, host, port)
        self.host, self.port = host, port
        self.generation += 1
        for callback in self.on_moved:
            callback()
        return True


class _SlotAddressed(AbstractConnection):
    """A connection to whichever node owns a slot now (``slot_owner`` kwarg).

    ``host`` and ``port`` are read from the :class:`SlotOwner` each time the
    connection connects. A ``MOVED`` reply updates the owner; the
    ``CLUSTERDOWN``, ``TRYAGAIN``, ``MOVED`` and ``ASK`` replies are raised as
    :class:`ClusterRedirect`.
    """

    def __init__(self, *, slot_owner: SlotOwner, **kwargs: Any) -> None:
        self._owner = slot_owner
        self._generation = slot_owner.generation
        super().__init__(**kwargs)

    @property
    def host(self) -> str:
        return self._owner.host

    @host.setter
    def host(self, value: str) -> None:
        pass  # set by redis-py's constructor: the owner decides

    @property
    def port(self) -> int:
        return self._owner.port

    @port.setter
    def port(self, value: int) -> None:
        pass

    @property
    def moved(self) -> bool:
        """True when the slot moved since this connection connected."""
        return self._generation != self._owner.generation

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.moved and self.is_connected:
            await self.disconnect(nowait=True)
        await super().connect_check_health(check_health, retry_socket_connect)

    async def _connect(self) -> None:
        self._generation = self._owner.generation
        await super()._connect()  # type: ignore[no-untyped-call,safe-super]

    async def can_read_destructive(self) -> bool:
        # The pool's check before handing out a connection: one to an old
        # owner counts as stale (it reconnects to the new one).
        return self.moved or await super().can_read_destructive()

    async def can_read(self) -> bool:
        return self.moved or await super().can_read()

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except redis_errors.AskError as exc:  # MovedError is an AskError
            if isinstance(exc, redis_errors.MovedError) and exc.slot_id == self._owner.slot:
                # (A key of another slot moved nothing of this connection's.)
                self._owner.move(exc.host, exc.port)
            raise ClusterRedirect(exc) from exc
        except (redis_errors.TryAgainError, redis_errors.ClusterDownError) as exc:
            raise ClusterRedirect(exc) from exc


class SlotConnection(_SlotAddressed, HiredisConnection):
    """A TCP connection to a slot's owner, packing with hiredis."""


class SlotSSLConnection(_SlotAddressed, HiredisSSLConnection):
    """A TLS connection to a slot's owner, packing with hiredis."""


class RedisLinks:
    """The Redis clients of a hub, by cell.

    :meth:`client` gives the command client of a cell (scripts, reads,
    publishing) and :meth:`subscriber` its pub/sub client. A hub of one cell
    asks once; a hub of several cells holds one pair per cell (on one Redis,
    the same pair for every cell).
    """

    sharded = False
    """Whether the bus uses sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``)."""

    def client(self, cell: str) -> Redis:
        raise NotImplementedError

    def subscriber(self, cell: str) -> Redis:
        raise NotImplementedError

    async def locate(self) -> None:
        """Find where each cell lives now (a step of the Redis watch before ``ready``).

        Raises:
            RedisUnavailable: no node could be asked.
        """

    def on_moved(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time a cell's slot moves to another master."""

    async def aclose(self) -> None:
        """Close every client."""


class SingleRedis(RedisLinks):
    """One Redis server for every cell.

    Args:
        url: the server.
        settings: timeouts.
    """

    def __init__(self, url: str, settings: Settings) -> None:
        self._client = redis_client(url, settings)
        self._subscriber = redis_client(url, settings, pubsub=True)

    def client(self, cell: str) -> Redis:
        return self._client

    def subscriber(self, cell: str) -> Redis:
        return self._subscriber

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._subscriber.aclose()


class ClusterLinks(RedisLinks):
    """A Redis Cluster reached through a seed node; one master per cell's slot.

    Args:
        url: a seed node, ``redis://`` or ``rediss://`` (user, password and
            TLS apply to every node).
        settings: timeouts.

    Raises:
        ConfigError: if the URL is a unix socket or names a database other than 0.
    """

    sharded = True

    def __init__(self, url: str, settings: Settings) -> None:
        dsn = RedisDSN.parse(url)
        if dsn.scheme == "unix" or dsn.host is None or dsn.port is None:
            raise ConfigError("redis_url", dsn.redacted(), "a cluster needs a redis:// seed")
        if dsn.db != 0:
            raise ConfigError("redis_url", dsn.redacted(), "a cluster has database 0 only")
        self._settings = settings
        self._seed = (dsn.host, dsn.port)
        self._kwargs: dict[str, Any] = dict(parse_url(url))
        for name in ("host", "port", "path", "db", "connection_class"):
            self._kwargs.pop(name, None)
        self._ssl = dsn.scheme == "rediss"
        self._nodes: list[tuple[str, int]] = [self._seed]
        """Every node the last slot map named (masters first), then the seed."""
        self._owners: dict[int, SlotOwner] = {}
        self._clients: dict[str, tuple[Redis, Redis]] = {}
        self._moved: list[Callable[[], None]] = []
        self._silent: set[tuple[str, int]] = set()
        """Nodes that did not answer the last slot map request."""
        self.maps = 0
        """Slot maps read so far."""

    # Public methods

    def owner(self, cell: str) -> SlotOwner:
        """The :class:`SlotOwner` of a cell's slot (one per slot, shared by its cells)."""
        slot = cell_slot(cell)
        owner = self._owners.get(slot)
        if owner is None:
            owner = self._owners[slot] = SlotOwner(slot, *self._nodes[0])
            owner.on_moved.extend(self._moved)
        return owner

    def client(self, cell: str) -> Redis:
        return self._pair(cell)[0]

    def subscriber(self, cell: str) -> Redis:
        return self._pair(cell)[1]

    def on_moved(self, callback: Callable[[], None]) -> None:
        self._moved.append(callback)
        for owner in self._owners.values():
            owner.on_moved.append(callback)

    async def locate(self) -> None:
        """Read the slot map from the first node that answers; move every owner to it.

        Raises:
            RedisUnavailable: no node answered ``CLUSTER SLOTS``, or a cell's
                slot has no master in the map (the cluster is failing over).
        """
        ranges = await self._slot_map()
        masters: list[tuple[str, int]] = []
        others: list[tuple[str, int]] = []
        for _, _, master, replicas in ranges:
            if master not in masters:
                masters.append(master)
            others.extend(r for r in replicas if r not in others)
        known = masters + [n for n in others if n not in masters]
        # Nodes that did not answer are asked last next time: a machine that
        # is down costs a connect timeout per node asked before the others.
        known.sort(key=lambda node: node in self._silent)
        self._nodes = known + [n for n in self._nodes if n not in known]
        del self._nodes[_MAX_NODES_ASKED * 4 :]
        self.maps += 1
        for slot, owner in self._owners.items():
            found = next((m for start, end, m, _ in ranges if start <= slot <= end), None)
            if found is None:
                raise RedisUnavailable(f"cluster slot {slot} (no master owns it)")
            owner.move(*found)

    async def aclose(self) -> None:
        for client, subscriber in self._clients.values():
            await client.aclose()
            await subscriber.aclose()
        self._clients.clear()

    # Private methods

    def _pair(self, cell: str) -> tuple[Redis, Redis]:
        pair = self._clients.get(cell)
        if pair is None:
            owner = self.owner(cell)
            pair = self._clients[cell] = (self._client(owner), self._client(owner, pubsub=True))
        return pair

    def _client(self, owner: SlotOwner, *, pubsub: bool = False) -> Redis:
        """A client whose connections go to the slot's owner (as ``redis_client``)."""
        s = self._settings
        kwargs: dict[str, Any] = {
            **self._kwargs,
            "connection_class": SlotSSLConnection if self._ssl else SlotConnection,
            "slot_owner": owner,
            "host": owner.host,
            "port": owner.port,
            "socket_connect_timeout": s.redis_timeout_s,
            "socket_timeout": None if pubsub else s.redis_timeout_s,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
            "health_check_interval": 0,
        }
        if not pubsub:
            kwargs["max_connections"] = 64
        return Redis.from_pool(ConnectionPool(**kwargs))

    async def _slot_map(self) -> list[tuple[int, int, tuple[str, int], list[tuple[str, int]]]]:
        """``CLUSTER SLOTS`` from the first node that answers, parsed.

        Returns:
            (first slot, last slot, master, replicas) per range.
        """
        s = self._settings
        error: Exception | None = None
        self._silent.clear()
        for host, port in self._nodes[:_MAX_NODES_ASKED]:
            connection_class = HiredisSSLConnection if self._ssl else HiredisConnection
            pool = ConnectionPool(
                connection_class=connection_class,
                **{
                    **self._kwargs,
                    "host": host,
                    "port": port,
                    "socket_connect_timeout": s.redis_timeout_s,
                    "socket_timeout": s.redis_timeout_s,
                    "retry": Retry(NoBackoff(), 0),
                    "decode_responses": False,
                },
            )
            client = Redis.from_pool(pool)
            try:
                # redis-py leaves execute_command() untyped.
                reply = await client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
                return [_range(r, host) for r in reply]
            except (redis_errors.RedisError, OSError) as exc:
                error = exc
                self._silent.add((host, port))
                logger.debug("! no slot map from %s:%d: %s", host, port, exc)
            finally:
                await client.aclose()
        self._nodes.sort(key=lambda node: node in self._silent)
        raise RedisUnavailable("cluster slot map") from error


def _address(entry: list[Any], asked: str) -> tuple[str, int]:
    """A node of a ``CLUSTER SLOTS`` range; an empty or ``?`` host is the node asked."""
    host = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
    return (host if host not in ("", "?") else asked), int(entry[1])


def _range(r: list[Any], asked: str) -> tuple[int, int, tuple[str, int], list[tuple[str, int]]]:
    return int(r[0]), int(r[1]), _address(r[2], asked), [_address(x, asked) for x in r[3:]]


def redis_links(url: str, settings: Settings) -> RedisLinks:
    """The hub's Redis clients: :class:`ClusterLinks` with ``redis_cluster``, else
    :class:`SingleRedis`.

    Raises:
        ConfigError: if the URL does not fit the mode.
    """
    if settings.redis_cluster:
        return ClusterLinks(url, settings)
    return SingleRedis(url, settings)


def connection_to(pool: ConnectionPool, host: str, port: int) -> AbstractConnection:
    """A new connection to ``host:port`` with the settings of ``pool``'s connections
    (the caller disconnects it): to run a call where an ``ASK`` reply says."""
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k != "slot_owner"}
    kwargs.update(host=host, port=port)
    tls = issubclass(pool.connection_class, HiredisSSLConnection)
    connection: AbstractConnection = (HiredisSSLConnection if tls else HiredisConnection)(**kwargs)
    return connection
