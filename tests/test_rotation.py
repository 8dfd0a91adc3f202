"""``keys rotate``: every sealed value under the first key, while workers run."""

from __future__ import annotations

import time

import pytest
from conftest import make_settings

from consent_flow import ConsentClient, Event, KeyRing, State, generate_key
from consent_flow.core.records import Change
from consent_flow.engine.rotation import rotate_keys
from consent_flow.queue.bus import new_id
from consent_flow.store.vault import open_tokens, seal_tokens
from workers import check_key_ring

pytestmark = pytest.mark.integration

TOKENS = {"access_token": "at-" + "x" * 1021, "refresh_token": "rt-" + "y" * 61}


async def provisioned_user(client: ConsentClient, user: str) -> bytes:
    """A provisioned user whose tokens are sealed under the client's first key."""
    store = client.store
    sealed = seal_tokens(client.ring, user, TOKENS)
    for event, to in (
        (Event.PROVISION_REQUESTED, State.PENDING),
        (Event.AUTHORIZATION_COMPLETED, State.PROVISIONED),
    ):
        rec = await store.load(user)
        change = Change(
            user=user,
            event=event,
            event_id=new_id(),
            expect_state=rec.state,
            expect_version=rec.version,
            to_state=to,
            actor="test",
            at=time.time(),
            fields={"expires_at": time.time() + 3600, "last_refresh_at": time.time()},
        )
        if to is State.PROVISIONED:
            change.fields["tokens"] = sealed
        assert (await store.commit(change)).ok
    return sealed


async def test_rotation_reseals_tokens_under_the_first_key(settings, env):
    old = env["CONSENT_ENCRYPTION_KEYS"]
    new = generate_key()
    async with ConsentClient(settings) as client:
        before = await provisioned_user(client, "olga")
        keys = client.store.keys
        assert await client.access_token("olga", min_ttl=0) == TOKENS["access_token"]
    rotated = settings.with_changes(
        encryption_keys=make_settings(
            {**env, "CONSENT_ENCRYPTION_KEYS": f"{new},{old}"}
        ).encryption_keys
    )
    async with ConsentClient(rotated) as client:
        report = await rotate_keys(client)
        assert report["rewritten"] == 1
        sealed = await client.store.redis.get(keys.sealed("olga", "tok"))
        assert KeyRing.is_binary(sealed) and KeyRing.key_id_of(sealed) == client.ring.primary_id
        assert open_tokens(client.ring, "olga", sealed) == TOKENS
        assert sealed != before
        assert await client.store.key_ids_in_use() == {client.ring.primary_id: 1}
        await check_key_ring(client.store, KeyRing.from_strings([new]))
        assert (await rotate_keys(client))["rewritten"] == 0  # nothing left to do


async def test_rotation_leaves_tokens_already_under_the_first_key(settings):
    async with ConsentClient(settings) as client:
        sealed = await provisioned_user(client, "pete")
        assert (await rotate_keys(client))["rewritten"] == 0
        assert (await client.store.load("pete")).tokens == sealed


async def test_rotation_waits_for_a_users_lock_and_reports_one_that_stays_taken(settings, env):
    """Anything that rewrites a connection's tokens takes the user's lock: a refresh holding it
    finishes first. A lock held past the wait is reported, never overridden."""
    old = env["CONSENT_ENCRYPTION_KEYS"]
    async with ConsentClient(settings) as client:
        await provisioned_user(client, "quinn")
        await provisioned_user(client, "rita")
        keys = client.store.keys
        # rita's lock is released half-way through the wait: her record is rotated after it.
        await client.store.redis.set(keys.lock("rita"), "refresh-in-flight", px=1000)
        await client.store.redis.set(keys.lock("quinn"), "stuck", px=60_000)
    rotated = settings.with_changes(
        http_timeout=0.1,  # a lock wait of 5.3 s
        encryption_keys=make_settings(
            {**env, "CONSENT_ENCRYPTION_KEYS": f"{generate_key()},{old}"}
        ).encryption_keys,
    )
    async with ConsentClient(rotated) as client:
        started = time.monotonic()
        report = await rotate_keys(client)
        assert time.monotonic() - started >= 1.0  # waited for rita's lock
        assert (report["records"], report["rewritten"], report["skipped"]) == (2, 1, 1)
        assert await client.store.redis.get(keys.lock("quinn")) == b"stuck"  # not taken over
        assert KeyRing.key_id_of((await client.store.load("rita")).tokens) == client.ring.primary_id
        assert (
            KeyRing.key_id_of((await client.store.load("quinn")).tokens) != client.ring.primary_id
        )
