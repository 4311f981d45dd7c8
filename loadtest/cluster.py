"""A real Redis Cluster on loopback ports, for the tests and the harness.

:class:`RedisCluster` starts ``2 * masters`` servers (by default the bundled
``valkey-server``) with cluster mode on, joins them with the matching
``valkey-cli --cluster create ... --cluster-replicas 1 --cluster-yes`` (or
``redis-cli`` next to a ``redis-server``), and waits until every node agrees
the cluster is ``ok`` and every replica is in sync. Settings that keep it
quick and useful under faults:

- ``cluster-node-timeout`` short (default 1000 ms): a killed master is
  failed over in a few seconds;
- ``repl-diskless-sync-delay 0``: a replica syncs at once;
- ``cluster-require-full-coverage no``: while one master fails over, the
  other masters' cells keep serving (with ``yes`` the whole cluster refuses
  commands until every slot has a master);
- ``cluster-replica-validity-factor 0``: a replica may always take over,
  however long its master was silent.

The hub package never imports this module.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis as sync_redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from hub.cluster import cell_slot

from .procs import RedisProcess, free_port

__all__ = ["RedisCluster", "cells_on_masters", "cli_for"]

_CREATE_OPTIONS = ("--cluster-replicas", "1", "--cluster-yes")
"""One replica per master; no question asked."""


def cli_for(server_binary: str) -> str:
    """The cluster-creating CLI next to a server binary (``valkey-cli``, ``redis-cli``).

    Raises:
        RuntimeError: if there is none.
    """
    path = Path(server_binary)
    for name in (path.name.replace("-server", "-cli"), "valkey-cli", "redis-cli"):
        candidate = path.with_name(name)
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if found is None:
        raise RuntimeError(f"no valkey-cli or redis-cli next to {server_binary}")
    return found


def _client(port: int, timeout_s: float = 2.0) -> sync_redis.Redis:
    return sync_redis.Redis(
        host="127.0.0.1",
        port=port,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


class RedisCluster:
    """A Redis Cluster of ``masters`` masters with one replica each, on 127.0.0.1.

    Args:
        binary: the server binary (its CLI is found next to it).
        dir: one subdirectory per node is made here.
        masters: number of masters (at least 3, as Redis Cluster requires).
        node_timeout_ms: ``cluster-node-timeout``.
        extra_args: more ``--name value`` arguments for every node.
    """

    def __init__(
        self,
        binary: str,
        dir: Path,
        *,
        masters: int = 3,
        node_timeout_ms: int = 1000,
        extra_args: Sequence[str] = (),
    ) -> None:
        if masters < 3:
            raise ValueError("a Redis Cluster needs at least 3 masters")
        self.binary = binary
        self.cli = cli_for(binary)
        self.dir = Path(dir)
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.extra_args = tuple(extra_args)
        self.nodes: list[RedisProcess] = []
        """Every node; the first ``masters`` were created masters."""

    @property
    def url(self) -> str:
        """A seed node's URL (the first live node)."""
        live = [n for n in self.nodes if n.is_running()]
        return (live or self.nodes)[0].url

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the nodes, create the cluster and wait until it is ``ok`` and in sync.

        Raises:
            RuntimeError: a node did not start, or the cluster was not ready in time.
        """
        for i in range(2 * self.masters):
            port = free_port()
            node_dir = self.dir / f"node-{i}"
            node = RedisProcess(
                self.binary,
                node_dir,
                port=port,
                extra_args=(
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    # The bus port of its own: the default (port + 10000) may
                    # be above 65535 or taken.
                    "--cluster-port", str(free_port()),
                    "--cluster-node-timeout", str(self.node_timeout_ms),
                    "--cluster-require-full-coverage", "no",
                    "--cluster-replica-validity-factor", "0",
                    "--repl-diskless-sync-delay", "0",
                    "--repl-diskless-sync", "yes",
                    *self.extra_args,
                ),
            )  # fmt: skip
            self.nodes.append(node)
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run(
            [self.cli, "--cluster", "create", *addresses, *_CREATE_OPTIONS],
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"cluster create failed: {done.stdout[-500:]!r} {done.stderr!r}")
        try:
            self.wait_ok(timeout_s)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL). Idempotent."""
        for node in self.nodes:
            node.stop()

    def node_at(self, port: int) -> RedisProcess:
        """The node listening on ``port``."""
        return next(n for n in self.nodes if n.port == port)

    def slot_map(self) -> list[tuple[int, int, int, list[int]]]:
        """``CLUSTER SLOTS`` from a live node: (first, last, master port, replica ports)."""
        for node in self.nodes:
            if not node.is_running():
                continue
            client = _client(node.port)
            try:
                reply = client.execute_command("CLUSTER SLOTS")
            except (sync_redis.RedisError, OSError):
                continue
            finally:
                client.close()
            return [(r[0], r[1], int(r[2][1]), [int(x[1]) for x in r[3:]]) for r in reply]
        raise RuntimeError("no node answered CLUSTER SLOTS")

    def master_of(self, slot: int) -> RedisProcess:
        """The node that owns ``slot`` now (as the live nodes see it)."""
        for first, last, port, _ in self.slot_map():
            if first <= slot <= last:
                return self.node_at(port)
        raise RuntimeError(f"slot {slot} has no master")

    def master_ports(self) -> list[int]:
        """The masters' ports, in slot order."""
        return [port for _, _, port, _ in sorted(self.slot_map())]

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Wait until every live node says ``cluster_state:ok``, every slot has a
        live master and every live replica is in sync with it.

        Raises:
            RuntimeError: if that did not happen within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            last = self._not_ok()
            if not last:
                return
            time.sleep(0.05)
        raise RuntimeError(f"cluster not ready in {timeout_s:g} s: {last}")

    def wait_owner_changed(self, slot: int, old_port: int, timeout_s: float = 30.0) -> float:
        """Wait until a live node other than ``old_port`` owns ``slot``; returns seconds waited.

        Raises:
            RuntimeError: on timeout.
        """
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            try:
                owner = self.master_of(slot)
            except RuntimeError:
                owner = None
            if owner is not None and owner.port != old_port and owner.is_running():
                return time.monotonic() - start
            time.sleep(0.02)
        raise RuntimeError(f"slot {slot} still not failed over after {timeout_s:g} s")

    # Private methods

    def _not_ok(self) -> str:
        """What is not ready yet, or ``""``."""
        total = 0
        for node in self.nodes:
            if not node.is_running():
                continue
            client = _client(node.port)
            try:
                info = client.cluster("INFO")  # parsed into a dict by redis-py
                if info.get("cluster_state") != "ok":
                    return f"{node.port}: not ok"
                repl = client.info("replication")
            except (sync_redis.RedisError, OSError) as exc:
                return f"{node.port}: {exc}"
            finally:
                client.close()
            if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                return f"replica {node.port}: link {repl.get('master_link_status')}"
        try:
            ranges = self.slot_map()
        except RuntimeError as exc:
            return str(exc)
        for first, last, port, replicas in ranges:
            if not self.node_at(port).is_running():
                return f"slots {first}-{last} on dead master {port}"
            if not replicas:
                return f"slots {first}-{last}: no replica yet"
            total += last - first + 1
        return "" if total == 16384 else f"{total} slots covered"


def cells_on_masters(cluster: RedisCluster, per_master: int = 1, prefix: str = "c") -> list[str]:
    """Cell names whose slots fall on each master in turn (``per_master`` per master).

    Returns:
        ``per_master`` cells of the first master, then of the second, ...
    """
    ranges = sorted(cluster.slot_map())
    found: list[list[str]] = [[] for _ in ranges]
    i = 0
    while any(len(cells) < per_master for cells in found):
        cell = f"{prefix}{i}"
        i += 1
        slot = cell_slot(cell)
        for k, (first, last, _, _) in enumerate(ranges):
            if first <= slot <= last and len(found[k]) < per_master:
                found[k].append(cell)
    return [cell for cells in found for cell in cells]
