"""The audio of the jobs a hub accepted: in its memory, never in Redis.

Redis holds scheduling state only. The hub that accepts a job keeps the
job's audio here until the job ends, and sends every job frame of it,
whichever hub's script started the attempt (``Dispatch.audio_hub``). The
store is bounded by a byte budget; a job that does not fit is refused
``OVERLOADED`` before any Redis call. An entry also leaves at its expiry
(the job's time budget plus a grace): past its deadline no attempt of the
job can start, so a job whose end this hub never heard of (its session
resumed on another hub) cannot hold memory for longer.
"""

from __future__ import annotations

import time

__all__ = ["AudioStore"]

_GRACE_S = 5.0
"""Kept past the job's time budget: the clocks of hub and Redis differ a little."""

_PURGE_EVERY_S = 0.1
"""Least time between two scans for expired entries when the budget is full."""


class AudioStore:
    """Audio bytes by job id, bounded by ``budget`` bytes.

    Args:
        budget: most bytes kept at once.
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        """Bytes kept now."""
        self._audio: dict[str, tuple[bytes, float]] = {}
        self._purged = 0.0

    def __len__(self) -> int:
        return len(self._audio)

    def full(self, size: int) -> bool:
        """Whether ``size`` more bytes would go over the budget (after dropping expired ones)."""
        if self.used + size <= self.budget:
            return False
        self.purge()
        return self.used + size > self.budget

    def put(self, job_id: str, audio: bytes, timeout_ms: int) -> bool:
        """Keep a job's audio until it ends or ``timeout_ms`` (plus a grace) passed.

        Returns:
            False, keeping nothing, when the budget cannot take it.
        """
        if self.full(len(audio)):
            return False
        self._audio[job_id] = (audio, time.monotonic() + timeout_ms / 1000 + _GRACE_S)
        self.used += len(audio)
        return True

    def get(self, job_id: str) -> bytes | None:
        """The audio of a job, or ``None`` when this hub does not keep it."""
        entry = self._audio.get(job_id)
        return None if entry is None else entry[0]

    def rename(self, old: str, new: str) -> None:
        """Keep a job's audio under its new id (it tries another cell); nothing if not kept."""
        entry = self._audio.pop(old, None)
        if entry is not None:
            self._audio[new] = entry

    def drop(self, job_id: str) -> None:
        """Forget a job's audio (it ended, or was refused); nothing if not kept."""
        entry = self._audio.pop(job_id, None)
        if entry is not None:
            self.used -= len(entry[0])

    def purge(self) -> int:
        """Drop expired entries (at most every 100 ms); returns how many went."""
        now = time.monotonic()
        if now - self._purged < _PURGE_EVERY_S:
            return 0
        self._purged = now
        expired = [jid for jid, (_, until) in self._audio.items() if until <= now]
        for jid in expired:
            self.drop(jid)
        return len(expired)
