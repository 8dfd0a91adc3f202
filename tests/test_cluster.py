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
