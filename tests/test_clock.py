"""One clock: due times, session expiry and schedules are Redis's time, whatever a process's own
clock says; skew that can be seen turns health red.

The skew is injected in the process, never the machine: subprocesses get ``tests/skew`` on
``PYTHONPATH``, whose ``sitecustomize`` shifts ``time.time()``, ``time.time_ns()`` and
``datetime.now()`` by ``CONSENT_TEST_CLOCK_SKEW`` seconds; tests in this process patch the same
functions (and arq's own reference to ``time``) with ``monkeypatch``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, tzinfo
from typing import Any

import arq.utils
import arq.worker
import httpx
import pytest
from arq import cron
from arq.connections import create_pool
from arq.constants import job_key_prefix
from conftest import ROOT, provider_clients, provision
from local_provider import LocalProvider, approve

from consent_flow import State
from consent_flow.queue.bus import JOB_SERIALIZERS
from consent_flow.queue.jobs import JobQueue
from consent_flow.queue.scheduler import Scheduler
from consent_flow.store.clock import MAX_CLOCK_SKEW, RedisClock, redis_time
from consent_flow.store.connection import arq_redis_settings
from consent_flow.store.metrics import MetricsRecorder, read_snapshot
from consent_flow.store.redis_store import Keys, RedisStore
from workers import ConsentWorker

pytestmark = pytest.mark.integration

SKEW = 120.0  # seconds: well past any leeway (the ID token's 30 s, the health limit's 30 s)
SKEW_PATH = str(ROOT / "tests" / "skew")
TOKEN_TTL = 4  # seconds an access token lives at the short-lived provider
ROUND_TRIP_LIMIT = 8.0  # seconds a provision round trip may take on a loaded machine


# --- helpers --------------------------------------------------------------------------------


def skewed(env: dict[str, str], skew: float) -> dict[str, str]:
    """A subprocess environment whose clock is ``skew`` seconds off (positive: ahead)."""
    path = os.pathsep.join(p for p in (SKEW_PATH, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **env, "PYTHONPATH": path, "CONSENT_TEST_CLOCK_SKEW": repr(skew)}


def start_worker(env: dict[str, str], queue: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "worker_process.py"), "--queue", queue],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def start_serve(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "consent_flow", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen[Any]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def live_workers(redis: Any, keys: Keys, n: int = 1) -> bool:
    return int(await redis.zcard(keys.workers)) >= n


def shift_clock(monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    """This process's wall clock ``skew`` seconds off, arq's views of it included (``time()``
    and ``datetime.now()``)."""
    real = time.time

    def shifted() -> float:
        return real() + skew

    class ShiftedDatetime(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> ShiftedDatetime:
            return cls.fromtimestamp(shifted(), tz)

    monkeypatch.setattr(time, "time", shifted)
    monkeypatch.setattr(arq.utils, "time", shifted)
    monkeypatch.setattr(arq.worker, "datetime", ShiftedDatetime)


@pytest.fixture
async def pool(redis_server):
    pool = await create_pool(arq_redis_settings(redis_server.url), **JOB_SERIALIZERS)
    try:
        yield pool
    finally:
        await pool.aclose()


@pytest.fixture
def keys() -> Keys:
    return Keys("c" + uuid.uuid4().hex[:10])


@pytest.fixture(scope="module")
def steady(redirect_uri) -> Iterator[LocalProvider]:
    """Short-lived access tokens, so that refreshes fall due during a test."""
    with LocalProvider.start(
        clients=provider_clients(redirect_uri),
        access_token_ttl=TOKEN_TTL,
        rotate_refresh_token=False,
    ) as op:
        yield op


@pytest.fixture(scope="module")
def twenty(redirect_uri) -> Iterator[LocalProvider]:
    """Access tokens that live 20 s: a caller may ask for more life than one has left."""
    with LocalProvider.start(
        clients=provider_clients(redirect_uri), access_token_ttl=20, rotate_refresh_token=False
    ) as op:
        yield op


# --- the clock and the scripts, against the real Redis ---------------------------------------


async def test_the_clock_reads_redis_time_whatever_the_process_clock_says(pool, monkeypatch):
    shift_clock(monkeypatch, -SKEW)
    clock = RedisClock(pool)
    offset = await clock.sync()
    assert abs(offset - SKEW) < 0.5  # this process is behind: positive
    assert clock.error is not None and clock.error < 0.5
    assert abs(clock() - await redis_time(pool)) < 0.5
    assert clock.age < 1.0
    # Between two measurements it keeps Redis's time by the monotonic clock: a wall clock that
    # steps meanwhile (an NTP correction, an operator) changes nothing.
    shift_clock(monkeypatch, 3 * SKEW)
    assert abs(clock() - await redis_time(pool)) < 0.5


async def test_a_job_due_now_is_scored_with_redis_time(pool, monkeypatch):
    shift_clock(monkeypatch, SKEW)  # a caller far ahead: its "now" would be minutes away
    queue = "c" + uuid.uuid4().hex[:8] + ":queue"
    jobs = JobQueue(pool)
    assert await jobs.put(jobs.job("f", (), job_id=f"{queue}-now", queue=queue))
    score = await pool.zscore(queue, f"{queue}-now")
    assert abs(score / 1000 - await redis_time(pool)) < 1.0


async def test_the_sweep_finds_what_is_due_by_redis_time(pool, keys, monkeypatch):
    scheduler = Scheduler(pool, keys=keys, queue_name=f"{keys.prefix}:queue")
    now = await redis_time(pool)
    shard = keys.of("alice")
    await pool.zadd(shard.sched, {"alice": int((now - 1) * 1000)})  # due, its job lost
    shift_clock(monkeypatch, -SKEW)  # a worker far behind would think it is not due yet
    counts = await scheduler.sweep()
    assert counts == {"due": 1, "requeued": 1}
    job_id = shard.refresh_job_id("alice", int((now - 1) * 1000))
    assert await pool.exists(job_key_prefix + job_id)
    score = await pool.zscore(shard.queue(f"{keys.prefix}:queue"), job_id)
    assert abs(score / 1000 - now) < 2.0  # queued as due now, by Redis's clock


async def test_a_live_session_is_claimed_whatever_the_callback_server_clock(
    pool, keys, monkeypatch
):
    store = RedisStore(pool, prefix=keys.prefix)
    now = await redis_time(pool)
    await pool.hset(
        keys.rec("alice"), mapping={"state": "pending", "sid": "s1", "sexp": repr(now + 60)}
    )
    await pool.hset(
        keys.rec("bob"), mapping={"state": "pending", "sid": "s2", "sexp": repr(now - 1)}
    )
    shift_clock(monkeypatch, SKEW)  # a callback server ahead would call it expired
    assert await store.claim_session("alice", "s1", "e1", "sealed") == "ok"
    assert await pool.get(keys.inbox("alice", "e1")) == b"sealed"
    assert 0 < await pool.ttl(keys.inbox("alice", "e1")) <= 120
    shift_clock(monkeypatch, -2 * SKEW)  # and one behind would accept an expired one
    assert await store.claim_session("bob", "s2", "e2", None) == "expired"


async def test_heartbeat_script_scores_by_redis_time_and_keeps_offsets(pool, keys):
    recorder = MetricsRecorder(pool, keys)
    now = await redis_time(pool)
    # A worker silent for over an hour is forgotten, its clock entry with it.
    await pool.zadd(keys.workers, {"gone": now - 4000})
    await pool.hset(keys.worker_clocks, "gone", "3.0")
    await recorder.heartbeat("w1", clock_offset=-SKEW)
    await recorder.heartbeat("w2", clock_offset=0.25)
    assert abs(await pool.zscore(keys.workers, "w1") - now) < 1.0
    assert await pool.zscore(keys.workers, "gone") is None
    clocks = await pool.hgetall(keys.worker_clocks)
    assert {k.decode(): float(v) for k, v in clocks.items()} == {"w1": -SKEW, "w2": 0.25}
    snapshot = await read_snapshot(pool, keys, f"{keys.prefix}:queue")
    assert snapshot.workers_alive == 2
    public = snapshot.public()
    assert (public["clock_skew"], public["clock_skew_worker"]) == (-SKEW, "w1")
    assert "w1's clock is 120.0 s ahead of Redis's time" in public["clock_skew_problem"]
    assert f"limit {MAX_CLOCK_SKEW:g} s" in public["clock_skew_problem"]


async def test_cron_jobs_run_on_time_on_a_worker_ahead(redis_server, monkeypatch):
    ran: list[float] = []

    async def tick(ctx: dict[str, Any]) -> None:
        ran.append(time.monotonic())

    shift_clock(monkeypatch, SKEW)  # arq would queue each tick two minutes into the future
    worker = ConsentWorker(
        functions=[],
        cron_jobs=[cron(tick, name="tick", second=set(range(60)), run_at_startup=True)],
        queue_name="c" + uuid.uuid4().hex[:8] + ":queue",
        redis_settings=arq_redis_settings(redis_server.url),
        poll_delay=0.01,
        keep_result=0,
        handle_signals=False,
        **JOB_SERIALIZERS,
    )
    task = asyncio.create_task(worker.async_run())
    try:
        await asyncio.sleep(3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()
    assert len(ran) >= 2  # at start-up, then every second
    assert abs(worker.clock.offset + SKEW) < 0.5


# --- skewed processes: workers ---------------------------------------------------------------


async def test_a_worker_behind_applies_events_and_refreshes_on_time(make_stack, steady, env):
    stack = await make_stack(op=steady, refresh_margin=2, workers=0)
    wenv = skewed(
        {
            **env,
            "CONSENT_ISSUER": steady.issuer,
            "CONSENT_REFRESH_MARGIN": "2",
            "CONSENT_HTTP_TIMEOUT": "2",
        },
        -SKEW,
    )
    worker = start_worker(wenv, stack.settings.queue_name)
    try:
        keys = stack.client.store.keys
        await wait_for(lambda: live_workers(stack.client.pool, keys), timeout=20)
        started = time.monotonic()
        page = await provision(stack, "alice")
        assert time.monotonic() - started < ROUND_TRIP_LIMIT
        assert page.status_code == 200 and "Access granted" in page.text
        # Refreshes fall due by Redis's clock: the stored token never lapses.
        deadline = time.monotonic() + 3 * TOKEN_TTL
        expiries = set()
        while time.monotonic() < deadline:
            rec = await stack.client.store.load("alice")
            assert rec.state is State.PROVISIONED
            assert rec.expires_at is not None
            assert rec.expires_at > await redis_time(stack.client.pool), "the token lapsed"
            expiries.add(rec.expires_at)
            await asyncio.sleep(0.25)
        assert len(expiries) >= 3
        assert steady.introspect((await _tokens(stack, "alice"))["access_token"])["active"]
        # The worker's offset is seen: health is red and names it; stats show it.
        async with httpx.AsyncClient() as http:
            health = await http.get(f"http://127.0.0.1:{stack.settings.http_port}/healthz")
        assert health.status_code == 503
        clock = health.json()["checks"]["clock"]
        assert "s behind Redis's time" in clock and "NTP" in clock
        assert 115 < float(clock.split("clock is ")[1].split(" s")[0]) < 125
        assert health.json()["checks"]["worker"] == "ok"
        snapshot = await read_snapshot(stack.client.pool, keys, stack.settings.queue_name)
        assert snapshot.clock_skew is not None and abs(snapshot.clock_skew[1] - SKEW) < 5
        stats = await asyncio.to_thread(cli, {**os.environ, **env}, "stats")
        [line] = [x for x in stats.stdout.splitlines() if x.startswith("clock skew: ")]
        assert f"worker {snapshot.clock_skew[0]}'s clock is" in line and "s behind" in line
    finally:
        stop(worker)


async def test_a_worker_ahead_does_not_expire_a_live_session(make_stack, env):
    # The session is opened while a worker with a correct clock serves; then a worker whose
    # clock is ahead by more than the session's lifetime takes over (its cleanup runs at once).
    stack = await make_stack(session_ttl=100)
    status = await stack.client.request_provisioning("alice")
    assert status.state is State.PENDING and status.authorization_url
    await stack.stop_workers()
    keys = stack.client.store.keys
    worker = start_worker(
        skewed({**env, "CONSENT_SESSION_TTL": "100"}, SKEW), stack.settings.queue_name
    )
    try:
        await wait_for(lambda: live_workers(stack.client.pool, keys), timeout=20)
        await asyncio.sleep(2)  # the cleanup job ran at start-up
        assert (await stack.client.status("alice")).state is State.PENDING
        callback = await approve(status.authorization_url, "alice")
        started = time.monotonic()
        page = await stack.callback(callback)
        assert time.monotonic() - started < ROUND_TRIP_LIMIT
        assert page.status_code == 200 and "Access granted" in page.text
        assert (await stack.client.status("alice")).state is State.PROVISIONED
        events = [h["event"] for h in await stack.client.history("alice")]
        assert events == ["provision_requested", "authorization_completed"]
        # What the worker stamped is Redis's time, not minutes in the future.
        [_, granted] = await stack.client.store.history("alice")
        assert abs(granted.at - await redis_time(stack.client.pool)) < 30
    finally:
        stop(worker)


# --- skewed processes: callers ---------------------------------------------------------------


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consent_flow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_callers_ahead_still_get_their_events_applied(env, settings, provider):
    """The command line and the callback server 120 s ahead, the worker on time."""
    queue = settings.queue_name
    worker = start_worker({**os.environ, **env}, queue)
    callers = skewed({**env, "CONSENT_QUEUE_NAME": queue}, SKEW)
    serve = start_serve(callers)
    base = f"http://127.0.0.1:{settings.http_port}"
    redis = await create_pool(arq_redis_settings(settings.redis_url or ""), **JOB_SERIALIZERS)
    try:
        keys = Keys(settings.redis_prefix)
        await wait_for(lambda: live_workers(redis, keys), timeout=20)
        await wait_for(lambda: _serving(base), timeout=20)
        started = time.monotonic()
        out = await asyncio.to_thread(cli, callers, "provision", "alice", "--json")
        assert out.returncode == 0, out.stderr
        pending = json.loads(out.stdout)
        assert pending["state"] == "pending"
        callback = await approve(pending["authorization_url"], "alice")
        async with httpx.AsyncClient(timeout=30) as http:
            page = await http.get(callback)
        assert time.monotonic() - started < 2 * ROUND_TRIP_LIMIT
        assert page.status_code == 200 and "Access granted" in page.text
        token = await asyncio.to_thread(cli, callers, "token", "alice")
        assert token.returncode == 0, token.stderr
        assert provider.introspect(token.stdout.strip())["active"] is True
        # The callback server sees its own clock is off: health is red and says whose.
        async with httpx.AsyncClient() as http:
            health = await http.get(f"{base}/healthz")
        assert health.status_code == 503
        assert "this server's clock is" in health.json()["checks"]["clock"]
        assert "ahead of Redis's time" in health.json()["checks"]["clock"]
    finally:
        await redis.aclose()
        stop(serve)
        stop(worker)


async def _serving(base: str) -> bool:
    try:
        async with httpx.AsyncClient() as http:
            await http.get(f"{base}/healthz", timeout=1)
        return True
    except httpx.HTTPError:
        return False


async def _tokens(stack: Any, user: str) -> dict[str, str]:
    from conftest import stored_tokens

    return await stored_tokens(stack, user)


async def test_a_caller_behind_never_gets_a_token_shorter_than_it_asked_for(
    make_stack, twenty, env, monkeypatch
):
    stack = await make_stack(op=twenty, refresh_margin=2, workers=0)
    worker = start_worker(
        {**os.environ, **env, "CONSENT_ISSUER": twenty.issuer, "CONSENT_REFRESH_MARGIN": "2"},
        stack.settings.queue_name,
    )
    try:
        await wait_for(lambda: live_workers(stack.client.pool, stack.client.store.keys), 20)
        await provision(stack, "alice")
        rec = await stack.client.store.load("alice")
        assert rec.expires_at is not None
        pool = stack.client.pool
        # Wait until the stored token has less left than the caller will ask for.
        await wait_for(lambda: _past(pool, rec.expires_at - 14), timeout=15)
        shift_clock(monkeypatch, -SKEW)  # this caller's clock now runs two minutes behind
        token = await stack.client.access_token("alice", min_ttl=15)
        left = twenty.introspect(token)["exp"] - await redis_time(pool)
        assert left >= 14, f"handed out a token with {left:.1f} s left, 15 s asked for"
    finally:
        stop(worker)


async def _past(pool: Any, at: float) -> bool:
    return await redis_time(pool) > at
