"""A rotated refresh token is never lost: key rotation, Redis outages and a killed worker while a
refresh is in flight.

Real parts only: the local provider rotating refresh tokens (a reused one ends the grant), a
private redis-server with an append-only file that the tests stop and start again on the same
port, and real worker processes (tests/worker_process.py), so that a worker that dies shows.
The tests that apply run on a Redis Cluster of three primaries too, the outage there being the
primary that serves the user's shard (its keys kept in its append-only file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from cluster_topology import NODE_TIMEOUT_MS, ClusterTopology
from conftest import ROOT, RestartableRedis, provider_clients, provision
from local_provider import LocalProvider
from structlog.testing import capture_logs

from consent_flow import ConsentClient, KeyRing, State, generate_key
from consent_flow.settings import Secret
from consent_flow.store.vault import open_tokens

pytestmark = pytest.mark.integration

TOKEN_TTL = 60  # seconds an access token lives: only the test's own refreshes happen
HOLD_MS = 3000  # how long the provider holds the token response of the refresh under test
HTTP_TIMEOUT = "5"  # longer than the hold: the refresh waits for the provider's answer
# What the test's on-demand refreshes ask for: a token stored this long ago has too little life
# left, and one refreshed through the hold has enough (its expiry counts from the request).
MIN_TTL = TOKEN_TTL - 5
STALE_AFTER = 5.2


@pytest.fixture(scope="module")
def rotating(redirect_uri):
    with LocalProvider.start(
        clients=provider_clients(redirect_uri),
        access_token_ttl=TOKEN_TTL,
        rotate_refresh_token=True,
    ) as op:
        yield op


class WorkerProcess:
    """tests/worker_process.py with its log in a file (a pipe nobody reads would fill up)."""

    def __init__(self, env: dict[str, str], log: Path, queue: str, *args: str) -> None:
        self.log = log
        self._out = open(log, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "worker_process.py"), "--queue", queue, *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._out,
        )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def events(self) -> list[dict]:
        lines = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    lines.append(entry)
        return lines

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events() if e.get("event") == event]

    def terminate(self, timeout: float = 15) -> int:
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._out.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._out.close()


@pytest.fixture
def workers():
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.terminate()


async def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ConnectionError, OSError):
            value = await predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


class UserNode:
    """The primary of a Redis Cluster that serves alice's shard, stopped and started as a
    RestartableRedis is; the other primaries serve their slots meanwhile."""

    def __init__(self, cluster: ClusterTopology, index: int) -> None:
        self.cluster = cluster
        self.index = index

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def address(self) -> str:
        """Where a worker's log says its Redis is: the nodes of the URL."""
        return ",".join(self.cluster.addresses) + "/0"

    def client(self) -> redis.Redis:
        return self.cluster.nodes[self.index].client()

    def stop(self) -> None:
        self.cluster.stop_node(self.index)

    def start(self) -> None:
        self.cluster.start_node(self.index)


class Scene:
    """One test's world: the callback server and a client in this process, Redis (or the
    cluster node of alice's shard) that can go away, and worker processes started with the
    test's environment. ``bystander``: on a cluster, a user whose shard another node serves."""

    def __init__(
        self,
        stack,
        op,
        env,
        redis: RestartableRedis | UserNode,
        workers,
        tmp_path,
        bystander: str | None = None,
    ) -> None:
        self.stack = stack
        self.op = op
        self.redis = redis
        self.bystander = bystander
        self.workers = workers
        self.tmp_path = tmp_path
        self.env = {
            **os.environ,
            **env,
            "CONSENT_REDIS_URL": redis.url,
            "CONSENT_ISSUER": op.issuer,
            "CONSENT_HTTP_TIMEOUT": HTTP_TIMEOUT,
        }

    def start_worker(self, *args: str, **env: str) -> WorkerProcess:
        log = self.tmp_path / f"worker-{len(self.workers)}.log"
        worker = WorkerProcess({**self.env, **env}, log, self.stack.settings.queue_name, *args)
        self.workers.append(worker)
        return worker

    async def record(self, client: ConsentClient | None = None):
        return await (client or self.stack.client).store.load("alice")

    async def refreshed_since(self, before: float, client: ConsentClient | None = None):
        rec = await self.record(client)
        return rec if rec.last_refresh_at and rec.last_refresh_at > before else None

    def hold_next_token_response(self, ms: int = HOLD_MS) -> None:
        self.op.reset_stats()
        self.op.fault(token_delay_ms=ms, count=1)

    async def provider_holds_it(self) -> None:
        async def busy() -> bool:
            return self.op.stats().get("delays_injected", 0) >= 1

        await wait_for(busy, timeout=15)

    async def provider_answered(self) -> None:
        async def answered() -> bool:
            return self.op.stats().get("refresh_success", 0) >= 1

        await wait_for(answered, timeout=15)

    def start_refresh(self, client: ConsentClient | None = None) -> asyncio.Task:
        """An on-demand refresh, as a tool asking for a token with more life left would start
        it. Its caller may give up during an outage; the refresh itself must not."""
        return asyncio.create_task(
            (client or self.stack.client).access_token("alice", min_ttl=MIN_TTL)
        )

    async def assert_grant_intact(self, client: ConsentClient | None = None) -> str:
        """Provisioned, the stored refresh token alive at the provider, no reuse seen, and the
        next refresh works. Returns the new access token."""
        client = client or self.stack.client
        rec = await self.record(client)
        assert rec.state is State.PROVISIONED, rec.reason
        stored = open_tokens(client.ring, "alice", rec.tokens)
        assert self.op.introspect(stored["refresh_token"])["active"] is True
        await asyncio.sleep(STALE_AFTER)  # the stored token has less than MIN_TTL left now
        token = await client.access_token("alice", min_ttl=MIN_TTL)
        assert token != stored["access_token"]
        after = open_tokens(client.ring, "alice", (await self.record(client)).tokens)
        assert self.op.introspect(after["refresh_token"])["active"] is True
        stats = self.op.stats()
        assert stats["refresh_reuse_detected"] == 0
        assert stats["grants_revoked"] == 0
        assert stats["revocations"] == 0
        return token


