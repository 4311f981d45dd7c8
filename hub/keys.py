"""Every Redis key name, built in one place.

All keys of a scheduling cell share one hash tag (``hub:v1:{cell}:``) so the
scripts run unchanged on Redis Cluster. Keys a script derives from what it
reads (a chosen node's hash) are built inside Lua from :attr:`Keys.prefix`,
with the same suffixes as the methods below.
"""

from __future__ import annotations

from typing import Final, TypeGuard

__all__ = ["Keys", "is_cell"]

VERSION = "v1"

_CELL_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def is_cell(value: object) -> TypeGuard[str]:
    """Whether ``value`` can name a cell (protocol.md §5): 1 to 64 letters, digits, ``_``, ``-``.

    Never ``.``, which separates a job id's cell from the rest (protocol.md §8, Cells),
    nor a brace of the hash tag.
    """
    return type(value) is str and 0 < len(value) <= 64 and _CELL_CHARS.issuperset(value)


class Keys:
    """Key names of one cell."""

    def __init__(self, cell: str = "0", *, namespace: str = "hub"):
        self.cell = cell
        self.prefix = f"{namespace}:{VERSION}:{{{cell}}}:"
        """Common prefix of every key of the cell, hash tag included."""

    # Nodes
    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def node_jobs(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}:jobs"

    def free(self, pool: str) -> str:
        return f"{self.prefix}free:{pool}"

    def pool_nodes(self, pool: str) -> str:
        return f"{self.prefix}pool:{pool}:nodes"

    def lang(self, src: str, tgt: str) -> str:
        """Set of the pools that serve a language pair."""
        return f"{self.prefix}lang:{src}:{tgt}"

    def live(self, src: str, tgt: str) -> str:
        """Set of the nodes serving a language pair that take jobs (state live)."""
        return f"{self.prefix}live:{src}:{tgt}"

    @property
    def seen(self) -> str:
        return f"{self.prefix}seen"

    @property
    def pools(self) -> str:
        """Set of every pool id ever registered in the cell."""
        return f"{self.prefix}pools"

    # Jobs
    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    @property
    def deadlines(self) -> str:
        return f"{self.prefix}deadlines"

    @property
    def queued(self) -> str:
        """Zset of queued job -> time its queue wait ends."""
        return f"{self.prefix}queued"

    @property
    def queue_depth(self) -> str:
        """Hash of language pair (``src:tgt``) -> number of queued jobs (none when 0)."""
        return f"{self.prefix}qdepth"

    @property
    def queue_heads(self) -> str:
        """Zset of language pair -> end of the queue wait of the job it hands out next."""
        return f"{self.prefix}qheads"

    def queue(self, src: str, tgt: str) -> str:
        """Round-robin list of sessions with jobs waiting for a language pair."""
        return f"{self.prefix}queue:{src}:{tgt}"

    def session_queue(self, src: str, tgt: str, session_id: str) -> str:
        """The session's jobs waiting for a language pair, in arrival order."""
        return f"{self.prefix}queue:{src}:{tgt}:s:{session_id}"

    # Sessions
    def session(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def session_jobs(self, session_id: str) -> str:
        """Set of the session's unfinished jobs."""
        return f"{self.prefix}session:{session_id}:jobs"

    def session_done(self, session_id: str) -> str:
        """Zset of the session's ended jobs -> end time, kept for the resume window."""
        return f"{self.prefix}session:{session_id}:done"

    def session_cells(self, session_id: str) -> str:
        """Set of the other cells where the session may have jobs (spilled there)."""
        return f"{self.prefix}session:{session_id}:cells"

    # Hubs
    @property
    def resume_secret(self) -> str:
        """String holding the key every hub of the cell signs session resume tokens with."""
        return f"{self.prefix}secret"

    @property
    def sweep_lease(self) -> str:
        return f"{self.prefix}sweep"

    @property
    def hubs(self) -> str:
        """Set of the ids of the hubs alive (each has a record, :meth:`hub_record`)."""
        return f"{self.prefix}hubs"

    def hub_record(self, hub_id: str) -> str:
        """String of a hub's own figures (sessions, latencies), expiring unless renewed."""
        return f"{self.prefix}hubrec:{hub_id}"

    def hub_metrics(self, hub_id: str) -> str:
        """String of a worker's ``/metrics`` text, for its siblings' (hub/siblings.py)."""
        return f"{self.prefix}hubmetrics:{hub_id}"

    @property
    def stats(self) -> str:
        """Hash of cell-wide counters, added to by each hub from its script replies."""
        return f"{self.prefix}stats"

    def channel(self, hub_id: str) -> str:
        """Pub/sub channel of one hub (delivery between hubs)."""
        return f"{self.prefix}hub:{hub_id}"

    # Every key
    @property
    def scan_pattern(self) -> str:
        """SCAN ``MATCH`` pattern of every key of the cell: the prefix, glob-escaped, then ``*``."""
        escaped = "".join("\\" + c if c in "\\*?[]" else c for c in self.prefix)
        return escaped + "*"
