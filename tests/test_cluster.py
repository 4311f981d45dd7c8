"""Cells on a real Redis Cluster: 3 masters, 3 replicas, spawned by the fixture.

Each cell's keys share one hash tag, so one slot; the hub finds the slot's
master from any seed node (hub/cluster.py) and follows ``MOVED`` and ``ASK``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis as sync_redis
from redis.exceptions import MovedError

from hub.app import Hub
from hub.cli import main
from hub.cluster import ClusterLinks, ClusterRedirect, cell_slot
from hub.config import ConfigError, Settings
from hub.errors import RedisUnavailable
from hub.events import Beat
from hub.keys import Keys
from hub.scheduler import Scheduler
from loadtest.chaos import ChaosConfig, format_report, run_chaos
from loadtest.cluster import RedisCluster, cells_on_masters
from loadtest.procs import REPO_ROOT, child_env, free_port, hub_command, parse_ready_line
from tests.helpers import MS, wait_for
from tests.hubtools import (
    Connect,
    check_invariants,
    expect,
    open_node,
    open_session,
    result,
    round_trip,
    submit,
)
from tests.test_loadtest import assert_every_job_answered_once, run_loadtest
from tests.test_scheduler import SETTINGS, exercise_fleet

MakeHub = Callable[..., Awaitable[Hub]]

SETTINGS_FIELDS = {f: getattr(SETTINGS, f) for f in Settings.field_names()}


def direct(port: int) -> sync_redis.Redis:
    """A plain client of one node (no redirects followed)."""
    return sync_redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


def on_node(port: int, *commands: tuple[object, ...]) -> list[object]:
    """Run commands on one node, in one pipeline (one connection), and close it."""
    client = direct(port)
    try:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(pipe.execute())
    finally:
        client.close()


def keys_on(port: int, keys: Keys) -> int:
    """How many keys of the cell one node holds."""
    client = direct(port)
    try:
        return sum(1 for _ in client.scan_iter(match=keys.scan_pattern, count=1000))
    finally:
        client.close()


def seed_not_owning(cluster: RedisCluster, cell: str) -> str:
    """The URL of a master that does not own the cell's slot."""
    owner = cluster.master_of(cell_slot(cell)).port
    port = next(p for p in cluster.master_ports() if p != owner)
    return f"redis://127.0.0.1:{port}/0"


async def cluster_schedulers(
    cluster: RedisCluster, keys: Keys, count: int
) -> tuple[list[ClusterLinks], list[Scheduler]]:
    """``count`` schedulers of one cell, each with its own links, located and loaded."""
    links = [ClusterLinks(cluster.url, SETTINGS) for _ in range(count)]
    schedulers = []
    for i, link in enumerate(links):
        scheduler = Scheduler(link.client(keys.cell), SETTINGS, hub_id=f"h{i}", keys=keys)
        await link.locate()
        await scheduler.load_scripts()
        schedulers.append(scheduler)
    return links, schedulers


# Scripts and invariants, per cell


async def test_three_cells_on_three_masters_keep_every_invariant(
    redis_cluster: RedisCluster,
) -> None:
    cells = cells_on_masters(redis_cluster, prefix="inv-")
    masters = redis_cluster.master_ports()
    runs: list[tuple[Keys, list[ClusterLinks], list[Scheduler]]] = []
    for cell in cells:
        keys = Keys(cell)
        links, schedulers = await cluster_schedulers(redis_cluster, keys, 4)
        runs.append((keys, links, schedulers))
    try:
        # The three cells at once, each on its own master.
        await asyncio.gather(
            *(
                exercise_fleet(schedulers, links[0].client(keys.cell), keys, seed=7 + i)
                for i, (keys, links, schedulers) in enumerate(runs)
            )
        )
        for i, (keys, links, _) in enumerate(runs):
            assert links[0].owner(keys.cell).port == masters[i]
            # Every key of the cell is on its master, none anywhere else.
            assert keys_on(masters[i], keys) > 10
            assert all(keys_on(p, keys) == 0 for p in masters if p != masters[i])
    finally:
        for _, links, schedulers in runs:
            for scheduler in schedulers:
                await scheduler.close()
            for link in links:
                await link.aclose()


