"""The worker's job bookkeeping (consent_flow/queue/jobstore.py), on one Redis and on a cluster.

The same worker, the same scripts: on the private Redis with today's job ids, and on a cluster
of three primaries with shard-tagged ones (``{s3}:...`` on the queue ``...:{s3}``), where arq's
own MULTI/EXEC bookkeeping cannot run. What arq writes is what is written here: arq's ``Job``
reads it back. Neither topology sees a MULTI.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from arq import Retry, func
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import Job
from arq.utils import timestamp_ms
from test_faults import wait_for

from consent_flow.queue.bus import JOB_SERIALIZERS, load_job
from consent_flow.queue.jobs import JobQueue
from consent_flow.queue.jobstore import JobStore
from consent_flow.store.connection import arq_redis_settings, connect
from workers import ConsentWorker

pytestmark = pytest.mark.integration

RUN_TIMEOUT = 20.0  # seconds a burst worker may take for a test's few jobs
FILLER_KEYS = 20_000  # in the slot a resharding test moves


@dataclass
class Backend:
    """Where the jobs are: the URL, the shard tag of ids and queue, and the data nodes."""

    name: str
    url: str
    tag: str
    nodes: list[Callable[[], redis.Redis]]

    def job_id(self, name: str) -> str:
        return f"{self.tag}:{name}-{uuid.uuid4().hex[:8]}" if self.tag else uuid.uuid4().hex

    def queue(self) -> str:
        name = "j" + uuid.uuid4().hex[:8] + ":queue"
        return f"{name}:{self.tag}" if self.tag else name

    def transactions(self) -> int:
        """MULTIs run so far, on every node."""
        total = 0
        for node in self.nodes:
            with node() as client:
                total += client.info("commandstats").get("cmdstat_multi", {}).get("calls", 0)
        return total


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from cluster_topology import ClusterTopology

    topology = ClusterTopology(Path(tmp_path_factory.mktemp("jobstore-cluster")))
    yield topology
    topology.close()


@pytest.fixture(params=["redis", "cluster"])
def backend(request: pytest.FixtureRequest, redis_server: Any) -> Backend:
    if request.param == "redis":
        return Backend("redis", redis_server.url, "", [redis_server.client])
    topology = request.getfixturevalue("cluster")
    return Backend("cluster", topology.url, "{s3}", [n.client for n in topology.nodes])


@pytest.fixture
async def pool(backend: Backend) -> AsyncIterator[Any]:
    pool = await connect(backend.url, startup_retries=0, **JOB_SERIALIZERS)
    try:
        yield pool
    finally:
        await pool.aclose()


def _worker(backend: Backend, queue: str, functions: list[Any], **options: Any) -> ConsentWorker:
    return ConsentWorker(
        functions=functions,
        queue_name=queue,
        redis_settings=arq_redis_settings(backend.url),
        poll_delay=0.01,
        handle_signals=False,
        **{"keep_result": 60, "burst": True, **options},
        **JOB_SERIALIZERS,
    )


async def _run(backend: Backend, worker: ConsentWorker) -> None:
    """Until the queue is empty (burst mode), then closed; it ran no MULTI."""
    transactions = backend.transactions()
    try:
        await asyncio.wait_for(worker.async_run(), RUN_TIMEOUT)
    finally:
        await worker.close()
    assert backend.transactions() == transactions


async def _put(pool: Any, queue: str, function: str, job_id: str, *args: Any, **at: Any) -> None:
    jobs = JobQueue(pool)
    assert await jobs.put(jobs.job(function, args, job_id=job_id, queue=queue, **at))


async def _leftovers(pool: Any, queue: str, job_id: str) -> list[str]:
    """arq's keys of a finished job that should be gone."""
    keys = [in_progress_key_prefix, job_key_prefix, retry_key_prefix]
    left = [prefix for prefix in keys if await pool.exists(prefix + job_id)]
    if await pool.zscore(queue, job_id) is not None:
        left.append("queue")
    return left


async def test_a_job_runs_and_arq_reads_its_result(backend: Backend, pool: Any) -> None:
    queue, job_id = backend.queue(), backend.job_id("add")

    async def add(ctx: dict[str, Any], a: int, b: int) -> int:
        assert ctx["job_try"] == 1
        return a + b

    await _put(pool, queue, "add", job_id, 2, 3)
    await _run(backend, _worker(backend, queue, [func(add, name="add")]))
    job = Job(job_id, pool, _queue_name=queue, _deserializer=load_job)
    info = await job.result_info()
    assert info is not None and (info.success, info.result, info.job_try) == (True, 5, 1)
    assert (await job.info()).function == "add"  # type: ignore[union-attr]
    if backend.name == "redis":  # arq's result() waits in a MULTI/EXEC: not on a cluster
        assert await job.result(timeout=1) == 5
    assert 55_000 < await pool.pttl(result_key_prefix + job_id) <= 60_000
    assert await _leftovers(pool, queue, job_id) == []


