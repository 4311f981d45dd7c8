"""The chaos run (loadtest/chaos.py), shortened: kill a node, a hub and Redis under load.

Three hub processes, six node processes and ten sessions on one cell of an
embedded Redis (append-only file on); over 20 s of steady load two nodes and
one hub are SIGKILLed and started again, Redis is stopped and restarted, and
Redis is SIGKILLed and restarted without its last second of writes.
The ledger must be clean: every job exactly one outcome in its session, no
duplicate, no attempt run twice, no slot or key leaked. ``python -m
loadtest.chaos`` runs the full-length version (120 s, 20 nodes, 50 sessions).
"""

from __future__ import annotations

from pathlib import Path

from loadtest.chaos import ChaosConfig, format_report, run_chaos


async def test_short_chaos_run_leaves_a_clean_ledger(tmp_path: Path) -> None:
    config = ChaosConfig(
        duration_s=20.0,
        hubs=3,
        nodes=6,
        sessions=10,
        seed=20240601,
        service_ms=(200.0, 600.0),
        job_interval_s=0.3,
        node_kill_every_s=4.0,
        hub_kills=1,
        hub_down_s=3.0,
        redis_down_s=1.5,
        settle_s=20.0,
        out_dir=tmp_path,
        quiet=True,
    )
    report = await run_chaos(config)
    text = format_report(report)
    print(text)  # shown by pytest -rA or on failure
    assert report["clean"], text
    assert report["faults"] == {
        "node": report["faults"]["node"],
        "hub": 1,
        "redis": 1,
        "redis-kill": 1,
    }
    assert report["faults"]["node"] >= 2
    assert report["submitted"] > 100 and report["finished"] > 0.6 * report["submitted"]
    assert report["duplicates"] == report["leaks"] == report["mismatches"] == 0
    # The killed hub's nodes and sessions all came back elsewhere.
    failover = report["failover"]
    assert failover["hub_kill_to_node_reregistered_s"] is not None
    assert failover["hub_kill_to_session_resumed_s"] is not None
    assert failover["redis_kill_to_hubs_reconciled_s"] is not None
