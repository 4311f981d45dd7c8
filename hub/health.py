"""Whether a hub can take work: shared, read-mostly state of its parts."""

from __future__ import annotations

__all__ = ["Health"]


class Health:
    """A hub's readiness and shutdown flags.

    :class:`~hub.liveness.Liveness` sets ``ready``; :class:`~hub.app.Hub`
    sets ``closing`` and ``stopping``; every other part only reads them.
    """

    def __init__(self) -> None:
        self.ready = False
        """True while Redis answers and the scripts are loaded (``/readyz``)."""
        self.ready_at = 0.0
        """``time.monotonic()`` when ``ready`` last became true."""
        self.closing = False
        """Shutting down: no new connections; drained nodes get 1001."""
        self.stopping = False
        """Shutdown reached the background loops: they end."""
