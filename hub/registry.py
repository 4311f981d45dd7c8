"""The connections a hub holds: nodes, sessions, and nodes still registering.

A node id or session id names at most one connection on a hub. A newer
connection replaces an older one; for nodes the registration's epoch tells
which connection an event is about (:meth:`Registry.node_link`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time

from websockets.asyncio.server import ServerConnection

from . import protocol as proto
from .auth import SessionGrant
from .config import Settings
from .protocol import NodeId, SessionId

__all__ = ["Backlog", "NodeLink", "Registry", "Route", "SessionLink"]


@dataclasses.dataclass(slots=True)
class Route:
    """What a node's hub knows of a job attempt it delivered (for partials)."""

    attempt: int
    session_id: str
    session_hub: str
    ref: str


Backlog = tuple[str | bytes, tuple[str, Route] | None, str | None]
"""A frame held for a registering node: frame, job route to record, job to forget."""


class NodeLink:
    """One node connection on this hub."""

    def __init__(self, ws: ServerConnection, limits: proto.Limits, cell: str = "0") -> None:
        self.ws = ws
        self.conn = proto.NodeConnection(limits)
        self.cell = cell
        """The node's cell (set when it registers): its script calls go there."""
        self.node_id: NodeId | None = None
        self.epoch = 0
        self.max_jobs = 0
        self.jobs: dict[str, Route] = {}
        """Jobs running on the node whose ``job`` frame this hub wrote to this socket (or
        that the node resumed, attempt 0), until their attempt ends here; what a hub
        re-sends after a Redis failure is decided against it (:mod:`hub.reconcile`)."""
        self.load: bytes | None = None
        self.ping_at: float | None = None
        self.closing = False
        self.pending = 0
        """Frames being handled in the background (see ``Tasks.bounded``)."""
        self.slice = secrets.randbelow(10)
        """Which tenth of the heartbeat interval this node is pinged in."""
        self.backlog: list[Backlog] = []
        """Frames that arrived for the node before its registration finished here."""
        self.registration: proto.Register | None = None
        """The node's ``register`` frame, to register it again after Redis lost it."""

    @property
    def transport(self) -> asyncio.Transport | None:
        """The socket's transport (``Tasks.start`` pauses its reading)."""
        return self.ws.transport


class SessionLink:
    """One session connection on this hub."""

    def __init__(
        self,
        ws: ServerConnection,
        session_id: SessionId,
        settings: Settings,
        limits: proto.Limits,
        grant: SessionGrant,
        cell: str = "0",
    ) -> None:
        self.ws = ws
        self.session_id = session_id
        self.grant = grant
        self.cell = cell
        """The session's cell: its record, and its jobs unless they spilled."""
        self.cells: dict[str, float] = {}
        """Other cells where the session may have jobs -> when (``time.monotonic()``)
        this connection last recorded that in its cell (``-inf``: learned on resume)."""
        self.conn = proto.SessionConnection(
            limits,
            max_inflight=grant.max_inflight or settings.max_inflight_per_session,
            rate_per_s=grant.rate_per_s or settings.session_rate_per_s,
            burst=grant.burst or settings.session_burst,
        )
        self.last_active = time.monotonic()
        self.pending = 0
        """Frames being handled in the background (see ``Tasks.bounded``)."""
        self.closing = False
        self.ended_early: set[str] = set()
        """Jobs whose result came before their dispatch reply was handled."""
        self.abandoned: set[str] = set()
        """Jobs refused with UNAVAILABLE whose script may have run after all."""
        self.submitting: set[str] = set()
        """Jobs whose dispatch call is in flight (their result may come before its reply)."""
        self.attempts: dict[str, int] = {}
        """The newest attempt announced (``accepted``) for each job not ended yet."""
        self.started: dict[str, float] = {}
        """Submit times (monotonic) of open jobs, negated once accepted (hub/latency.py)."""

    @property
    def transport(self) -> asyncio.Transport | None:
        """The socket's transport (``Tasks.start`` pauses its reading)."""
        return self.ws.transport

    def all_cells(self) -> list[str]:
        """The session's cell, then each other cell where it may have jobs."""
        return [self.cell, *self.cells]


Link = NodeLink | SessionLink


class Registry:
    """Node, session and registering connections of one hub, by id."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeLink] = {}
        """Registered nodes connected here."""
        self.sessions: dict[str, SessionLink] = {}
        """Sessions connected here."""
        self.registering: dict[str, NodeLink] = {}
        """Nodes whose register call is in flight, by the id they asked for."""

    # Nodes

    def node_link(self, node_id: str, epoch: int) -> NodeLink | None:
        """This hub's connection of a node, if it is the registration ``epoch`` names."""
        link = self.nodes.get(node_id)
        return link if link is not None and link.epoch == epoch else None

    def begin_registering(self, node_id: str, link: NodeLink) -> None:
        """Hold frames for ``link`` while its register call is in flight."""
        self.registering[node_id] = link

    def end_registering(self, node_id: str, link: NodeLink) -> None:
        """Stop holding frames for ``link`` (registered, or refused)."""
        if self.registering.get(node_id) is link:
            del self.registering[node_id]

    def add_node(self, link: NodeLink) -> NodeLink | None:
        """Record a registered node; returns the connection it replaces, if any."""
        assert link.node_id is not None
        old = self.nodes.get(link.node_id)
        self.nodes[link.node_id] = link
        return old if old is not link else None

    def remove_node(self, link: NodeLink) -> bool:
        """Forget a node connection; False if a newer one holds its id."""
        if link.node_id is not None and self.nodes.get(link.node_id) is link:
            del self.nodes[link.node_id]
            return True
        return False

    # Sessions

    def add_session(self, link: SessionLink) -> SessionLink | None:
        """Record a session connection; returns the connection it replaces, if any."""
        old = self.sessions.get(link.session_id)
        self.sessions[link.session_id] = link
        return old if old is not link else None

    def remove_session(self, link: SessionLink) -> bool:
        """Forget a session connection; False if a newer one holds its id."""
        if self.sessions.get(link.session_id) is link:
            del self.sessions[link.session_id]
            return True
        return False