async def test_a_retry_runs_the_job_again_after_its_delay(backend: Backend, pool: Any) -> None:
    queue, job_id = backend.queue(), backend.job_id("flaky")
    runs: list[tuple[int, float]] = []

    async def flaky(ctx: dict[str, Any]) -> str:
        runs.append((ctx["job_try"], time.monotonic()))
        if ctx["job_try"] == 1:
            raise Retry(defer=0.3)
        return "second time"

    await _put(pool, queue, "flaky", job_id)
    await _run(backend, _worker(backend, queue, [func(flaky, name="flaky", max_tries=3)]))
    assert [t for t, _ in runs] == [1, 2]
    assert runs[1][1] - runs[0][1] >= 0.25
    info = await Job(job_id, pool, _queue_name=queue, _deserializer=load_job).result_info()
    assert info is not None and info.success and (info.result, info.job_try) == ("second time", 2)
    assert await _leftovers(pool, queue, job_id) == []


async def test_a_failure_and_too_many_tries_end_with_a_failed_result(
    backend: Backend, pool: Any
) -> None:
    queue, failing, spent = backend.queue(), backend.job_id("fail"), backend.job_id("spent")
    runs: list[str] = []

    async def fail(ctx: dict[str, Any], name: str) -> None:
        runs.append(name)
        raise ValueError("no")

    await _put(pool, queue, "fail", failing, "failing")
    await _put(pool, queue, "fail", spent, "spent")
    await pool.set(retry_key_prefix + spent, 2)  # two tries spent: a third is one too many
    await _run(backend, _worker(backend, queue, [func(fail, name="fail", max_tries=2)]))
    assert runs == ["failing"]
    for job_id, why in ((failing, "no"), (spent, "max 2 retries exceeded")):
        info = await Job(job_id, pool, _queue_name=queue, _deserializer=load_job).result_info()
        assert info is not None and info.success is False
        assert why in str(info.result)
        assert await _leftovers(pool, queue, job_id) == []


async def test_an_expired_job_ends_with_a_failed_result(backend: Backend, pool: Any) -> None:
    queue, job_id = backend.queue(), backend.job_id("gone")

    async def never(ctx: dict[str, Any]) -> None:
        raise AssertionError("an expired job must not run")

    await _put(pool, queue, "never", job_id, expires_ms=1)
    await asyncio.sleep(0.05)
    assert not await pool.exists(job_key_prefix + job_id)
    await _run(backend, _worker(backend, queue, [func(never, name="never")]))
    info = await Job(job_id, pool, _queue_name=queue, _deserializer=load_job).result_info()
    assert info is not None and info.success is False and "job expired" in str(info.result)
    assert await _leftovers(pool, queue, job_id) == []


async def test_a_job_whose_worker_died_runs_again_once_its_mark_lapses(
    backend: Backend, pool: Any
) -> None:
    """A worker that died mid-job leaves its in-progress mark and its try counted: no worker
    takes the job until the mark lapses, then one runs it as its second try."""
    queue, job_id = backend.queue(), backend.job_id("orphan")
    runs: list[tuple[int, float]] = []

    async def orphan(ctx: dict[str, Any]) -> None:
        runs.append((ctx["job_try"], time.monotonic()))

    await _put(pool, queue, "orphan", job_id)
    started = time.monotonic()
    await pool.set(in_progress_key_prefix + job_id, b"1", px=700)
    await pool.set(retry_key_prefix + job_id, 1)
    await _run(backend, _worker(backend, queue, [func(orphan, name="orphan")]))
    [(job_try, ran)] = runs
    assert job_try == 2
    assert ran - started >= 0.6
    assert await _leftovers(pool, queue, job_id) == []


async def test_a_cron_job_keeps_its_mark_for_a_while_after_it_ends(
    backend: Backend, pool: Any
) -> None:
    """arq keeps a cron job's in-progress mark a minute after it ends, so a worker whose clock
    lags does not run the same instant twice."""
    from arq.cron import cron

    queue, job_id = backend.queue(), backend.job_id("tick")
    ticks: list[int] = []

    async def tick(ctx: dict[str, Any]) -> None:
        ticks.append(ctx["job_try"])

    # Queued by the worker's own cron under an id with the queue's tag.
    ticking = cron(tick, name="tick", job_id=job_id, run_at_startup=True)
    await _run(backend, _worker(backend, queue, [], cron_jobs=[ticking]))
    assert ticks == [1]
    assert 55_000 < await pool.pttl(in_progress_key_prefix + job_id) <= 60_000
    assert not await pool.exists(job_key_prefix + job_id)