async def test_calls_follow_moved_from_a_seed_that_does_not_own_the_cell(
    redis_cluster: RedisCluster,
) -> None:
    keys = Keys(cells_on_masters(redis_cluster, prefix="moved-")[0])
    links = ClusterLinks(seed_not_owning(redis_cluster, keys.cell), SETTINGS)
    scheduler = Scheduler(links.client(keys.cell), SETTINGS, hub_id="h0", keys=keys)
    moves: list[int] = []
    links.on_moved(lambda: moves.append(1))
    try:
        # No locate(): the first call goes to the seed, which answers MOVED;
        # the call runs once, on the owner.
        reg = await scheduler.register_node(
            "n1", services=("asr",), lang_pairs=(("en", "fr"),), max_jobs=2
        )
        assert reg.epoch == 1
        owner = redis_cluster.master_of(cell_slot(keys.cell)).port
        assert links.owner(keys.cell).port == owner
        assert moves == [1]
        assert keys_on(owner, keys) > 0
        await check_invariants(links.client(keys.cell), keys, ["n1"])
    finally:
        await scheduler.close()
        await links.aclose()


async def test_a_key_of_another_slot_is_refused_and_moves_nothing(
    redis_cluster: RedisCluster,
) -> None:
    cells = cells_on_masters(redis_cluster, prefix="other-")
    links = ClusterLinks(redis_cluster.url, SETTINGS)
    try:
        await links.locate()
        client = links.client(cells[0])
        before = links.owner(cells[0]).port
        with pytest.raises(ClusterRedirect) as info:
            await client.get(Keys(cells[1]).seen)
        assert isinstance(info.value.error, MovedError)
        assert links.owner(cells[0]).port == before
        assert await client.exists(Keys(cells[0]).seen) == 0
    finally:
        await links.aclose()


async def test_calls_during_a_slot_migration_follow_ask_then_moved(
    redis_cluster: RedisCluster,
) -> None:
    keys = Keys(cells_on_masters(redis_cluster, prefix="ask-")[0])
    slot = cell_slot(keys.cell)
    source = redis_cluster.master_of(slot).port
    target = next(p for p in redis_cluster.master_ports() if p != source)
    clients = {p: direct(p) for p in redis_cluster.master_ports()}
    src, dst = clients[source], clients[target]
    ids = {p: c.execute_command("CLUSTER MYID") for p, c in clients.items()}
    links = ClusterLinks(redis_cluster.url, SETTINGS)
    scheduler = Scheduler(links.client(keys.cell), SETTINGS, hub_id="h0", keys=keys)
    pairs = (("en", "fr"),)
    try:
        await links.locate()
        await scheduler.load_scripts()
        reg = await scheduler.register_node("n1", services=("asr",), lang_pairs=pairs, max_jobs=2)
        # The slot starts moving; every key of the cell goes to the target.
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
        moving = list(src.scan_iter(match=keys.scan_pattern))
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *moving)
        # A one-key script: the source answers ASK, the target runs it after ASKING.
        beat = Beat("n1", reg.epoch, True, None, 1.0)
        assert list(await scheduler.heartbeat([beat])) == [1]
        assert src.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
        # A script whose keys are not all there yet (a new node) cannot run
        # anywhere until the migration ends (TRYAGAIN): refused, never run.
        with pytest.raises(RedisUnavailable):
            await scheduler.register_node("n2", services=("asr",), lang_pairs=pairs, max_jobs=2)
        assert links.owner(keys.cell).port == source
        # The migration ends: the next call gets MOVED and runs on the target.
        for client in clients.values():
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])
        await scheduler.register_node("n2", services=("asr",), lang_pairs=pairs, max_jobs=2)
        assert links.owner(keys.cell).port == target
        assert dst.exists(keys.node("n2")) and dst.exists(keys.seen)
        await check_invariants(links.client(keys.cell), keys, ["n1", "n2"])
    finally:
        # Back where it was, empty, for the other tests.
        for key in dst.scan_iter(match=keys.scan_pattern):
            dst.pipeline(transaction=False).execute_command("ASKING").delete(key).execute()
        for client in (src, dst):
            client.execute_command("CLUSTER SETSLOT", slot, "STABLE")
        for client in clients.values():
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[source])
            client.close()
        await scheduler.close()
        await links.aclose()
        await asyncio.to_thread(redis_cluster.wait_ok, 30)


