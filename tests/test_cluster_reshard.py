"""A Redis Cluster resharded under load: nothing lost, nothing applied twice, every caller answered.

A real cluster (tests/cluster_topology.py: three primaries on loopback), the local provider
rotating refresh tokens on every use (a reused one ends the grant) with access tokens that
live seconds, two worker processes and the callback server on ``redis+cluster://``. Users are
provisioned on shards of every node; while scheduled refreshes, on-demand refreshes, provisions
and callbacks run at a steady pace, ``redis-cli --cluster reshard`` moves every slot of one
primary to another, then part of them back. The keys of the users' shards (records, tokens,
schedules, queues) move with MIGRATE while they are refreshed: a command on a slot that is
moving is answered ASK, and a script on keys some of which have moved TRYAGAIN.

Three scripts reach keys that are not in their KEYS, which a half-moved slot can put out of
their reach after they have written (the batch claim, the commit) or show as missing when
they are not (a running job's in-progress key, to the job claim): while their slot moves the
first two answer TRYAGAIN and the job claim takes nothing, tested here one step of a move at a
time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix
from conftest import HEAVY, provider_clients
from local_provider import LocalProvider, approve
from test_lua_commit import OTHER, SEALED, Step
from under_load import Load, grants_go_on, nothing_lost, start_workers

from consent_flow import State
from consent_flow.queue.scheduler import Scheduler, refresh_job_id
from consent_flow.store import codec
from consent_flow.store.batch import BatchClaimer
from consent_flow.store.connection import connect
from consent_flow.store.redis_store import Keys, RedisStore, due_ms, shard_job_id
from consent_flow.store.scripts import lua

pytestmark = pytest.mark.integration

TOKEN_TTL = 4  # seconds: every grant is refreshed on schedule about every two seconds
SHARDS = range(12)  # provisioned users in each: shards of all three nodes
CROWDED = 3  # users in each shard of the node whose slots move first
# Keys beside the users' in each shard of node 0: a slot takes a while to move (redis-cli
# moves ten keys per MIGRATE), so refreshes meet it half moved.
FILLER_KEYS = 15_000
LOAD_BEFORE = 2.0  # seconds of load before the first move
LOAD_AFTER = 3.0  # seconds of load after the last
# The record's fields a test sets by hand, as the codec names them.
REXP = codec.field_name("refresh_expires_at")
EXP = codec.field_name("expires_at")
BACK = 4000  # slots moved back: the lowest-numbered, among them the shards of moved users


@pytest.fixture(scope="module")
def rotating(redirect_uri: str) -> Any:
    with LocalProvider.start(
        clients=provider_clients(redirect_uri),
        access_token_ttl=TOKEN_TTL,
        rotate_refresh_token=True,
    ) as op:
        yield op


def _users(keys: Keys, crowded: set[int]) -> list[str]:
    """One user in each of ``SHARDS``, ``CROWDED`` in those of ``crowded``."""
    users: dict[int, list[str]] = {shard: [] for shard in SHARDS}
    for name in (f"user{i}" for i in range(1000)):
        shard = keys.shard_of(name)
        if shard in users and len(users[shard]) < (CROWDED if shard in crowded else 1):
            users[shard].append(name)
    return [name for shard in SHARDS for name in users[shard]]


def _keys_on(cluster: Any, i: int) -> int:
    with cluster.nodes[i].client() as node:
        return int(node.dbsize())


def _redirections(cluster: Any) -> Counter[str]:
    met: Counter[str] = Counter()
    for node in cluster.nodes:
        with node.client() as direct:
            errors = direct.info("errorstats")
        for kind in ("ASK", "TRYAGAIN"):
            met[kind] += errors.get(f"errorstat_{kind}", {}).get("count", 0)
    return met


@HEAVY
async def test_a_resharding_under_load_loses_nothing(
    redis_cluster: Any, make_stack: Any, rotating: Any, env: dict[str, str], tmp_path: Any
) -> None:
    stack = await make_stack(op=rotating, redis_url=redis_cluster.url, workers=0)
    keys = stack.client.store.keys
    # One scheduled refresh per batch: due members of a crowded shard wait in its ready set
    # while a batch of another runs (what a backlog looks like to the slot that moves).
    worker_env = {**env, "CONSENT_REFRESH_BATCH": "1"}
    workers = start_workers(stack, rotating, worker_env, redis_cluster.url, tmp_path)
    try:
        first_moved = {n for n in SHARDS if redis_cluster.owner(keys.shard(n).sched) == 0}
        users = _users(keys, first_moved)
        owners = {user: redis_cluster.owner(keys.rec(user)) for user in users}
        assert set(owners.values()) == {0, 1, 2}, owners
        rotating.reset_stats()
        for user in users:
            status = await stack.client.request_provisioning(user)
            response = await stack.callback(await approve(status.authorization_url or "", user))
            assert response.status_code == 200, workers[0].log.read_text()[-3000:]
        with redis_cluster.client() as cluster, cluster.pipeline(transaction=False) as pipe:
            for tag in {keys.of(u).tag for u in users if owners[u] == 0}:
                for n in range(FILLER_KEYS):
                    pipe.set(f"filler:{tag}:{n}", b"x")
            pipe.execute()

        for node in redis_cluster.nodes:
            with node.client() as direct:
                direct.config_resetstat()
        load = Load(stack, users)
        load.start()
        await asyncio.sleep(LOAD_BEFORE)
        started = time.monotonic()
        moves = []
        # Every slot of node 0 to node 1, then the lowest-numbered of node 1's back to node 0.
        for slots, source, target in ((redis_cluster.slots_of(0), 0, 1), (BACK, 1, 0)):
            before = {user: redis_cluster.owner(keys.rec(user)) for user in users}
            refreshed = rotating.stats().get("refresh_success", 0)
            held = _keys_on(redis_cluster, 0)  # node 0 gives all its keys, then takes some back
            began = time.monotonic()
            await asyncio.to_thread(redis_cluster.reshard, slots, source, target)
            took = time.monotonic() - began
            during = rotating.stats().get("refresh_success", 0) - refreshed
            moved = [u for u in users if redis_cluster.owner(keys.rec(u)) != before[u]]
            carried = abs(_keys_on(redis_cluster, 0) - held)
            moves.append((slots, source, target, took, during, moved, carried))
            assert moved, f"no provisioned user's shard among the {slots} slots moved"
            assert during > 0, f"no refresh while {slots} slots moved ({took:.1f} s)"
        resharded = time.time()
        await asyncio.sleep(LOAD_AFTER)
        ledger = await load.stop()
        down = ledger.unavailable(started)
        # What the fleet's commands met on the slots that were moving: ASK (a key moved
        # already) and TRYAGAIN (a script's keys on both nodes), answered by the nodes.
        met = _redirections(redis_cluster)
        for slots, source, target, took, during, moved, carried in moves:
            print(
                f"\nreshard {slots} slots node {source} -> {target}: {carried} keys in "
                f"{took:.1f} s, the keys of {len(moved)} provisioned users among them, "
                f"{during} refreshes answered meanwhile"
            )
        print(
            f"fleet unavailable {down:.2f} s at most; answered {dict(ledger.answered)}; told to "
            f"retry {dict(ledger.told_to_retry)}; granted during the load {len(ledger.granted)}; "
            f"nodes answered {met}"
        )
        assert met["ASK"] > 0, "no command met a slot while it moved"
        assert not ledger.unexpected, ledger.unexpected
        assert ledger.granted, "no provision completed during the load"
        for worker in workers:
            assert worker.alive, worker.log.read_text()[-3000:]
            # Not even a failed batch or a Redis that looked away (both logged as errors).
            errors = [e for e in worker.events() if e.get("level") in ("error", "critical")]
            assert not errors, errors[:5]

        await grants_go_on(stack, rotating, users, ledger.granted, resharded, TOKEN_TTL - 0.5)
        refreshes = await nothing_lost(stack, rotating, users, ledger, workers)
        print(f"refreshes answered and stored: {refreshes}")
    finally:
        for worker in workers:
            worker.terminate()


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


async def test_a_job_claim_takes_nothing_while_its_queue_moves(redis_cluster: Any) -> None:
    """A job runs (its in-progress key is on the old node) when its queue reaches the new node
    ahead of that key: claimed there, the job would run twice. The claim takes nothing while
    the slot moves, then the due job once the slot has moved and the running one has ended."""
    pool = await connect(redis_cluster.url, startup_retries=0)
    try:
        claim = pool.register_script(lua("claim_due"))
        queue = Keys.queue("cq", 3)
        running, due = shard_job_id(3, "running"), shard_job_id(3, "due")
        await pool.zadd(queue, {running: 1000, due: 2000})
        await pool.set(in_progress_key_prefix + running, b"1", px=60_000)

        async def claimed() -> list[str]:
            answer = await claim(keys=[queue], args=[in_progress_key_prefix, 60_000, 10, 100])
            return [j.decode() for j in answer[::2]]

        source = redis_cluster.owner(queue)
        target = (source + 1) % 3
        with redis_cluster.nodes[source].client() as node:
            slot = int(node.execute_command("CLUSTER", "KEYSLOT", queue))
        redis_cluster.begin_move(slot, source, target)
        assert await claimed() == []
        redis_cluster.migrate(
            source, target, [queue]
        )  # the queue first, the running job's key later
        assert await claimed() == [], "a running job claimed again"
        await asyncio.to_thread(redis_cluster.end_move, slot, source, target)
        assert await claimed() == [due]
        await pool.delete(in_progress_key_prefix + running)
        assert await claimed() == [running]
    finally:
        await pool.aclose()


async def test_a_sweep_queues_nothing_while_its_shard_moves(redis_cluster: Any) -> None:
    """A due refresh whose job is queued, its schedule and queue moved to the new node ahead of
    the job's key: there the job reads as missing, and a sweep would queue it again (a second
    job key, which then stops the move: MIGRATE will not overwrite it). The sweep queues nothing
    while the slot moves, and once it has moved finds the job there."""
    pool = await connect(redis_cluster.url, startup_retries=0)
    try:
        keys = RedisStore(pool, prefix="sw").keys
        scheduler = Scheduler(pool, keys=keys, queue_name="sq")
        user, due = "alice", time.time() - 5
        k = keys.of(user)
        await pool.zadd(k.sched, {user: due_ms(due)})
        await scheduler.schedule(user, due)
        job_key = job_key_prefix + refresh_job_id(keys, user, due_ms(due))
        assert await pool.exists(job_key)
        assert (await scheduler.sweep())["requeued"] == 0

        source = redis_cluster.owner(k.sched)
        target = (source + 1) % 3
        with redis_cluster.nodes[source].client() as node:
            slot = int(node.execute_command("CLUSTER", "KEYSLOT", k.sched))
        redis_cluster.begin_move(slot, source, target)
        redis_cluster.migrate(source, target, [k.sched, k.queue("sq")])
        assert (await scheduler.sweep())["requeued"] == 0, "a queued job queued again"
        await asyncio.to_thread(redis_cluster.end_move, slot, source, target)
        assert (await scheduler.sweep())["requeued"] == 0
        await pool.delete(job_key)  # lost: the sweep queues it again
        assert (await scheduler.sweep())["requeued"] == 1
    finally:
        await pool.aclose()
