"""Queueing and claiming arq jobs in one round trip keeps arq's own semantics, on a real Redis.

arq's job keys are global (not per queue): each test uses job ids of its own.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from arq.connections import create_pool
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import Job, JobStatus, deserialize_job
from arq.utils import timestamp_ms

from consent_flow.queue.bus import JOB_SERIALIZERS, load_job
from consent_flow.queue.jobs import JobQueue
from consent_flow.store.clock import RedisClock
from consent_flow.store.connection import arq_redis_settings
from workers import ConsentWorker

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(redis_server):
    pool = await create_pool(arq_redis_settings(redis_server.url), **JOB_SERIALIZERS)
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.fixture
def queue_name() -> str:
    return "j" + uuid.uuid4().hex[:8] + ":queue"


async def test_a_queued_job_reads_back_as_arq_wrote_it(pool, queue_name):
    jobs = JobQueue(pool)
    job = jobs.job("refresh_tokens", ("alice", 1), job_id="refresh:alice:1", queue=queue_name)
    assert await jobs.put(job)
    raw = await pool.get(job_key_prefix + "refresh:alice:1")
    assert raw.startswith(b"{")  # the project's JSON job format, never a pickle
    job_def = deserialize_job(raw, deserializer=load_job)
    assert job_def.function == "refresh_tokens"
    assert (tuple(job_def.args), job_def.kwargs) == (("alice", 1), {})
    assert abs(job_def.enqueue_time.timestamp() * 1000 - timestamp_ms()) < 5000
    info = await Job("refresh:alice:1", pool, _queue_name=queue_name, _deserializer=load_job).info()
    assert info is not None and info.function == "refresh_tokens"
    assert (
        await Job("refresh:alice:1", pool, _queue_name=queue_name, _deserializer=load_job).status()
        is JobStatus.queued
    )


async def test_a_job_id_arq_still_holds_is_refused(pool, queue_name):
    jobs = JobQueue(pool)
    first = jobs.job("f", (1,), job_id="same", queue=queue_name)
    assert await jobs.put(first)
    assert not await jobs.put(jobs.job("f", (2,), job_id="same", queue=queue_name))
    held = deserialize_job(await pool.get(job_key_prefix + "same"), deserializer=load_job)
    assert list(held.args) == [1]
    # A finished job whose result arq keeps blocks its id too, as enqueue_job does.
    await pool.set(result_key_prefix + "done", b"x")
    assert not await jobs.put(jobs.job("f", (), job_id="done", queue=queue_name))
    assert await pool.zscore(queue_name, "done") is None


async def test_deferred_jobs_are_scored_and_expire_like_arq(pool, queue_name):
    clock = RedisClock(pool)
    await clock.sync()
    jobs = JobQueue(pool, clock=clock)
    # The expiry is counted from the queue's clock at put(): taken from the same clock just
    # before, it can only be shorter, never longer, than the hour asked for.
    later = int(clock() * 1000) + 3_600_000
    assert await jobs.put(jobs.job("f", (), job_id="later", queue=queue_name, run_at_ms=later))
    assert await pool.zscore(queue_name, "later") == later
    ttl = await pool.pttl(job_key_prefix + "later")
    assert 3_600_000 + pool.expires_extra_ms - 10_000 < ttl <= 3_600_000 + pool.expires_extra_ms
    assert await jobs.put(jobs.job("f", (), job_id="soon", queue=queue_name, expires_ms=2000))
    assert 0 < await pool.pttl(job_key_prefix + "soon") <= 2000


def _worker(redis_server, queue_name, functions, **options: Any) -> ConsentWorker:
    options = {"max_jobs": 20, **options}
    return ConsentWorker(
        functions=functions,
        queue_name=queue_name,
        redis_settings=arq_redis_settings(redis_server.url),
        poll_delay=0.005,
        keep_result=0,
        handle_signals=False,
        **options,
        **JOB_SERIALIZERS,
    )


async def _run_workers(
    redis_server, queue_name, functions, count=3, *, seconds=2.0, **options: Any
) -> None:
    """Several ConsentWorkers on one queue, for a while, then closed."""
    workers = [_worker(redis_server, queue_name, functions, **options) for _ in range(count)]
    tasks = [asyncio.create_task(w.async_run()) for w in workers]
    try:
        await asyncio.sleep(seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            await worker.close()


async def test_three_workers_run_each_due_job_exactly_once(redis_server, pool, queue_name):
    runs: list[int] = []

    async def work(ctx: dict[str, Any], n: int) -> None:
        runs.append(n)
        await asyncio.sleep(0.01)

    jobs = JobQueue(pool)
    for n in range(300):
        await jobs.put(jobs.job("work", (n,), job_id=f"{queue_name}-{n}", queue=queue_name))
    later = timestamp_ms() + 3_600_000
    await jobs.put(
        jobs.job("work", (-1,), job_id=f"{queue_name}-later", queue=queue_name, run_at_ms=later)
    )
    from arq import func

    await _run_workers(redis_server, queue_name, [func(work, name="work")])
    assert sorted(runs) == list(range(300))  # each once, none lost; the deferred one waits
    assert await pool.zrange(queue_name, 0, -1) == [f"{queue_name}-later".encode()]
    assert not await pool.keys(f"{in_progress_key_prefix}{queue_name}-*")


async def test_a_job_in_progress_elsewhere_is_not_claimed(redis_server, pool, queue_name):
    runs: list[str] = []

    async def work(ctx: dict[str, Any]) -> None:
        runs.append("ran")

    jobs = JobQueue(pool)
    await jobs.put(jobs.job("work", (None,), job_id="busy", queue=queue_name))
    # Another worker holds it (its in-progress marker is there): ours must leave it alone.
    await pool.set(in_progress_key_prefix + "busy", b"1", px=60_000)
    from arq import func

    async def no_arg(ctx: dict[str, Any], _: Any) -> None:
        await work(ctx)

    started = time.monotonic()
    await _run_workers(redis_server, queue_name, [func(no_arg, name="work")], count=1, seconds=0.5)
    assert time.monotonic() - started >= 0.5
    assert runs == []
    assert await pool.zscore(queue_name, "busy") is not None


async def test_jobs_behind_ones_running_elsewhere_are_claimed(redis_server, pool, queue_name):
    runs: list[str] = []

    async def work(ctx: dict[str, Any], name: str) -> None:
        runs.append(name)

    jobs = JobQueue(pool)
    now = timestamp_ms()
    for n in range(5):
        name = f"{queue_name}-{n}"
        await jobs.put(jobs.job("work", (name,), job_id=name, queue=queue_name, run_at_ms=now + n))
        if n < 3:  # the oldest three run elsewhere
            await pool.set(in_progress_key_prefix + name, b"1", px=60_000)
    from arq import func

    await _run_workers(redis_server, queue_name, [func(work, name="work")], count=1, seconds=0.5)
    assert sorted(runs) == [f"{queue_name}-3", f"{queue_name}-4"]
    assert len(await pool.zrange(queue_name, 0, -1)) == 3


async def test_a_worker_claims_no_more_jobs_than_it_has_free_slots(redis_server, pool, queue_name):
    running = 0
    most = 0
    runs: list[int] = []

    async def work(ctx: dict[str, Any], n: int) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        # Only the jobs this worker runs are marked in progress: none waits claimed.
        marked = await pool.keys(f"{in_progress_key_prefix}{queue_name}-*")
        assert len(marked) <= 2
        await asyncio.sleep(0.05)
        running -= 1
        runs.append(n)

    jobs = JobQueue(pool)
    for n in range(8):
        await jobs.put(jobs.job("work", (n,), job_id=f"{queue_name}-{n}", queue=queue_name))
    from arq import func

    await _run_workers(
        redis_server, queue_name, [func(work, name="work")], count=1, seconds=1.0, max_jobs=2
    )
    assert sorted(runs) == list(range(8))
    assert most == 2


async def test_burst_mode_stops_after_max_burst_jobs(redis_server, pool, queue_name):
    runs: list[int] = []

    async def work(ctx: dict[str, Any], n: int) -> None:
        runs.append(n)

    jobs = JobQueue(pool)
    now = timestamp_ms()
    for n in range(5):
        await jobs.put(
            jobs.job("work", (n,), job_id=f"{queue_name}-{n}", queue=queue_name, run_at_ms=now + n)
        )
    from arq import func

    worker = _worker(
        redis_server, queue_name, [func(work, name="work")], burst=True, max_burst_jobs=3
    )
    try:
        await asyncio.wait_for(worker.async_run(), timeout=10)
    finally:
        await worker.close()
    assert sorted(runs) == [0, 1, 2]
    assert len(await pool.zrange(queue_name, 0, -1)) == 2


async def test_a_retried_job_runs_again_when_its_delay_is_over(redis_server, pool, queue_name):
    """arq's Retry puts the job back with a later score and frees it: the poll claims it again
    only when that time comes, and ctx carries the try number."""
    from arq import Retry, func

    runs: list[tuple[int, float]] = []

    async def work(ctx: dict[str, Any]) -> None:
        runs.append((ctx["job_try"], time.monotonic()))
        if ctx["job_try"] == 1:
            raise Retry(defer=0.4)

    jobs = JobQueue(pool)
    await jobs.put(jobs.job("work", (), job_id=f"{queue_name}-retry", queue=queue_name))
    await _run_workers(
        redis_server, queue_name, [func(work, name="work", max_tries=3)], count=2, seconds=1.5
    )
    assert [t for t, _ in runs] == [1, 2]
    assert runs[1][1] - runs[0][1] >= 0.35  # not before its delay (clocks differ by a little)
    assert await pool.zscore(queue_name, f"{queue_name}-retry") is None
    assert not await pool.exists(in_progress_key_prefix + f"{queue_name}-retry")
