"""Tokens stay fresh: against the real local provider, real Redis and real worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ROOT, make_settings, provider_clients, provision, stored_tokens
from local_provider import LocalProvider
from structlog.testing import capture_logs

from consent_flow import ConsentClient, ConsentRevoked, NotProvisioned, ProviderUnavailable, State
from consent_flow.engine.refresh import RetryPolicy

pytestmark = pytest.mark.integration

TOKEN_TTL = 4  # seconds an access token lives at the short-lived providers
FAST = {
    "retry": RetryPolicy(base=0.2, cap=2.0, halt_retry=1.0, halt_probe=1.0),
    "sweep_every": 1,
    "cleanup_every": 1,
}
PER_JOB = {**FAST, "batched": False}  # a deferred arq job per scheduled refresh, and the sweep


@pytest.fixture(scope="module")
def rotating(redirect_uri):
    """Short-lived access tokens; refresh tokens rotate and a reused one kills the grant."""
    with LocalProvider.start(
        clients=provider_clients(redirect_uri),
        access_token_ttl=TOKEN_TTL,
        rotate_refresh_token=True,
    ) as op:
        yield op


@pytest.fixture(scope="module")
def steady(redirect_uri):
    """Short-lived access tokens, refresh tokens that do not rotate."""
    with LocalProvider.start(
        clients=provider_clients(redirect_uri),
        access_token_ttl=TOKEN_TTL,
        rotate_refresh_token=False,
    ) as op:
        yield op


async def refreshes(stack, user: str) -> int:
    """How many refreshes the history counts (refreshes in a row share one entry)."""
    return sum(
        h.get("count", 1)
        for h in await stack.client.history(user)
        if h["event"] == "token_refreshed"
    )


async def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def test_refreshes_ahead_of_every_expiry(make_stack, rotating):
    stack = await make_stack(op=rotating, refresh_margin=2, worker_options=FAST)
    await provision(stack, "alice")
    expiries = []
    deadline = time.monotonic() + 3 * TOKEN_TTL
    while time.monotonic() < deadline:
        rec = await stack.client.store.load("alice")
        expiries.append(rec.expires_at)
        # Never expired: whenever we look, the stored access token is still valid.
        assert rec.expires_at > time.time(), "the access token expired before its refresh"
        await asyncio.sleep(0.25)
    assert await refreshes(stack, "alice") >= 3
    history = await stack.client.history("alice")
    assert [h["event"] for h in history] == [
        "provision_requested",
        "authorization_completed",
        "token_refreshed",
    ]
    assert history[-1]["first_at"] < history[-1]["at"]
    assert len(set(expiries)) >= 3
    # The worker stopped first (a refresh in flight commits): otherwise a refresh between the
    # two reads below looks like a lost token.
    await stack.stop_workers()
    tokens = await stored_tokens(stack, "alice")
    assert rotating.introspect(tokens["refresh_token"])["active"] is True
    assert rotating.introspect(tokens["access_token"])["active"] is True
    assert rotating.stats()["refresh_reuse_detected"] == 0
    status = await stack.client.status("alice")
    assert status.state is State.PROVISIONED
    assert status.details["refresh_failures"] == 0


def start_worker_process(env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "worker_process.py"), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stderr is not None:
        process.stderr.close()


def worker_env(env: dict[str, str], op: LocalProvider, settings) -> dict[str, str]:
    return {
        **os.environ,
        **env,
        "CONSENT_ISSUER": op.issuer,
        "CONSENT_REFRESH_MARGIN": "2",
        "CONSENT_HTTP_TIMEOUT": "2",
    }


async def test_three_worker_processes_never_reuse_a_rotated_token(make_stack, rotating, env):
    """Invariant 4: single flight across processes, on a provider that punishes reuse."""
    stack = await make_stack(op=rotating, refresh_margin=2, workers=0)
    wenv = worker_env(env, rotating, stack.settings)
    processes = [start_worker_process(wenv, "--queue", stack.settings.queue_name) for _ in range(3)]
    try:
        users = [f"user{i}" for i in range(8)]
        for user in users:
            await provision(stack, user)
        # Each worker checks the client's credentials once it starts, with a made-up refresh
        # token (a refresh error at the provider): counted before the stats start over.
        deadline = time.monotonic() + 60
        while rotating.stats()["refresh_errors"] < len(processes):
            assert time.monotonic() < deadline, "the workers did not check the client"
            await asyncio.sleep(0.2)
        rotating.reset_stats()
        # Scheduled refreshes from three processes, plus on-demand refreshes from the broker
        # racing them, for several token lifetimes.
        deadline = time.monotonic() + 3 * TOKEN_TTL
        while time.monotonic() < deadline:
            tokens = await asyncio.gather(
                *(stack.client.access_token(u, min_ttl=TOKEN_TTL - 1) for u in users)
            )
            assert all(tokens)
            await asyncio.sleep(0.3)
        # Workers stopped (SIGTERM lets a refresh in flight commit) before the stored tokens are
        # compared with the provider's: otherwise a refresh between the two reads looks like loss.
        for process in processes:
            stop_process(process)
        stats = rotating.stats()
        assert stats["refresh_requests"] >= 3 * len(users)
        assert stats["refresh_reuse_detected"] == 0
        assert stats["refresh_errors"] == 0
        for user in users:
            assert (await stack.client.status(user)).state is State.PROVISIONED
            tokens = await stored_tokens(stack, user)
            assert rotating.introspect(tokens["refresh_token"])["active"] is True
    finally:
        for process in processes:
            stop_process(process)


async def test_provider_errors_keep_the_grant_and_recover(make_stack, steady):
    stack = await make_stack(op=steady, refresh_margin=2, worker_options=FAST)
    await provision(stack, "alice")
    steady.fault(token_status=503, count=4, retry_after=1)
    try:
        status = await wait_for(
            lambda: _status_with_failures(stack, "alice"), timeout=3 * TOKEN_TTL
        )
        assert status.state is State.PROVISIONED
        assert "503" in status.details["last_refresh_error"]
        assert status.details["refresh_failures"] >= 1
    finally:
        pass
    # The provider is back after the run of 503s: the next attempt succeeds.
    status = await wait_for(lambda: _recovered(stack, "alice"), timeout=4 * TOKEN_TTL)
    assert status.details["refresh_failures"] == 0
    assert status.details.get("last_refresh_error") is None
    assert status.state is State.PROVISIONED
    assert all(h["event"] != "refresh_rejected" for h in await stack.client.history("alice"))


async def _status_with_failures(stack, user):
    status = await stack.client.status(user)
    return status if status.details.get("refresh_failures") else None


async def _recovered(stack, user):
    status = await stack.client.status(user)
    if status.details.get("refresh_failures") == 0 and await refreshes(stack, user):
        return status
    return None


async def test_a_grant_revoked_at_the_provider_ends_revoked_and_the_broker_raises(
    make_stack, steady
):
    stack = await make_stack(op=steady, refresh_margin=2, worker_options=FAST)
    await provision(stack, "alice")
    assert await stack.client.access_token("alice", min_ttl=0)
    steady.revoke_grants("alice")
    status = await wait_for(lambda: _revoked(stack, "alice"), timeout=3 * TOKEN_TTL)
    assert status.reason.startswith("refresh token rejected by provider: invalid_grant")
    [last] = (await stack.client.history("alice"))[-1:]
    assert (last["event"], last["from"], last["to"]) == (
        "refresh_rejected",
        "provisioned",
        "revoked",
    )
    assert (await stack.client.store.load("alice")).tokens is None
    with pytest.raises(ConsentRevoked, match="invalid_grant") as info:
        await stack.client.access_token("alice")
    assert info.value.reason == status.reason
    assert (
        await stack.client.pool.zscore(stack.client.store.keys.of("alice").sched, "alice") is None
    )


async def _revoked(stack, user):
    status = await stack.client.status(user)
    return status if status.state is State.REVOKED else None


async def test_a_lost_response_after_rotation_ends_the_grant_with_a_reason(make_stack, rotating):
    # The provider rotates the refresh token, then the answer is lost on the way back.
    stack = await make_stack(op=rotating, refresh_margin=2, worker_options=FAST)
    await provision(stack, "alice")
    rotating.fault(token_drop_response=True, count=1)
    status = await wait_for(lambda: _revoked(stack, "alice"), timeout=4 * TOKEN_TTL)
    assert "invalid_grant" in status.reason
    assert "lost" in status.reason


async def test_a_worker_killed_mid_refresh_is_finished_by_another(make_stack, steady, env):
    stack = await make_stack(op=steady, refresh_margin=2, workers=0)
    wenv = worker_env(env, steady, stack.settings)
    queue = ["--queue", stack.settings.queue_name, "--job-timeout", "3"]
    first = start_worker_process(wenv, *queue)
    second = None
    try:
        await provision(stack, "alice")
        steady.reset_stats()
        steady.fault(token_delay_ms=3000, count=1)  # the next refresh hangs at the provider
        await wait_for(_provider_busy(steady), timeout=3 * TOKEN_TTL)
        first.send_signal(signal.SIGKILL)
        first.wait()
        before = (await stack.client.store.load("alice")).expires_at
        second = start_worker_process(wenv, *queue)
        rec = await wait_for(lambda: _refreshed_past(stack, "alice", before), timeout=30)
        assert rec.state is State.PROVISIONED
        tokens = await stored_tokens(stack, "alice")
        assert steady.introspect(tokens["refresh_token"])["active"] is True
        assert await stack.client.access_token("alice", min_ttl=1)
    finally:
        steady.clear_faults()
        stop_process(first)
        if second is not None:
            stop_process(second)


def _provider_busy(op):
    async def check():
        return op.stats().get("delays_injected", 0) >= 1

    return check


async def _refreshed_past(stack, user, before):
    rec = await stack.client.store.load(user)
    return rec if rec.expires_at and rec.expires_at > before else None


async def test_a_pending_session_past_its_ttl_is_expired_by_cleanup(make_stack):
    stack = await make_stack(session_ttl=2, worker_options=FAST)
    status = await stack.client.request_provisioning("alice")
    assert status.state is State.PENDING
    status = await wait_for(lambda: _unprovisioned(stack, "alice"), timeout=10)
    assert status.reason == "authorization session expired"
    [_, expired] = await stack.client.history("alice")
    assert (expired["event"], expired["actor"]) == ("session_expired", "worker")
    assert await stack.client.store.session_owner(0, "x") is None


async def _unprovisioned(stack, user):
    status = await stack.client.status(user)
    return status if status.state is State.UNPROVISIONED and status.since else None


async def test_history_older_than_retention_is_trimmed(make_stack):
    stack = await make_stack(worker_options=FAST)
    await stack.client.request_provisioning("alice")
    await stack.client.revoke("alice")
    keys = stack.client.store.keys
    # Age the first entry by rewriting it as if it were two years old.
    import json

    first = json.loads(await stack.client.pool.lindex(keys.hist("alice"), 0))
    first["at"] -= 2 * 365 * 24 * 3600
    await stack.client.pool.lset(keys.hist("alice"), 0, json.dumps(first))
    await stack.client.pool.zadd(keys.of("alice").histidx, {"alice": first["at"]})
    history = await wait_for(lambda: _history_len(stack, "alice", 1), timeout=5)
    assert history[0]["event"] == "revoke_requested"


async def _history_len(stack, user, n):
    history = await stack.client.history(user)
    return history if len(history) == n else None


async def test_invalid_client_pauses_refreshes_revokes_no_one_and_resumes(
    make_stack, steady, env, settings
):
    """A mistyped client secret wipes no one's consent: a provider's trouble never revokes."""
    stack = await make_stack(op=steady, refresh_margin=2, workers=0)
    good = stack.settings
    from conftest import Stack

    # Provision with a correct worker, then run only a worker with a wrong secret.
    await stack.start_worker(**FAST)
    await provision(stack, "alice")
    await provision(stack, "bob")
    await stack.stop_workers()
    from consent_flow import Settings  # noqa: F401

    bad = Stack(good.with_changes(client_secret=type(good.client_secret)("wrong")), steady)
    await bad.client.__aenter__()
    try:
        await bad.start_worker(**FAST)
        with capture_logs() as logs:
            await wait_for(lambda: _halted(stack), timeout=3 * TOKEN_TTL)
        assert any(e["event"] == "refresh_paused" for e in logs)
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{good.http_port}/healthz")
        assert health.status_code == 503
        assert "invalid_client" in health.text
        await asyncio.sleep(TOKEN_TTL)
        for user in ("alice", "bob"):
            status = await stack.client.status(user)
            assert status.state is State.PROVISIONED
        history = await stack.client.history("alice")
        assert all(h["event"] != "refresh_rejected" for h in history)
    finally:
        await bad.stop()
        await bad.client.__aexit__(None, None, None)
    # Credentials fixed: a worker with the right secret lifts the pause and refreshes resume.
    await stack.start_worker(**FAST)
    await wait_for(lambda: _not_halted(stack), timeout=3 * TOKEN_TTL)
    before = await refreshes(stack, "alice")
    await wait_for(lambda: _more_refreshes(stack, "alice", before), timeout=3 * TOKEN_TTL)
    assert (await stack.client.status("alice")).state is State.PROVISIONED


async def _halted(stack):
    return await stack.client.pool.exists(stack.client.store.keys.halt)


async def _not_halted(stack):
    return not await stack.client.pool.exists(stack.client.store.keys.halt)


async def _more_refreshes(stack, user, before):
    return await refreshes(stack, user) > before


async def test_broker_serves_from_cache_then_store_then_refresh(make_stack, steady):
    stack = await make_stack(op=steady, refresh_margin=1, worker_options=FAST)
    await provision(stack, "alice")
    first = await stack.client.access_token("alice", min_ttl=0)
    await asyncio.sleep(0.2)  # the invalidation subscription is confirmed by now
    assert await stack.client.access_token("alice", min_ttl=0) == first
    # Asking for more life than the stored token has left forces an on-demand refresh.
    await asyncio.sleep(1.0)
    rec = await stack.client.store.load("alice")
    assert rec.expires_at - time.time() < TOKEN_TTL - 0.5
    fresh = await stack.client.access_token("alice", min_ttl=TOKEN_TTL - 0.5)
    after = await stack.client.store.load("alice")
    assert after.expires_at > rec.expires_at
    assert fresh == (await stored_tokens(stack, "alice"))["access_token"]


async def test_a_refresh_commits_its_next_job_counters_and_lock_release_at_once(make_stack, steady):
    """What rides in a refresh's commit: the next deferred job, the counters, the lock (the
    path of a job per scheduled refresh)."""
    from arq.constants import job_key_prefix

    from consent_flow.queue.scheduler import refresh_job_id
    from consent_flow.store.redis_store import due_ms

    stack = await make_stack(op=steady, refresh_margin=1, worker_options=PER_JOB)
    await provision(stack, "alice")
    store = stack.client.store
    await asyncio.sleep(1.0)
    before = await store.load("alice")
    assert before.next_refresh_at is not None and before.next_refresh_at > time.time()
    replaced = refresh_job_id(store.keys, "alice", due_ms(before.next_refresh_at))
    assert await store.redis.exists(job_key_prefix + replaced)  # the schedule's job, queued
    await stack.client.access_token("alice", min_ttl=TOKEN_TTL - 0.5)  # refreshes on demand
    rec = await store.load("alice")
    assert rec.version > before.version and rec.next_refresh_at is not None
    assert before.next_refresh_at != rec.next_refresh_at
    # The job of the schedule the refresh replaced went with it: no stale job left queued.
    assert not await store.redis.exists(job_key_prefix + replaced)
    queue = store.keys.of("alice").queue(stack.settings.queue_name)  # alice's shard's
    assert await store.redis.zscore(queue, replaced) is None
    job_id = refresh_job_id(store.keys, "alice", due_ms(rec.next_refresh_at))
    assert await store.redis.exists(job_key_prefix + job_id)
    assert await store.redis.zscore(queue, job_id) == due_ms(rec.next_refresh_at)
    assert not await store.redis.exists(store.keys.lock("alice"))
    counts = await store.redis.hgetall(store.keys.of("alice").refresh_counts)
    lead = await store.redis.hgetall(store.keys.of("alice").refresh_lead)
    successes = int(counts[b"success"])
    assert successes >= 1
    # Every successful refresh lands in exactly one lead-time bucket, and the sum is positive.
    assert sum(int(v) for k, v in lead.items() if k != b"sum") == successes
    assert float(lead[b"sum"]) > 0


async def test_after_revocation_no_process_hands_the_token_out(make_stack, steady, settings):
    """Invariant 9, across two clients (two processes' worth of caches)."""
    stack = await make_stack(op=steady, worker_options=FAST)
    await provision(stack, "alice")
    other = ConsentClient(stack.settings)
    async with other:
        assert await other.access_token("alice", min_ttl=0)
        await asyncio.sleep(0.2)
        assert await other.access_token("alice", min_ttl=0)  # now from its cache
        await stack.client.revoke("alice")
        with pytest.raises(ConsentRevoked):
            await other.access_token("alice", min_ttl=0)


async def test_a_revocation_removes_the_queued_refresh_job(make_stack, steady):
    """The revocation's commit takes the deferred job of the schedule it cancels with it: no
    job of a revoked grant waits in the queue to run as a no-op (the path of a job per scheduled
    refresh)."""
    from arq.constants import job_key_prefix

    from consent_flow.queue.scheduler import refresh_job_id
    from consent_flow.store.redis_store import due_ms

    stack = await make_stack(op=steady, refresh_margin=1, worker_options=PER_JOB)
    await provision(stack, "alice")
    store = stack.client.store
    queue = store.keys.of("alice").queue(stack.settings.queue_name)

    async def queued() -> list[bytes]:
        head = store.keys.of("alice").refresh_job_head.encode() + b"al"
        return [m for m in await store.redis.zrange(queue, 0, -1) if m.startswith(head)]

    rec = await store.load("alice")
    assert rec.next_refresh_at is not None and rec.next_refresh_at > time.time() + 1
    job_id = refresh_job_id(store.keys, "alice", due_ms(rec.next_refresh_at))
    assert await wait_for(lambda: store.redis.exists(job_key_prefix + job_id), timeout=2)
    await stack.client.revoke("alice")
    assert await store.redis.zscore(store.keys.of("alice").sched, "alice") is None

    async def gone() -> bool:
        # A refresh that was running when the revocation came is cleaned up by arq itself. (Job
        # keys are arq's, global: other tests' alices have theirs; the queue is this stack's.)
        return not await store.redis.exists(job_key_prefix + job_id) and not await queued()

    assert await wait_for(gone, timeout=1.0)
    assert rec.next_refresh_at > time.time()  # the job was still due later: the commit took it


async def test_broker_errors_are_clear(stack):
    with pytest.raises(NotProvisioned) as info:
        await stack.client.access_token("nobody")
    assert info.value.code == "not_provisioned"
    assert not isinstance(info.value, ConsentRevoked)


async def test_redis_restart_loses_no_consent_and_the_sweep_catches_up(
    tmp_path, provider, env, redirect_uri, steady, make_stack
):
    from conftest import start_redis, stop_redis

    server = start_redis(tmp_path / "aof-redis", appendonly=True)
    try:
        stack = await make_stack(
            op=steady, refresh_margin=2, redis_url=server.url, worker_options=FAST
        )
        await provision(stack, "alice")
        await provision(stack, "bob")
        stop_redis(server)  # SIGTERM: Redis flushes its append-only file
        await asyncio.sleep(TOKEN_TTL)  # refreshes fall due while Redis is away
        down_until = time.time()
        server = start_redis(server.directory, port=server.port, appendonly=True)
        for user in ("alice", "bob"):
            rec = await wait_for(lambda u=user: _refreshed_after(stack, u, down_until), 20)
            assert rec.state is State.PROVISIONED
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{stack.settings.http_port}/healthz")
        assert health.status_code == 200
        # The callback server reconnected too: a new user completes the round trip.
        response = await provision(stack, "carol")
        assert response.status_code == 200
        await stack.stop()
    finally:
        stop_redis(server)


async def _refreshed_after(stack, user, at):
    rec = await stack.client.store.load(user)
    return rec if rec.last_refresh_at and rec.last_refresh_at > at else None


async def test_tokens_never_in_clear_after_refreshes(make_stack, steady):
    stack = await make_stack(op=steady, refresh_margin=2, worker_options=FAST)
    with capture_logs() as logs:
        await provision(stack, "alice")
        await wait_for(lambda: refreshes(stack, "alice"), timeout=3 * TOKEN_TTL)
        tokens = await stored_tokens(stack, "alice")
    text = repr(logs)
    pool = stack.client.pool
    async for key in pool.scan_iter(match=f"{stack.settings.redis_prefix}:*"):
        kind = await pool.type(key)
        if kind == b"hash":
            text += repr(await pool.hgetall(key))
        elif kind == b"string":  # the sealed tokens: binary, deflated and encrypted
            text += repr(await pool.get(key))
    assert (await pool.get(stack.client.store.keys.sealed("alice", "tok")))[:1] == b"\x02"
    assert tokens["access_token"] not in text
    assert tokens["refresh_token"] not in text


async def test_keys_rotate_while_workers_run(make_stack, steady, env):
    from consent_flow import KeyRing, generate_key
    from consent_flow.engine.rotation import rotate_keys
    from workers import check_key_ring

    stack = await make_stack(op=steady, refresh_margin=2, worker_options=FAST)
    for user in ("alice", "bob", "carol"):
        await provision(stack, user)
    await stack.client.request_provisioning("dave")  # a pending session is sealed too
    old = env["CONSENT_ENCRYPTION_KEYS"]
    new = generate_key()
    rotated = stack.settings.with_changes(
        encryption_keys=make_settings(
            {**env, "CONSENT_ENCRYPTION_KEYS": f"{new},{old}"}
        ).encryption_keys
    )
    async with ConsentClient(rotated) as client:
        report = await rotate_keys(client)  # the old-key worker keeps refreshing meanwhile
    assert report["records"] == 4
    only_new = KeyRing.from_strings([new])
    await check_key_ring(stack.client.store, only_new)  # nothing needs the old key any more
    new_only = stack.settings.with_changes(
        encryption_keys=make_settings({**env, "CONSENT_ENCRYPTION_KEYS": new}).encryption_keys
    )
    async with ConsentClient(new_only) as client:
        for user in ("alice", "bob", "carol"):
            assert await client.access_token(user, min_ttl=0)


async def test_asking_for_longer_than_the_provider_grants_does_not_refresh_in_a_loop(
    make_stack, steady
):
    stack = await make_stack(op=steady, worker_options=FAST)
    await provision(stack, "alice")
    steady.reset_stats()
    with pytest.raises(ProviderUnavailable, match="less than"):
        await stack.client.access_token("alice", min_ttl=3600)
    with pytest.raises(ProviderUnavailable, match="less than"):
        await stack.client.access_token("alice", min_ttl=3600)
    assert steady.stats()["refresh_requests"] == 0
