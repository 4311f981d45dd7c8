"""Delivery between hubs: one Redis pub/sub channel per hub.

On a Redis Cluster the channel is sharded (``SPUBLISH``/``SSUBSCRIBE``): a
hub's channel name carries its cell's hash tag, so its messages go to the
master of the cell's slot (and its replicas) only, instead of every node of
the cluster as classic pub/sub does; fan-out does not grow with the cluster.

A hub that must reach a node or session connected to another hub publishes
an already-encoded frame on that hub's channel. Messages are small binary
envelopes::

    kind (1 byte) | uint32 big-endian meta length | meta (JSON) | frame

``kind`` is ``N`` (frame for a node), ``S`` (frame for a session), ``D`` (a
started attempt of a job whose audio the receiving hub keeps: it sends the
job frame; the frame part is the job's payload) or ``C`` (control: close a
node connection with the code in meta ``c``, 4004 lost, else 4002 replaced).
Delivery is at most once: a message for a hub that is down is lost, which
is why results also stay in Redis for the session's resume (protocol.md §8).

A hub's channel is named in a cell (``hub:v1:{cell}:hub:<hub_id>``). A hub
publishes on the channel in its own default cell and listens on its channel
in every cell it serves, so hubs whose default cells differ reach each other
when they serve the same cells (:mod:`hub.cells`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

__all__ = ["Bus", "decode_envelope", "encode_envelope"]

logger = logging.getLogger("hub.bus")

_LEN = struct.Struct(">I")


def encode_envelope(kind: bytes, meta: dict[str, Any], frame: str | bytes) -> bytes:
    """Build one bus message. A text frame is stored UTF-8 encoded with ``meta["t"] = 1``."""
    if isinstance(frame, str):
        meta["t"] = 1
        body = frame.encode()
    else:
        body = frame
    header = orjson.dumps(meta)
    return kind + _LEN.pack(len(header)) + header + body


def decode_envelope(message: bytes) -> tuple[bytes, dict[str, Any], str | bytes]:
    """Split a bus message into kind, meta and frame (text frames as ``str``).

    Raises:
        ValueError: if the message is truncated or its meta is not JSON.
    """
    if len(message) < 5:
        raise ValueError("truncated bus message")
    (size,) = _LEN.unpack_from(message, 1)
    if 5 + size > len(message):
        raise ValueError("truncated bus message")
    meta = orjson.loads(message[5 : 5 + size])
    if not isinstance(meta, dict):
        raise ValueError("bus message meta is not an object")
    body = message[5 + size :]
    return message[:1], meta, body.decode() if meta.get("t") else body


class Bus:
    """This hub's inbox, and the outbox to the other hubs.

    Args:
        redis: the command client (publishing goes through its pipelines).
        subscriber: a client for pub/sub only (no read timeout).
        channel: this hub's channel name.
        on_message: called with each raw message received.
        max_outbox: most messages waiting to be published; more are dropped
            with a warning (the receivers find results in Redis on resume).
        ping_interval_s: a subscription that received nothing for this long
            sends a PING on its connection…
        ping_timeout_s: …and one that then hears nothing more for this long
            is replaced. A subscription only reads: without its pings, a
            connection that a partition left half-open (Redis closed it, the
            FIN was lost) would stay silent for ever.
        also: more channels of this hub, listened on too (its channel in
            the other cells it serves: another hub publishes in its own
            default cell, :mod:`hub.cells`).
        sharded: use sharded pub/sub (Redis Cluster).
        subscribers: the pub/sub client of each channel (``channel``, then
            ``also``), when not ``subscriber`` for all (a cluster: the master
            of each cell's slot). The channels of one client share a subscription.
    """

    def __init__(
        self,
        redis: Redis,
        subscriber: Redis,
        channel: str,
        on_message: Callable[[bytes], None],
        *,
        max_outbox: int = 10000,
        ping_interval_s: float = 1.0,
        ping_timeout_s: float = 2.0,
        also: Sequence[str] = (),
        sharded: bool = False,
        subscribers: Sequence[Redis] | None = None,
    ) -> None:
        self.redis = redis
        self.subscriber = subscriber
        self.channel = channel
        self.channels = (channel, *also)
        """Every channel listened on: this hub's in each cell it serves."""
        self.on_message = on_message
        self.max_outbox = max_outbox
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.sharded = sharded
        self._publish = "SPUBLISH" if sharded else "PUBLISH"
        groups: dict[int, tuple[Redis, list[str]]] = {}
        for i, name in enumerate(self.channels):
            client = subscriber if subscribers is None else subscribers[i]
            groups.setdefault(id(client), (client, []))[1].append(name)
        self._groups = [(client, tuple(names)) for client, names in groups.values()]
        """The subscriptions: a client and the channels it listens on."""
        self._live: set[int] = set()
        self.dropped = 0
        """Messages dropped because the outbox was full or Redis was down."""
        self.subscribed = asyncio.Event()
        """Set while the subscription is live."""
        self.subscriptions = 0
        """Subscriptions made so far (the first, then one after each loss)."""
        self.on_subscribed: Callable[[], None] | None = None
        """Called after each (re)subscription: messages published meanwhile were lost."""
        self._outbox: list[tuple[str, bytes]] = []
        self._flushing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # Public methods

    def start(self) -> None:
        """Start listening (reconnecting with backoff while Redis is down)."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(i, client, names))
            for i, (client, names) in enumerate(self._groups)
        ]

    async def close(self) -> None:
        """Stop listening and wait for publishes in flight."""
        # The flag ends the loops even when redis-py swallows the cancel (Python 3.11).
        self._closed = True
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._flush_tasks:
            await asyncio.gather(*self._flush_tasks, return_exceptions=True)

    def publish(self, channel: str, message: bytes) -> None:
        """Queue a message for another hub; all queued in one loop iteration go together."""
        if len(self._outbox) >= self.max_outbox:
            self.dropped += 1
            logger.warning("! bus outbox full: dropped a message for %s", channel)
            return
        self._outbox.append((channel, message))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    # Private methods

    def _flush(self) -> None:
        self._flushing = False
        batch, self._outbox = self._outbox, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._flush_tasks.add(task)
            task.add_done_callback(self._flush_tasks.discard)

    async def _send(self, batch: list[tuple[str, bytes]]) -> None:
        for delay in (0.02, 0.1, 0):
            pipe = self.redis.pipeline(transaction=False)
            for channel, message in batch:
                pipe.execute_command(self._publish, channel, message)
            try:
                await pipe.execute()
                return
            except redis_errors.ConnectionError as exc:
                # After a Redis restart, each pooled connection fails once
                # ("Connection closed by server"): the old server never ran it.
                error: Exception = exc
                if not delay:
                    break
                await asyncio.sleep(delay)
            except (redis_errors.RedisError, OSError) as exc:
                error = exc  # a timeout may have published: no retry
                break
        self.dropped += len(batch)
        logger.warning("! could not publish %d bus messages: %s", len(batch), error)

    async def _receive(self, pubsub: PubSub) -> None:
        """Hand each message to ``on_message``; ping when idle, fail when silent.

        Raises:
            redis.exceptions.ConnectionError: when Redis answered nothing for
                ``ping_interval_s + ping_timeout_s`` (the caller subscribes again).
        """
        loop = asyncio.get_running_loop()
        heard_at = pinged_at = loop.time()
        silence_s = self.ping_interval_s + self.ping_timeout_s
        while not self._closed:
            msg = await pubsub.get_message(timeout=min(1.0, self.ping_interval_s))
            now = loop.time()
            if msg is not None:
                heard_at = now
                kind = msg.get("type")
                if kind in ("message", "smessage"):
                    try:
                        self.on_message(msg["data"])
                    except Exception:
                        logger.error("! bus message handler failed", exc_info=True)
                elif kind == "sunsubscribe":
                    # The cell's slot moved to another master (resharding).
                    raise redis_errors.ConnectionError("the channel's slot moved")
                continue
            if now - heard_at > silence_s:
                raise redis_errors.ConnectionError(
                    f"no answer on the subscription for {silence_s:g} s"
                )
            if now - max(heard_at, pinged_at) >= self.ping_interval_s:
                pinged_at = now
                await pubsub.ping()

    async def _listen(self, group: int, subscriber: Redis, channels: tuple[str, ...]) -> None:
        delay = 0.05
        while not self._closed:
            pubsub = subscriber.pubsub()
            try:
                if self.sharded:
                    await pubsub.ssubscribe(*channels)
                else:
                    await pubsub.subscribe(*channels)
                # Live once Redis confirms each (a refusal, e.g. NOPERM, raises here).
                confirmed = 0
                for _ in range(10 * len(channels)):
                    msg = await pubsub.get_message(timeout=1.0)
                    if msg is not None and msg.get("type") in ("subscribe", "ssubscribe"):
                        confirmed += 1
                        if confirmed == len(channels):
                            break
                else:
                    raise redis_errors.TimeoutError("no subscription confirmed in 10 s")
                self.subscriptions += 1
                self._live.add(group)
                if len(self._live) == len(self._groups):
                    self.subscribed.set()
                if self.on_subscribed is not None:
                    self.on_subscribed()
                delay = 0.05
                await self._receive(pubsub)
            except asyncio.CancelledError:
                raise
            except (redis_errors.RedisError, OSError) as exc:
                self._live.discard(group)
                self.subscribed.clear()
                logger.warning("! bus subscription lost (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                # Capped low: what is published to this hub meanwhile is lost.
                delay = min(delay * 2, 0.5)
            finally:
                self._live.discard(group)
                self.subscribed.clear()
                with contextlib.suppress(redis_errors.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]
