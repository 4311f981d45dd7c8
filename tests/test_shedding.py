"""Load shedding: a hub that is behind refuses new jobs OVERLOADED, without Redis.

protocol.md §6 (``OVERLOADED``) and §4.9 (``retry_after_ms``). Each sign of
being behind is forced here on purpose: a tiny audio budget, a blocked event
loop, a low bound on script calls in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from hub.app import Hub
from tests.helpers import MS, wait_for
from tests.hubtools import (
    ALL_BYTES,
    Connect,
    expect,
    open_node,
    open_session,
    receive,
    result,
    submit,
)

MakeHub = Callable[..., Awaitable[Hub]]


def called_scripts(hub: Hub) -> list[str]:
    """The names of the scripts ``hub`` calls from now on (the calls still run)."""
    names: list[str] = []
    batcher = hub.scheduler.batcher
    call = batcher.call

    def recording(name: str, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        names.append(name)
        return call(name, *args, **kwargs)

    batcher.call = recording  # type: ignore[method-assign]
    return names


async def test_job_over_the_audio_budget_is_refused_overloaded_with_no_redis_call(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(audio_budget_bytes=1000, shed_retry_after_ms=750)
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    scripts = called_scripts(hub)

    await submit(session, "big", audio=bytes(1001))

    refused = await expect(session, "error", ref="big", code="OVERLOADED")
    assert refused["retry_after_ms"] == 750
    assert "audio budget" in refused["message"]
    assert "dispatch_task" not in scripts
    # The refusal harms nothing: a job that fits runs, and the ref is free again.
    await submit(session, "big", audio=ALL_BYTES)
    await expect(session, "accepted", ref="big")
    job = await expect(node, "job")
    assert job["audio"] == ALL_BYTES
    assert hub.audio.used == len(ALL_BYTES)
    await result(node, job, result={})
    await expect(session, "result", ref="big", status="finished")
    assert (hub.audio.used, len(hub.audio)) == (0, 0)


async def test_hub_whose_loop_is_behind_sheds_new_jobs_then_takes_them_again(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(shed_loop_lag_ms=150)
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    await submit(session, "before")
    await expect(session, "accepted", ref="before")
    running = await expect(node, "job")

    # The hub shares this loop: its lag timer fires late twice in a row (once
    # is a pause, not a backlog).
    for _ in range(2):
        time.sleep(0.3)  # noqa: ASYNC251
        await asyncio.sleep(0.01)
    await wait_for(lambda: hub.shedder.reason(0), what="the hub to shed")
    await submit(session, "during")

    refused = await expect(session, "error", ref="during", code="OVERLOADED")
    assert refused["retry_after_ms"] == 1000
    assert "event loop" in refused["message"]
    # An accepted job goes on while the hub sheds.
    await result(node, running, result={"ok": 1})
    await expect(session, "result", ref="before", status="finished", result={"ok": 1})
    # Shedding lasts a moment after the last sign of lag, no longer (bounded
    # retries: a busy test machine may lag on its own now and then).
    for _ in range(20):
        await asyncio.sleep(0.3)
        await submit(session, "during")
        answer = await receive(session)
        if answer["type"] == "accepted":
            break
        assert answer["code"] == "OVERLOADED", answer
    else:
        raise AssertionError("the hub kept shedding after its loop caught up")


async def test_hub_with_too_many_script_calls_in_flight_sheds_new_jobs(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(shed_script_calls=1)
    await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    batcher = hub.scheduler.batcher
    stuck: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def one_call_in_flight() -> None:
        batcher.in_flight += 1  # as a call waiting for its reply would
        try:
            await stuck
        finally:
            batcher.in_flight -= 1

    task = asyncio.create_task(one_call_in_flight())
    await asyncio.sleep(0)
    await submit(session, "c-1")
    refused = await expect(session, "error", ref="c-1", code="OVERLOADED")
    assert "script calls" in refused["message"]
    assert hub.metrics.snapshot()["hub_jobs_refused_total{code=OVERLOADED}"] == 1
    stuck.set_result(None)
    await task
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")


async def test_flood_of_refused_jobs_leaves_the_hub_bounded(
    make_hub: MakeHub, connect: Connect
) -> None:
    """Many jobs refused at once: no task and no held audio piles up."""
    hub = await make_hub(audio_budget_bytes=1000, max_inflight_per_session=64)
    await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    scripts = called_scripts(hub)
    for i in range(300):
        await submit(session, f"r{i}", audio=bytes(2000))
    for i in range(300):
        await expect(session, "error", ref=f"r{i}", code="OVERLOADED")
    assert (hub.audio.used, len(hub.audio)) == (0, 0)
    assert "dispatch_task" not in scripts
    assert len(hub.tasks) < 10
    await wait_for(lambda: hub.scheduler.batcher.in_flight == 0, timeout=1000 * MS)


async def test_hub_whose_dispatches_are_slow_sheds_until_the_average_fades(
    make_hub: MakeHub, connect: Connect
) -> None:
    hub = await make_hub(shed_dispatch_ms=50)
    await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    hub.shedder.dispatched(0.001)  # the round trip without a queue
    for _ in range(100):
        hub.shedder.dispatched(0.5)  # as if submits waited 500 ms for their reply
    await submit(session, "c-1")
    refused = await expect(session, "error", ref="c-1", code="OVERLOADED")
    assert "dispatch" in refused["message"]
    # With no dispatch getting through, the average fades and jobs are taken again.
    await wait_for(lambda: not hub.shedder.reason(0), timeout=3000 * MS, what="the fade")
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")


async def test_hub_whose_dispatches_all_take_long_does_not_shed(
    make_hub: MakeHub, connect: Connect
) -> None:
    # A remote Redis makes every dispatch slow, not a queue: the fastest
    # dispatch of the last 30 s is the floor, and only time above it counts.
    hub = await make_hub(shed_dispatch_ms=50)
    await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    for _ in range(100):
        hub.shedder.dispatched(0.5)
    await wait_for(lambda: hub.shedder.floor_s == 0.5, what="the floor to be measured")
    assert hub.shedder.reason(0) == ""
    await submit(session, "c-1")
    await expect(session, "accepted", ref="c-1")
