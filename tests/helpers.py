"""Test helpers: time units, polling and Redis clients.

Import them as ``from tests.helpers import MS, wait_for``. Processes (Redis
servers, hubs, nodes), free ports and ``/proc`` readings come from
:mod:`loadtest.procs`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = [
    "CONNECT_TIMEOUT_S",
    "MS",
    "NO_SHEDDING",
    "SOCKET_TIMEOUT_S",
    "client_for",
    "glob_escape",
    "wait_for",
    "wait_for_sync",
]

MS = 0.001 * float(os.environ.get("HUB_TESTS_TIMEOUT_FACTOR", "1"))
"""One millisecond, scaled by ``HUB_TESTS_TIMEOUT_FACTOR`` for slow machines."""

SOCKET_TIMEOUT_S = 5.0
"""Read timeout of test clients."""
CONNECT_TIMEOUT_S = 2.0
"""Connect timeout of test clients."""


def client_for(url: str) -> Redis:
    """An asyncio client with explicit timeouts and no retries; close it with ``aclose()``.

    redis-py 8 gives ``Redis(host=...)`` ten retries with exponential backoff
    by default (``Redis.from_url`` gets none), so a test against a dead server
    could hang for seconds instead of failing at once. Spell everything out.
    """
    return Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )


# Polling


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    *,
    # A polling helper, not a cancellable operation: asyncio.timeout() would
    # not give the "waiting for X; last result: Y" message.
    timeout: float = 500 * MS,  # noqa: ASYNC109
    interval: float = 5 * MS,
    what: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns a truthy value.

    Args:
        predicate: called with no argument; may return an awaitable.
        timeout: seconds before giving up; use multiples of :data:`MS`.
        interval: seconds between calls.
        what: description for the failure message (default: the predicate).
        ignore: exceptions that count as "not yet" instead of propagating.

    Returns:
        The first truthy value.

    Raises:
        AssertionError: on timeout, naming what was awaited and the last value
            or exception seen.
    """
    poll = _Poll(predicate, timeout, what, ignore)
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except ignore as exc:
            value = exc
        if poll.done(value):
            return value
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], Any],
    *,
    timeout: float = 500 * MS,
    interval: float = 5 * MS,
    what: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Blocking twin of :func:`wait_for`, for sync tests and fixtures.

    Args:
        predicate: called with no argument.
        timeout: seconds before giving up.
        interval: seconds between calls.
        what: description for the failure message.
        ignore: exceptions that count as "not yet".

    Returns:
        The first truthy value.

    Raises:
        AssertionError: on timeout.
    """
    poll = _Poll(predicate, timeout, what, ignore)
    while True:
        try:
            value = predicate()
        except ignore as exc:
            value = exc
        if poll.done(value):
            return value
        time.sleep(interval)


class _Poll:
    """The deadline and the failure message of one :func:`wait_for`."""

    def __init__(
        self,
        predicate: Callable[..., Any],
        timeout: float,
        what: str | None,
        ignore: tuple[type[BaseException], ...],
    ) -> None:
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.what = what or _describe(predicate)
        self.ignore = ignore

    def done(self, value: Any) -> bool:
        """Whether ``value`` ends the wait; raise once the time is up."""
        if value and not isinstance(value, self.ignore):
            return True
        if time.monotonic() >= self.deadline:
            raise AssertionError(
                f"timed out after {self.timeout:.3f} s waiting for {self.what}; "
                f"last result: {value!r}"
            )
        return False


def _describe(predicate: Callable[..., Any]) -> str:
    name = getattr(predicate, "__qualname__", None) or repr(predicate)
    return f"{name}() to be true"


def glob_escape(text: str) -> str:
    """Escape ``text`` for a Redis glob pattern (``SCAN MATCH``, ``KEYS``)."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


NO_SHEDDING: dict[str, int] = {"shed_loop_lag_ms": 60_000, "shed_dispatch_ms": 60_000}
"""Hub settings for tests: a test machine runs Redis, hubs and the test on two
shared cores (and PYTHONASYNCIODEBUG slows every hub), so only the tests of
load shedding shed load."""