async def test_a_call_to_a_slot_no_master_serves_fails_unavailable_and_never_runs(
    redis_cluster: RedisCluster,
) -> None:
    keys = Keys(cells_on_masters(redis_cluster, prefix="down-")[0])
    slot = cell_slot(keys.cell)
    owner = redis_cluster.master_of(slot).port
    links = ClusterLinks(redis_cluster.url, SETTINGS)
    scheduler = Scheduler(links.client(keys.cell), SETTINGS, hub_id="h0", keys=keys)
    pairs = (("en", "fr"),)
    try:
        await links.locate()
        await scheduler.load_scripts()
        # The master forgets the slot: it answers CLUSTERDOWN for the cell's keys.
        on_node(owner, ("CLUSTER", "DELSLOTS", slot))
        with pytest.raises(RedisUnavailable):
            await scheduler.register_node("n1", services=("asr",), lang_pairs=pairs, max_jobs=2)
        assert keys_on(owner, keys) == 0
    finally:
        on_node(owner, ("CLUSTER", "ADDSLOTS", slot))
        await asyncio.to_thread(redis_cluster.wait_ok, 30)
        await scheduler.close()
        await links.aclose()
    # Served again: the same call runs.
    links = ClusterLinks(redis_cluster.url, SETTINGS)
    scheduler = Scheduler(links.client(keys.cell), SETTINGS, hub_id="h0", keys=keys)
    try:
        await links.locate()
        reg = await scheduler.register_node("n1", services=("asr",), lang_pairs=pairs, max_jobs=2)
        assert reg.epoch == 1
    finally:
        await scheduler.close()
        await links.aclose()


async def test_wait_replicas_acts_on_replies_once_the_replica_has_the_writes(
    redis_cluster: RedisCluster,
) -> None:
    keys = Keys(cells_on_masters(redis_cluster, prefix="wait-")[0])
    settings = Settings(**{**SETTINGS_FIELDS, "redis_wait_replicas": 1, "redis_wait_ms": 1000})
    links = ClusterLinks(redis_cluster.url, settings)
    scheduler = Scheduler(links.client(keys.cell), settings, hub_id="h0", keys=keys)
    owner = redis_cluster.master_of(cell_slot(keys.cell)).port
    replica = next(rs[0] for _, _, port, rs in redis_cluster.slot_map() if port == owner)
    try:
        await links.locate()
        await scheduler.load_scripts()
        stats = on_node(owner, ("INFO", "commandstats"))[0]
        assert isinstance(stats, dict)
        waits = stats.get("cmdstat_wait", {}).get("calls", 0)
        for i in range(5):
            await scheduler.register_node(
                f"n{i}", services=("asr",), lang_pairs=(("en", "fr"),), max_jobs=2
            )
            # Acknowledged: the replica holds it already.
            read = on_node(replica, ("READONLY",), ("EXISTS", keys.node(f"n{i}")))
            assert read[1] == 1
        stats = on_node(owner, ("INFO", "commandstats"))[0]
        assert isinstance(stats, dict)
        assert stats["cmdstat_wait"]["calls"] - waits == 5
        assert scheduler.batcher.unreplicated == 0
    finally:
        await scheduler.close()
        await links.aclose()


# Hubs


async def test_hub_serves_a_cell_from_any_seed_and_uses_sharded_pubsub(
    redis_cluster: RedisCluster, make_hub: MakeHub, connect: Connect
) -> None:
    cell = cells_on_masters(redis_cluster, prefix="hubs-")[2]
    seed = seed_not_owning(redis_cluster, cell)
    a = await make_hub(redis_url=seed, redis_cluster=True, cell=cell, hub_id="cl-a")
    b = await make_hub(redis_url=seed, redis_cluster=True, cell=cell, hub_id="cl-b")
    owner = redis_cluster.master_of(cell_slot(cell)).port
    assert a.links.owner(cell).port == b.links.owner(cell).port == owner
    # Each hub's channel is a sharded one on the cell's master, nothing classic.
    client = direct(owner)
    try:
        channels = [a.keys.channel("cl-a"), b.keys.channel("cl-b")]
        counts = dict(client.execute_command("PUBSUB SHARDNUMSUB", *channels))
        assert counts == {channels[0].encode(): 1, channels[1].encode(): 1}
        assert set(dict(client.execute_command("PUBSUB NUMSUB", *channels)).values()) == {0}
    finally:
        client.close()
    # A session on hub A, its job on a node of hub B: frames cross the bus.
    node = await open_node(connect, b, "gpu-1")
    session = await open_session(connect, a)
    done = await round_trip(session, node, "r-1")
    assert done["status"] == "finished"
    assert a.bus.dropped == b.bus.dropped == 0
    await check_invariants(a.redis, a.keys, ["gpu-1"])
    assert keys_on(owner, a.keys) > 0


