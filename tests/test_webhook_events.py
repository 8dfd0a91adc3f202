"""The engine's transitions emit webhook notices: one per transition that matters, queued by the
commit that makes it true. A real receiver, real Redis, a real worker and the real local provider;
the commit script's share (jobs queued only when a commit applies) is also tested directly."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest
from arq.connections import ArqRedis
from conftest import provision
from local_provider import approve
from standardwebhooks import Webhook
from structlog.testing import capture_logs
from test_webhooks import SECRET, Receiver, answering, fast

from consent_flow import ConsentError, Event, ProviderUnavailable, State
from consent_flow.core.records import Change, Job, NoticeJob, RefreshJob
from consent_flow.engine.refresh import RetryPolicy
from consent_flow.engine.webhooks import Notice
from consent_flow.queue.bus import Envelope
from consent_flow.queue.commit_jobs import CommitJobs
from consent_flow.queue.scheduler import Scheduler
from consent_flow.settings import Secret
from consent_flow.store.redis_store import MemoryStore, RedisStore, _job_id

pytestmark = pytest.mark.integration

# Refreshes that failed are retried within a fraction of a second.
FAST_REFRESH = RetryPolicy(base=0.05, cap=0.3, halt_retry=1.0, halt_probe=1.0)
QUIET = 0.7  # seconds a test waits to see that no further notice comes


@pytest.fixture
async def hook() -> AsyncIterator[Receiver]:
    """A receiver on loopback that takes every notice (204)."""
    r = await Receiver(answering(then=204)).start()
    yield r
    await r.close()


async def hooked(make_stack: Any, url: str, **changes: Any) -> Any:
    return await make_stack(
        webhook_url=url,
        webhook_secret=Secret(SECRET),
        worker_options={**fast(), "retry": FAST_REFRESH},
        **changes,
    )


def notices(r: Receiver) -> list[dict[str, Any]]:
    """Every notice the receiver got, each verified against its signature."""
    return [Webhook(SECRET).verify(q.body, q.headers) for q in r.requests]


def types(r: Receiver) -> list[str]:
    return [n["type"] for n in notices(r)]


def got(r: Receiver, kind: str) -> bool:
    return kind in types(r)


def epoch(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def provisioned(stack: Any, r: Receiver, user: str = "alice") -> None:
    response = await provision(stack, user)
    assert response.status_code == 200
    await r.wait_for(lambda: got(r, "connection.provisioned"))


async def token_lifetime(stack: Any, user: str) -> float:
    """An on-demand ``min_ttl`` that forces a refresh: the token's whole life, which it can
    meet only when fresh."""
    rec = await stack.client.store.load(user)
    assert rec.expires_at is not None and rec.last_refresh_at is not None
    await asyncio.sleep(0.05)
    return rec.expires_at - rec.last_refresh_at


async def test_provisioning_sends_one_provisioned_notice_that_verifies(make_stack, hook):
    stack = await hooked(make_stack, hook.url)
    await provisioned(stack, hook)
    await asyncio.sleep(QUIET)
    assert types(hook) == ["connection.provisioned"]
    notice = notices(hook)[0]
    assert notice["data"] == {
        "user": "alice",
        "provider": "default",
        "from": "pending",
        "to": "provisioned",
        "reason": None,
    }
    rec = await stack.client.store.load("alice")
    assert rec.since is not None
    assert epoch(notice["timestamp"]) == pytest.approx(rec.since, abs=0.002)
    assert hook.requests[0].headers["webhook-id"].startswith("msg_")


async def test_revoking_sends_one_revoked_notice_with_the_reason(make_stack, hook):
    stack = await hooked(make_stack, hook.url)
    await provisioned(stack, hook)
    status = await stack.client.revoke("alice", reason="left the company")
    assert status.state is State.REVOKED
    await hook.wait_for(lambda: got(hook, "connection.revoked"))
    await asyncio.sleep(QUIET)
    assert types(hook) == ["connection.provisioned", "connection.revoked"]
    assert notices(hook)[1]["data"] == {
        "user": "alice",
        "provider": "default",
        "from": "provisioned",
        "to": "revoked",
        "reason": "left the company",
    }


async def test_an_approved_upgrade_sends_upgraded_and_a_denied_one_sends_nothing(make_stack, hook):
    stack = await hooked(make_stack, hook.url)
    await provisioned(stack, hook)
    opened = await stack.client.request_provisioning("alice", scopes=["notes:write"])
    assert opened.upgrade and opened.authorization_url
    denied = await approve(opened.authorization_url, "alice", deny=True)
    assert (await stack.callback(denied)).status_code == 403
    opened = await stack.client.request_provisioning("alice", scopes=["notes:write"])
    callback = await approve(opened.authorization_url, "alice")
    assert (await stack.callback(callback)).status_code == 200
    await hook.wait_for(lambda: got(hook, "connection.upgraded"))
    await asyncio.sleep(QUIET)
    assert types(hook) == ["connection.provisioned", "connection.upgraded"]
    assert notices(hook)[1]["data"] == {
        "user": "alice",
        "provider": "default",
        "from": "provisioned",
        "to": "provisioned",
        "reason": None,
    }


async def test_transient_failures_send_one_failing_notice_at_the_threshold_then_recovered(
    make_stack, hook
):
    stack = await hooked(make_stack, hook.url, webhook_failing_after=3)
    await provisioned(stack, hook)
    min_ttl = await token_lifetime(stack, "alice")
    armed_at = time.time()
    stack.provider.fault(token_status=503, count=5)
    try:
        with pytest.raises(ProviderUnavailable):
            await stack.client.access_token("alice", min_ttl=min_ttl)
        # The scheduled retries fail four more times, then one succeeds.
        await hook.wait_for(lambda: got(hook, "connection.refresh_recovered"), timeout=30)
    finally:
        stack.provider.clear_faults()
    await asyncio.sleep(QUIET)
    assert types(hook) == [
        "connection.provisioned",
        "connection.refresh_failing",
        "connection.refresh_recovered",
    ]
    failing, recovered = notices(hook)[1:]
    assert failing["data"]["failures"] == 3
    assert failing["data"]["from"] == failing["data"]["to"] == "provisioned"
    assert "503" in failing["data"]["reason"]
    since = epoch(failing["data"]["failing_since"])
    assert armed_at - 0.01 <= since < epoch(failing["timestamp"])
    assert recovered["data"]["failures"] == 5
    assert recovered["data"]["failing_since"] == failing["data"]["failing_since"]
    rec = await stack.client.store.load("alice")
    assert rec.state is State.PROVISIONED and rec.refresh_failures == 0


async def test_a_rejected_refresh_sends_refresh_rejected_with_the_providers_description(
    make_stack, hook
):
    stack = await hooked(make_stack, hook.url)
    await provisioned(stack, hook)
    min_ttl = await token_lifetime(stack, "alice")
    stack.provider.fault(
        token_status=400,
        token_error="invalid_grant",
        token_error_description="consent withdrawn by the user",
        count=1,
    )
    try:
        with pytest.raises(ConsentError):
            await stack.client.access_token("alice", min_ttl=min_ttl)
        await hook.wait_for(lambda: got(hook, "connection.refresh_rejected"))
    finally:
        stack.provider.clear_faults()
    await asyncio.sleep(QUIET)
    assert types(hook) == ["connection.provisioned", "connection.refresh_rejected"]
    data = notices(hook)[1]["data"]
    assert (data["from"], data["to"]) == ("provisioned", "revoked")
    assert "invalid_grant" in data["reason"]
    assert "consent withdrawn by the user" in data["reason"]


async def test_a_duplicated_event_sends_one_notice(make_stack, hook):
    stack = await hooked(make_stack, hook.url)
    await provisioned(stack, hook)
    envelope = Envelope(Event.REVOKE_REQUESTED, "alice", "test", payload={"reason": "twice"})
    assert (await stack.client.emit(envelope)).result == "applied"
    await hook.wait_for(lambda: got(hook, "connection.revoked"))
    # The event delivered again after arq forgot both it and its notice's job: the store still
    # knows the event, so its commit is a duplicate and must queue nothing.
    prefix = stack.settings.redis_prefix
    forgotten = [key async for key in stack.client.pool.scan_iter(match=f"arq:*wh:{prefix}:*")]
    assert forgotten
    reply = stack.client.store.keys.reply(envelope.user, envelope.event_id)
    await stack.client.pool.delete(*forgotten, reply)
    replay = await stack.client.emit(envelope)
    assert replay.state == "revoked"
    await asyncio.sleep(QUIET)
    assert types(hook) == ["connection.provisioned", "connection.revoked"]


async def test_a_commit_that_loses_sends_no_notice(make_stack, hook):
    """The user revokes while the code exchange is in flight: the exchange's commit conflicts,
    and only the revocation is heard of."""
    stack = await hooked(make_stack, hook.url)
    status = await stack.client.request_provisioning("alice")
    assert status.authorization_url
    callback = await approve(status.authorization_url, "alice")
    stack.provider.fault(token_delay_ms=1500, count=1)
    try:
        exchange = asyncio.create_task(stack.callback(callback))
        await asyncio.sleep(0.5)  # the worker is waiting on the token endpoint now
        await stack.client.revoke("alice", reason="changed my mind")
        response = await exchange
    finally:
        stack.provider.clear_faults()
    assert response.status_code == 409
    await hook.wait_for(lambda: got(hook, "connection.revoked"))
    await asyncio.sleep(QUIET)
    assert types(hook) == ["connection.revoked"]
    data = notices(hook)[0]["data"]
    assert (data["from"], data["to"], data["reason"]) == ("pending", "revoked", "changed my mind")


@pytest.mark.parametrize("with_url", [True, False], ids=["with-url", "without-url"])
async def test_notices_are_queued_only_with_a_webhook_url(make_stack, hook, monkeypatch, with_url):
    """Without a URL nothing is queued and no notice is even built (the worker runs in this
    process, so a notice built anywhere would fail its event)."""
    if with_url:
        stack = await hooked(make_stack, hook.url)
    else:

        def refuse(*_args: Any, **_kwargs: Any) -> Notice:
            raise AssertionError("a notice was built without a webhook URL")

        monkeypatch.setattr(Notice, "of", refuse)
        stack = await make_stack(worker_options={"retry": FAST_REFRESH})
        assert stack.settings.webhook_url is None
    with capture_logs() as logs:
        assert (await provision(stack, "alice")).status_code == 200
        assert (await stack.client.revoke("alice", reason="done")).state is State.REVOKED
        if with_url:
            await hook.wait_for(lambda: len(hook.requests) == 2)
        await asyncio.sleep(QUIET)
    prefix = stack.settings.redis_prefix
    # Delivered or not, arq keeps each notice's job or result under the notice's job id.
    kept = [key async for key in stack.client.pool.scan_iter(match=f"arq:*wh:{prefix}:*")]
    queued = await stack.client.pool.zrange(stack.settings.queue_name, 0, -1)
    assert not [job for job in queued if job.startswith(b"wh:")]
    assert not [e for e in logs if e["event"] == "webhook_dropped"]
    if with_url:
        assert len(kept) == 2
        assert types(hook) == ["connection.provisioned", "connection.revoked"]
    else:
        assert kept == []
        assert hook.requests == []


# --- the commit script: jobs ride with the commit, only when it applies ------------------------


@pytest.fixture(params=["memory", "redis"])
async def stores(request, redis_server):
    """A store, and the queue its commits write jobs to."""
    pool = ArqRedis(port=redis_server.port)
    queue = "q" + uuid.uuid4().hex[:8]
    try:
        if request.param == "memory":
            yield MemoryStore(), pool, queue
        else:
            store = RedisStore(pool, prefix="w" + uuid.uuid4().hex[:8])
            scheduler = Scheduler(pool, keys=store.keys, queue_name=queue)
            store.commit_jobs = CommitJobs(scheduler, prefix=store.keys.prefix)
            yield store, pool, queue
    finally:
        await pool.aclose()


async def queued(store: Any, pool: ArqRedis, queue: str) -> set[str]:
    if isinstance(store, MemoryStore):
        return set(store.jobs)
    # alice's shard's queue: where a commit of hers writes its jobs.
    shard_queue = store.keys.of("alice").queue(queue)
    return {job.decode() for job in await pool.zrange(shard_queue, 0, -1)}


def job_id(store: Any, job: Job) -> str:
    if isinstance(store, MemoryStore):
        return _job_id("alice", job)
    return str(store.commit_jobs.queued("alice", job).job_id)


async def test_a_commit_queues_every_job_it_carries_only_when_it_applies(stores):
    store, pool, queue = stores

    def notice(name: str) -> NoticeJob:
        return NoticeJob(name, {"id": name}, keep_for=60.0)

    refresh, first, again = RefreshJob(5000.25), notice("n1"), notice("again")
    rec = await store.load("alice")

    def step(event_id: str, version: int, *carried: Job) -> Change:
        return Change(
            user="alice",
            event=Event.PROVISION_REQUESTED,
            event_id=event_id,
            expect_state=State.UNPROVISIONED if version == 0 else State.PENDING,
            expect_version=version,
            to_state=State.PENDING,
            actor="test",
            at=1000.0,
            jobs=carried,
        )

    applied = await store.commit(step("e1", rec.version, refresh, first))
    assert applied.ok
    assert await queued(store, pool, queue) == {job_id(store, refresh), job_id(store, first)}
    # The same event again: a duplicate, which queues nothing, not even a job id never seen.
    assert (await store.commit(step("e1", 0, again))).status == "duplicate"
    # A step that read an older version loses, and queues nothing.
    assert (await store.commit(step("e2", 0, notice("lost")))).status == "conflict"
    assert await queued(store, pool, queue) == {job_id(store, refresh), job_id(store, first)}
    # A job the queue still holds is not queued twice by a later commit that applies; the
    # refresh it replaces goes.
    later = RefreshJob(6000.5)
    step3 = step("e3", applied.version, first, later)
    step3.drop_refresh_at = refresh.at
    assert (await store.commit(step3)).ok
    assert await queued(store, pool, queue) == {job_id(store, first), job_id(store, later)}


async def test_a_notice_names_the_provider_of_its_connection(
    make_stack, hook, env, two_providers, tmp_path
):
    from conftest import make_settings, providers_env

    base = make_settings(providers_env(env, two_providers, tmp_path))
    stack = await hooked(make_stack, hook.url, base=base)
    status = await stack.client.request_provisioning("alice", "github")
    assert status.authorization_url
    response = await stack.callback(await approve(status.authorization_url, "alice"))
    assert response.status_code == 200
    await hook.wait_for(lambda: got(hook, "connection.provisioned"))
    await stack.client.revoke("alice", "github")
    await hook.wait_for(lambda: got(hook, "connection.revoked"))
    for notice in notices(hook):
        assert (notice["data"]["user"], notice["data"]["provider"]) == ("alice", "github")