@pytest.fixture(params=["single", "cluster"])
def backend(request, tmp_path):
    """One Redis with an append-only file, or a cluster of three primaries with one each:
    while a primary is down the others serve their slots ("cluster"), or all of them refuse
    every command, as Redis does by default ("full-coverage cluster")."""
    if request.param == "single":
        yield request.getfixturevalue("aof_redis")
        return
    cluster = ClusterTopology(
        tmp_path / "cluster", appendonly=True, full_coverage=request.param != "cluster"
    )
    yield cluster
    cluster.close()


# A test a cluster adds nothing to: what the 5-minute outage does on a cluster, the 25-second one
# does there too (the cluster holds the node failed after 5 s, the client gives up on it within
# 10 s, the deferred commit retries every second), and its five minutes are the slow lane's.
SINGLE_REDIS = pytest.mark.parametrize("backend", ["single"], indirect=True)


@pytest.fixture
async def scene(backend, make_stack, rotating, env, workers, tmp_path):
    stack = await make_stack(
        op=rotating, redis_url=backend.url, workers=0, http_timeout=float(HTTP_TIMEOUT)
    )
    if isinstance(backend, RestartableRedis):
        return Scene(stack, rotating, env, backend, workers, tmp_path)
    keys = stack.client.store.keys
    node = backend.owner(keys.rec("alice"))
    bystander = next(f"user{n}" for n in range(100) if backend.owner(keys.rec(f"user{n}")) != node)
    return Scene(stack, rotating, env, UserNode(backend, node), workers, tmp_path, bystander)


async def _provisioned(scene: Scene, worker: WorkerProcess) -> float:
    response = await provision(scene.stack, "alice")
    assert response.status_code == 200, worker.log.read_text()
    rec = await scene.record()
    assert rec.state is State.PROVISIONED
    await asyncio.sleep(STALE_AFTER)  # an on-demand refresh for MIN_TTL is due from now on
    assert rec.last_refresh_at is not None
    return rec.last_refresh_at


async def test_keys_rotate_during_a_refresh_keeps_the_rotated_token(scene, env):
    """`keys rotate` one second into a refresh the provider holds: rotation waits for the user's
    lock, the refresh stores its rotated token, and the rotation then re-seals it."""
    old, new = env["CONSENT_ENCRYPTION_KEYS"], generate_key()
    first = scene.start_worker()
    await _provisioned(scene, first)  # sealed under the old key
    # The documented procedure: the new key first, the old one after it, workers restarted.
    assert first.terminate() == 0
    scene.start_worker(CONSENT_ENCRYPTION_KEYS=f"{new},{old}")
    both = scene.stack.settings.with_changes(encryption_keys=(Secret(new), Secret(old)))
    async with ConsentClient(both) as client:
        scene.hold_next_token_response()
        refresh = scene.start_refresh(client)
        await scene.provider_holds_it()
        await asyncio.sleep(1.0)
        from consent_flow.engine.rotation import rotate_keys
        from workers import check_key_ring

        report = await rotate_keys(client)
        assert report.get("skipped", 0) == 0  # no user was busy past the lock wait
        token = await refresh  # the refresh applied: no conflict, nothing revoked
        rec = await scene.record(client)
        assert open_tokens(client.ring, "alice", rec.tokens)["access_token"] == token
        await scene.assert_grant_intact(client)
        # The rotation still re-sealed everything: the old key can go.
        await check_key_ring(client.store, KeyRing.from_strings([new]))
    history = await scene.stack.client.history("alice")
    assert all(h["event"] != "refresh_rejected" for h in history)