async def test_an_aborted_job_stops_and_a_deferred_one_never_starts(
    backend: Backend, pool: Any
) -> None:
    queue = backend.queue()
    running, deferred = backend.job_id("long"), backend.job_id("later")
    started = asyncio.Event()
    finished: list[str] = []

    async def long(ctx: dict[str, Any], name: str) -> None:
        started.set()
        await asyncio.sleep(5)
        finished.append(name)

    await _put(pool, queue, "long", running, "running")
    await _put(pool, queue, "long", deferred, "deferred", run_at_ms=timestamp_ms() + 3_600_000)
    store = JobStore(pool)
    worker = _worker(backend, queue, [func(long, name="long")], allow_abort_jobs=True)
    task = asyncio.create_task(_run(backend, worker))
    await asyncio.wait_for(started.wait(), RUN_TIMEOUT)
    await store.abort(running, queue, timestamp_ms())
    await store.abort(deferred, queue, timestamp_ms())
    await asyncio.wait_for(task, RUN_TIMEOUT)
    assert finished == []
    for job_id in (running, deferred):
        info = await Job(job_id, pool, _queue_name=queue, _deserializer=load_job).result_info()
        assert info is not None and info.success is False
        assert await _leftovers(pool, queue, job_id) == []
        assert await pool.zscore(abort_jobs_ss, job_id) is None


async def test_jobs_run_once_each_while_their_slot_moves_to_another_node(
    redis_cluster: Any,
) -> None:
    """Jobs are queued and run on one shard's queue while ``redis-cli --cluster reshard`` moves
    every slot of its node (the shard's among them) to another: each runs once, none is lost."""
    backend = Backend("cluster", redis_cluster.url, "{s3}", [n.client for n in redis_cluster.nodes])
    queue = backend.queue()
    runs: list[str] = []

    async def work(ctx: dict[str, Any], name: str) -> None:
        await asyncio.sleep(0.01)
        runs.append(name)

    workers = [
        _worker(backend, queue, [func(work, name="work")], burst=False, max_jobs=5)
        for _ in range(2)
    ]
    tasks = [asyncio.create_task(w.async_run()) for w in workers]
    queued: list[str] = []
    pool = await connect(backend.url, startup_retries=0, **JOB_SERIALIZERS)
    try:
        # Keys enough in the shard's slot that it takes a while to move (redis-cli moves ten
        # keys per MIGRATE): polls fall in the middle of it.
        async with pool.pipeline(transaction=False) as pipe:
            for n in range(FILLER_KEYS):
                pipe.set(f"{backend.tag}:filler:{n}", b"x")
            await pipe.execute()
        source = redis_cluster.owner(queue)
        moving = asyncio.create_task(
            asyncio.to_thread(
                redis_cluster.reshard, redis_cluster.slots_of(source), source, (source + 1) % 3
            )
        )
        while not moving.done():
            job_id = backend.job_id(str(len(queued)))
            await _put(pool, queue, "work", job_id, job_id)
            queued.append(job_id)
            await asyncio.sleep(0.005)
        await moving
        assert redis_cluster.owner(queue) != source
        assert len(queued) > 100

        async def drained() -> bool:
            return len(runs) >= len(queued) and not await pool.zcard(queue)

        await wait_for(drained, RUN_TIMEOUT)
        assert sorted(runs) == sorted(queued)
    finally:
        for worker in workers:
            worker.burst, worker.max_burst_jobs = True, 0
        await asyncio.wait(tasks, timeout=10)
        for worker in workers:
            await worker.close()
        await pool.aclose()


async def test_a_worker_rides_out_a_cluster_that_is_down_a_while(redis_cluster: Any) -> None:
    """A primary of another shard stops: the cluster is down (no replica takes its slots), and
    every node answers CLUSTERDOWN. The worker waits, as it does when Redis is away, and runs
    jobs again once the node is back."""
    backend = Backend("cluster", redis_cluster.url, "{s3}", [n.client for n in redis_cluster.nodes])
    queue = backend.queue()
    runs: list[str] = []

    async def work(ctx: dict[str, Any], name: str) -> None:
        runs.append(name)

    worker = _worker(backend, queue, [func(work, name="work")], burst=False)
    task = asyncio.create_task(worker.async_run())
    pool = await connect(backend.url, startup_retries=0, **JOB_SERIALIZERS)
    try:
        await _put(pool, queue, "work", backend.job_id("before"), "before")
        await wait_for(lambda: _ran(runs, "before"), RUN_TIMEOUT)
        serving = redis_cluster.owner(queue)
        other = next(i for i in range(3) if i != serving)
        redis_cluster.stop_node(other)
        down = redis_cluster.nodes[serving]

        async def cluster_down() -> bool:
            with down.client() as node:
                return node.cluster("INFO")["cluster_state"] == "fail"

        await wait_for(cluster_down, RUN_TIMEOUT)
        await asyncio.sleep(2)  # polls, heartbeats and claims meet CLUSTERDOWN
        assert not task.done()
        await asyncio.to_thread(redis_cluster.start_node, other)
        await _put(pool, queue, "work", backend.job_id("after"), "after")
        await wait_for(lambda: _ran(runs, "after"), RUN_TIMEOUT)
        assert worker.redis_outages == 1
    finally:
        worker.burst, worker.max_burst_jobs = True, 0
        await asyncio.wait([task], timeout=10)
        await worker.close()
        await pool.aclose()


async def _ran(runs: list[str], name: str) -> bool:
    return name in runs
