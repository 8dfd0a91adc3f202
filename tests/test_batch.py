"""Scheduled refreshes in batches: every rule of one refresh holds per member, the soonest lapse
goes first, and the provider's limits hold across a fleet. Real Redis, the real local provider."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis
from conftest import Stack, provider_clients, provision, stored_tokens
from local_provider import LocalProvider
from structlog.testing import capture_logs
from test_ops import asgi, by_label, samples

from consent_flow import State
from consent_flow.core.table import Event
from consent_flow.engine.batch import BatchRefresher
from consent_flow.engine.engine import Engine
from consent_flow.engine.refresh import Refresher, RetryPolicy
from consent_flow.oidc import OAuthClient, ProviderSession
from consent_flow.queue.bus import Envelope
from consent_flow.queue.commit_jobs import CommitJobs
from consent_flow.queue.limits import Limits, ProviderLimiter
from consent_flow.queue.scheduler import Scheduler
from consent_flow.store import codec
from consent_flow.store.batch import DRAIN_SLOT, BatchClaimer, drain_key
from consent_flow.store.clock import RedisClock
from consent_flow.store.metrics import read_snapshot
from consent_flow.store.redis_store import RedisStore

pytestmark = pytest.mark.integration

# The record's fields a test sets by hand, as the codec names them.
REXP = codec.field_name("refresh_expires_at")
EXP = codec.field_name("expires_at")
RETRY = RetryPolicy(base=30.0, cap=60.0)  # a failed member stays failed for the test's span


@pytest.fixture(scope="module")
def rotating(redirect_uri: str):
    """Refresh tokens rotate on every use and a reused one ends the grant."""
    with LocalProvider.start(
        clients=provider_clients(redirect_uri), access_token_ttl=3600, rotate_refresh_token=True
    ) as op:
        yield op


Build = Callable[..., Awaitable[BatchRefresher]]


@pytest.fixture
async def build(
    make_stack: Any, rotating: LocalProvider, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Stack, Build]]:
    """A stack to provision users with (its worker stopped once they are), and batch refreshers
    built as a worker builds its own: each one worker of the fleet. One shard unless the test
    asks for more (indirect parametrize): a batch is one shard's, and these tests are about one
    batch."""
    shards = getattr(request, "param", 1)
    stack: Stack = await make_stack(op=rotating, redis_shards=shards)
    clients: list[ProviderSession] = []

    async def make(
        *, limits: Limits | None = None, size: int = 64, lanes: int = 1
    ) -> BatchRefresher:
        settings = stack.settings
        pool = stack.client.pool
        store = RedisStore(pool, prefix=settings.redis_prefix, shards=settings.redis_shards)
        clock = RedisClock(pool)
        await clock.sync()
        http = ProviderSession(timeout=settings.http_timeout)
        clients.append(http)
        scheduler = Scheduler(
            pool, keys=store.keys, queue_name=settings.queue_name, clock=clock, batched=True
        )
        store.commit_jobs = CommitJobs(scheduler, prefix=settings.redis_prefix)
        engine = Engine(
            settings=settings,
            store=store,
            oauth=OAuthClient(settings, http, clock=clock),
            ring=stack.client.ring,
            clock=clock,
            on_scheduled=scheduler.schedule,
        )
        refresher = Refresher(engine, scheduler, retry=RETRY)
        limiter = ProviderLimiter(
            pool,
            prefix=settings.redis_prefix,
            provider="default",
            limits=limits or Limits(),
            lease=5.0,
        )
        return BatchRefresher(refresher, limiter, size=size, lanes=lanes, idle_poll=0.05)

    try:
        yield stack, make
    finally:
        for http in clients:
            await http.aclose()


async def provisioned(stack: Stack, users: list[str]) -> None:
    for user in users:
        response = await provision(stack, user)
        assert response.status_code == 200
    await stack.stop_workers()  # from here on, only the test's batches refresh


async def make_due(stack: Stack, users: list[str], *, ago: float = 1.0) -> None:
    now = time.time()
    keys = stack.client.store.keys
    for u in users:
        await stack.client.store.redis.zadd(keys.of(u).sched, {u: int((now - ago) * 1000)})


async def sched_score(stack: Stack, user: str) -> float | None:
    score = await stack.client.store.redis.zscore(stack.client.store.keys.of(user).sched, user)
    return None if score is None else score / 1000


async def test_each_member_of_a_batch_stands_alone(build, rotating):
    """One batch: a member whose provider call fails, one revoked at the provider, one locked
    elsewhere, one revoked before its turn, and two that refresh: each ends as it would alone."""
    stack, make = build
    users = ["ok1", "ok2", "ok3", "dead", "locked", "gone"]
    await provisioned(stack, users)
    store = stack.client.store
    before = {u: await stored_tokens(stack, u) for u in users}
    batches = await make()
    # "gone" revoked before its turn: it sits in the ready set, no longer scheduled.
    await stack.client.store.redis.zadd(store.keys.of("gone").ready, {"gone": 1})
    revoke = Envelope(Event.REVOKE_REQUESTED, "gone", "alice", reply=False)
    assert (await batches.engine.handle(revoke)).state == "revoked"
    rotating.revoke_grants("dead")  # its refresh token is dead at the provider: invalid_grant
    elsewhere = await store.acquire_lock("locked", 30)  # another worker is refreshing it
    await make_due(stack, ["ok1", "ok2", "ok3", "dead", "locked"])
    rotating.reset_stats()
    rotating.fault(token_status=503, count=1)  # the batch's first provider call fails

    await batches.run_once()

    recs = {u: await store.load(u) for u in users}
    after = {u: await stored_tokens(stack, u) for u in ("ok1", "ok2", "ok3", "locked")}
    refreshed = [u for u in ("ok1", "ok2", "ok3") if after[u] != before[u]]
    failed = [u for u in ("ok1", "ok2", "ok3") if recs[u].refresh_failures == 1]
    assert len(refreshed) == 2 and len(failed) == 1, (refreshed, failed)
    now = time.time()
    for user in refreshed:
        tokens = await stored_tokens(stack, user)
        assert tokens["refresh_token"] != before[user]["refresh_token"]
        assert rotating.introspect(tokens["refresh_token"])["active"] is True
        assert (await sched_score(stack, user) or 0) > now + 600  # its next refresh, an hour on
        assert recs[user].inflight is None
    (fail,) = failed
    assert recs[fail].state is State.PROVISIONED
    assert await stored_tokens(stack, fail) == before[fail]  # the grant keeps its tokens
    assert rotating.introspect(before[fail]["refresh_token"])["active"] is True
    assert now + 10 < (await sched_score(stack, fail) or 0) < now + 70  # backoff
    assert recs["dead"].state is State.REVOKED
    assert await sched_score(stack, "dead") is None
    # Locked elsewhere: untouched, still its holder's, and back in the schedule after a lease.
    assert recs["locked"].inflight is None
    assert await store.redis.get(store.keys.lock("locked")) == elsewhere.encode()
    assert (await sched_score(stack, "locked") or 0) > now
    assert after["locked"] == before["locked"]
    # Revoked before its turn: no call, no schedule, no lock left behind.
    assert recs["gone"].state is State.REVOKED
    assert await sched_score(stack, "gone") is None
    assert await store.redis.get(store.keys.lock("gone")) is None
    stats = rotating.stats()
    assert stats["refresh_reuse_detected"] == 0
    assert stats["token_requests"] == 4  # ok1-3 and dead; never locked nor gone
    for user in users:
        if user != "locked":
            assert await store.redis.get(store.keys.lock(user)) is None


async def test_a_revocation_during_the_call_wins_and_the_new_tokens_do_not_live_on(build, rotating):
    stack, make = build
    await provisioned(stack, ["carol", "dave"])
    batches = await make()
    await make_due(stack, ["carol", "dave"])
    rotating.fault(token_delay_ms=800, count=2)
    started = time.time()
    run = asyncio.create_task(batches.run_once())
    await asyncio.sleep(0.3)  # both calls at the provider
    revoke = Envelope(Event.REVOKE_REQUESTED, "carol", "carol", reply=False)
    outcome = await batches.engine.handle(revoke)  # waits for the batch's lock on carol
    await run
    assert outcome.state == "revoked"
    store = stack.client.store
    carol = await store.load("carol")
    assert carol.state is State.REVOKED and carol.tokens is None
    assert await sched_score(stack, "carol") is None
    dave = await store.load("dave")
    assert dave.state is State.PROVISIONED and (dave.last_refresh_at or 0) > started
    # Whatever carol's refresh obtained was revoked at the provider with the grant.
    assert rotating.revoke_grants("carol") == 0


async def test_the_soonest_lapse_goes_first(build):
    """Refresh tokens lapse first; a grant whose refresh token does not lapse counts by its
    access token."""
    stack, _ = build
    users = ["u1", "u2", "u3", "u4"]
    await provisioned(stack, users)
    store = stack.client.store
    now = time.time()
    lapses = {"u1": now + 900, "u2": now + 60, "u3": None, "u4": now + 300}
    for user, lapse in lapses.items():
        if lapse is None:
            await store.redis.hdel(store.keys.rec(user), REXP)
            await store.redis.hset(store.keys.rec(user), EXP, repr(now + 120))
        else:
            await store.redis.hset(store.keys.rec(user), REXP, repr(lapse))
    # Due in the opposite order of their lapse.
    await store.redis.zadd(
        store.keys.shard(0).sched,
        {"u2": int((now - 1) * 1000), "u4": int((now - 2) * 1000), "u1": int((now - 4) * 1000)}
        | {"u3": int((now - 3) * 1000)},
    )
    claimer = BatchClaimer(store)
    taken = []
    for _ in range(4):
        claim = await claimer.claim(0, 1, lock_ttl=5, lease=5)
        taken += [m.user for m in claim.members]
    assert taken == ["u2", "u3", "u4", "u1"]


async def test_a_member_whose_worker_died_comes_back_after_its_lease(build):
    stack, _ = build
    await provisioned(stack, ["erin"])
    await make_due(stack, ["erin"])
    claimer = BatchClaimer(stack.client.store)
    first = await claimer.claim(0, 8, lock_ttl=0.4, lease=0.4)
    assert [m.user for m in first.locked] == ["erin"]
    assert (await claimer.claim(0, 8, lock_ttl=0.4, lease=0.4)).members == []  # leased
    await asyncio.sleep(0.6)  # the worker died: its lock and lease ran out
    again = await claimer.claim(0, 8, lock_ttl=0.4, lease=0.4)
    assert [m.user for m in again.locked] == ["erin"]
    assert again.members[0].record is not None
    assert again.members[0].record.inflight is not None  # the first claim's mark stays


def windows_over(times: list[float], rate: float) -> list[tuple[float, int]]:
    """Start times of one-second windows holding more than ``rate`` events."""
    times = sorted(times)
    over = []
    for i, start in enumerate(times):
        n = sum(1 for t in times[i:] if t < start + 1.0)
        if n > rate:
            over.append((start, n))
    return over


async def test_the_rate_holds_across_a_fleet_of_limiters(build):
    """Three workers asking for permits as fast as they can: no second of grants holds more than
    the rate, and the rate is reached."""
    stack, _ = build
    pool = stack.client.pool
    limits = Limits(max_refresh_rate=40)
    fleet = [
        ProviderLimiter(
            pool, prefix=stack.settings.redis_prefix, provider="p", limits=limits, lease=5
        )
        for _ in range(3)
    ]
    granted: list[float] = []
    stop = time.monotonic() + 3.0

    async def worker(limiter: ProviderLimiter) -> None:
        while time.monotonic() < stop:
            permits = await limiter.acquire(16)
            if permits:
                # When Redis granted them (a reply can come back late on a busy machine).
                granted.extend(
                    s / 1000 for s in await pool.zmscore(limiter.log_key, list(permits.ids))
                )
            else:
                await asyncio.sleep(permits.wait)

    await asyncio.gather(*(worker(limiter) for limiter in fleet))
    assert windows_over(granted, 40) == []
    assert len(granted) >= 0.9 * 40 * 3


async def test_concurrency_holds_across_a_fleet_of_limiters(build):
    stack, _ = build
    limits = Limits(max_concurrency=5)
    make = lambda: ProviderLimiter(  # noqa: E731
        stack.client.pool, prefix=stack.settings.redis_prefix, provider="p", limits=limits, lease=5
    )
    a, b = make(), make()
    first = await a.acquire(4)
    second = await b.acquire(4)
    assert (len(first), len(second)) == (4, 1)
    assert len(await a.acquire(1)) == 0
    await a.release(list(first.ids))
    assert len(await b.acquire(8)) == 4


@pytest.mark.parametrize("build", [16], indirect=True)
async def test_scheduled_refreshes_of_a_fleet_keep_the_rate(build, rotating):
    """Three workers draining a backlog spread over 16 shards at a configured rate: no second
    of provider calls holds more than it, and every grant is refreshed."""
    stack, make = build
    users = [f"r{i:02d}" for i in range(24)]
    await provisioned(stack, users)
    fleet = [await make(limits=Limits(max_refresh_rate=8), size=8, lanes=2) for _ in range(3)]
    await make_due(stack, users)
    rotating.reset_stats()
    t0 = time.time()
    tasks = [asyncio.create_task(b.run()) for b in fleet]
    store = stack.client.store
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            recs = [await store.load(u) for u in users]
            if all((r.last_refresh_at or 0) > t0 for r in recs):
                break
            await asyncio.sleep(0.5)  # the workers share this loop: a light poll
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    starts = [r.last_refresh_at or 0 for r in recs]
    assert all(t > t0 for t in starts)
    assert windows_over(starts, 8) == []
    assert all(r.state is State.PROVISIONED for r in recs)
    assert rotating.stats()["refresh_reuse_detected"] == 0


async def test_a_429_slows_every_worker(build, rotating):
    stack, make = build
    users = [f"s{i}" for i in range(6)]
    await provisioned(stack, users)
    fleet = [await make(size=1) for _ in range(2)]
    await make_due(stack, users)
    rotating.fault(token_status=429, retry_after=2, count=1)
    t0 = time.time()
    tasks = [asyncio.create_task(b.run()) for b in fleet]
    store = stack.client.store
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            recs = {u: await store.load(u) for u in users}
            done = [r for r in recs.values() if (r.last_refresh_at or 0) > t0]
            if len(done) == len(users) - 1:
                break
            await asyncio.sleep(0.1)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    (limited,) = [r for r in recs.values() if r.refresh_failures == 1]
    assert limited.last_failure_at is not None
    later = [
        r.last_refresh_at
        for r in recs.values()
        if (r.last_refresh_at or 0) > limited.last_failure_at
    ]
    assert later, "every other refresh started before the 429 came back"
    # Nobody, on either worker, called the provider during the pause it asked for.
    assert min(later) >= limited.last_failure_at + 1.9


async def test_the_backlog_shows_in_stats_metrics_and_ops(build, env):
    """Three due grants, one of which lapses before its turn at the drain rate of the last
    minute (one refresh: turns a minute apart)."""
    stack, _ = build
    users = ["b0", "b1", "b2"]
    await provisioned(stack, users)
    store = stack.client.store
    now = time.time()
    for user, lapse in (("b0", 45), ("b1", 3600), ("b2", 30)):
        await store.redis.hset(store.keys.rec(user), REXP, repr(now + lapse))
    await make_due(stack, users, ago=30)
    slot = int(now // DRAIN_SLOT) - 1
    await store.redis.set(drain_key(store.keys, slot), 1)

    snapshot = await read_snapshot(store.redis, store.keys, stack.settings.queue_name)
    backlog = snapshot.backlogs["default"]
    assert (backlog.due, backlog.lapsing, backlog.drain_per_s) == (3, 1, 1 / 60)
    assert backlog.oldest_due_age is not None and 29 <= backlog.oldest_due_age < 40

    async with asgi(stack.client) as http:
        got = samples((await http.get("/metrics")).text)
        page = (await http.get("/ops")).text
    assert by_label(
        got["consent_flow_refresh_backlog"], "consent_flow_refresh_backlog", "provider"
    ) == {"default": 3}
    lapsing = "consent_flow_refresh_lapsing_before_turn"
    assert by_label(got[lapsing], lapsing, "provider") == {"default": 1}
    assert '<dd id="fig-backlog-default">3</dd>' in page
    assert 'id="fig-lapsing-default"><span class="warn">1</span>' in page

    cli_env = {
        **os.environ,
        **env,
        "CONSENT_REDIS_PREFIX": stack.settings.redis_prefix,
        "CONSENT_REDIS_SHARDS": str(stack.settings.redis_shards),
    }
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "consent_flow", "stats", "--json"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout)["backlog"]["default"]
    assert (data["due"], data["drain_per_s"], data["lapsing_before_turn"]) == (3, 0.02, 1)
    text = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "consent_flow", "stats"],
        env=cli_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert text.stdout.split("LAPSING BEFORE TURN")[1].split()[:2] == ["default", "3"]


async def test_a_batch_costs_no_script_checks_and_survives_a_flushed_script_cache(build, rotating):
    """The claim and the commits go out by SHA alone: no SCRIPT EXISTS round trip per batch (as
    redis-py sends for scripts handed to a pipeline). A server that lost its scripts (a new
    primary, SCRIPT FLUSH) loads them again within the turn: nothing is taken or granted for
    nothing, and the batch refreshes."""
    stack, make = build
    users = ["s1", "s2", "s3"]
    await provisioned(stack, users)
    redis = stack.client.store.redis
    limits = Limits(max_refresh_rate=50.0, max_concurrency=8)
    batches = await make(limits=limits)
    before = {u: await stored_tokens(stack, u) for u in users}

    async def script_exists_calls() -> int:
        stats = await redis.info("commandstats")
        return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))

    await redis.script_flush()
    await make_due(stack, users)
    # The scripts are loaded again within the turn, and nothing is granted for nothing.
    await batches.run_once()
    for user in users:
        assert await stored_tokens(stack, user) != before[user]
    assert await redis.zcard(batches.limiter.leases_key) == 0  # every call's lease back
    assert await redis.zcard(batches.limiter.log_key) == len(users)  # a grant per call made
    checks = await script_exists_calls()
    await make_due(stack, users)
    await batches.run_once()
    assert await script_exists_calls() == checks
    for user in users:
        assert (await stack.client.status(user)).state is State.PROVISIONED


async def test_a_member_put_back_is_due_at_once_even_if_a_claim_comes_between(build):
    """A member put back (its call would have started too late for the rate) is due again at
    once. Another lane's claim may run between the two steps of the put-back: it must not find
    the member due while its lock is still held, or it would lease it for a lock's lifetime
    (seen in a rate-limited drain: stragglers 20 s after the rest)."""
    stack, make = build
    await provisioned(stack, ["fay"])
    await make_due(stack, ["fay"])
    batches = await make()
    claimer = BatchClaimer(stack.client.store)
    [member] = (await claimer.claim(0, 8, lock_ttl=30, lease=30)).members
    assert member.token is not None
    store = batches.store
    release = store.release_lock
    between: list[list[str]] = []

    async def claim_then_release(user: str, token: str) -> bool:
        other = await claimer.claim(0, 8, lock_ttl=30, lease=30)
        between.append([m.user for m in other.members])
        return await release(user, token)

    store.release_lock = claim_then_release  # type: ignore[method-assign]
    await batches._put_back(member)
    store.release_lock = release  # type: ignore[method-assign]
    assert between == [[]]  # not due while still locked
    again = await claimer.claim(0, 8, lock_ttl=30, lease=30)
    assert [m.user for m in again.locked] == ["fay"]


async def test_a_lock_release_that_fails_is_said(build, rotating):
    """A member's lock that Redis did not release holds its user's refreshes for the lock's
    lifetime: the worker says so, naming the user."""
    stack, make = build
    await provisioned(stack, ["ivan"])
    await make_due(stack, ["ivan"])
    batches = await make()
    rotating.fault(token_status=503, count=1)  # no answer to commit: the lock is released apart

    async def unreachable(user: str, token: str) -> bool:
        raise redis.exceptions.ConnectionError("Redis went away")

    batches.engine.store.release_lock = unreachable  # type: ignore[method-assign]
    with capture_logs() as logs:
        await batches.run_once()
    failed = [e for e in logs if e["event"] == "lock_release_failed"]
    assert [(e["user"], e["error"]) for e in failed] == [("ivan", "ConnectionError")]
    assert await stack.client.store.redis.get(stack.client.store.keys.lock("ivan")) is not None
