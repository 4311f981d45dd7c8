"""The cells a hub serves: each cell's Redis client and scheduler, and where a job lives.

A cell is one scheduling domain: its nodes, pools, queues and jobs, all
under one hash tag (``hub:v1:{cell}:``), so every script stays within one
cluster slot. A hub serves its default cell (``cell``) and any others
listed in ``cells``; its connections are its own, each node and session
in one cell (``register``'s ``cell`` or a token claim, ``?cell=``).

:class:`Cells` is the only place that knows which Redis client serves a
cell: on a single Redis every cell has the same client, and the cells of
one client share one :class:`~hub.batcher.Batcher`, so the calls of one
loop iteration share one pipeline whatever their cell.

Job ids say their cell. A hub serving one cell makes the ids it always
made (no cell in them); a hub serving several makes ``<cell>.<random>``
(``.`` is never in a cell nor in the random part). So any hub finds the
cell of a result, cancel, ack or resume from the id alone: an id without
``.`` is in the hub's default cell.

Spill-over (``spill`` K > 0): a job whose cell has no free node for its
pair tries up to K other cells, one dispatch call each (a queue wait of 0),
before it queues in its own cell. Which cells serve the pair is learned
from those calls: a cell that answered that no pool or no live node serves
the pair is skipped for :data:`LACKS_PAIR_S` (:meth:`Cells.spill_order`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator

from redis.asyncio import Redis

from .batcher import Batcher
from .config import Settings
from .keys import Keys
from .scheduler import Scheduler
from .scripts import load_script_sources

__all__ = ["LACKS_PAIR_S", "MAX_LACKS", "Cells"]

LACKS_PAIR_S = 2.0
"""How long a cell that does not serve a pair is left out of the pair's spill-over, seconds."""

MAX_LACKS = 4096
"""Most (cell, pair) entries remembered as not served; past it the oldest go."""


class Cells:
    """The cells this hub serves, by name: Redis client, keys, scheduler.

    Args:
        settings: ``cell`` (the default), ``cells``, ``spill``, and the
            schedulers' settings.
        redis: the Redis client (every cell's, on a single Redis).
        hub_id: this hub's id, recorded by the scripts.
        client_of: the Redis client of each cell, when not ``redis`` for every
            one (:meth:`RedisLinks.client <hub.cluster.RedisLinks.client>`).
    """

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        *,
        hub_id: str,
        client_of: Callable[[str], Redis] | None = None,
    ) -> None:
        self.default = settings.cell
        """The hub's default cell: its nodes' and sessions' unless they name another."""
        self.names = settings.served_cells
        """Every cell served, the default first."""
        self.several = len(self.names) > 1
        """Whether job ids carry their cell (a hub serving one cell makes plain ids)."""
        self.spill = settings.spill if self.several else 0
        """Most other cells a job tries before it queues in its own."""
        self._clients = {
            cell: redis if client_of is None else client_of(cell) for cell in self.names
        }
        batchers: dict[int, Batcher] = {}
        sources = load_script_sources()
        self._schedulers: dict[str, Scheduler] = {}
        for cell in self.names:
            client = self.client(cell)
            batcher = batchers.get(id(client))
            scheduler = Scheduler(
                client, settings, hub_id=hub_id, keys=Keys(cell), sources=sources, batcher=batcher
            )
            batchers[id(client)] = scheduler.batcher
            self._schedulers[cell] = scheduler
        self._batchers = list(batchers.values())
        self._turn = itertools.count()
        self._lacks: dict[tuple[str, str], float] = {}

    # Lookups

    def client(self, cell: str) -> Redis:
        """The Redis client serving ``cell`` (the same for every cell on a single Redis).

        Raises:
            KeyError: the hub does not serve ``cell``.
        """
        return self._clients[cell]

    def __contains__(self, cell: object) -> bool:
        return cell in self._schedulers

    def __iter__(self) -> Iterator[Scheduler]:
        """The schedulers of the cells served, the default cell's first."""
        return iter(self._schedulers.values())

    def __getitem__(self, cell: str) -> Scheduler:
        """The scheduler of a cell served.

        Raises:
            KeyError: the hub does not serve ``cell``.
        """
        return self._schedulers[cell]

    @property
    def main(self) -> Scheduler:
        """The default cell's scheduler."""
        return self._schedulers[self.default]

    def servers(self) -> list[Scheduler]:
        """One scheduler per Redis client (per server): the default cell's first.

        On a single Redis, the default cell's only; on a cluster, each cell's
        (its client talks to its slot's master): for what is read per server,
        the ``run_id`` and the ping.
        """
        found: dict[int, Scheduler] = {}
        for scheduler in self._schedulers.values():
            found.setdefault(id(scheduler.redis), scheduler)
        return list(found.values())

    @property
    def batchers(self) -> list[Batcher]:
        """One per Redis client: the pipelines every call goes through."""
        return self._batchers

    # Job ids

    def job_id(self, cell: str, token: str) -> str:
        """The id of a job of ``cell`` whose random part is ``token``."""
        return f"{cell}.{token}" if self.several else token

    def job_cell(self, job_id: str) -> str | None:
        """The cell a job id names (an id without one: the default cell); ``None`` if not served."""
        cell, sep, _ = job_id.partition(".")
        if not sep:
            return self.default
        return cell if cell in self._schedulers else None

    def for_job(self, job_id: str) -> Scheduler | None:
        """The scheduler of a job's cell; ``None`` when the hub does not serve it."""
        cell = self.job_cell(job_id)
        return None if cell is None else self._schedulers[cell]

    # Spill-over

    def spill_order(self, home: str, pair: str) -> list[str]:
        """Up to ``spill`` other cells for a job of ``home`` to try, in turn.

        The cells rotate from one job to the next, so spilled jobs spread
        over them; a cell recently found without the pair is left out.
        """
        if not self.spill:
            return []
        others = [c for c in self.names if c != home]
        if not others:
            return []
        start = next(self._turn) % len(others)
        now = time.monotonic()
        order = []
        for cell in others[start:] + others[:start]:
            until = self._lacks.get((cell, pair))
            if until is not None:
                if until > now:
                    continue
                del self._lacks[(cell, pair)]
            order.append(cell)
            if len(order) == self.spill:
                break
        return order

    def lacks(self, cell: str, pair: str) -> None:
        """Remember for a while that ``cell`` has no live node for ``pair``."""
        lacks = self._lacks
        if len(lacks) >= MAX_LACKS:
            del lacks[next(iter(lacks))]
        lacks[(cell, pair)] = time.monotonic() + LACKS_PAIR_S

    # Life

    async def load_scripts(self) -> None:
        """Load every script into each Redis server (SCRIPT LOAD).

        Raises:
            RedisUnavailable: if a Redis server cannot be reached.
        """
        for batcher in self._batchers:
            await batcher.load_scripts()

    async def close(self) -> None:
        """Close every scheduler (their last counts flushed when Redis answers)."""
        for scheduler in self._schedulers.values():
            await scheduler.close()
