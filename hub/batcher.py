"""Script calls batched into pipelines of EVALSHA.

Calls issued in one event-loop iteration travel together in one pipeline
(EVALSHA, no MULTI), which costs Redis and the client a fraction of one round
trip each. Pipelines are resolved in the order they were sent, whatever order
their replies come in. Scripts are loaded once; a ``NOSCRIPT`` reply (after a
Redis restart or failover) reloads them and re-sends only the calls that did
not run.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection

from .cluster import ClusterRedirect, connection_to
from .errors import RedisUnavailable, ScriptError
from .scripts import script_shas

__all__ = ["Batcher"]

logger = logging.getLogger("hub.batcher")

_MAX_RETRIES = 4
"""Most times a call is sent again after a reply saying it did not run."""

_RETRIED = (
    redis_errors.NoScriptError,
    redis_errors.AskError,  # and MovedError, a subclass
    redis_errors.TryAgainError,
)
"""Replies of a call that did not run and is sent again: the scripts are
reloaded (``NOSCRIPT``: after a restart or failover), the cell's slot is on
another master (``MOVED``: the connection already knows which) or is being
migrated (``ASK``: once to the node named, ``TRYAGAIN``: after a pause)."""

_NOT_RUN = (*_RETRIED, redis_errors.ClusterDownError)
"""Replies of a call that did not run: it fails with ``RedisUnavailable``."""

_TRYAGAIN_S = 0.05
"""Pause before sending again a call that got ``TRYAGAIN``."""


class _Ok:
    """A call's reply, told apart from an exception to raise."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


class _Call:
    """One script call waiting for its pipeline."""

    __slots__ = ("args", "future", "keys", "name")

    def __init__(
        self, name: str, keys: Sequence[str], args: Sequence[Any], future: asyncio.Future[Any]
    ):
        self.name = name
        self.keys = keys
        self.args = args
        self.future = future


class _WireDeadline:
    """``asyncio.timeout()`` that times the wire, not this hub's event loop.

    When the deadline comes and replies were read since it was set, or bytes
    from Redis wait unread (this hub's loop was busy, Redis was not slow), it
    moves on by another ``timeout_s``. Only ``timeout_s`` of silence from
    Redis while replies are due fails the pipeline.

    Args:
        timeout_s: the silence allowed; ``None`` or 0: no deadline.
        progress: a number that grows when bytes arrive or replies are read.
    """

    __slots__ = ("_fired", "_handle", "_last", "_progress", "_task", "_timeout_s")

    def __init__(self, timeout_s: float | None, progress: Callable[[], int]) -> None:
        self._timeout_s = timeout_s
        self._progress = progress
        self._fired = False
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._last = 0

    async def __aenter__(self) -> None:
        if self._timeout_s:
            self._task = asyncio.current_task()
            self._last = self._progress()
            self._handle = asyncio.get_running_loop().call_later(self._timeout_s, self._check)

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._fired and exc_type is asyncio.CancelledError:
            assert self._task is not None
            if self._task.uncancel() == 0:
                raise TimeoutError from exc

    def _check(self) -> None:
        now = self._progress()
        if now != self._last:
            self._last = now
            self._handle = asyncio.get_running_loop().call_later(self._timeout_s or 0, self._check)
            return
        self._fired = True
        if self._task is not None:
            self._task.cancel()