async def test_a_refresh_whose_job_times_out_at_the_provider_keeps_the_answer(scene):
    """arq cancels a job at its timeout. A refresh cancelled with its request at the provider
    (which rotates the token meanwhile) finishes in the background and stores the answer."""
    worker = scene.start_worker("--job-timeout", "2")
    before = await _provisioned(scene, worker)
    scene.hold_next_token_response()  # 3 s: the job is cancelled 2 s in
    caller = scene.start_refresh()
    await wait_for(lambda: scene.refreshed_since(before), timeout=15)
    with contextlib.suppress(Exception):
        await caller  # its job failed; the refresh did not
    assert any("TimeoutError" in e["event"] for e in worker.events() if "refresh" in e["event"])
    await scene.assert_grant_intact()


async def _outage_during_a_refresh(scene: Scene, outage: float) -> None:
    worker = scene.start_worker()
    if scene.bystander is not None:
        assert (await provision(scene.stack, scene.bystander)).status_code == 200
    before = await _provisioned(scene, worker)
    scene.hold_next_token_response()
    caller = scene.start_refresh()
    await scene.provider_holds_it()
    scene.redis.stop()
    down_at = time.monotonic()
    await scene.provider_answered()  # the provider rotated: the worker holds the only copy
    if scene.bystander is not None:
        # The other primaries serve their shards meanwhile: a token from the store there.
        await asyncio.sleep(2 * NODE_TIMEOUT_MS / 1000)  # the other nodes hold the node failed
        client = scene.stack.client
        rec = await client.store.load(scene.bystander)
        assert rec.state is State.PROVISIONED
        stored = open_tokens(client.ring, scene.bystander, rec.tokens)
        assert await client.access_token(scene.bystander, min_ttl=10) == stored["access_token"]
    await asyncio.sleep(max(0.0, outage - (time.monotonic() - down_at)))
    assert worker.alive, worker.log.read_text()[-3000:]
    scene.redis.start()
    await wait_for(lambda: scene.refreshed_since(before), timeout=20)
    with contextlib.suppress(Exception):
        await caller  # its caller may have given up meanwhile; the refresh did not
    assert worker.alive, worker.log.read_text()[-3000:]
    await scene.assert_grant_intact()
    counts_key = scene.stack.client.store.keys.worker_counts

    async def told() -> bool:  # said and counted after the commit, by a process of its own
        counts = await scene.stack.client.pool.hgetall(counts_key)
        return {b"redis_outages", b"commits_deferred"} <= counts.keys()

    await wait_for(told, timeout=10)
    # Logged once, not per poll, with the address and no credentials; counted.
    [down] = worker.named("redis_unavailable")
    assert down["redis"] == scene.redis.address
    assert worker.named("redis_available")  # before the outage is counted
    assert worker.named("refresh_commit_deferred")
    counts = await scene.stack.client.pool.hgetall(counts_key)
    assert int(counts[b"redis_outages"]) >= 1
    assert int(counts[b"commits_deferred"]) == 1
    started = time.monotonic()
    assert worker.terminate() == 0
    assert time.monotonic() - started < 5


async def test_redis_away_25_seconds_during_a_refresh_loses_no_grant(scene):
    await _outage_during_a_refresh(scene, outage=25)


@SINGLE_REDIS
@pytest.mark.slow
async def test_redis_away_5_minutes_during_a_refresh_loses_no_grant(scene):
    await _outage_during_a_refresh(scene, outage=300)


