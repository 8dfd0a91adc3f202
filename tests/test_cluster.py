"""The Redis Cluster the cluster tests run on (tests/cluster_topology.py), and a resharding."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.integration


def test_cluster_serves_every_slot_and_reshards(redis_cluster: Any) -> None:
    assert [redis_cluster.slots_of(i) for i in range(3)] == [5461, 5462, 5461]
    with redis_cluster.client() as cluster:
        cluster.set("{s0}:moved", "kept")
        source = redis_cluster.owner("{s0}:moved")
        target = (source + 1) % 3
        before = redis_cluster.slots_of(source)
        # Every slot of the source: the key's slot moves too, whichever it is.
        redis_cluster.reshard(before, source, target)
        assert redis_cluster.slots_of(source) == 0
        assert redis_cluster.owner("{s0}:moved") == target
        assert cluster.get("{s0}:moved") == "kept"


async def test_a_cluster_url_runs_scripts_on_the_node_of_their_keys(redis_cluster: Any) -> None:
    """Scripts go where their keys are, also to a node that has not seen them (a resharding
    moved the slot there), alone or in a pipeline; keys of two slots are refused."""
    from redis.exceptions import NoScriptError, RedisClusterException

    from consent_flow.store.connection import ClusterArqRedis, connect

    pool = await connect(redis_cluster.url, startup_retries=0)
    try:
        assert isinstance(pool, ClusterArqRedis)
        swap = pool.register_script(
            "local old = redis.call('GET', KEYS[2]) redis.call('SET', KEYS[1], ARGV[1]) return old"
        )
        await pool.set("{s1}:b", "before")
        assert await swap(keys=["{s1}:a", "{s1}:b"], args=["one"]) == b"before"
        with pytest.raises(RedisClusterException, match="same key slot"):
            await swap(keys=["{s1}:a", "{s2}:b"], args=["two"])

        # Only the node of {s1} has seen the script; its slots move to a node that has not.
        source = redis_cluster.owner("{s1}:a")
        target = (source + 1) % 3
        redis_cluster.reshard(redis_cluster.slots_of(source), source, target)
        assert await swap(keys=["{s1}:b", "{s1}:a"], args=["two"]) == b"one"
        assert await pool.get("{s1}:b") == b"two"

        for node in redis_cluster.nodes:
            with node.client() as direct:
                direct.script_flush()
        async with pool.pipeline(transaction=False) as pipe:
            for shard in range(8):
                await swap(
                    keys=[f"{{s{shard}}}:c", f"{{s{shard}}}:a"], args=[str(shard)], client=pipe
                )
            answers = await pipe.execute()
        assert answers == [b"one" if shard == 1 else None for shard in range(8)]
        assert [await pool.get(f"{{s{shard}}}:c") for shard in range(8)] == [
            str(shard).encode() for shard in range(8)
        ]

        # Queued by its SHA alone, a script the node lacks is the caller's to load.
        for node in redis_cluster.nodes:
            with node.client() as direct:
                direct.script_flush()
        async with pool.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVALSHA", swap.sha, 2, "{s1}:c", "{s1}:a", "x")
            [answer] = await pipe.execute(raise_on_error=False)
        assert isinstance(answer, NoScriptError)
    finally:
        await pool.aclose()


async def test_the_store_takes_a_cluster_client(redis_cluster: Any) -> None:
    from consent_flow.store.connection import connect
    from consent_flow.store.redis_store import RedisStore

    pool = await connect(redis_cluster.url, startup_retries=0)
    try:
        assert RedisStore(pool, prefix="c").redis is pool
    finally:
        await pool.aclose()


async def test_a_job_rings_the_bell_of_a_worker_on_a_cluster(
    redis_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue's bell on a cluster: a worker serving shard queues, blocked on the bell far
    longer than the test, takes each job at once, also from nodes that have not seen the
    scripts, and when the job's node is slow to write it: the bell (a slot of its own, another
    node) rings only once the job is there."""
    import asyncio
    import time
    import uuid

    from arq import func

    import workers._worker
    from consent_flow.queue.bus import JOB_SERIALIZERS
    from consent_flow.queue.jobs import JobQueue, bell_key
    from consent_flow.store.connection import arq_redis_settings, connect
    from consent_flow.store.redis_store import Keys, shard_job_id
    from workers import ConsentWorker

    monkeypatch.setattr(workers._worker, "BELL_WAIT", 30.0)
    queue = "b" + uuid.uuid4().hex[:8]
    ran: list[int] = []

    async def job(ctx: dict[str, Any], n: int) -> None:
        ran.append(n)

    worker = ConsentWorker(
        functions=[func(job, name="job")],
        queue_name=queue,
        queue_shards=range(4),
        redis_settings=arq_redis_settings(redis_cluster.url),
        keep_result=0,
        handle_signals=False,
        **JOB_SERIALIZERS,
    )
    task = asyncio.create_task(worker.async_run())
    pool = await connect(redis_cluster.url, startup_retries=0, **JOB_SERIALIZERS)
    try:
        jobs = JobQueue(pool)
        await asyncio.sleep(1.0)  # the worker is blocked on the bell now
        bell_node = redis_cluster.owner(bell_key(queue))
        slow = next(n for n in range(4) if redis_cluster.owner(Keys.queue(queue, n)) != bell_node)
        for n in [*range(4), slow + 4]:
            if n == 2:
                for node in redis_cluster.nodes:
                    with node.client() as direct:
                        direct.script_flush()
            job_id, shard_queue = shard_job_id(n % 4, f"j{n}"), Keys.queue(queue, n % 4)
            if n >= 4:
                # No rings left over from the jobs before: the worker is blocked on the bell.
                await pool.delete(bell_key(queue))
                await asyncio.sleep(0.5)
                # Writes wait a second on the job's node; the bell's node answers at once.
                with redis_cluster.nodes[redis_cluster.owner(shard_queue)].client() as direct:
                    direct.execute_command("CLIENT", "PAUSE", 1000, "WRITE")
            started = time.monotonic()
            put = jobs.job("job", (n,), job_id=job_id, queue=shard_queue)
            assert await jobs.put(put, ring=bell_key(queue))
            while n not in ran:
                assert time.monotonic() - started < 5.0, f"job {n} waited for a poll"
                await asyncio.sleep(0.01)
        assert not task.done()
    finally:
        worker.burst, worker.max_burst_jobs = True, 0
        await pool.execute_command("LPUSH", bell_key(queue), b"1")  # wake it to stop
        await asyncio.wait([task], timeout=10)
        await worker.close()
        await pool.aclose()


