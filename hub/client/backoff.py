"""Reconnection delays: exponential backoff with full jitter, bounded."""

from __future__ import annotations

import dataclasses
import random

__all__ = ["Backoff"]


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before the n-th reconnection attempt.

    The delay before attempt ``n`` (1 for the first retry) is drawn uniformly
    from ``[0, min(max_s, min_s * factor ** (n - 1))]`` ("full jitter"), so a
    fleet that lost its hub at once does not come back at once. Without
    jitter it is the upper bound itself.

    Raises:
        ValueError: if a delay is negative, ``max_s < min_s`` or ``factor < 1``.
    """

    min_s: float = 0.1
    """Upper bound of the first delay, seconds."""
    max_s: float = 5.0
    """Largest delay, seconds."""
    factor: float = 2.0
    """Growth of the bound per failed attempt."""
    jitter: bool = True
    """Draw the delay uniformly below the bound; ``False`` waits the bound itself."""

    def __post_init__(self) -> None:
        if self.min_s < 0 or self.max_s < self.min_s:
            raise ValueError("Backoff needs 0 <= min_s <= max_s")
        if self.factor < 1:
            raise ValueError("Backoff needs factor >= 1")

    def delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay before reconnection attempt ``attempt`` (1, 2, …), seconds."""
        exponent = min(max(attempt - 1, 0), 64)  # bounded: no float overflow
        bound = min(self.max_s, self.min_s * self.factor**exponent)
        if not self.jitter:
            return bound
        return (rng or random).uniform(0.0, bound)
