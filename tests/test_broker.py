"""The token broker's cache never outlives a revocation made in another process."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis as sync_redis
from conftest import provision

from consent_flow import ConsentClient, ConsentRevoked
from consent_flow.core.records import ConsentRecord
from consent_flow.engine.broker import TokenBroker

pytestmark = pytest.mark.integration


class HeldBroker(TokenBroker):
    """Holds its next fill between the read and the insert (the ``read_record`` seam), and tells
    when an invalidation message reached it."""

    def __init__(self, client: ConsentClient) -> None:
        super().__init__(client)
        self.hold_next = False
        self.read = asyncio.Event()
        self.release = asyncio.Event()
        self.invalidated = asyncio.Event()

    async def read_record(self, user: str, provider: str = "default") -> ConsentRecord:
        rec = await super().read_record(user, provider)
        if self.hold_next:
            self.hold_next = False
            self.read.set()
            await self.release.wait()
        return rec

    def forget(self, user: str, provider: str = "default") -> None:
        super().forget(user, provider)
        self.invalidated.set()


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


async def warm(broker: HeldBroker) -> None:
    """The broker is subscribed and its cache empty; the next fill will be held."""
    assert await broker.access_token("alice", min_ttl=0)
    await until(lambda: broker._listening)
    broker.forget("alice")
    broker.invalidated.clear()
    broker.hold_next = True


async def test_a_fill_that_read_before_a_revocation_elsewhere_does_not_cache(stack):
    """The fill reads alice's record; another process revokes her and the invalidation reaches
    this one; then the fill would insert what it read. Neither the held call nor any later one
    hands out her token."""
    await provision(stack, "alice")
    async with ConsentClient(stack.settings) as other:
        broker = HeldBroker(other)
        try:
            await warm(broker)
            held = asyncio.create_task(broker.access_token("alice", min_ttl=0))
            await asyncio.wait_for(broker.read.wait(), 5)  # it read alice provisioned
            await stack.client.revoke("alice")  # the revocation completes in another client
            await asyncio.wait_for(broker.invalidated.wait(), 5)
            broker.release.set()
            with pytest.raises(ConsentRevoked):
                await held
            with pytest.raises(ConsentRevoked):
                await broker.access_token("alice", min_ttl=0)
        finally:
            broker.release.set()
            await broker.close()


async def until_subscribed(stack, timeout: float = 5.0) -> None:
    """A client of this Redis is subscribed to the invalidation channel again."""
    deadline = time.monotonic() + timeout
    while True:
        clients = await stack.client.pool.client_list(_type="pubsub")
        if any(int(c.get("sub", 0)) >= 1 for c in clients):
            return
        if time.monotonic() > deadline:
            raise AssertionError("no subscriber came back")
        await asyncio.sleep(0.01)


def revoke_elsewhere(settings, user: str) -> None:
    """Revoke ``user`` from another event loop with a worker of its own: another process's
    worth of connections, running while this test's loop is blocked."""

    async def run() -> None:
        from workers import ConsentWorker, worker_settings

        options = worker_settings(settings, settings.redis_url)
        worker = ConsentWorker(**{**options, "handle_signals": False})
        task = asyncio.create_task(worker.main())
        try:
            async with ConsentClient(settings) as client:
                await client.revoke(user)
        finally:
            worker.burst, worker.max_burst_jobs = True, 0
            await asyncio.wait_for(task, 15)
            await worker.close()

    asyncio.run(run())


async def test_a_fill_across_a_lost_subscription_does_not_cache(stack):
    """Messages published while the subscription is down are lost (redis-py reconnects and
    subscribes again by itself): a fill that read before the connection dropped and inserts
    after it came back must not trust what it read."""
    await provision(stack, "alice")
    async with ConsentClient(stack.settings) as other:
        broker = HeldBroker(other)
        try:
            await warm(broker)
            held = asyncio.create_task(broker.access_token("alice", min_ttl=0))
            await asyncio.wait_for(broker.read.wait(), 5)
            # This loop is blocked from here: the subscription is killed and alice revoked
            # before the broker can see either, so the invalidation is lost to it.
            with sync_redis.Redis.from_url(stack.settings.redis_url) as r:
                assert r.client_kill_filter(_type="pubsub") >= 1
            thread = threading.Thread(target=revoke_elsewhere, args=(stack.settings, "alice"))
            thread.start()
            thread.join(30)
            assert not thread.is_alive()
            await until_subscribed(stack)  # redis-py reconnected and subscribed again
            await until(lambda: broker._listening)
            await asyncio.sleep(0.1)
            assert not broker.invalidated.is_set()  # the message never reached it
            broker.release.set()
            with pytest.raises(ConsentRevoked):
                await held
            with pytest.raises(ConsentRevoked):
                await broker.access_token("alice", min_ttl=0)
        finally:
            broker.release.set()
            await broker.close()


async def test_a_silent_subscription_is_probed_and_the_cache_dropped(stack, monkeypatch):
    """A connection that stops delivering without an error (no reset) is found by a PING that
    gets no answer; until then nothing is cached beyond CACHE_MAX_AGE."""
    import consent_flow.engine.broker as broker_module

    monkeypatch.setattr(broker_module, "PUBSUB_PING_EVERY", 0.2, raising=False)
    await provision(stack, "alice")
    async with ConsentClient(stack.settings) as other:
        broker = HeldBroker(other)
        try:
            assert await broker.access_token("alice", min_ttl=0)
            await until(lambda: broker._listening)
            subscribers = await stack.client.pool.client_list(_type="pubsub")
            await asyncio.sleep(1.0)  # several probes, each answered: still the same subscription
            assert broker._listening
            assert [c["id"] for c in await stack.client.pool.client_list(_type="pubsub")] == [
                c["id"] for c in subscribers
            ]
            # Redis stops answering this client (CLIENT PAUSE holds every command, PING too).
            await stack.client.pool.execute_command("CLIENT", "PAUSE", "1500", "ALL")
            await until(lambda: not broker._listening, timeout=1.4)
            assert "alice" not in broker._cache
        finally:
            await broker.close()
