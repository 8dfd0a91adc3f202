"""The round trip on a Redis Cluster: provision (request, consent, callback), an on-demand
refresh and a revocation, with the real worker, the callback server and the local provider,
``CONSENT_REDIS_URL=redis+cluster://...``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import provision, stored_tokens

from consent_flow import ConsentClient, State
from consent_flow.errors import ConsentRevoked
from consent_flow.store.connection import ClusterArqRedis

pytestmark = pytest.mark.integration


async def test_provision_refresh_and_revoke_on_a_cluster(
    redis_cluster: Any, make_stack: Any, make_provider: Any
) -> None:
    """Users of several shards (so several nodes' slots) provisioned through the callback; an
    access token from the store, then from the broker's cache (its invalidations heard on one
    node's subscription); an on-demand refresh; a revocation, after which the cached token is
    no longer handed out."""
    stack = await make_stack(op=make_provider(access_token_ttl=60), redis_url=redis_cluster.url)
    client = stack.client
    assert isinstance(client.pool, ClusterArqRedis)
    users = ["alice", "bob", "carol"]
    assert len({redis_cluster.owner(client.store.keys.of(u).rec(u)) for u in users}) > 1
    for user in users:
        assert (await provision(stack, user)).status_code == 200
        assert (await client.status(user)).state is State.PROVISIONED
    before = await stored_tokens(stack, "alice")
    token = await client.access_token("alice")
    assert token == before["access_token"]
    assert await client.access_token("alice") == token
    await asyncio.sleep(1.0)
    refreshed = await client.access_token("alice", min_ttl=59.5)  # more than is left: on demand
    after = await stored_tokens(stack, "alice")
    assert refreshed == after["access_token"] != token
    assert (await client.store.load("alice")).last_refresh_at is not None

    assert await client.access_token("bob")
    broker = client._broker
    assert broker is not None and broker._listening  # the subscription is up: served from memory
    assert await client.access_token("bob") == broker._cache[("default", "bob")].token
    # Revoked by another process's client: only the invalidation drops this one's cache entry.
    async with ConsentClient(stack.settings) as other:
        assert (await other.revoke("bob")).state is State.REVOKED
    for _ in range(40):
        if ("default", "bob") not in broker._cache:
            break
        await asyncio.sleep(0.05)
    with pytest.raises(ConsentRevoked):
        await client.access_token("bob")
    assert (await client.status("bob")).state is State.REVOKED
    assert (await client.status("carol")).state is State.PROVISIONED
