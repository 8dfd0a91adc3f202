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
from typing import Any

import pytest
from conftest import provision
from structlog.testing import capture_logs
from test_shards import run_the_worker_through_its_work

from consent_flow import State

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "consent_flow"]
USERS = ["alice", "bob", "carol", "dave"]


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
    """The worker through its work as tests/test_shards.py drives it (provisions, on-demand and
    batched refreshes, a revocation, the sweep, the limiter, a second worker's start-up, cleanup
    ticks, the stats snapshot), on the cluster: the worker logs no error on the way (a script
    spanning slots, or a command sent to the wrong node, would)."""
    with capture_logs() as logs:
        snapshot = await run_the_worker_through_its_work(cluster_stack)
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
