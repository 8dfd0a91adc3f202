"""A Redis Cluster on loopback: three primaries, no replicas (or ``replicas`` each), no
persistence (unless asked).

Every node is a ``redis-server --cluster-enabled yes`` started by conftest's ``start_redis`` (a
temporary folder each, holding the node's ``nodes.conf``); ``redis-cli --cluster create`` hands
out the 16384 slots and waits for the nodes to meet, and the topology is ready once every node
says ``cluster_state:ok`` and they agree on who serves each slot. ``reshard`` moves slots (and
their keys) between two primaries with ``redis-cli --cluster reshard``, as an operator would.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import redis
from conftest import RedisServer, free_port, start_redis, stop_redis
from prerequisites import find_redis_cli

__all__ = ["PRIMARIES", "ClusterTopology"]

PRIMARIES = 3
NODE_TIMEOUT_MS = 5000  # a node silent this long is failing (no replica could take over anyway)
# The cluster bus listens on the node's port plus this (what Redis before 7 always does).
BUS_PORT_OFFSET = 10000
SETTLE_TIMEOUT = 30.0  # seconds for the nodes to meet and agree on the slots
CLI_TIMEOUT = 120.0  # seconds redis-cli may take to create the cluster or move slots


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _node_port() -> int:
    """A free port whose cluster bus port is free too."""
    while True:
        port = free_port()
        if port + BUS_PORT_OFFSET <= 65535 and _bindable(port + BUS_PORT_OFFSET):
            return port


class ClusterTopology:
    """The primaries, and the operations a cluster test needs."""

    def __init__(
        self,
        directory: Path,
        *,
        primaries: int = PRIMARIES,
        replicas: int = 0,
        appendonly: bool = False,
        full_coverage: bool = True,
    ) -> None:
        """``appendonly``: each node keeps an append-only file, so a node stopped and started
        again comes back with its keys. ``full_coverage=False``: with a node down, the others
        go on serving their slots (by default every node refuses every command then)."""
        self.directory = directory
        self.appendonly = appendonly
        self.coverage = ("--cluster-require-full-coverage", "yes" if full_coverage else "no")
        self.nodes: list[RedisServer] = []
        cli = find_redis_cli()
        if cli is None:
            raise AssertionError("the cluster tests need redis-cli (it ships with redis-server)")
        self.cli = cli
        try:
            for i in range(primaries * (1 + replicas)):
                folder = directory / f"node-{i}"
                self.nodes.append(
                    start_redis(
                        folder,
                        port=_node_port(),
                        appendonly=appendonly,
                        args=(*self._args(folder), *self.coverage),
                    )
                )
            self._cli(
                "--cluster",
                "create",
                *self.addresses,
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            )
            self.wait_settled()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _args(folder: Path) -> tuple[str, ...]:
        return (
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(folder / "nodes.conf"),
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            # A primary whose last slot moves away stays a primary that slots can move back to
            # (Redis 7 would make it a replica of the node that took that slot).
            "--cluster-allow-replica-migration",
            "no",
        )

    # --- addresses ----------------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """``CONSENT_REDIS_URL`` for this cluster."""
        return "redis+cluster://" + ",".join(self.addresses)

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, decode_responses=True)

    def node_id(self, i: int) -> str:
        with self.nodes[i].client() as node:
            return str(node.execute_command("CLUSTER", "MYID"))

    def slots_of(self, i: int) -> int:
        """How many slots node ``i`` serves."""
        with self.nodes[i].client() as node:
            return sum(
                int(end) - int(start) + 1
                for start, end, primary, *_ in node.execute_command("CLUSTER", "SLOTS")
                if int(primary[1]) == self.nodes[i].port
            )

    def owner(self, key: str) -> int:
        """The index of the node that serves ``key``'s slot."""
        with self.nodes[0].client() as node:
            slot = int(node.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in node.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    [i] = [i for i, n in enumerate(self.nodes) if n.port == int(primary[1])]
                    return i
        raise AssertionError(f"no node serves {key!r}")

    def replica_of(self, i: int) -> int:
        """The index of a replica of primary ``i`` whose link to it is up."""
        for j, server in enumerate(self.nodes):
            if j != i and server.process.poll() is None:
                with server.client() as node:
                    info = node.info("replication")
                if info["role"] == "slave" and int(info["master_port"]) == self.nodes[i].port:
                    return j
        raise AssertionError(f"node {i} has no replica")

    # --- waiting ------------------------------------------------------------------------------

    def wait_settled(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Until every node says ``cluster_state:ok``, all of them map the slots alike and
        every replica's link to its primary is up."""
        deadline = time.monotonic() + timeout
        while not self._settled():
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster did not settle (see {self.directory})")
            time.sleep(0.1)

    def _settled(self) -> bool:
        try:
            maps = []
            for server in self.nodes:
                with server.client() as node:
                    if node.cluster("INFO")["cluster_state"] != "ok":
                        return False
                    replication = node.info("replication")
                    if replication.get("master_link_status", "up") != "up":
                        return False
                    maps.append(
                        sorted(
                            (int(start), int(end), int(primary[1]))
                            for start, end, primary, *_ in node.execute_command("CLUSTER", "SLOTS")
                        )
                    )
            return all(m == maps[0] for m in maps)
        except (redis.RedisError, OSError, KeyError):
            return False

    # --- operations ---------------------------------------------------------------------------

    def reshard(self, slots: int, source: int, target: int) -> None:
        """Move ``slots`` slots, with their keys, from primary ``source`` to primary ``target``."""
        self._cli(
            "--cluster",
            "reshard",
            self.addresses[source],
            "--cluster-from",
            self.node_id(source),
            "--cluster-to",
            self.node_id(target),
            "--cluster-slots",
            str(slots),
            "--cluster-yes",
        )
        self.wait_settled()

    # A slot moved by hand, one step at a time, as redis-cli does it: a test stops between the
    # steps, where a resharding passes in milliseconds.

    def begin_move(self, slot: int, source: int, target: int) -> None:
        """``slot`` importing on ``target`` and migrating on ``source``: its keys may be on
        either node (ASK for one that has moved, TRYAGAIN for several split between them)."""
        with self.nodes[target].client() as node:
            node.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self.node_id(source))
        with self.nodes[source].client() as node:
            node.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self.node_id(target))

    def migrate(self, source: int, target: int, keys: list[str]) -> None:
        """Move ``keys`` (of a slot that is moving) from ``source`` to ``target``."""
        with self.nodes[source].client() as node:
            node.execute_command(
                "MIGRATE", "127.0.0.1", self.nodes[target].port, "", 0, 5000, "KEYS", *keys
            )

    def end_move(self, slot: int, source: int, target: int) -> None:
        """Move the slot's remaining keys, then give the slot to ``target`` (on every node)."""
        with self.nodes[source].client() as node:
            left = node.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100_000)
        if left:
            self.migrate(source, target, left)
        for i in sorted(range(len(self.nodes)), key=lambda i: i != target):
            with self.nodes[i].client() as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", self.node_id(target))
        self.wait_settled()

    def _cli(self, *args: str) -> None:
        result = subprocess.run(
            [self.cli, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
        if result.returncode != 0 or "[ERR]" in output:
            raise AssertionError(f"redis-cli {' '.join(args[:2])} failed:\n{output[-2000:]}")

    def stop_node(self, i: int) -> None:
        """Stop node ``i`` (SIGTERM); with no replica, its slots are served by no one."""
        stop_redis(self.nodes[i])

    def start_node(self, i: int) -> None:
        """Start node ``i`` again on its port and folder: its nodes.conf brings it back into
        the cluster with its slots."""
        node = self.nodes[i]
        self.nodes[i] = start_redis(
            node.directory,
            port=node.port,
            appendonly=self.appendonly,
            args=(*self._args(node.directory), *self.coverage),
        )
        self.wait_settled()

    def close(self) -> None:
        for server in self.nodes:
            if server.process.poll() is None:
                stop_redis(server)