async def test_an_events_outcome_reaches_its_caller_on_a_cluster(redis_cluster: Any) -> None:
    """A worker's reply to a waiting caller (an outcome no commit pushed: a rejected or
    unchanged event) is one script on the reply's key, not a MULTI a cluster refuses; it
    expires like the commit's."""
    from consent_flow.core.table import Event
    from consent_flow.queue.bus import JOB_SERIALIZERS, Envelope, EventBus, Outcome
    from consent_flow.store.connection import connect
    from consent_flow.store.redis_store import REPLY_TTL, Keys

    pool = await connect(redis_cluster.url, startup_retries=0, **JOB_SERIALIZERS)
    try:
        keys = Keys("c")
        bus = EventBus(pool, keys=keys, queue_name="q", timeout=5)
        envelope = Envelope(Event.PROVISION_REQUESTED, "alice", "test").with_reply_key()
        outcome = Outcome("alice", "provisioned", None, None, envelope.event.value, "unchanged")
        await bus.reply(envelope, outcome)
        assert await bus.wait(envelope, timeout=1) == outcome.sent()
        ttl = await pool.ttl(keys.reply("alice", envelope.event_id))
        assert 0 < ttl <= REPLY_TTL
    finally:
        await pool.aclose()


async def test_the_provider_watch_keeps_its_reason_on_a_cluster(
    redis_cluster: Any, settings: Any
) -> None:
    """A provider that does not answer discovery: the watch keeps the reason (with its ttl)
    in Redis on a cluster too, where a MULTI is refused."""
    import asyncio
    import time

    import httpx
    from conftest import free_port
    from test_provider_check import _discovery

    from consent_flow.engine.provider_watch import ProviderWatch, read_provider_check
    from consent_flow.oidc import OAuthClient
    from consent_flow.store.connection import connect
    from consent_flow.store.redis_store import Keys

    port = free_port()
    down = settings.with_changes(issuer=f"http://127.0.0.1:{port}", discovery_url=_discovery(port))
    keys = Keys(settings.redis_prefix, "default")
    pool = await connect(redis_cluster.url, startup_retries=0)
    async with httpx.AsyncClient() as http:
        watch = ProviderWatch(
            OAuthClient(down, http), pool, keys, clock=time.time, retry_first=0.2, retry_cap=0.5
        )
        task = asyncio.create_task(watch.until_discovered())
        try:
            deadline = time.monotonic() + 10
            while (reason := await read_provider_check(pool, keys)) is None:
                assert not task.done(), task.exception()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert _discovery(port) in reason and "unreachable" in reason
            assert 0 < await pool.ttl(keys.provider_check) <= 90
        finally:
            task.cancel()
            await pool.aclose()


async def test_thousands_of_commands_at_once_wait_their_turn_on_a_cluster(
    redis_cluster: Any,
) -> None:
    """A burst of commands and pipelines from one client (a busy callback server, a drain
    reading its records back): redis-py would open a connection for each at once, the nodes'
    accept queues overflow and the client takes them for failed ("Redis Cluster cannot be
    connected"). They wait for one another instead, and all succeed."""
    import asyncio
    import time

    from consent_flow.store.connection import connect

    pool = await connect(redis_cluster.url, startup_retries=0)
    try:
        keys = [f"{{s{i % 16}}}:burst:{i}" for i in range(4000)]
        started = time.monotonic()
        answers = await asyncio.gather(*(pool.set(k, str(i)) for i, k in enumerate(keys)))
        assert answers == [True] * len(keys)

        async def read(i: int) -> list[Any]:
            async with pool.pipeline(transaction=False) as pipe:
                pipe.get(keys[i])
                pipe.get(keys[-1 - i])
                return await pipe.execute()

        pairs = await asyncio.gather(*(read(i) for i in range(2000)))
        assert pairs == [[str(i).encode(), str(3999 - i).encode()] for i in range(2000)]
        assert time.monotonic() - started < 30
    finally:
        await pool.aclose()