class Batcher:
    """Sends script calls to Redis in pipelines, a few pipelines at a time.

    Args:
        redis: a client created with ``decode_responses=False`` and no retries
            (a retried script could run twice).
        sources: script name -> source; a call names one of them.
        max_batch: most script calls in one pipeline.
        max_pipelines: most pipelines in flight at once.
        max_pending: most calls waiting for a pipeline (bounded memory).
        reply_timeout_s: how long Redis may send nothing while replies are
            due before the pipeline fails (``None``: the client's socket timeout).
        wait_replicas: after each pipeline, ``WAIT`` until this many replicas
            have its writes, before the replies are acted on; 0: no wait.
        wait_ms: the ``WAIT`` timeout: past it the replies are acted on anyway
            (counted in :attr:`unreplicated`).
    """

    def __init__(
        self,
        redis: Redis,
        sources: Mapping[str, str],
        *,
        max_batch: int = 256,
        max_pipelines: int = 4,
        max_pending: int = 20000,
        reply_timeout_s: float | None = None,
        wait_replicas: int = 0,
        wait_ms: int = 50,
    ) -> None:
        self.redis = redis
        self.sources = dict(sources)
        """Script name -> source, as :meth:`load_scripts` loads them."""
        self.shas = script_shas(self.sources)
        """Script name -> SHA1, as EVALSHA names them."""
        self.max_batch = max_batch
        self.max_pipelines = max_pipelines
        self.reply_timeout_s = reply_timeout_s
        self.wait_replicas = wait_replicas
        self.wait_ms = wait_ms
        self.unreplicated = 0
        """Pipelines whose writes fewer than ``wait_replicas`` replicas had within ``wait_ms``."""
        self.max_pending = max_pending
        """Most calls waiting for a pipeline; more fail at once with RedisUnavailable."""
        self.pending: list[_Call] = []
        """Calls waiting for a pipeline (the urgent ones are in :attr:`urgent`)."""
        self.urgent: list[_Call] = []
        """Urgent calls waiting for a pipeline: they go first, in order."""
        self._flush_scheduled = False
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._next_seq = 0
        self._next_settle = 0
        self._settled: dict[int, tuple[list[_Call], list[Any]]] = {}
        self._idle: list[AbstractConnection] = []
        """Connections kept between pipelines (at most ``max_pipelines``): :meth:`_connection`."""
        self.batches = 0
        """Pipelines sent so far (for metrics)."""
        self.calls = 0
        """Script calls sent so far (for metrics)."""
        self.in_flight = 0
        """Calls waiting for a pipeline or for their reply (load shedding reads it)."""

    async def load_scripts(self) -> None:
        """Load every script into Redis (SCRIPT LOAD); call at startup and after failover.

        Raises:
            RedisUnavailable: if Redis cannot be reached.
        """
        try:
            pipe = self.redis.pipeline(transaction=False)
            for source in self.sources.values():
                pipe.script_load(source)
            await pipe.execute()
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise RedisUnavailable("script load") from exc

    async def close(self) -> None:
        """Wait for pipelines in flight (bounded by the Redis timeout); give back connections."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.redis.connection_pool.release(conn)

    async def call(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, urgent: bool = False
    ) -> Any:
        """Run a script in the next pipeline and return its reply.

        Args:
            name: the script (a key of :attr:`sources`).
            keys: its KEYS.
            args: its ARGV.
            urgent: goes ahead of the calls waiting, and is never refused for
                their number (liveness, and results: a job already accepted
                keeps its latency while new ones queue).

        Raises:
            RedisUnavailable: too many calls wait already, or the pipeline
                failed (the script may or may not have run).
            ScriptError: the script raised an error.
        """
        if len(self.pending) >= self.max_pending and not urgent:
            # Bounded memory when Redis or this process falls behind: refuse now.
            raise RedisUnavailable(name)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        call = _Call(name, keys, args, future)
        if urgent:
            self.urgent.append(call)
        else:
            self.pending.append(call)
        if not self._flush_scheduled and self._inflight < self.max_pipelines:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        self.in_flight += 1
        try:
            return await future
        finally:
            self.in_flight -= 1

    def _flush(self) -> None:
        self._flush_scheduled = False
        while (self.pending or self.urgent) and self._inflight < self.max_pipelines:
            batch = self.urgent[: self.max_batch]
            del self.urgent[: self.max_batch]
            room = self.max_batch - len(batch)
            if room > 0 and self.pending:
                batch += self.pending[:room]
                del self.pending[:room]
            self._inflight += 1
            seq = self._next_seq
            self._next_seq += 1
            task = asyncio.get_running_loop().create_task(self._send(seq, batch))
            self._tasks.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight -= 1
        if (self.pending or self.urgent) and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _send(self, seq: int, batch: list[_Call]) -> None:
        self.batches += 1
        self.calls += len(batch)
        outcomes: list[Any] = [RedisUnavailable(call.name) for call in batch]
        try:
            results = await self._execute(batch)
            for _ in range(_MAX_RETRIES):
                again = [i for i, r in enumerate(results) if isinstance(r, _RETRIED)]
                if not again:
                    break
                replies = await self._again([batch[i] for i in again], [results[i] for i in again])
                for i, r in zip(again, replies, strict=True):
                    results[i] = r
            for i, (call, result) in enumerate(zip(batch, results, strict=True)):
                if isinstance(result, _NOT_RUN):
                    # protocol: the call did not run (the cluster is failing
                    # over, or redirected it too often): Redis is away for now.
                    logger.debug("! %s.lua not run: %s", call.name, result)
                elif isinstance(result, redis_errors.ResponseError):
                    logger.error("! %s.lua failed: %s", call.name, result)
                    outcomes[i] = ScriptError(call.name, str(result))
                else:
                    outcomes[i] = _Ok(result)
        except (
            redis_errors.ConnectionError,
            redis_errors.TimeoutError,
            OSError,
            RedisUnavailable,
        ) as exc:
            logger.debug("! pipeline of %d calls failed: %s", len(batch), exc)
        except Exception as exc:  # a bug: fail every caller rather than hang them
            outcomes = [exc] * len(batch)
            raise
        finally:
            self._settle(seq, batch, outcomes)

    async def _again(self, calls: list[_Call], replies: list[Any]) -> list[Any]:
        """Send again calls whose reply said they did not run; their new replies.

        ``NOSCRIPT`` reloads the scripts first and ``TRYAGAIN`` waits a moment;
        those and ``MOVED`` go to the cell's master (a ``MOVED`` reply moved
        it); each ``ASK`` goes to the node it names.
        """
        if any(isinstance(r, redis_errors.NoScriptError) for r in replies):
            logger.warning("! scripts missing in Redis (restart or failover?): reloading")
            await self.load_scripts()
        if any(isinstance(r, redis_errors.TryAgainError) for r in replies):
            await asyncio.sleep(_TRYAGAIN_S)
        results = list(replies)
        here = [
            i
            for i, r in enumerate(replies)
            if type(r) is not redis_errors.AskError  # MOVED is a subclass
        ]
        for i, r in zip(here, await self._execute([calls[i] for i in here]), strict=True):
            results[i] = r
        for i, r in enumerate(replies):
            if type(r) is redis_errors.AskError:
                results[i] = await self._ask(calls[i], r.host, r.port)
        return results

    async def _ask(self, call: _Call, host: str, port: int) -> Any:
        """Run a call once on the node an ``ASK`` reply names (its slot is migrating).

        ``ASKING`` then ``EVAL`` with the source (the node may not have the
        script), on a connection of its own that is closed afterwards.
        """
        conn = connection_to(self.redis.connection_pool, host, port)
        try:
            source = self.sources[call.name]
            packed = conn.pack_commands(
                [("ASKING",), ("EVAL", source, len(call.keys), *call.keys, *call.args)]
            )
            await conn.send_packed_command(packed)
            await conn.read_response()
            try:
                return await conn.read_response()
            except redis_errors.ResponseError as exc:
                return exc
        finally:
            await conn.disconnect(nowait=True)

    def _settle(self, seq: int, batch: list[_Call], outcomes: list[Any]) -> None:
        """Resolve pipelines in the order they were sent, whatever order replies come in.

        Pipelines travel on several connections, so a later one can be read
        first; resolving in order keeps the hubs' view of each job in Redis
        order (a job's ``queued`` before its ``accepted``).
        """
        self._settled[seq] = (batch, outcomes)
        while self._next_settle in self._settled:
            done, results = self._settled.pop(self._next_settle)
            self._next_settle += 1
            for call, outcome in zip(done, results, strict=True):
                if call.future.done():
                    continue
                if isinstance(outcome, _Ok):
                    call.future.set_result(outcome.value)
                else:
                    call.future.set_exception(outcome)

    async def _execute(self, batch: Sequence[_Call]) -> list[Any]:
        """Send a batch as one pipeline of EVALSHA (no MULTI); one reply per call.

        What ``pipeline(transaction=False).execute(raise_on_error=False)`` does,
        without its per-command machinery (command stack, callbacks, one
        Pipeline object per batch): pack every call, write them at once, read
        the replies in order. An error reply (``NOSCRIPT``, a Lua error) is
        returned in its call's place as a ``ResponseError``.

        Raises:
            redis.exceptions.ConnectionError, TimeoutError, OSError: the batch
                may have run in part; the connection is closed, never kept or
                returned to the pool with replies left unread. TimeoutError:
                not every reply came within the client's ``socket_timeout`` of
                the write.
        """
        conn = await self._connection()
        reusable = False
        try:
            shas = self.shas
            commands: list[tuple[Any, ...]] = [
                ("EVALSHA", shas[c.name], len(c.keys), *c.keys, *c.args) for c in batch
            ]
            if self.wait_replicas:
                # The replies are acted on only once the replicas have the writes.
                commands.append(("WAIT", self.wait_replicas, self.wait_ms))
            packed = conn.pack_commands(commands)
            try:
                await conn.send_packed_command(packed)
                results: list[Any] = []
                # One deadline for all the replies rather than one per reply
                # (math.inf: no timeout of redis-py's own in read_response).
                reader = getattr(conn, "_reader", None)
                async with _WireDeadline(
                    self.reply_timeout_s or conn.socket_timeout,
                    lambda: len(results) + len(getattr(reader, "_buffer", b"")),
                ):
                    for _ in batch:
                        try:
                            results.append(await conn.read_response(timeout=math.inf))
                        except redis_errors.ResponseError as exc:
                            results.append(exc)
                        except ClusterRedirect as exc:
                            results.append(exc.error)
                    if self.wait_replicas:
                        acked = await conn.read_response(timeout=math.inf)
                        if isinstance(acked, int) and acked < self.wait_replicas:
                            self.unreplicated += 1
            except BaseException:
                # Replies may be left unread (timeout, cancel): drop the socket.
                await conn.disconnect(nowait=True)
                raise
            reusable = True
        except TimeoutError as exc:  # asyncio's, from the deadline above
            raise redis_errors.TimeoutError(f"no reply within {conn.socket_timeout} s") from exc
        finally:
            await self._release(conn, reusable)
        return results

    async def _connection(self) -> AbstractConnection:
        """A connection for a pipeline: one kept from an earlier pipeline, else the pool's.

        Keeping a few connections (one per pipeline in flight) skips the
        pool's checkout and release on every pipeline (a lock, a check of the
        socket, metrics events), which cost about as much as packing.
        """
        if not self._idle:
            pool = self.redis.connection_pool
            # redis-py leaves get_connection() untyped (a decorator for deprecated args).
            new: AbstractConnection = await pool.get_connection()  # type: ignore[no-untyped-call]
            return new
        conn = self._idle.pop()
        if not conn.is_connected:
            return conn  # the write connects it
        # The pool's own check: bytes nobody asked for, or EOF (Redis
        # restarted, the server closed an idle client). Then the write
        # reconnects.
        try:
            try:
                stale = await conn.can_read()
            except (redis_errors.ConnectionError, OSError):
                stale = True
            if stale:
                await conn.disconnect(nowait=True)
        except BaseException:
            await self.redis.connection_pool.release(conn)
            raise
        return conn

    async def _release(self, conn: AbstractConnection, reusable: bool) -> None:
        """Keep a connection for the next pipeline, or give it back to the pool.

        Args:
            conn: the pipeline's connection.
            reusable: every reply was read (else the connection is closed).
        """
        # redis-py leaves should_reconnect() untyped (maintenance notifications).
        renew: bool = conn.should_reconnect()  # type: ignore[no-untyped-call]
        if reusable and not renew and len(self._idle) < self.max_pipelines:
            self._idle.append(conn)
        else:
            await self.redis.connection_pool.release(conn)