@pytest.mark.parametrize("backend", ["full-coverage cluster"], indirect=True)
async def test_a_commit_that_meets_a_cluster_that_is_down_waits_for_it(scene):
    """Redis's default on a cluster: with a primary away (and no replica to take its slots),
    every node answers CLUSTERDOWN, alice's too. A refresh answered then commits once the
    cluster is up again (its commit retried by the client, or deferred as when Redis is away)."""
    hold_ms = 15_000  # the provider answers once the cluster is down (5-7 s after the stop)
    worker = scene.start_worker("--job-timeout", "30", CONSENT_HTTP_TIMEOUT="20")
    before = await _provisioned(scene, worker)
    scene.hold_next_token_response(hold_ms)
    caller = scene.start_refresh()
    await scene.provider_holds_it()
    cluster = scene.redis.cluster
    other = UserNode(cluster, next(i for i in range(len(cluster.nodes)) if i != scene.redis.index))
    other.stop()

    async def cluster_down() -> bool:
        with scene.redis.client() as node:
            return node.cluster("INFO")["cluster_state"] == "fail"

    await wait_for(cluster_down, timeout=hold_ms / 1000 - 2)
    assert scene.op.stats().get("refresh_success", 0) == 0  # still held
    await scene.provider_answered()
    await asyncio.sleep(2.0)  # the worker retries its commit
    assert worker.alive, worker.log.read_text()[-3000:]
    other.start()
    await wait_for(lambda: scene.refreshed_since(before), timeout=20)
    with contextlib.suppress(Exception):
        await caller
    assert worker.alive, worker.log.read_text()[-3000:]
    await scene.assert_grant_intact()


async def test_a_worker_killed_between_the_answer_and_the_commit_loses_nothing_on_restart(scene):
    """SIGKILL after the provider answered, before the commit applied (Redis holds it: writes
    paused). The rotated tokens wait in the worker's spool file; a worker started on the same
    machine with the same data folder commits them before it takes any job."""
    worker = scene.start_worker()
    before = await _provisioned(scene, worker)
    scene.hold_next_token_response()
    caller = scene.start_refresh()
    await scene.provider_holds_it()
    admin = scene.redis.client()
    admin.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
    try:
        await scene.provider_answered()
        await asyncio.sleep(0.5)  # the answer reached the worker; its commit waits on Redis
        worker.kill()
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()
    with contextlib.suppress(Exception):
        await caller
    rec = await scene.record()
    assert rec.last_refresh_at == before  # nothing committed: the store holds the spent token
    second = scene.start_worker()
    await wait_for(lambda: scene.refreshed_since(before), timeout=40)

    async def replayed() -> bool:  # logged just after the commit it reports
        return bool(second.named("spool_replayed"))

    await wait_for(replayed, timeout=10)
    assert not second.named("lock_not_held_at_release")  # the commit released it
    await scene.assert_grant_intact()


async def test_sigterm_during_an_outage_stops_the_worker_in_seconds_and_says_what_waits(scene):
    worker = scene.start_worker()
    before = await _provisioned(scene, worker)
    scene.hold_next_token_response()
    caller = scene.start_refresh()
    await scene.provider_holds_it()
    scene.redis.stop()
    await scene.provider_answered()
    await asyncio.sleep(1.0)  # the worker retries its commit
    started = time.monotonic()
    assert worker.terminate() == 0
    assert time.monotonic() - started < 5
    [unsaved] = worker.named("refresh_tokens_unsaved")
    assert unsaved["user"] == "alice"
    assert "spool" in unsaved
    with contextlib.suppress(Exception):
        await caller
    # Redis back and a worker started on the same machine: the tokens were not lost.
    scene.redis.start()
    scene.start_worker()
    await wait_for(lambda: scene.refreshed_since(before), timeout=40)
    await scene.assert_grant_intact()


async def test_the_outage_log_names_redis_without_its_credentials(settings):
    from workers import ConsentWorker, worker_settings

    for url, shown in (
        ("redis://ops:hunter2@10.0.0.7:6390/3", "10.0.0.7:6390/3"),
        ("redis+sentinel://:hunter2@s1:26379,s2:26380/main", "s1:26379,s2:26380/0"),
        ("redis+cluster://:hunter2@n1:7000,n2:7001", "n1:7000,n2:7001/0"),
    ):
        options = worker_settings(settings, url)
        assert ConsentWorker(**{**options, "handle_signals": False}).redis_address == shown


