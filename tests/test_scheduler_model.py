"""The scheduling scripts against a small Python model (Hypothesis, stateful).

A :class:`~hypothesis.stateful.RuleBasedStateMachine` drives random
registrations, heartbeats, dispatches, completions (right, stale, by the
wrong node), cancellations, node losses, drains and sweeps through a real
:class:`Scheduler` on a real Redis. Time is the model's: every call passes
``now_ms``. The model predicts every reply and every event; where a script
may choose at random (ties between equally loaded nodes), the model checks
that the choice was one of the allowed ones and follows it. After every step
the whole Redis state of the cell is compared with the model.

The machine is synchronous and owns its event loop (one per example), so
Hypothesis needs no async support.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hub.config import Settings
from hub.errors import ErrorCode, SchedulingError
from hub.events import (
    Accepted,
    Beat,
    CancelAttempt,
    Dispatch,
    Event,
    JobEnded,
    NodeLost,
    NodeReplaced,
    Queued,
)
from hub.keys import Keys
from hub.node_scripts import pool_id
from hub.scheduler import Scheduler
from loadtest.procs import RedisProcess

T0 = 1_000_000
SERVICES = ("asr", "nmt")
EN_FR = ("en", "fr")
DE_EN = ("de", "en")
SETTINGS = Settings(
    queue_wait_ms=800,
    queue_max=3,
    max_queued_per_session=2,
    job_timeout_ms=1_000,
    max_attempts=2,
    job_ttl_ms=600_000,
    node_lease_ms=1_500,
    sweep_batch=1_000,
)
TERMINAL = ("finished", "failed")
PAIRS = (DE_EN, EN_FR)
MAX_EXPIRED_PER_FILL = 32  # lua/includes/jobs.lua


def pair_text(pair: tuple[str, str]) -> str:
    return f"{pair[0]}:{pair[1]}"


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    opool: str
    pairs: tuple[tuple[str, str], ...]
    max_jobs: int

    @property
    def pool(self) -> str:
        return pool_id(self.opool, SERVICES, sorted(self.pairs))


SPECS = {
    "a": NodeSpec("default", (EN_FR,), 1),
    "b": NodeSpec("default", (EN_FR,), 2),
    "c": NodeSpec("premium", (EN_FR, DE_EN), 2),
    "d": NodeSpec("default", (DE_EN,), 1),
    "e": NodeSpec("default", (EN_FR,), 2),
}
GHOST = "z"  # never registers
NODE_NAMES = (*SPECS, GHOST)
SESSIONS = ("s1", "s2", "s3")


# The model


@dataclasses.dataclass
class NodeModel:
    name: str
    spec: NodeSpec
    state: str | None = None  # None: never registered; live | offline | draining | lost
    epoch: int = 0
    hub: str = ""
    seen: int = 0


@dataclasses.dataclass
class JobModel:
    job_id: str
    session_id: str
    pair: tuple[str, str]
    payload: bytes
    has_audio: bool
    ref: str
    deadline: int
    status: str = "queued"
    node: str | None = None
    attempt: int = 0
    hist: list[str] = dataclasses.field(default_factory=list)
    queue_until: int | None = None
    result: bytes = b""
    error: str = ""


class Cursor:
    """Walks a script's events in order, as the model predicts them."""

    def __init__(self, events: Iterable[Event]):
        self.events = list(events)
        self.index = 0

    def take(self, kind: type) -> Any:
        assert self.index < len(self.events), f"expected a {kind.__name__}, got nothing more"
        event = self.events[self.index]
        assert isinstance(event, kind), f"expected a {kind.__name__}, got {event}"
        self.index += 1
        return event

    def expect(self, event: Event) -> None:
        assert self.take(type(event)) == event

    def done(self) -> None:
        assert self.index == len(self.events), f"unexpected events: {self.events[self.index :]}"


def session_hub(session_id: str) -> str:
    return f"hs-{session_id}"


