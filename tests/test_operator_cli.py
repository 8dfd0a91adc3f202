"""Operators' commands against a real Redis holding a few hundred users in every state."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from seed import seed

from consent_flow import State
from consent_flow.store.redis_store import RedisStore

pytestmark = pytest.mark.integration

COUNTS = {State.PROVISIONED: 150, State.PENDING: 100, State.UNPROVISIONED: 80, State.REVOKED: 70}


def run(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "consent_flow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
async def seeded(env, redis_server):
    from redis.asyncio import Redis

    client = Redis(port=redis_server.port)
    try:
        store = RedisStore(client, prefix=env["CONSENT_REDIS_PREFIX"])
        await seed(store, COUNTS)
        yield {**os.environ, **env}
    finally:
        await client.aclose()


async def test_list_by_state_in_both_formats_and_pages(seeded):
    for state, count in COUNTS.items():
        out = await asyncio.to_thread(
            run, seeded, "list", "--state", state.value, "--json", "--limit", "1000"
        )
        rows = json.loads(out.stdout)
        assert len(rows) == count
        assert all(r["state"] == state.value and r["since"].endswith("Z") for r in rows)
        assert [r["since"] for r in rows] == sorted(r["since"] for r in rows)
    page1 = json.loads(
        (
            await asyncio.to_thread(
                run, seeded, "list", "--state", "pending", "--json", "--limit", "40"
            )
        ).stdout
    )
    page2 = json.loads(
        (
            await asyncio.to_thread(
                run,
                seeded,
                "list",
                "--state",
                "pending",
                "--json",
                "--limit",
                "40",
                "--offset",
                "40",
            )
        ).stdout
    )
    assert len(page1) == len(page2) == 40
    assert not {r["user"] for r in page1} & {r["user"] for r in page2}
    table = (await asyncio.to_thread(run, seeded, "list", "--state", "revoked")).stdout
    header, *lines = table.splitlines()
    assert header.split() == ["USER", "STATE", "SINCE"]
    assert len(lines) == 70


async def test_stats_in_both_formats(seeded):
    data = json.loads((await asyncio.to_thread(run, seeded, "stats", "--json")).stdout)
    assert data["states"] == {s.value: n for s, n in COUNTS.items()}
    for key in (
        "refreshes_due_next_hour",
        "refresh_failures_24h",
        "refresh_rejections_24h",
        "queue_depth",
        "workers_alive",
    ):
        assert isinstance(data[key], int)
    text = (await asyncio.to_thread(run, seeded, "stats")).stdout
    assert ["provisioned", "150"] in [line.split() for line in text.splitlines()]
    assert "workers alive: 0" in text


async def test_history_in_both_formats(seeded):
    rows = json.loads(
        (await asyncio.to_thread(run, seeded, "history", "revoked-0003", "--json")).stdout
    )
    assert [(r["event"], r["from"], r["to"]) for r in rows] == [
        ("provision_requested", "unprovisioned", "pending"),
        ("authorization_completed", "pending", "provisioned"),
        ("revoke_requested", "provisioned", "revoked"),
    ]
    table = (await asyncio.to_thread(run, seeded, "history", "unprovisioned-0001")).stdout
    assert "access_denied" in table


async def test_tail_follows_transitions_live_as_json_lines(seeded, env, redis_server):
    from redis.asyncio import Redis

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consent_flow",
        "tail",
        "--json",
        env=seeded,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    client = Redis(port=redis_server.port)
    try:
        # tail starts at the stream's end (only new transitions): seed once it is reading, which
        # Redis shows as a client blocked in XREAD.
        for _ in range(300):
            clients = await client.client_list()
            if any(c.get("cmd") == "xread" for c in clients):
                break
            assert process.returncode is None, await process.stderr.read()
            await asyncio.sleep(0.05)
        else:
            pytest.fail("tail never started reading the stream")
        store = RedisStore(client, prefix=env["CONSENT_REDIS_PREFIX"])
        await seed(store, {State.PENDING: 2}, prefix="tail-")
        lines = []
        while len(lines) < 2:
            line = await asyncio.wait_for(process.stdout.readline(), timeout=10)
            lines.append(json.loads(line))
    finally:
        await client.aclose()
        process.terminate()
        await process.wait()
    assert {line["event"] for line in lines} == {"provision_requested"}
    assert {line["user"] for line in lines} == {"tail-pending-0000", "tail-pending-0001"}
    assert all(set(line) >= {"user", "event", "from", "to", "at", "actor"} for line in lines)
