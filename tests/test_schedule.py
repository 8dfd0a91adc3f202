"""The schedule sweep finds every due refresh whose job went missing, even behind a backlog."""

from __future__ import annotations

import time
import uuid

import pytest
from arq.connections import create_pool
from arq.constants import job_key_prefix

from consent_flow.queue.bus import JOB_SERIALIZERS
from consent_flow.queue.scheduler import Scheduler, refresh_job_id
from consent_flow.store.connection import arq_redis_settings
from consent_flow.store.redis_store import Keys, due_ms

pytestmark = pytest.mark.integration


@pytest.fixture
async def scheduler(redis_server):
    pool = await create_pool(arq_redis_settings(redis_server.url), **JOB_SERIALIZERS)
    # One shard: the sweep's paging through one schedule is what these tests are about.
    keys = Keys("s" + uuid.uuid4().hex[:8], shards=1)
    try:
        yield Scheduler(pool, keys=keys, queue_name=f"{keys.prefix}:queue")
    finally:
        await pool.aclose()


async def test_lost_jobs_behind_queued_ones_are_requeued(scheduler):
    pool, keys = scheduler.pool, scheduler.keys
    past = time.time() - 60
    users = {f"u{i:04d}": due_ms(past + i / 1000) for i in range(2500)}
    await pool.zadd(keys.shard(0).sched, users)
    # The first 1,500 have their jobs queued (workers are behind); the last 1,000 lost theirs.
    for user, score in list(users.items())[:1500]:
        await scheduler.schedule(user, score / 1000)
    counts = await scheduler.sweep(limit=400)
    assert counts["requeued"] == 1000
    for user, score in users.items():
        assert await pool.exists(job_key_prefix + refresh_job_id(keys, user, score))
    assert await pool.zcard(keys.shard(0).queue(scheduler.queue_name)) == 2500
    again = await scheduler.sweep(limit=400)
    assert again["requeued"] == 0


async def test_entries_not_yet_due_are_left_alone(scheduler):
    pool, keys = scheduler.pool, scheduler.keys
    await pool.zadd(keys.shard(0).sched, {"later": due_ms(time.time() + 3600)})
    assert await scheduler.sweep() == {"due": 0, "requeued": 0}
    assert await pool.zcard(keys.shard(0).queue(scheduler.queue_name)) == 0
