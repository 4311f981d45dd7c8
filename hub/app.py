"""A hub process: wires its parts together, starts and stops them in order.

The parts, each in its own module, each given its collaborators here::

    Gate        HTTP routes, admission, auth        -> Nodes, Sessions
    HttpServer  HTTP/1.1 connections switched off the port -> JobsApi
    JobsApi     the HTTP job API: submit, look up, cancel, wait
    Nodes       a node connection, register to gone -> Scheduler, Outbox, Router
    Sessions    a session connection, welcome to gone, submit/cancel/resume
    Router      the one consumer of scheduling events -> Outbox
    AudioStore  the audio of jobs accepted here, bounded by a byte budget
    Shedder     whether the hub is behind: new jobs refused OVERLOADED
    Outbox      sending, slow-consumer closing, local or bus delivery
    Registry    node, session and registering connections, by id
    Liveness    Redis watch, heartbeats, sweep
    Reconciler  after a Redis failure: job frames re-sent, a restart settled
    Health      ready and closing flags, shared read-only by the others
    Watch       this hub's figures to Redis; /v1/watch snapshots of the deployment
    Siblings    a worker's metrics to Redis; its siblings' for /metrics

Start order: the Redis watch and the bus subscription (in the background,
so a hub starts while Redis is down), the listening socket, then the
heartbeat, sweep and idle loops. Shutdown order is :meth:`Hub.close`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import ssl
import time
from collections.abc import Coroutine
from typing import Any

from websockets.asyncio.server import Server, serve

from . import protocol as proto
from .audio import AudioStore
from .auth import Authenticator
from .bus import Bus
from .cells import Cells
from .cluster import redis_links
from .config import RedisDSN, Settings
from .gate import Gate, RedactingLogger
from .health import Health
from .httpconn import HttpServer
from .jobsapi import JobsApi
from .keys import Keys
from .latency import Latencies
from .liveness import Liveness
from .metrics import Metrics
from .nodes import Nodes
from .outbox import Outbox
from .protocol import CloseCode
from .reconcile import Reconciler
from .registry import Registry
from .router import Router
from .sessions import Sessions
from .shedding import Shedder
from .siblings import Siblings
from .tasks import Tasks
from .watch import Watch

__all__ = ["Hub"]

logger = logging.getLogger("hub.app")


class Hub:
    """A hub process: accepts nodes and sessions, runs their jobs through Redis.

    Args:
        settings: everything configurable.
        redis_url: the Redis server (``settings.redis_url`` when omitted).
        siblings: the ids of every worker of the ``hub serve --workers`` this
            hub is one of (its ``/metrics`` includes theirs); empty for a hub
            of its own.
        group: the id of that ``hub serve`` (shown in ``/v1/status``).

    Raises:
        ValueError: if there is no Redis URL.
        ConfigError: if the Redis URL is malformed.
    """

    def __init__(
        self,
        settings: Settings,
        redis_url: str | None = None,
        *,
        siblings: tuple[str, ...] = (),
        group: str | None = None,
    ) -> None:
        url = redis_url or settings.redis_url
        if url is None:
            raise ValueError("Hub needs a Redis URL (hub.cli starts an embedded server)")
        self.settings = settings
        self.hub_id = settings.hub_id or secrets.token_hex(6)
        """This hub's id: names its channel and is recorded with its nodes and sessions."""
        self.port: int = settings.port
        """The port listened on (the one bound, when ``settings.port`` is 0)."""
        self.keys = Keys(settings.cell)
        self.links = redis_links(url, settings)
        """The Redis clients by cell: one server, or the master of each cell's slot."""
        self.redis = self.links.client(settings.cell)
        self.subscriber = self.links.subscriber(settings.cell)
        self.cells = Cells(settings, self.redis, hub_id=self.hub_id, client_of=self.links.client)
        """The cells served: each one's Redis client and scheduler."""
        self.scheduler = self.cells.main
        self.metrics = Metrics(self.hub_id)
        self.auth = Authenticator(settings)
        self.health = Health()
        self.registry = Registry()
        self.tasks = Tasks()
        limits = proto.Limits.from_settings(settings)
        self.audio = AudioStore(settings.audio_budget_bytes)
        self.bus = Bus(
            self.redis,
            self.subscriber,
            self.keys.channel(self.hub_id),
            lambda message: self.outbox.receive_bus(message),
            ping_timeout_s=settings.redis_reply_timeout_s,
            also=[Keys(cell).channel(self.hub_id) for cell in settings.served_cells[1:]],
            sharded=self.links.sharded,
            subscribers=[self.links.subscriber(cell) for cell in settings.served_cells],
        )
        self.outbox = Outbox(
            self.hub_id,
            self.registry,
            self.bus,
            self.keys,
            self.metrics,
            self.health,
            self.tasks,
            self.audio,
            send_buffer_bytes=settings.send_buffer_bytes,
            max_backlog=2 * limits.max_jobs_per_node,
        )
        self.router = Router(self.outbox, self.metrics, self.audio, self.cells, self.tasks)
        self.latencies = Latencies(settings.latency_window_s)
        self.outbox.latencies = self.latencies
        self.shedder = Shedder(
            settings, self.scheduler.batcher, self.registry, self.audio, self.health
        )
        parts = (self.cells, self.registry, self.outbox, self.router)
        common = (self.metrics, self.health, self.tasks)
        self.nodes = Nodes(self.hub_id, settings, limits, *parts, *common)
        self.sessions = Sessions(
            self.hub_id, settings, limits, *parts, *common, self.audio, self.shedder
        )
        self.reconciler = Reconciler(self.hub_id, settings, *parts, *common)
        self.jobs = JobsApi(
            self.hub_id,
            settings,
            limits,
            self.auth,
            self.cells,
            self.router,
            self.sessions,
            self.audio,
            self.shedder,
            self.latencies,
            *common,
        )
        self.outbox.on_ended = self.jobs.job_ended
        self.outbox.on_accepted = self.jobs.job_accepted
        self.http = HttpServer(
            self.jobs.handle,
            max_body_bytes=settings.max_frame_bytes,
            idle_timeout_s=settings.http_idle_timeout_s,
            switch_timeout_s=settings.register_timeout_s,
            max_connections=settings.max_connections,
            max_connections_per_ip=settings.max_connections_per_ip,
        )

        def subscribed() -> None:
            self.reconciler.schedule()
            self.sessions.resend_lost_results()

        self.bus.on_subscribed = subscribed
        # A cell's slot moved to another master (a failover, a MOVED reply):
        # as after a new subscription (the bus's is, on the new master), and
        # the reconcile checks the run_id (the new master may lack the last writes).
        self.links.on_moved(subscribed)
        self.liveness = Liveness(
            settings,
            self.redis,
            RedisDSN.parse(url).redacted() + (" (cluster seed)" if settings.redis_cluster else ""),
            *parts,
            *common,
            prepare=(
                self.links.locate,
                self.sessions.load_secret,
                self.cells.load_scripts,
                self.reconciler.reconcile,
            ),
            restarted=self.reconciler.restarted,
        )
        self.watch = Watch(
            self.hub_id,
            settings,
            self.scheduler,
            self.registry,
            self.outbox,
            self.latencies,
            self.health,
            group=group,
        )
        self.siblings = Siblings(
            self.cells.client(settings.cell),
            self.keys,
            self.hub_id,
            siblings,
            interval_s=settings.watch_interval_s,
            render_metrics=lambda: self.metrics.render(self.gate.snapshot())[0],
        )
        self.gate = Gate(
            self.hub_id,
            settings,
            self.auth,
            self.cells,
            self.registry,
            self.nodes,
            self.sessions,
            self.metrics,
            self.health,
            self.watch,
            self.siblings,
        )
        self.server: Server | None = None
        self._loops: list[asyncio.Task[Any]] = []

    @property
    def ready(self) -> bool:
        """True while Redis answers and the scripts are loaded (``/readyz``)."""
        return self.health.ready

    # Public methods

    async def start(self) -> None:
        """Start watching Redis (waiting with backoff while it is down) and listen.

        Raises:
            OSError: if the port cannot be bound.
        """
        self._loop(self.liveness.watch_redis(), "redis-watch")
        self.bus.start()
        s = self.settings
        ssl_context = None
        if s.tls_cert and s.tls_key:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(s.tls_cert, s.tls_key)
        self.server = await serve(
            self.gate.handle,
            s.host,
            s.port,
            process_request=self.gate.process_request,
            # Job API requests leave for self.http before websockets parses them.
            create_connection=self.http.connection_class(),
            max_size=s.max_frame_bytes,
            # Bounded reading: past 4 messages waiting to be handled, the
            # connection stops reading its socket (TCP backpressure).
            max_queue=4,
            compression=None,
            ping_interval=None,
            ping_timeout=None,
            open_timeout=s.register_timeout_s,
            close_timeout=2,
            ssl=ssl_context,
            reuse_port=s.reuse_port or None,
            server_header=None,
            logger=RedactingLogger(logging.getLogger("websockets.server")),
        )
        sockets = list(self.server.sockets)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._loop(self.liveness.heartbeat(), "heartbeat")
        self._loop(self.liveness.sweep(), "sweep")
        self._loop(self.sessions.watch_idle(), "idle")
        self._loop(self.shedder.watch(), "shedder")
        self._loop(self.watch.run(), "watch")
        if self.siblings.ids:
            self._loop(self.siblings.run(), "siblings")
        logger.info("= hub %s listening on %s:%d", self.hub_id, s.host, self.port)

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Wait until Redis answered, the scripts are loaded and the bus is subscribed.

        Raises:
            TimeoutError: after ``timeout_s``.
        """
        async with asyncio.timeout(timeout_s):
            # Polling is fine here: a startup helper, bounded by the timeout.
            while not (self.health.ready and self.bus.subscribed.is_set()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Shut down: stop accepting, drain nodes, close everything, release Redis state.

        Order:
        1. stop accepting connections (``/readyz`` answers 503); answer the
           HTTP requests waiting for jobs (the jobs run on) and close the HTTP
           connections;
        2. ask nodes to finish (drain_node), and wait up to ``shutdown_grace_s``
           for their running jobs;
        3. close sessions, then nodes, with 1001 (each node's connection ends
           with node_lost, which hands back whatever still runs);
        4. wait for the connections to end, then stop the background loops;
        5. wait briefly for background tasks, cancel the rest, delete a
           worker's metrics from Redis, close Redis.
        """
        health = self.health
        if health.closing:
            return
        health.closing = True
        logger.info("= hub %s shutting down", self.hub_id)
        if self.server is not None:
            self.server.close(close_connections=False)
        self.jobs.close()
        await self.http.close(timeout_s=self.settings.shutdown_grace_s)
        await self.nodes.drain_all()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        # Bounded by the grace period; jobs end on the nodes' own tasks.
        while time.monotonic() < deadline and any(  # noqa: ASYNC110
            link.jobs for link in self.registry.nodes.values()
        ):
            await asyncio.sleep(0.05)
        for slink in list(self.registry.sessions.values()):
            self.outbox.shut(slink, CloseCode.GOING_AWAY)
        for ws in list(self.watch.watchers):
            self.tasks.spawn(self.outbox.close(ws, CloseCode.GOING_AWAY, "hub shutting down"))
        for link in list(self.registry.nodes.values()):
            self.outbox.shut(link, CloseCode.GOING_AWAY)
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.shutdown_grace_s + 3):
                    await self.server.wait_closed()
        self.sessions.close()
        health.stopping = True
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self.tasks.close(timeout_s=3)
        await self.siblings.remove()
        await self.bus.close()
        await self.cells.close()
        await self.links.aclose()
        logger.info("= hub %s stopped", self.hub_id)

    def install_signal_handlers(self, stop: asyncio.Event) -> None:
        """Make SIGTERM and SIGINT set ``stop`` (the caller then awaits :meth:`close`)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

    # Private methods

    def _loop(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        self._loops.append(asyncio.create_task(coro, name=name))