class Model:
    def __init__(self) -> None:
        self.now = T0
        self.nodes = {name: NodeModel(name, spec) for name, spec in SPECS.items()}
        self.nodes[GHOST] = NodeModel(GHOST, SPECS["a"])
        self.jobs: dict[str, JobModel] = {}
        self.lang_pools: dict[tuple[str, str], set[str]] = {EN_FR: set(), DE_EN: set()}
        self.pools_known: set[str] = set()
        # One queue per language pair: sessions take turns, each its jobs in order.
        self.queues: dict[tuple[str, str], list[str]] = {}
        self.session_queues: dict[tuple[tuple[str, str], str], list[str]] = {}
        self.preferences: dict[str, tuple[str, str, tuple[str, str]]] = {}
        self.ends = 0

    # Reads

    def running_on(self, name: str) -> list[str]:
        return sorted(
            j.job_id for j in self.jobs.values() if j.status == "running" and j.node == name
        )

    def free_in(self, pool: str) -> dict[str, float]:
        out = {}
        for node in self.nodes.values():
            if node.name != GHOST and node.spec.pool == pool and node.state == "live":
                running = len(self.running_on(node.name))
                if running < node.spec.max_jobs:
                    out[node.name] = running / node.spec.max_jobs
        return out

    def live_for(self, pair: tuple[str, str]) -> set[str]:
        """The nodes that count as serving a pair: live ones (not offline, draining, lost)."""
        return {
            n.name
            for n in self.nodes.values()
            if n.name != GHOST and n.state == "live" and pair in n.spec.pairs
        }

    def depth(self, pair: tuple[str, str]) -> int:
        return sum(len(self.session_queues.get((pair, s), [])) for s in SESSIONS)

    def head(self, pair: tuple[str, str]) -> int | None:
        """When the queue wait of the job the pair hands out next ends."""
        sessions = self.queues.get(pair)
        if not sessions:
            return None
        return self.jobs[self.session_queues[(pair, sessions[0])][0]].queue_until

    def candidates(
        self, pools: Iterable[str], pref_pool: str | None, pref_node: str | None
    ) -> set[str]:
        """The nodes pick_node may return (includes/pools.lua): affinity, then least loaded."""
        pools = sorted(pools)
        if pref_pool in pools:
            free = self.free_in(pref_pool)
            if pref_node in free:
                return {pref_node}
            if free:
                low = min(free.values())
                return {n for n, s in free.items() if s == low}
        frees = [self.free_in(p) for p in pools]
        lows = [min(f.values()) for f in frees if f]
        if not lows:
            return set()
        low = min(lows)
        return {n for f in frees for n, s in f.items() if s == low}

    # Transitions, mirroring lua/includes/

    def dispatch_event(self, job: JobModel) -> Dispatch:
        node = self.nodes[job.node]
        return Dispatch(
            node_hub=node.hub,
            node_id=node.name,
            job_id=job.job_id,
            attempt=job.attempt,
            session_id=job.session_id,
            src_lang=job.pair[0],
            tgt_lang=job.pair[1],
            deadline_ms=job.deadline,
            payload=job.payload,
            audio_hub=session_hub(job.session_id) if job.has_audio else "",
            session_hub=session_hub(job.session_id),
            ref=job.ref,
        )

    def start_attempt(self, job: JobModel, name: str) -> None:
        node = self.nodes[name]
        assert node.state == "live", f"{name} is {node.state}"
        assert len(self.running_on(name)) < node.spec.max_jobs, f"{name} has no free slot"
        assert job.pair in node.spec.pairs
        job.status, job.node, job.attempt = "running", name, job.attempt + 1
        job.hist.append(name)
        job.queue_until = None
        self.preferences[job.session_id] = (node.spec.pool, name, job.pair)

    def end_job(self, job: JobModel, status: str, result: bytes, error: str) -> JobEnded:
        assert job.status not in TERMINAL, f"{job.job_id} ends twice"
        job.status, job.result, job.error = status, result, error
        job.queue_until = None
        self.ends += 1
        return JobEnded(
            session_hub(job.session_id),
            job.session_id,
            job.job_id,
            job.ref,
            "finished" if status == "finished" else "failed",
            result,
            error or None,
        )

    def unqueue(self, job: JobModel) -> None:
        key = (job.pair, job.session_id)
        self.session_queues[key].remove(job.job_id)
        if not self.session_queues[key]:
            del self.session_queues[key]
            self.queues[job.pair] = [s for s in self.queues[job.pair] if s != job.session_id]

    def pop_queue(self, pair: tuple[str, str]) -> JobModel:
        sessions = self.queues[pair]
        sid = sessions.pop(0)
        waiting = self.session_queues[(pair, sid)]
        job = self.jobs[waiting.pop(0)]
        if waiting:
            sessions.append(sid)
        else:
            del self.session_queues[(pair, sid)]
        assert job.status == "queued"
        return job

    def fill_slots(self, name: str, cursor: Cursor) -> None:
        """A node's free slots take the jobs queued for its pairs, whatever pool they came by.

        Each slot takes, of its pairs' queue heads, the one whose wait ends
        first (the first pair, sorted, on a tie); a job past its deadline
        ends JOB_TIMEOUT instead of starting.
        """
        node = self.nodes[name]
        if node.state != "live":
            return
        pairs = sorted(node.spec.pairs)
        expired = 0
        while len(self.running_on(name)) < node.spec.max_jobs:
            heads = [(self.head(p), i) for i, p in enumerate(pairs) if self.head(p) is not None]
            if not heads:
                break
            job = self.pop_queue(pairs[min(heads)[1]])
            if self.now >= job.deadline:
                cursor.expect(self.end_job(job, "failed", b"null", "JOB_TIMEOUT"))
                expired += 1
                if expired >= MAX_EXPIRED_PER_FILL:
                    break
            else:
                self.start_attempt(job, name)
                cursor.expect(self.dispatch_event(job))

    def lose_job(self, job: JobModel, name: str, node_hub: str, cursor: Cursor) -> None:
        cursor.expect(CancelAttempt(node_hub, name, job.job_id, job.attempt, "NODE_LOST"))
        if job.attempt < SETTINGS.max_attempts and self.now < job.deadline:
            pref = self.preferences.get(job.session_id)
            allowed = self.candidates(self.lang_pools[job.pair], pref and pref[0], None)
            if allowed:
                event = cursor.take(Dispatch)
                assert event.node_id in allowed, (event.node_id, allowed)
                self.start_attempt(job, event.node_id)
                assert event == self.dispatch_event(job)
                return
        cursor.expect(self.end_job(job, "failed", b"null", "NODE_LOST"))

    def lose_node(self, name: str, cursor: Cursor) -> None:
        node = self.nodes[name]
        node.state = "lost"
        for job_id in self.running_on(name):
            self.lose_job(self.jobs[job_id], name, node.hub, cursor)
        cursor.expect(NodeLost(node.hub, name, node.epoch))


