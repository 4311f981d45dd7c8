"""The demo worker of ``hub node`` and ``hub demo``: deterministic fake results.

It answers every job after a configurable delay with::

    {"text": payload["text"].upper(), "audio_bytes": len(audio),
     "node_id": ..., "src_lang": ..., "tgt_lang": ...}

sending two partials on the way (the first half, then the first
three quarters, of the text upper-cased). Tests, the demo and the load test
use it as a node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable
from typing import Any

from .jobs import Job

__all__ = ["ServiceTime", "demo_handler", "demo_result"]


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceTime:
    """How long a simulated job takes: ``low_ms`` exactly, or uniform in ``low_ms..high_ms``.

    The demo worker and the load test's simulated nodes both draw from it.
    ``0`` is instant, ``100`` is fixed, ``50..300`` is uniform.
    """

    low_ms: float
    high_ms: float

    @classmethod
    def parse(cls, text: str) -> ServiceTime:
        """Parse ``200`` or ``50..300`` (milliseconds).

        Raises:
            ValueError: with a one-line reason.
        """
        low, sep, high = text.strip().partition("..")
        try:
            low_ms = float(low)
            high_ms = float(high) if sep else low_ms
        except ValueError:
            raise ValueError(f"expected milliseconds like 200 or 50..300, got {text!r}") from None
        if not 0 <= low_ms <= high_ms:
            raise ValueError(f"expected 0 <= low <= high milliseconds, got {text!r}")
        return cls(low_ms, high_ms)

    @property
    def mean_ms(self) -> float:
        """The mean service time, milliseconds."""
        return (self.low_ms + self.high_ms) / 2

    @property
    def instant(self) -> bool:
        """Whether jobs take no time at all."""
        return self.high_ms == 0

    def draw_s(self, rng: random.Random) -> float:
        """One job's service time, seconds."""
        if self.low_ms == self.high_ms:
            return self.low_ms / 1000
        return rng.uniform(self.low_ms, self.high_ms) / 1000

    def __str__(self) -> str:
        if self.low_ms == self.high_ms:
            return f"{self.low_ms:g}"
        return f"{self.low_ms:g}..{self.high_ms:g}"


def demo_result(job: Job, node_id: str) -> dict[str, Any]:
    """The demo worker's result for ``job``: a pure function of the job."""
    return {
        "text": str(job.payload.get("text", "")).upper(),
        "audio_bytes": len(job.audio or b""),
        "node_id": node_id,
        "src_lang": job.src_lang,
        "tgt_lang": job.tgt_lang,
    }


def demo_handler(
    node_id: str, service_time: ServiceTime, *, seed: int | None = None
) -> Callable[[Job], Awaitable[dict[str, Any]]]:
    """A job handler that sleeps ``service_time`` and returns :func:`demo_result`.

    Two partials are sent on the way, at a third and two thirds of the delay.
    """
    rng = random.Random(seed)

    async def handle(job: Job) -> dict[str, Any]:
        delay_s = service_time.draw_s(rng)
        text = str(job.payload.get("text", ""))
        for fraction in (0.5, 0.75):
            await asyncio.sleep(delay_s / 3)
            await job.partial({"text": text[: int(len(text) * fraction)].upper()})
        await asyncio.sleep(delay_s / 3)
        return demo_result(job, node_id)

    return handle