async def test_status_page_reads_the_cell_on_its_master(
    redis_cluster: RedisCluster, make_hub: MakeHub, connect: Connect
) -> None:
    cell = cells_on_masters(redis_cluster, prefix="status-")[1]
    hub = await make_hub(redis_url=redis_cluster.url, redis_cluster=True, cell=cell)
    await open_node(connect, hub, "gpu-9")
    session = await open_session(connect, hub)
    await submit(session, "s-1")
    await expect(session, "accepted", ref="s-1")
    status = await hub.scheduler.status()
    assert [n["node_id"] for n in status["nodes"]] == ["gpu-9"]
    assert status["nodes"][0]["running"] == 1


def test_hub_serve_redis_cluster_flag_serves_the_cell(redis_cluster: RedisCluster) -> None:
    cell = cells_on_masters(redis_cluster, prefix="cli-")[1]
    args = ["serve", "--redis-cluster", "--redis-url", seed_not_owning(redis_cluster, cell)]
    args += ["--cell", cell, "--port", "0", "--log-level", "WARNING"]
    process = subprocess.Popen(
        hub_command(*args),
        cwd=REPO_ROOT,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        ready = parse_ready_line(line)
        assert ready is not None, line
        assert ready.port > 0
        # It shared the cell's resume secret through the cell's master.
        owner = redis_cluster.master_of(cell_slot(cell)).port
        assert on_node(owner, ("EXISTS", Keys(cell).resume_secret)) == [1]
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err


# Several cells per hub, spill-over


async def test_a_hub_of_two_cells_on_two_masters_spills_and_survives_a_failover(
    redis_cluster: RedisCluster, make_hub: MakeHub, connect: Connect
) -> None:
    a, b = cells_on_masters(redis_cluster, prefix="spill-")[:2]
    hub = await make_hub(
        redis_url=redis_cluster.url,
        redis_cluster=True,
        cell=a,
        cells=(a, b),
        spill=1,
        redis_timeout_s=0.5,
    )
    masters = {cell: redis_cluster.master_of(cell_slot(cell)).port for cell in (a, b)}
    assert masters[a] != masters[b]
    assert {c: hub.links.owner(c).port for c in (a, b)} == masters
    # Each cell's channel is subscribed on its own master (its own slot).
    for cell in (a, b):
        counts = on_node(masters[cell], ("PUBSUB", "SHARDNUMSUB", Keys(cell).channel(hub.hub_id)))
        assert counts[0] == [Keys(cell).channel(hub.hub_id).encode(), 1]
    node_a = await open_node(connect, hub, "n-a", max_jobs=1)
    node_b = await open_node(connect, hub, "n-b", cell=b, max_jobs=1)
    session = await open_session(connect, hub)

    async def spill_round(ref: str) -> None:
        await submit(session, ref + "-1")
        first = await expect(session, "accepted", ref=ref + "-1", node_id="n-a")
        await submit(session, ref + "-2")  # cell a is full: its dispatch tries cell b
        spilled = await expect(session, "accepted", ref=ref + "-2", node_id="n-b")
        assert spilled["job_id"].startswith(b + ".")
        # The spilled job lives on cell b's master only.
        job_key = Keys(b).job(spilled["job_id"])
        assert on_node(hub.links.owner(b).port, ("EXISTS", job_key)) == [1]
        for node, accepted in ((node_b, spilled), (node_a, first)):
            job = await expect(node, "job", job_id=accepted["job_id"])
            await result(node, job, result={"ref": job["job_id"]})
            await expect(session, "result", job_id=accepted["job_id"], status="finished")

    await spill_round("before")
    # Cell b's master dies: the hub finds its replica, reconciles, spills again.
    master = redis_cluster.node_at(masters[b])
    restarts = hub.reconciler.restarts
    await asyncio.to_thread(master.kill)
    try:
        await asyncio.to_thread(redis_cluster.wait_owner_changed, cell_slot(b), master.port, 30)
        await wait_for(
            lambda: (
                hub.ready and hub.bus.subscribed.is_set() and hub.reconciler.restarts > restarts
            ),
            timeout=30_000 * MS,
            what="the hub ready again with cell b on the promoted replica",
        )
        assert hub.links.owner(b).port != masters[b]
        assert hub.links.owner(a).port == masters[a]
        await spill_round("after")
        await check_invariants(hub.cells.client(a), Keys(a), ["n-a"])
        await check_invariants(hub.cells.client(b), Keys(b), ["n-b"])
    finally:
        await asyncio.to_thread(master.start)
        await asyncio.to_thread(redis_cluster.wait_ok, 30)


# Bad configuration


def test_cluster_needs_a_tcp_seed() -> None:
    settings = Settings(redis_cluster=True)
    with pytest.raises(ConfigError) as info:
        ClusterLinks("unix:///tmp/redis.sock", settings)
    assert str(info.value) == (
        "invalid setting redis_url='unix:///tmp/redis.sock': a cluster needs a redis:// seed"
    )
    with pytest.raises(ConfigError) as info:
        ClusterLinks("redis://127.0.0.1:7000/2", settings)
    assert str(info.value) == (
        "invalid setting redis_url='redis://127.0.0.1:7000/2': a cluster has database 0 only"
    )


def test_serve_with_redis_cluster_and_no_url_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--redis-cluster", "--port", "0"]) == 2
    assert capsys.readouterr().err == (
        "hub: error: --redis-cluster needs --redis-url (a seed node of the cluster)\n"
    )


async def test_locate_fails_unavailable_when_no_node_answers() -> None:

    links = ClusterLinks(f"redis://127.0.0.1:{free_port()}/0", Settings(redis_timeout_s=0.5))
    try:
        with pytest.raises(RedisUnavailable):
            await links.locate()
    finally:
        await links.aclose()


# Failover


async def test_hub_serves_its_cell_again_after_its_master_is_killed(
    redis_cluster: RedisCluster, make_hub: MakeHub, connect: Connect
) -> None:
    cell = cells_on_masters(redis_cluster, prefix="fo-")[0]
    slot = cell_slot(cell)
    hub = await make_hub(
        redis_url=redis_cluster.url, redis_cluster=True, cell=cell, redis_timeout_s=0.5
    )
    node = await open_node(connect, hub, "gpu-1")
    session = await open_session(connect, hub)
    assert (await round_trip(session, node, "before"))["status"] == "finished"
    master = redis_cluster.master_of(slot)
    replicas = {
        p for f, last, port, rs in redis_cluster.slot_map() if port == master.port for p in rs
    }
    restarts = hub.reconciler.restarts
    await asyncio.to_thread(master.kill)
    try:
        await asyncio.to_thread(redis_cluster.wait_owner_changed, slot, master.port, 30)
        await wait_for(
            lambda: hub.ready and hub.reconciler.restarts > restarts,
            timeout=30_000 * MS,
            what="the hub ready again on the promoted replica",
        )
        assert hub.links.owner(cell).port in replicas
        # The node's socket lived on: it was registered again on the new master.
        assert (await round_trip(session, node, "after"))["status"] == "finished"
        await check_invariants(hub.redis, hub.keys, ["gpu-1"])
    finally:
        await asyncio.to_thread(master.start)
        await asyncio.to_thread(redis_cluster.wait_ok, 30)


async def test_chaos_run_with_the_cells_master_killed_leaves_a_clean_ledger(
    tmp_path: Path,
) -> None:
    # Its own cluster (loadtest/chaos.py starts it): three hubs on one cell,
    # nodes killed every few seconds, a hub killed, and the cell's master
    # SIGKILLed under load; its replica is promoted.
    config = ChaosConfig(
        duration_s=20.0,
        hubs=3,
        nodes=6,
        sessions=10,
        seed=20261206,
        service_ms=(200.0, 600.0),
        job_interval_s=0.3,
        node_kill_every_s=4.0,
        hub_kills=1,
        hub_down_s=3.0,
        redis_down_s=1.5,
        redis_cluster=3,
        settle_s=30.0,
        out_dir=tmp_path,
        quiet=True,
    )
    report = await run_chaos(config)
    text = format_report(report)
    print(text)  # shown by pytest -rA or on failure
    assert report["clean"], text
    assert report["faults"] == {"node": report["faults"]["node"], "hub": 1, "master-kill": 1}
    assert report["submitted"] > 100 and report["finished"] > 0.6 * report["submitted"]
    assert report["duplicates"] == report["leaks"] == report["mismatches"] == 0
    failover = report["failover"]
    assert failover["master_kill_to_replica_promoted_s"]["n"] == 1
    assert failover["redis_kill_to_hubs_reconciled_s"]["n"] == 1


# Genuine Redis 7

REDIS_7 = "/usr/bin/redis-server"


@pytest.fixture(scope="module")
def redis7_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    if not os.access(REDIS_7, os.X_OK):
        pytest.skip(f"{REDIS_7} is not installed (.ci/run installs Debian's redis-server)")
    cluster = RedisCluster(REDIS_7, tmp_path_factory.mktemp("redis7-cluster"))
    cluster.start(timeout_s=60_000 * MS)
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_redis_7_cluster_runs_the_scripts_the_bus_and_a_failover(
    redis7_cluster: RedisCluster, make_hub: MakeHub, connect: Connect
) -> None:
    version = on_node(redis7_cluster.master_ports()[0], ("INFO", "server"))[0]
    assert isinstance(version, dict)
    assert str(version["redis_version"]).startswith("7.") and "valkey_version" not in version
    cells = cells_on_masters(redis7_cluster, prefix="r7-")
    # The scripts and invariants on one cell, four hubs' worth of schedulers.
    keys = Keys(cells[0])
    links, schedulers = await cluster_schedulers(redis7_cluster, keys, 4)
    try:
        await exercise_fleet(schedulers, links[0].client(keys.cell), keys, seed=70)
    finally:
        for scheduler in schedulers:
            await scheduler.close()
        for link in links:
            await link.aclose()
    # Two hubs on another cell: sharded pub/sub between them, then a failover.
    cell = cells[1]
    url = seed_not_owning(redis7_cluster, cell)
    settings = {"redis_cluster": True, "cell": cell, "redis_timeout_s": 0.5}
    a = await make_hub(redis_url=url, hub_id="r7-a", **settings)
    b = await make_hub(redis_url=url, hub_id="r7-b", **settings)
    node = await open_node(connect, b, "gpu-1")
    session = await open_session(connect, a)
    assert (await round_trip(session, node, "before"))["status"] == "finished"
    slot = cell_slot(cell)
    master = redis7_cluster.master_of(slot)
    await asyncio.to_thread(master.kill)
    try:
        await asyncio.to_thread(redis7_cluster.wait_owner_changed, slot, master.port, 30)
        await wait_for(
            # Subscribed too: a partial published to a hub not yet subscribed
            # again is lost (pub/sub is at most once, protocol.md §8).
            lambda: all(
                h.ready and h.bus.subscribed.is_set() and h.reconciler.restarts for h in (a, b)
            ),
            timeout=30_000 * MS,
            what="both hubs ready again on the promoted replica",
        )
        assert (await round_trip(session, node, "after"))["status"] == "finished"
        await check_invariants(a.redis, a.keys, ["gpu-1"])
    finally:
        await asyncio.to_thread(master.start)


# The load harness


def test_load_harness_starts_a_cluster_and_spreads_three_cells_over_its_masters(
    tmp_path: Path,
) -> None:
    report = run_loadtest(
        tmp_path, "--redis-cluster", "3", "--cells", "3", "--hubs", "3", "--nodes", "6"
    )
    assert_every_job_answered_once(report)
    meta = report["meta"]
    assert len(meta["redis_cluster_pids"]) == 6
    # One cell per master (valkey-cli gives each of 3 masters a third of the slots).
    assert sorted(cell_slot(cell) * 3 // 16384 for cell in meta["cells"]) == [0, 1, 2]
    # Every master did a part of the scheduling work.
    parts = report["cpu"]["redis_masters_part"]
    assert len(parts) == 3 and all(part > 0 for part in parts.values())