# The machine


class DeterministicScheduler(Scheduler):
    """Seeds its scripts' tie-breaking from a fixed sequence, so Hypothesis can replay."""

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seeds = random.Random(seed)

    def _seed(self) -> int:
        return self.seeds.randrange(1, 2147483646)


class SchedulerMachine(RuleBasedStateMachine):
    redis_url = ""  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis = Redis.from_url(self.redis_url, socket_timeout=5, retry=Retry(NoBackoff(), 0))
        self.keys = Keys(cell="model-" + uuid.uuid4().hex[:12])
        self.scheduler = DeterministicScheduler(
            self.redis, SETTINGS, hub_id="h1", keys=self.keys, seed=1
        )
        self.run(self.scheduler.load_scripts())
        self.model = Model()
        self.counter = 0

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def refused(self, coroutine: Any) -> ErrorCode:
        with pytest.raises(SchedulingError) as caught:
            self.run(coroutine)
        return caught.value.error_code

    def teardown(self) -> None:
        try:

            async def clean() -> None:
                pattern = self.keys.scan_pattern
                found = [key async for key in self.redis.scan_iter(match=pattern, count=1000)]
                if found:
                    await self.redis.unlink(*found)
                await self.scheduler.close()
                await self.redis.aclose()

            self.run(clean())
        finally:
            self.loop.close()

    # Rules

    @initialize()
    def start_fleet(self) -> None:
        # d and e join later, maybe while jobs wait for them.
        for name in ("a", "b", "c"):
            self.register(name, [])

    @rule(name=st.sampled_from(tuple(SPECS)), data=st.data())
    def register_node(self, name: str, data: st.DataObject) -> None:
        own = self.model.running_on(name)
        others = sorted(j for j in self.model.jobs if j not in own)[:3]
        resume = data.draw(st.lists(st.sampled_from([*own, *others, "nope"]), unique=True))
        self.register(name, resume)

    def register(self, name: str, resume: Sequence[str]) -> None:
        model, node = self.model, self.model.nodes[name]
        hub = f"h{(node.epoch + 1) % 2}-{name}"
        reg = self.run(
            self.scheduler.register_node(
                name,
                services=SERVICES,
                lang_pairs=node.spec.pairs,
                max_jobs=node.spec.max_jobs,
                pools=(node.spec.opool,),
                resume=resume,
                hub_id=hub,
                now_ms=model.now,
            )
        )
        own = model.running_on(name)
        resumed = [j for j in own if j in resume]
        assert reg.epoch == node.epoch + 1
        assert reg.resumed == tuple(resumed)
        assert reg.dropped == tuple(j for j in resume if j not in resumed)
        cursor = Cursor(reg.events)
        if node.state not in (None, "lost"):
            cursor.expect(NodeReplaced(node.hub, name, node.epoch))
        node.state = "lost"  # out of dispatch while its old jobs are settled
        for job_id in own:
            if job_id not in resumed:
                model.lose_job(model.jobs[job_id], name, node.hub, cursor)
        node.state, node.epoch, node.hub, node.seen = "live", reg.epoch, hub, model.now
        for pair in node.spec.pairs:
            model.lang_pools[pair].add(node.spec.pool)
        model.pools_known.add(node.spec.pool)
        model.fill_slots(name, cursor)
        cursor.done()

    @rule(
        beats=st.lists(
            st.tuples(st.sampled_from(NODE_NAMES), st.booleans(), st.booleans()),
            min_size=1,
            max_size=4,
        )
    )
    def heartbeat(self, beats: list[tuple[str, bool, bool]]) -> None:
        nodes = self.model.nodes
        self.beat(
            [
                Beat(name, max(nodes[name].epoch, 1) - stale, online=online)
                for name, online, stale in beats
            ]
        )

    @rule()
    def heartbeat_fleet(self) -> None:
        """Every registered node's connection beats: its lease starts again."""
        alive = [n for n in self.model.nodes.values() if n.state not in (None, "lost")]
        assert self.beat([Beat(n.name, n.epoch) for n in alive]) == [1] * len(alive)

    def beat(self, beats: list[Beat]) -> list[int]:
        model = self.model
        reply = self.run(self.scheduler.heartbeat(beats, now_ms=model.now))
        cursor = Cursor(reply.events)
        expected = []
        for beat in beats:
            node = model.nodes[beat.node_id]
            if node.state in (None, "lost"):
                expected.append(ErrorCode.UNKNOWN_NODE)
            elif beat.epoch != node.epoch:
                expected.append(ErrorCode.STALE_EPOCH)
            else:
                node.seen = model.now
                if beat.online and node.state == "offline":
                    # Back online: its free slots take the jobs waiting for them.
                    node.state = "live"
                    model.fill_slots(node.name, cursor)
                elif not beat.online and node.state == "live":
                    node.state = "offline"
                expected.append(1 if beat.online else 0)
        cursor.done()
        assert list(reply) == expected
        return list(reply)

    @rule(
        jobs=st.lists(
            st.tuples(
                st.sampled_from(SESSIONS),
                st.sampled_from([EN_FR, EN_FR, DE_EN]),
                st.sampled_from([1_000, 1_000, 200]),  # timeout_ms
                st.booleans(),
            ),
            min_size=1,
            max_size=4,
        )
    )
    def dispatch_tasks(self, jobs: list[tuple[str, tuple[str, str], int, bool]]) -> None:
        for job in jobs:
            self.dispatch(*job)

    @rule(
        jobs=st.lists(
            st.tuples(
                st.sampled_from(SESSIONS), st.sampled_from(PAIRS), st.sampled_from([1_000, 200])
            ),
            min_size=6,
            max_size=10,
        )
    )
    def dispatch_burst(self, jobs: list[tuple[str, tuple[str, str], int]]) -> None:
        """More jobs than free slots: some wait, in both pairs' queues."""
        for session_id, pair, timeout_ms in jobs:
            self.dispatch(session_id, pair, timeout_ms, False)

    def dispatch(
        self, session_id: str, pair: tuple[str, str], timeout_ms: int, with_audio: bool
    ) -> None:
        model = self.model
        self.counter += 1
        job_id = f"j{self.counter}"
        payload = b'{"n":%d}' % self.counter
        call = self.scheduler.dispatch_task(
            session_id, *pair, payload, ref=f"r{self.counter}", has_audio=with_audio,
            timeout_ms=timeout_ms, job_id=job_id, session_hub=session_hub(session_id),
            now_ms=model.now,
        )  # fmt: skip
        pools = sorted(model.lang_pools[pair])
        pref = model.preferences.get(session_id)
        pref_pool, pref_node = (pref[0], pref[1]) if pref and pref[2] == pair else (None, None)
        allowed = model.candidates(pools, pref_pool, pref_node)
        if not pools:
            assert self.refused(call) is ErrorCode.NO_POOL_FOR_LANG_PAIR
            return
        if not allowed:
            # Queued only while a live node serves the pair, whatever its pool.
            if not model.live_for(pair):
                assert self.refused(call) is ErrorCode.EMPTY_POOL
                return
            if model.depth(pair) >= SETTINGS.queue_max:
                assert self.refused(call) is ErrorCode.QUEUE_FULL
                return
            if len(model.session_queues.get((pair, session_id), [])) >= 2:
                assert self.refused(call) is ErrorCode.SESSION_QUEUE_FULL
                return
        reply = self.run(call)
        ref, deadline = f"r{self.counter}", model.now + timeout_ms
        job = JobModel(job_id, session_id, pair, payload, with_audio, ref, deadline)
        model.jobs[job_id] = job
        if allowed:
            assert isinstance(reply, Accepted), reply
            assert reply.node_id in allowed, (reply, allowed)
            model.start_attempt(job, reply.node_id)
            node = model.nodes[reply.node_id]
            assert reply == Accepted(job_id, node.name, 1, node.hub, job.deadline)
        else:
            assert reply == Queued(job_id, pair_text(pair), job.deadline)
            job.queue_until = model.now + SETTINGS.queue_wait_ms
            if (pair, session_id) not in model.session_queues:
                model.queues.setdefault(pair, []).append(session_id)
            model.session_queues.setdefault((pair, session_id), []).append(job_id)

    @precondition(lambda self: any(j.status == "running" for j in self.model.jobs.values()))
    @rule(data=st.data(), statuses=st.lists(st.sampled_from(["finished", "failed"]), min_size=1,
                                            max_size=3))  # fmt: skip
    def complete_tasks(self, data: st.DataObject, statuses: list[str]) -> None:
        for status in statuses:
            running = sorted(j.job_id for j in self.model.jobs.values() if j.status == "running")
            if not running:
                return
            job = self.model.jobs[data.draw(st.sampled_from(running))]
            self.complete(job.job_id, job.node, job.attempt, status)

    @rule(data=st.data())
    def complete_task_refused(self, data: st.DataObject) -> None:
        # Repeated, stale, by another node, never dispatched, unknown.
        options = [("nope", "a", 1)]
        for job in self.model.jobs.values():
            if job.node is None:
                options.append((job.job_id, "a", 0))
                continue
            if job.status in TERMINAL:
                options.append((job.job_id, job.node, job.attempt))
            options.append((job.job_id, job.node, job.attempt - 1))
            options.extend((job.job_id, n, job.attempt) for n in SPECS if n != job.node)
        self.complete(*data.draw(st.sampled_from(options)), "finished")

    def complete(self, job_id: str, name: str, attempt: int, status: str) -> None:
        model = self.model
        result = b'{"ok":true}' if status == "finished" else b"null"
        error = "" if status == "finished" else "MODEL_ERROR"
        call = self.scheduler.complete_task(
            job_id, name, attempt, status, result=result, error=error or None, now_ms=model.now
        )
        job = model.jobs.get(job_id)
        if job is None:
            assert self.refused(call) is ErrorCode.UNKNOWN_JOB
        elif job.node != name:
            expected = ErrorCode.STALE_ATTEMPT if name in job.hist else ErrorCode.NODE_MISMATCH
            assert self.refused(call) is expected
        elif job.status != "running" or job.attempt != attempt:
            assert self.refused(call) is ErrorCode.STALE_ATTEMPT
        else:
            done = self.run(call)
            assert done.ended == model.end_job(job, status, result, error)
            cursor = Cursor(done.events)
            model.fill_slots(name, cursor)
            cursor.done()
            node = model.nodes[name]
            assert done.drained == (node.state == "draining" and not model.running_on(name))

    @rule(data=st.data())
    def cancel_task(self, data: st.DataObject) -> None:
        model = self.model
        options = [("nope", "s1")]
        for job in model.jobs.values():
            options += [(job.job_id, job.session_id)] * 2 + [(job.job_id, s) for s in SESSIONS]
        job_id, session_id = data.draw(st.sampled_from(options))
        call = self.scheduler.cancel_task(job_id, session_id, now_ms=model.now)
        job = model.jobs.get(job_id)
        if job is None:
            assert self.refused(call) is ErrorCode.UNKNOWN_JOB
        elif job.session_id != session_id:
            assert self.refused(call) is ErrorCode.SESSION_MISMATCH
        elif job.status in TERMINAL:
            assert self.refused(call) is ErrorCode.STALE_ATTEMPT
        else:
            cancelled = self.run(call)
            cursor = Cursor(cancelled.events)
            if job.status == "queued":
                model.unqueue(job)
                assert cancelled.ended == model.end_job(job, "failed", b"null", "CANCELLED")
            else:
                node = model.nodes[job.node]
                cursor.expect(CancelAttempt(node.hub, node.name, job_id, job.attempt, "CANCELLED"))
                assert cancelled.ended == model.end_job(job, "failed", b"null", "CANCELLED")
                model.fill_slots(node.name, cursor)
            cursor.done()

    @precondition(lambda self: any(j.status == "running" for j in self.model.jobs.values()))
    @rule(data=st.data())
    def busy_node_lost(self, data: st.DataObject) -> None:
        """The socket of a node with jobs closes: they move on, or fail."""
        busy = sorted({j.node for j in self.model.jobs.values() if j.status == "running"})
        self.node_lost(data.draw(st.sampled_from(busy)), "current")

    @rule(name=st.sampled_from(NODE_NAMES), epoch=st.sampled_from(["current", "stale", "none"]))
    def node_lost(self, name: str, epoch: str) -> None:
        model, node = self.model, self.model.nodes[name]
        sent = {"current": node.epoch, "stale": node.epoch - 1, "none": None}[epoch]
        call = self.scheduler.node_lost(name, epoch=sent, now_ms=model.now)
        if node.state in (None, "lost"):
            assert self.refused(call) is ErrorCode.UNKNOWN_NODE
        elif sent is not None and sent != node.epoch:
            assert self.refused(call) is ErrorCode.STALE_EPOCH
        else:
            cursor = Cursor(self.run(call))
            model.lose_node(name, cursor)
            cursor.done()

    @rule(name=st.sampled_from(NODE_NAMES), stale=st.booleans())
    def drain_node(self, name: str, stale: bool) -> None:
        model, node = self.model, self.model.nodes[name]
        call = self.scheduler.drain_node(name, epoch=node.epoch - stale)
        if node.state in (None, "lost"):
            assert self.refused(call) is ErrorCode.UNKNOWN_NODE
        elif stale:
            assert self.refused(call) is ErrorCode.STALE_EPOCH
        else:
            assert self.run(call) == len(model.running_on(name))
            node.state = "draining"

    @rule(elapsed_ms=st.sampled_from([50, 100, 200, 300, 500, 1_000, 1_500]))
    def time_passes(self, elapsed_ms: int) -> None:
        self.model.now += elapsed_ms

    @rule()
    def sweep(self) -> None:
        model = self.model
        now = model.now
        report = self.run(self.scheduler.sweep(now_ms=now, lease_ms=0))
        assert report.ran
        cursor = Cursor(report.events)
        due = sorted(
            (j for j in model.jobs.values() if j.status not in TERMINAL and j.deadline <= now),
            key=lambda j: (j.deadline, j.job_id),
        )
        timed_out = 0
        for job in due:
            if job.status == "running":
                node = model.nodes[job.node]
                cursor.expect(CancelAttempt(node.hub, node.name, job.job_id, job.attempt,
                                            "JOB_TIMEOUT"))  # fmt: skip
                cursor.expect(model.end_job(job, "failed", b"null", "JOB_TIMEOUT"))
                model.fill_slots(node.name, cursor)
                timed_out += 1
            elif job.status == "queued":
                model.unqueue(job)
                cursor.expect(model.end_job(job, "failed", b"null", "JOB_TIMEOUT"))
                timed_out += 1
        waited = sorted(
            (j for j in model.jobs.values() if j.status == "queued" and j.queue_until <= now),
            key=lambda j: (j.queue_until, j.job_id),
        )
        for job in waited:
            model.unqueue(job)
            cursor.expect(model.end_job(job, "failed", b"null", "NO_AVAILABLE_NODE"))
        silent = sorted(
            (n for n in model.nodes.values() if n.state not in (None, "lost")
             and n.seen <= now - SETTINGS.lease_ms),
            key=lambda n: (n.seen, n.name),
        )  # fmt: skip
        for node in silent:
            model.lose_node(node.name, cursor)
        cursor.done()
        assert (report.timed_out, report.queue_expired, report.nodes_lost) == (
            timed_out,
            len(waited),
            len(silent),
        )

    # The whole cell, after every step

    @invariant()
    def redis_matches_the_model(self) -> None:
        self.run(self.check())

    async def check(self) -> None:
        model, k = self.model, self.keys
        pipe = self.redis.pipeline(transaction=False)
        jobs = sorted(model.jobs.values(), key=lambda j: j.job_id)
        for job in jobs:
            pipe.hgetall(k.job(job.job_id))
        names = [n for n in NODE_NAMES if model.nodes[n].state is not None] + [GHOST]
        for name in names:
            pipe.hgetall(k.node(name))
            pipe.smembers(k.node_jobs(name))
        pools = sorted(model.pools_known)
        for pool in pools:
            pipe.zrange(k.free(pool), 0, -1, withscores=True)
        for pair in PAIRS:
            pipe.smembers(k.live(*pair))
            pipe.lrange(k.queue(*pair), 0, -1)
            for sid in SESSIONS:
                pipe.lrange(k.session_queue(*pair, sid), 0, -1)
        pipe.zrange(k.queue_heads, 0, -1, withscores=True)
        pipe.hgetall(k.queue_depth)
        pipe.zrange(k.seen, 0, -1, withscores=True)
        pipe.zrange(k.deadlines, 0, -1, withscores=True)
        pipe.zrange(k.queued, 0, -1, withscores=True)
        replies = iter(await pipe.execute())

        for job in jobs:
            got = {f.decode(): v for f, v in next(replies).items()}
            assert got["status"].decode() == job.status, job
            assert int(got["attempt"]) == job.attempt, job
            assert got.get("node") == (job.node.encode() if job.node else None), job
            if job.status in TERMINAL:
                assert (got["result"], got["error"].decode()) == (job.result, job.error)
                assert "payload" not in got and "audio" not in got
            else:
                assert got["payload"] == job.payload
                assert got.get("audio") == (b"1" if job.has_audio else b"")
            assert "qpool" not in got, job
        for name in names:
            node, got, members = model.nodes[name], next(replies), next(replies)
            running = model.running_on(name)
            assert {m.decode() for m in members} == set(running), name
            if node.state is None:
                assert got == {}
                continue
            assert got[b"state"].decode() == node.state, name
            assert int(got[b"epoch"]) == node.epoch, name
            if node.state != "lost":
                assert int(got[b"running"]) == len(running) <= node.spec.max_jobs, name
        for pool in pools:
            free = {m.decode(): s for m, s in next(replies)}
            loads = model.free_in(pool)
            assert free.keys() == loads.keys(), pool
            # A score is the load level (in 2**20ths) times 2**31 plus a tie-break below 2**31.
            assert all(
                free[n] == int(free[n]) and int(free[n]) // 2**31 == int(loads[n] * 2**20)
                for n in loads
            ), (pool, free, loads)
        for pair in PAIRS:
            assert {m.decode() for m in next(replies)} == model.live_for(pair), pair
            assert [s.decode() for s in next(replies)] == model.queues.get(pair, []), pair
            for sid in SESSIONS:
                waiting = [j.decode() for j in next(replies)]
                assert waiting == model.session_queues.get((pair, sid), []), (pair, sid)
        heads = {p.decode(): s for p, s in next(replies)}
        assert heads == {
            pair_text(p): self.model.head(p) for p in PAIRS if self.model.head(p) is not None
        }
        depths = {p.decode(): int(d) for p, d in next(replies).items()}
        assert depths == {pair_text(p): model.depth(p) for p in PAIRS if model.depth(p)}
        seen = {m.decode(): s for m, s in next(replies)}
        assert seen == {
            n.name: n.seen for n in model.nodes.values() if n.state not in (None, "lost")
        }
        deadlines = {m.decode(): s for m, s in next(replies)}
        assert deadlines == {j.job_id: j.deadline for j in jobs if j.status not in TERMINAL}
        queued = {m.decode(): s for m, s in next(replies)}
        assert queued == {j.job_id: j.queue_until for j in jobs if j.status == "queued"}
        assert model.ends == sum(j.status in TERMINAL for j in jobs)


# A pass takes seconds; a failure takes longer, while Hypothesis shrinks it.
@pytest.mark.timeout(600)
def test_scripts_match_the_model(redis_server: RedisProcess, monkeypatch):
    monkeypatch.setattr(SchedulerMachine, "redis_url", redis_server.url)
    run_state_machine_as_test(
        SchedulerMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
