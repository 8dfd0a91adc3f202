"""What runs across shards, on a Redis Cluster of three primaries: the worker's whole life (its
batches, the sweep, the cleanup, the limiter, a second worker's start-up, the stats snapshot) and
the operator's commands that read every shard (`list`, `stats`, `tail`, `history`), with users
whose keys live on different nodes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from conftest import provision
from structlog.testing import capture_logs

from consent_flow import State
from consent_flow.queue.scheduler import Scheduler
from consent_flow.store.metrics import read_snapshot

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "consent_flow"]
USERS = ["alice", "bob", "carol", "dave"]


async def _wait(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := await check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, [*CLI, *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
async def cluster_stack(redis_cluster: Any, make_stack: Any) -> Any:
    stack = await make_stack(redis_url=redis_cluster.url, worker_options={"cleanup_every": 1})
    nodes = {redis_cluster.owner(stack.client.store.keys.of(u).rec(u)) for u in USERS}
    assert len(nodes) > 1, "the users' keys must live on more than one node"
    return stack


async def test_the_workers_periodic_work_runs_on_a_cluster(cluster_stack: Any) -> None:
    """Provisions, an on-demand refresh, scheduled refreshes taken by the batches of each shard,
    a revocation, a lost job requeued by the sweep, the limiter, a second worker's start-up
    checks, the stats snapshot and cleanup ticks: all on the cluster, and the worker logs no
    error on the way (a script spanning slots, or a command sent to the wrong node, would)."""
    stack = cluster_stack
    client, store = stack.client, stack.client.store
    with capture_logs() as logs:
        for user in USERS:
            assert (await provision(stack, user)).status_code == 200
        await client.access_token("alice", min_ttl=3599.5)  # an on-demand refresh (a job)
        before = {u: (await store.load(u)).last_refresh_at for u in ("bob", "carol")}
        for user in before:
            await store.redis.zadd(store.keys.of(user).sched, {user: int(time.time() * 1000) - 5})

        async def refreshed() -> bool:
            recs = [await store.load(u) for u in before]
            return all((r.last_refresh_at or 0) > (before[r.user] or 0) for r in recs)

        await _wait(refreshed)
        assert (await client.revoke("dave")).state is State.REVOKED
        scheduler = Scheduler(store.redis, keys=store.keys, queue_name=stack.settings.queue_name)
        await store.redis.zadd(store.keys.of("erin").sched, {"erin": int(time.time() * 1000) - 5})
        assert (await scheduler.sweep())["requeued"] == 1
        await stack.start_worker()
        services = stack._workers[0].ctx["services"]
        await services.stacks["default"].batches.limiter.pause(0.01, time.time())
        await asyncio.sleep(2.5)  # cleanup ticks and heartbeats on both workers
        snapshot = await read_snapshot(store.redis, store.keys, stack.settings.queue_name)
    errors = [e for e in logs if e.get("log_level") in {"error", "critical", "exception"}]
    assert errors == []
    assert snapshot.states == {"unprovisioned": 0, "pending": 0, "provisioned": 3, "revoked": 1}
    assert snapshot.workers_alive == 2


async def test_the_operators_commands_read_every_shard_on_a_cluster(
    cluster_stack: Any, env: dict[str, str], settings: Any, redis_cluster: Any
) -> None:
    """`list`, `stats --json`, `keys rotate`, `history` and `tail --json` on a
    `redis+cluster://` URL reach the users of every node, and `tail` follows transitions on
    whichever node they happen."""
    stack = cluster_stack
    cli_env = {
        **os.environ,
        **env,
        "CONSENT_QUEUE_NAME": settings.queue_name,
        "CONSENT_REDIS_URL": redis_cluster.url,
    }
    for user in USERS:
        assert (await provision(stack, user)).status_code == 200
    listed = json.loads((await _cli(cli_env, "list", "--json")).stdout)
    assert sorted((row["user"], row["state"]) for row in listed) == [
        (user, "provisioned") for user in sorted(USERS)
    ]
    stats = json.loads((await _cli(cli_env, "stats", "--json")).stdout)
    assert stats["states"] == {"unprovisioned": 0, "pending": 0, "provisioned": 4, "revoked": 0}

    new_key = (await _cli(cli_env, "keys", "generate")).stdout.strip()
    rotating = {**cli_env, "CONSENT_ENCRYPTION_KEYS": f"{new_key},{env['CONSENT_ENCRYPTION_KEYS']}"}
    rotated = await _cli(rotating, "keys", "rotate", "--json")
    assert json.loads(rotated.stdout)["rewritten"] == len(USERS), rotated.stderr
    for user in USERS:
        token = await _cli({**cli_env, "CONSENT_ENCRYPTION_KEYS": new_key}, "token", user)
        assert token.returncode == 0, token.stderr

    tail = await asyncio.create_subprocess_exec(
        *CLI, "tail", "--json", env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert tail.stdout is not None and tail.stderr is not None
    followed: list[dict[str, Any]] = []

    async def follow_until(users: set[str]) -> None:
        assert tail.stdout is not None
        while not users <= {e["user"] for e in followed}:
            followed.append(json.loads(await tail.stdout.readline()))

    try:
        # Once it follows (its start-up takes a while on a loaded machine), a probe shows.
        for n in range(60):
            await stack.client.request_provisioning(f"probe{n}")
            try:
                await asyncio.wait_for(follow_until({f"probe{n}"}), 1.0)
                break
            except TimeoutError:
                continue
        for user in USERS:
            assert (await stack.client.revoke(user)).state is State.REVOKED
        await asyncio.wait_for(follow_until(set(USERS)), 20)
    finally:
        tail.terminate()
        await asyncio.wait_for(tail.wait(), 20)
    revoked = sorted(e["user"] for e in followed if e["event"] == "revoke_requested")
    assert revoked == sorted(USERS)

    history = json.loads((await _cli(cli_env, "history", "carol", "--json")).stdout)
    assert [h["event"] for h in history] == [
        "provision_requested",
        "authorization_completed",
        "revoke_requested",
    ]
    stats = json.loads((await _cli(cli_env, "stats", "--json")).stdout)
    assert stats["states"]["revoked"] == 4
