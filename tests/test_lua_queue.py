"""The queue's scripts on their own, against a real Redis, by their headers' contracts."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from consent_flow.store.clock import redis_time
from consent_flow.store.scripts import lua


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[Redis]:
    client = Redis(port=redis_server.port)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def p() -> str:
    return "lq" + uuid.uuid4().hex[:8]


async def run(redis: Redis, text: str, keys: list[str], args: list[Any]) -> Any:
    return await redis.register_script(text)(keys=keys, args=args)


async def test_enqueue_writes_a_job_once_and_scores_now_by_redis_time(redis, p):
    script = lua("enqueue_function") + lua("enqueue")
    keys = [f"{p}:job:j1", f"{p}:result:j1", f"{p}:queue"]
    now = await redis_time(redis)
    assert await run(redis, script, keys, [b"payload", 60000, "", "j1"]) == 1
    assert await redis.get(f"{p}:job:j1") == b"payload"
    assert 0 < await redis.pttl(f"{p}:job:j1") <= 60000
    assert abs(await redis.zscore(f"{p}:queue", "j1") / 1000 - now) < 2
    assert await run(redis, script, keys, [b"second", 60000, "5", "j1"]) == 0
    assert await redis.get(f"{p}:job:j1") == b"payload"
    # A job that finished keeps its result for a while: its id is still taken.
    await redis.delete(f"{p}:job:j1")
    await redis.set(f"{p}:result:j1", "done")
    assert await run(redis, script, keys, [b"third", 60000, "5", "j1"]) == 0
    assert await redis.exists(f"{p}:job:j1") == 0


async def test_due_without_job_finds_lost_jobs_behind_a_backlog(redis, p):
    sched, prefix = f"{p}:sched", f"{p}:job:"
    await redis.zadd(sched, {f"u{i}": 1000 + i for i in range(6)} | {"later": 9000})
    for i in (0, 1, 2, 4):  # still queued
        await redis.set(f"{prefix}refresh:u{i}:{1000 + i}", "x")
    head = prefix + "refresh:"
    looked, missing, more, now = await run(
        redis, lua("due_without_job"), [sched], ["5000", 1, head, 100]
    )
    assert (looked, missing, more, now) == (4, [b"u3", b"1003"], 1, b"5000")
    looked, missing, more, _ = await run(
        redis, lua("due_without_job"), [sched], ["5000", 10, head, 100]
    )
    assert (looked, missing, more) == (6, [b"u3", b"1003", b"u5", b"1005"], 0)


async def test_enqueue_missing_queues_only_jobs_not_there(redis, p):
    queue = f"{p}:queue"
    await redis.set(f"{p}:job:a", "queued already")
    args = [60000, f"{p}:job:a", b"A", 10, "a", f"{p}:job:b", b"B", 20, "b"]
    assert await run(redis, lua("enqueue_missing"), [queue], args) == 1
    assert await redis.get(f"{p}:job:a") == b"queued already"
    assert await redis.get(f"{p}:job:b") == b"B"
    assert await redis.zrange(queue, 0, -1, withscores=True) == [(b"b", 20.0)]


async def test_claim_due_claims_each_due_job_once(redis, p):
    queue, prefix = f"{p}:queue", f"{p}:in-progress:"
    now_ms = int(await redis_time(redis) * 1000)
    await redis.zadd(queue, {"a": now_ms - 10, "b": now_ms - 5, "future": now_ms + 60_000})
    await redis.set(prefix + "a", "another worker")
    claimed = await run(redis, lua("claim_due"), [queue], [prefix, 5000, 10, 100])
    assert claimed == [b"b", str(now_ms - 5).encode()]
    assert 0 < await redis.pttl(prefix + "b") <= 5000
    assert await run(redis, lua("claim_due"), [queue], [prefix, 5000, 10, 100]) == []
