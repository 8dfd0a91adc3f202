"""``keys rotate``: every sealed value under the first key, and tokens moved out of an earlier
version's layout (v1 text in the record hash) into their own key (v2 binary)."""

from __future__ import annotations

import json
import time

import pytest
from conftest import make_settings

from consent_flow import ConsentClient, Event, KeyRing, State, generate_key
from consent_flow.core.records import Change
from consent_flow.engine.rotation import rotate_keys
from consent_flow.queue.bus import new_id
from consent_flow.store.vault import open_tokens
from workers import check_key_ring

pytestmark = pytest.mark.integration

TOKENS = {"access_token": "at-" + "x" * 1021, "refresh_token": "rt-" + "y" * 61}


async def old_layout_user(client: ConsentClient, user: str) -> str:
    """A provisioned user as an earlier version stored it: the tokens sealed as v1 text in a
    field of the record hash, counted in cf:kids by the commit script of that version."""
    store, keys = client.store, client.store.keys
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
            set_fields={"exp": repr(time.time() + 3600), "lastref": repr(time.time())},
        )
        assert (await store.commit(change)).ok
    legacy = client.ring.encrypt(json.dumps(TOKENS).encode(), user=user, purpose="tokens")
    await store.redis.hset(keys.rec(user), "tok", legacy)
    await store.redis.hincrby(keys.kids, KeyRing.key_id_of(legacy), 1)
    return legacy


async def test_old_layout_tokens_are_read_and_rotation_moves_them(settings, env):
    old = env["CONSENT_ENCRYPTION_KEYS"]
    new = generate_key()
    async with ConsentClient(settings) as client:
        legacy = await old_layout_user(client, "olga")
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
        assert await client.store.redis.hget(keys.rec("olga"), "tok") is None
        sealed = await client.store.redis.get(keys.sealed("olga", "tok"))
        assert KeyRing.is_binary(sealed) and KeyRing.key_id_of(sealed) == client.ring.primary_id
        assert open_tokens(client.ring, "olga", sealed) == TOKENS
        assert sealed != legacy.encode()
        assert await client.store.key_ids_in_use() == {client.ring.primary_id: 1}
        await check_key_ring(client.store, KeyRing.from_strings([new]))
        assert (await rotate_keys(client))["rewritten"] == 0  # nothing left to do


async def test_rotation_moves_old_layout_tokens_even_under_the_same_key(settings):
    async with ConsentClient(settings) as client:
        await old_layout_user(client, "pete")
        report = await rotate_keys(client)
        assert report["rewritten"] == 1
        rec = await client.store.load("pete")
        assert rec.tokens is not None and KeyRing.is_binary(rec.tokens)
        assert "tok" not in rec.raw
        assert open_tokens(client.ring, "pete", rec.tokens) == TOKENS
        assert await client.store.key_ids_in_use() == {client.ring.primary_id: 1}


async def test_rotation_waits_for_a_users_lock_and_reports_one_that_stays_taken(settings, env):
    """Anything that rewrites a connection's tokens takes the user's lock: a refresh holding it
    finishes first. A lock held past the wait is reported, never overridden."""
    old = env["CONSENT_ENCRYPTION_KEYS"]
    async with ConsentClient(settings) as client:
        await old_layout_user(client, "quinn")
        await old_layout_user(client, "rita")
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
