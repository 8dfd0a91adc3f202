"""Scripts on a Redis Cluster slot while it moves between primaries, one step of the move at a
time (tests/cluster_topology.py: three primaries on loopback): a command on a slot that is
moving is answered ASK, and a script on keys some of which have moved TRYAGAIN. Two scripts
reach keys that a half-moved slot can put out of their reach after they have written (the batch
claim, the commit): they answer TRYAGAIN while their slot moves, and the client sends them again.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from test_lua_commit import OTHER, SEALED, Step

from consent_flow import State
from consent_flow.store import codec
from consent_flow.store.batch import BatchClaimer
from consent_flow.store.connection import connect
from consent_flow.store.redis_store import RedisStore

pytestmark = pytest.mark.integration

# The record's fields a test sets by hand, as the codec names them.
REXP = codec.field_name("refresh_expires_at")
EXP = codec.field_name("expires_at")


async def test_a_batch_claim_waits_while_its_slot_moves(redis_cluster: Any) -> None:
    """A batch claim on a shard whose slot moves, with due members waiting in the ready set
    (a backlog): the claim builds per-user keys that are not in its KEYS (a user's lock, its
    record), which the moving slot puts out of the script's reach halfway. The claim waits
    until the slot has moved, then takes a member from the new node, its record whole; no due
    member leaves the schedule meanwhile."""
    pool = await connect(redis_cluster.url, startup_retries=0)
    try:
        store = RedisStore(pool, prefix="c")
        claimer = BatchClaimer(store)
        shard = 10
        k = store.keys.shard(shard)
        users = [u for u in (f"u{i}" for i in range(500)) if store.keys.shard_of(u) == shard][:3]
        now = time.time()
        for user in users:
            await pool.hset(
                k.rec(user),
                mapping={codec.STATE: State.PROVISIONED.value, REXP: now + 3600, EXP: now + 60},
            )
            await pool.zadd(k.sched, {user: int(now * 1000) - 1000})
        first = await claimer.claim(shard, 1, lock_ttl=30, lease=30)
        assert len(first.locked) == 1
        assert await pool.zcard(k.ready) == 2  # the other two wait for the next claim

        source = redis_cluster.owner(k.sched)
        target = (source + 1) % 3
        with redis_cluster.nodes[source].client() as node:
            slot = int(node.execute_command("CLUSTER", "KEYSLOT", k.sched))
        redis_cluster.begin_move(slot, source, target)
        claim = asyncio.create_task(claimer.claim(shard, 1, lock_ttl=30, lease=30))
        await asyncio.sleep(0.5)
        assert await _waiting(pool, k) == set(users), "a due member left the schedule"
        assert not claim.done(), claim
        # The schedule's keys move first, the users' keys stay behind a while.
        redis_cluster.migrate(source, target, [k.sched, k.ready, k.ready_due])
        await asyncio.sleep(0.5)
        assert not claim.done(), claim
        await asyncio.to_thread(redis_cluster.end_move, slot, source, target)
        taken = await asyncio.wait_for(claim, 10)

        [member] = taken.locked
        assert member.record is not None and member.record.state is State.PROVISIONED
        assert await _waiting(pool, k) == set(users)
    finally:
        await pool.aclose()


async def _waiting(pool: Any, k: Any) -> set[str]:
    """The users in a shard's schedule or its ready set."""
    members = await pool.zrange(k.sched, 0, -1) + await pool.zrange(k.ready, 0, -1)
    return {m.decode() for m in members}


async def test_a_commit_waits_while_its_slot_moves(redis_cluster: Any) -> None:
    """A commit on a moving slot whose keys are all still on the old node runs there; a key it
    deletes and then writes again (a record compacted to the small encoding) or reads again (a
    sealed key wiped) is then out of its reach, and the script would end halfway, the record
    deleted. The commit waits until the slot has moved, then applies whole."""
    pool = await connect(redis_cluster.url, startup_retries=0)
    try:
        p = "{s5}lc"
        first = Step(
            p,
            set={"state": "provisioned", "reason": "r" * 100},  # the large encoding
            moved=True,
            schedule="5000",
            hist=json.dumps({"event": "authorization_completed", "at": 1000.0}),
            event_name="authorization_completed",
            metric="m",
        )
        first.op["seal"] = {"tokens": first.arg(SEALED), "revoke": first.arg(OTHER)}
        assert await first.run(pool) == [b"ok", 1]
        step = Step(
            p,
            expect_state="provisioned",
            expect_v=1,
            set={"state": "provisioned"},
            hist=json.dumps({"event": "token_refreshed", "at": 1001.0}),
            event_name="token_refreshed",
            metric="m",
        )
        step.op["del"] = ["reason"]
        step.op["wipe"] = {"revoke": True}
        # A step within one state: both state indexes are its; every key it names is there.
        step.keys[step.op["keys"]["idx_from"] - 1] = f"{p}:idx_to"
        assert all([await pool.exists(k) for k in step.keys])

        source = redis_cluster.owner(f"{p}:rec")
        target = (source + 1) % 3
        with redis_cluster.nodes[source].client() as node:
            slot = int(node.execute_command("CLUSTER", "KEYSLOT", f"{p}:rec"))
        redis_cluster.begin_move(slot, source, target)
        commit = asyncio.create_task(step.run(pool))
        await asyncio.sleep(0.5)
        assert await pool.hget(f"{p}:rec", "v") == b"1", "the commit ended halfway"
        assert not commit.done(), commit
        await asyncio.to_thread(redis_cluster.end_move, slot, source, target)
        assert await asyncio.wait_for(commit, 10) == [b"ok", 2]
        assert await pool.hgetall(f"{p}:rec") == {b"state": b"provisioned", b"v": b"2"}
        assert await pool.get(f"{p}:revoke") is None
        assert await pool.llen(f"{p}:hist") == 2
    finally:
        await pool.aclose()