async def test_a_spooled_answer_whose_user_stays_locked_at_start_is_committed_by_cleanup(
    make_stack, settings
):
    """A worker that died with an answer in its spool; when the next worker starts, the user's
    lock is still taken (the dead worker's, say). The start does not wait forever or fail: the
    cleanup job commits the answer once the lock is free."""
    from consent_flow.oidc import OAuthClient, ProviderSession
    from consent_flow.store.spool import PendingTokens, TokenSpool, token_digest
    from consent_flow.store.vault import seal_tokens

    stack = await make_stack(http_timeout=1.0, worker_options={"cleanup_every": 1})
    await provision(stack, "alice")
    await stack.stop_workers()
    rec = await stack.client.store.load("alice")
    spent = open_tokens(stack.client.ring, "alice", rec.tokens)
    # The dead worker's refresh: the provider rotated, the answer reached only its spool.
    http = ProviderSession(timeout=5.0)
    try:
        fresh = await OAuthClient(stack.settings, http).refresh(spent["refresh_token"])
    finally:
        await http.aclose()
    now = time.time()
    spool = stack.settings.data_dir / "spool" / stack.settings.redis_prefix / "default"
    TokenSpool(spool).write(
        PendingTokens(
            user="alice",
            event_id="dead-worker-refresh",
            at=now,
            since=rec.since,
            base=token_digest(spent["refresh_token"]),
            sealed=seal_tokens(
                stack.client.ring,
                "alice",
                {"access_token": fresh.access_token, "refresh_token": fresh.refresh_token},
            ),
            expires_at=fresh.expires_at,
            refresh_expires_at=fresh.refresh_expires_at,
            scopes=fresh.scopes,
            due_at=now + 3000,
        )
    )
    keys = stack.client.store.keys
    await stack.client.store.redis.set(keys.lock("alice"), "dead-worker", px=12_000)

    async def stored():
        rec = await stack.client.store.load("alice")
        tokens = open_tokens(stack.client.ring, "alice", rec.tokens)
        return tokens["refresh_token"] == fresh.refresh_token

    with capture_logs() as logs:
        await stack.start_worker(cleanup_every=1)  # its start gives up on alice after 8 s
        await wait_for(stored, timeout=30)
    events = [e["event"] for e in logs]
    assert events.index("spool_entry_postponed") < events.index("worker_started")
    assert events.index("worker_started") < events.index("spool_replayed")
    assert stack.provider.introspect(fresh.refresh_token)["active"] is True
    assert not any((stack.settings.data_dir / "spool").rglob("*.json"))
    assert await stack.client.access_token("alice", min_ttl=0) == fresh.access_token


async def test_a_replayed_answer_found_stored_is_settled_only_once_its_replicas_confirm(
    make_stack,
):
    """A worker that died after its commit applied, before the replicas confirmed it: the
    answer is in the record the next worker reads, but that read may come from a primary a
    failover is about to replace. The spool file stays until the replicas confirm, and the
    user's lock is released once either way."""
    from consent_flow.oidc import ProviderSession
    from consent_flow.store.clock import RedisClock
    from consent_flow.store.spool import PendingTokens, token_digest
    from workers import _provider_stack

    stack = await make_stack()
    await provision(stack, "alice")
    await stack.stop_workers()
    rec = await stack.client.store.load("alice")
    assert rec.last_refresh_at is not None and rec.tokens is not None
    stored = PendingTokens(  # the tokens the record holds, as the dead worker's spool held them
        user="alice",
        event_id="dead-worker-refresh",
        at=rec.last_refresh_at,
        since=rec.since,
        base=token_digest("the-refresh-token-it-replaced"),
        sealed=rec.tokens,
        expires_at=rec.expires_at,
        refresh_expires_at=rec.refresh_expires_at,
        scopes=rec.scopes,
        due_at=rec.next_refresh_at or time.time() + 3000,
    )
    settings = stack.settings
    clock = RedisClock(stack.client.pool)
    await clock.sync()
    http = ProviderSession(timeout=5.0)
    try:
        refresher = _provider_stack(
            settings,
            settings.providers[0],
            stack.client.pool,
            http,
            stack.client.ring,
            clock,
            None,
            batched=True,
        ).refresher
        refresher.spool.write(stored)
        confirm = refresher.store.confirm_replicated
        confirms: list[bool] = []

        async def unconfirmed(user: str) -> bool:
            confirms.append(False)
            return False

        refresher.store.confirm_replicated = unconfirmed  # type: ignore[method-assign]
        with capture_logs() as logs:
            assert await refresher.replay() == 0
            assert confirms == [False]
            assert refresher.spool.entries() == [stored]
            refresher.store.confirm_replicated = confirm  # type: ignore[method-assign]
            assert await refresher.replay() == 1
        assert refresher.spool.entries() == []
    finally:
        await http.aclose()
    events = [e["event"] for e in logs]
    assert events == ["spool_entry_postponed", "refresh_already_stored", "spool_replayed"]
    assert not await stack.client.store.redis.exists(stack.client.store.keys.lock("alice"))
    after = await stack.client.store.load("alice")
    assert after.version == rec.version and after.tokens == rec.tokens  # nothing written
