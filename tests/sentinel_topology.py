"""A Redis Sentinel topology on loopback: one primary, one replica, three sentinels.

Every process is a ``redis-server`` started by conftest's ``start_redis`` (free ports, a
temporary folder each); the sentinels run it with ``--sentinel`` and a configuration file of
their own, which Sentinel rewrites as it learns the topology. The timings are the smallest that
stay stable on a loaded two-core machine: a primary that does not answer for ``DOWN_AFTER_MS`` is
down, and a failover that has not finished in ``FAILOVER_TIMEOUT_MS`` is tried again.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import redis
from conftest import RedisServer, start_redis, stop_redis

__all__ = ["MASTER_NAME", "SentinelTopology"]

MASTER_NAME = "consentflow"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
QUORUM = 2
SETTLE_TIMEOUT = 30.0  # seconds for the sentinels to find each other and the replica


class SentinelTopology:
    """The five processes, and the operations a failover test needs."""

    def __init__(self, directory: Path, *, down_after_ms: int = DOWN_AFTER_MS) -> None:
        self.directory = directory
        self.data: list[RedisServer] = []
        self.sentinels: list[RedisServer] = []
        try:
            primary = start_redis(directory / "primary")
            self.data.append(primary)
            self.data.append(
                start_redis(
                    directory / "replica",
                    args=("--replicaof", "127.0.0.1", str(primary.port)),
                )
            )
            for i in range(3):
                folder = directory / f"sentinel-{i}"
                folder.mkdir(parents=True)
                config = folder / "sentinel.conf"
                config.write_text(
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {primary.port} {QUORUM}\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
                    f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
                    f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                )
                self.sentinels.append(start_redis(folder, config=config, args=("--sentinel",)))
            self.wait_settled()
        except BaseException:
            self.close()
            raise

    # --- addresses ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``CONSENT_REDIS_URL`` for this topology."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}"

    def sentinel(self, i: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinels[i].port, decode_responses=True, socket_timeout=2)

    def primary_port(self, i: int = 0) -> int:
        """The primary as sentinel ``i`` sees it."""
        with self.sentinel(i) as s:
            _, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        return int(port)

    def server(self, port: int) -> RedisServer:
        [found] = [s for s in self.data if s.port == port]
        return found

    def primary(self) -> redis.Redis:
        return self.server(self.primary_port()).client()

    # --- waiting ------------------------------------------------------------------------------

    def wait_settled(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Until every sentinel agrees on the primary, knows a replica with its link up and the
        two other sentinels: only then can a failover be authorized and find a replica."""
        deadline = time.monotonic() + timeout
        while True:
            if self._settled():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the Sentinel topology did not settle (see {self.directory})")
            time.sleep(0.1)

    def _settled(self) -> bool:
        try:
            primaries = {self.primary_port(i) for i in range(len(self.sentinels))}
            if len(primaries) != 1:
                return False
            [port] = primaries
            with self.server(port).client() as p:
                info = p.info("replication")
                if info["role"] != "master" or info.get("connected_slaves", 0) < 1:
                    return False
            for i in range(len(self.sentinels)):
                with self.sentinel(i) as s:
                    replicas = s.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
                    others = s.execute_command("SENTINEL", "SENTINELS", MASTER_NAME)
                    live = [
                        r
                        for r in map(_pairs, replicas)
                        if "s_down" not in r["flags"] and r.get("master-link-status") == "ok"
                    ]
                    if not live or len(others) < len(self.sentinels) - 1:
                        return False
            return True
        except (redis.RedisError, OSError, ValueError):
            return False

    def wait_new_primary(self, old: int, timeout: float = 30.0) -> int:
        """Until every sentinel names a primary other than ``old`` that says it is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, OSError, ValueError):
                ports = {self.primary_port(i) for i in range(len(self.sentinels))}
                if len(ports) == 1 and old not in ports:
                    [port] = ports
                    with self.server(port).client() as p:
                        if p.info("replication")["role"] == "master":
                            return port
            time.sleep(0.05)
        raise AssertionError(f"no new primary within {timeout} s (see {self.directory})")

    # --- faults -------------------------------------------------------------------------------

    def failover(self) -> int:
        """``SENTINEL FAILOVER``: the orderly switch (the replica catches up first). Returns the
        old primary's port."""
        old = self.primary_port()
        with self.sentinel() as s:
            s.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        return old

    def kill_primary(self) -> int:
        """SIGKILL the primary: what a crashed machine looks like. Returns its port."""
        old = self.primary_port()
        server = self.server(old)
        server.process.kill()
        server.process.wait()
        return old

    def close(self) -> None:
        for server in [*self.sentinels, *self.data]:
            if server.process.poll() is None:
                stop_redis(server)


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
