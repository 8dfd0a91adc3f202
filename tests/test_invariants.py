"""The invariants the round trip touches (docs/design.md): one writer wins, exactly-once effect,
tokens of a losing step do not live on, sealed at rest, no secret in the clear, the caller is the
user, revoked means gone."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import CLIENT_SECRET, make_settings, provision, stored_tokens
from local_provider import approve
from structlog.testing import capture_logs

from consent_flow import (
    ConsentClient,
    Event,
    State,
    UnknownKeyError,
    WorkerUnavailable,
    generate_key,
)
from consent_flow.queue.bus import Envelope

pytestmark = pytest.mark.integration


async def test_concurrent_provision_requests_make_one_session(stack):
    """1: one writer wins; the losers see the winner's session."""
    results = await asyncio.gather(*(stack.client.request_provisioning("alice") for _ in range(8)))
    assert {r.authorization_url for r in results} == {results[0].authorization_url}
    assert len(await stack.client.history("alice")) == 1
    assert (await stack.client.store.load("alice")).version == 1


async def test_a_duplicated_event_is_applied_once(stack):
    """2: at-least-once delivery, exactly-once effect."""
    await provision(stack, "alice")
    envelope = Envelope(Event.REVOKE_REQUESTED, "alice", "test")
    first = await stack.client.emit(envelope)
    second = await stack.client.emit(envelope)  # same event id: a redelivery
    assert first.result == "applied"
    assert second.result in ("applied", "unchanged")  # the outcome of that one event
    assert second.state == "revoked"
    third = await stack.client.emit(envelope, timeout=2)
    assert third.state == "revoked"
    history = await stack.client.history("alice")
    assert [h["event"] for h in history].count("revoke_requested") == 1


async def test_a_redelivery_after_40_newer_events_changes_nothing(stack):
    """2: the duplicate window is time-based, not the last few ids: a redelivery that comes after
    40 newer events for the same user is still recognised."""
    first = Envelope(Event.PROVISION_REQUESTED, "alice", "test")
    assert (await stack.client.emit(first)).state == "pending"
    for i in range(41):  # revoke, provision, ..., revoke: 41 newer events, ending revoked
        event = Event.PROVISION_REQUESTED if i % 2 else Event.REVOKE_REQUESTED
        await stack.client.emit(Envelope(event, "alice", "test"))
    before = await stack.client.store.load("alice")
    assert before.state is State.REVOKED
    # The same event id delivered again, after its first outcome's reply is gone (it would
    # answer at once otherwise): the worker's answer to the replay is what this waits for.
    await stack.client.pool.delete(stack.client.store.keys.reply("alice", first.event_id))
    replay = await stack.client.emit(first)
    assert replay.state == "revoked"
    after = await stack.client.store.load("alice")
    assert (after.state, after.version) == (State.REVOKED, before.version)
    assert len(await stack.client.history("alice")) == 42


async def test_tokens_of_a_step_that_loses_are_revoked_not_stored(stack):
    """3: the user revokes while the code exchange is in flight."""
    status = await stack.client.request_provisioning("alice")
    callback = await approve(status.authorization_url, "alice")
    stack.provider.fault(token_delay_ms=1500, count=1)
    revoked_before = stack.provider.stats()["grants_revoked"]
    try:
        callback_task = asyncio.create_task(stack.callback(callback))
        await asyncio.sleep(0.5)  # the worker is now waiting on the token endpoint
        revoked = await stack.client.revoke("alice", reason="changed my mind")
        assert revoked.state is State.REVOKED
        response = await callback_task
    finally:
        stack.provider.clear_faults()
    assert response.status_code == 409
    rec = await stack.client.store.load("alice")
    assert rec.state is State.REVOKED and rec.tokens is None
    assert stack.provider.stats()["grants_revoked"] > revoked_before


async def test_a_wrong_key_is_a_clear_error_and_wipes_nothing(stack, env):
    """6: a worker started with the wrong key refuses to start; the record is untouched."""
    from workers import check_key_ring

    await provision(stack, "alice")
    keys = stack.client.store.keys
    before = await stack.client.pool.hgetall(keys.rec("alice"))
    sealed_before = await stack.client.pool.get(keys.sealed("alice", "tok"))
    assert sealed_before
    wrong = make_settings({**env, "CONSENT_ENCRYPTION_KEYS": generate_key()})
    from consent_flow import KeyRing

    ring = KeyRing.from_strings(k.reveal() for k in wrong.encryption_keys)
    with pytest.raises(UnknownKeyError, match="CONSENT_ENCRYPTION_KEYS"):
        await check_key_ring(stack.client.store, ring)
    async with ConsentClient(wrong) as client:
        with pytest.raises(UnknownKeyError):
            await client.access_token("alice")
    assert await stack.client.pool.hgetall(keys.rec("alice")) == before
    assert await stack.client.pool.get(keys.sealed("alice", "tok")) == sealed_before


async def test_rotated_key_ring_still_reads_old_records(stack, env):
    """6: the first key encrypts, every key decrypts."""
    await provision(stack, "alice")
    old = env["CONSENT_ENCRYPTION_KEYS"]
    rotated = make_settings({**env, "CONSENT_ENCRYPTION_KEYS": f"{generate_key()},{old}"})
    async with ConsentClient(rotated) as client:
        assert (
            await client.access_token("alice")
            == (await stored_tokens(stack, "alice"))["access_token"]
        )


async def test_a_ciphertext_copied_to_another_user_is_refused(stack):
    """6: tokens are bound to their user."""
    await provision(stack, "alice")
    keys = stack.client.store.keys
    alice = await stack.client.pool.hgetall(keys.rec("alice"))
    await stack.client.pool.hset(keys.rec("mallory"), mapping=alice)
    sealed = await stack.client.pool.get(keys.sealed("alice", "tok"))
    await stack.client.pool.set(keys.sealed("mallory", "tok"), sealed)
    from consent_flow import VaultError

    with pytest.raises(VaultError):
        await stack.client.access_token("mallory")


async def test_no_secret_reaches_redis_in_clear_or_any_log_line(stack):
    """7: tokens, codes, verifiers, the client secret and keys: nowhere."""
    with capture_logs() as logs:
        status = await stack.client.request_provisioning("alice")
        callback = await approve(status.authorization_url, "alice")
        code = callback.split("code=")[1].split("&")[0]
        await stack.callback(callback)
        tokens = await stored_tokens(stack, "alice")
        await stack.client.revoke("bob")
    secrets = [
        tokens["access_token"],
        tokens["refresh_token"],
        code,
        CLIENT_SECRET,
        stack.settings.encryption_keys[0].reveal(),
    ]
    dump = []
    redis = stack.client.pool
    async for key in redis.scan_iter(match=f"{stack.settings.redis_prefix}:*"):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            dump.append(repr(await redis.hgetall(key)))
        elif kind == "list":
            dump.append(repr(await redis.lrange(key, 0, -1)))
        elif kind == "string":
            dump.append(repr(await redis.get(key)))
        elif kind == "zset":
            dump.append(repr(await redis.zrange(key, 0, -1)))
        elif kind == "stream":
            dump.append(repr(await redis.xrange(key)))
    async for key in redis.scan_iter(match="arq:*"):
        dump.append(repr(await redis.get(key)) if (await redis.type(key)) == b"string" else "")
    # The tokens were stored (sealed, in a key of their own) and are in the dump, not in clear.
    assert repr(await redis.get(stack.client.store.keys.sealed("alice", "tok"))) in dump
    text = "\n".join(dump) + "\n".join(json.dumps(e, default=str) for e in logs)
    assert logs
    for secret in secrets:
        assert secret not in text


async def dump_redis(redis) -> bytes:
    """Every key of the Redis, every type, values and members and fields alike."""
    out: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        kind = (await redis.type(key)).decode()
        out.append(key)
        if kind == "string":
            out.append(await redis.get(key) or b"")
        elif kind == "hash":
            for field, value in (await redis.hgetall(key)).items():
                out += [field, value]
        elif kind == "list":
            out += await redis.lrange(key, 0, -1)
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "zset":
            out += [member for member, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for entry_id, fields in await redis.xrange(key):
                out.append(entry_id)
                for field, value in fields.items():
                    out += [field, value]
        elif kind != "none":  # "none": gone since the scan saw it (a finished job)
            raise AssertionError(f"{key!r} is a {kind}: dump it too")
    return b"\n".join(out)


def session_secrets(url: str) -> list[bytes]:
    query = parse_qs(urlsplit(url).query)
    [state], [nonce] = query["state"], query["nonce"]
    assert len(state) >= 43 and len(nonce) >= 43
    return [state.encode(), nonce.encode()]


async def test_no_state_or_nonce_in_redis_at_any_moment(stack):
    """8: the authorization URL carries the session's state and nonce. The caller's reply (which
    waits in Redis for a minute), the job, the record: none holds them in clear, neither while
    pending nor once provisioned; a duplicate waiter holding another key cannot open the URL."""
    redis = stack.client.pool
    status = await stack.client.request_provisioning("alice")
    assert status.authorization_url
    secrets = session_secrets(status.authorization_url)
    # Bob's event is emitted twice by its caller (a retry) and once by someone else: the same
    # event id, so all three read the one reply the worker pushed.
    envelope = Envelope(Event.PROVISION_REQUESTED, "bob", "test").with_reply_key()
    first = await stack.client.emit(envelope)
    again = await stack.client.emit(envelope)
    stranger = await stack.client.emit(replace(envelope, reply_to=None, reply_key=None))
    assert first.authorization_url and again.authorization_url == first.authorization_url
    assert stranger.state == "pending" and stranger.authorization_url is None
    secrets += session_secrets(first.authorization_url)
    assert await redis.exists(stack.client.store.keys.reply("bob", envelope.event_id))
    pending = await dump_redis(redis)
    callback = await approve(status.authorization_url, "alice")
    assert (await stack.callback(callback)).status_code == 200
    assert (await stack.client.status("alice")).state is State.PROVISIONED
    provisioned = await dump_redis(redis)
    for secret in secrets:
        assert secret not in pending
        assert secret not in provisioned


async def test_the_user_is_the_session_owner_not_a_parameter(stack):
    """8: a callback cannot name a user; the state decides whose session it completes."""
    status = await stack.client.request_provisioning("alice")
    callback = await approve(status.authorization_url, "alice")
    response = await stack.callback(callback + "&user=bob")
    assert response.status_code == 200
    assert (await stack.client.status("alice")).state is State.PROVISIONED
    assert (await stack.client.status("bob")).state is State.UNPROVISIONED


async def test_history_records_event_from_to_when_actor_reason_and_correlation(stack):
    """10: every transition is kept, readable by an operator."""
    await provision(stack, "alice")
    await stack.client.revoke("alice", actor="operator:root", reason="offboarding")
    history = await stack.client.history("alice")
    assert len(history) == 3
    last = history[-1]
    assert last["actor"] == "operator:root"
    assert last["reason"] == "offboarding"
    assert last["correlation_id"]
    assert all(h["at"].endswith("Z") for h in history)
    raw = await stack.client.pool.xrange(stack.client.store.keys.of("alice").stream)
    assert len(raw) == 3


async def test_without_a_worker_the_caller_gets_a_clear_error_not_a_hang(settings):
    async with ConsentClient(settings.with_changes(event_timeout=0.5)) as client:
        with pytest.raises(WorkerUnavailable, match="no worker answered"):
            await asyncio.wait_for(client.request_provisioning("alice"), timeout=5)
    # The event expired with the caller's patience: a worker started later does not apply it.
    assert (await _load(settings, "alice")).state is State.UNPROVISIONED


async def _load(settings, user):
    async with ConsentClient(settings) as client:
        await asyncio.sleep(1.2)
        from workers import ConsentWorker, worker_settings

        options = worker_settings(settings, settings.redis_url)
        options.update(burst=True, handle_signals=False)
        worker = ConsentWorker(**options)
        await worker.main()
        await worker.close()
        return await client.store.load(user)


async def test_every_transition_is_one_log_line_with_its_fields(stack):
    with capture_logs() as logs:
        await provision(stack, "alice")
        await stack.client.revoke("alice", reason="done")
    lines = [e for e in logs if e["event"] == "transition"]
    assert [(e["event_name"], e["from"], e["to"]) for e in lines] == [
        ("provision_requested", "unprovisioned", "pending"),
        ("authorization_completed", "pending", "provisioned"),
        ("revoke_requested", "provisioned", "revoked"),
    ]
    for e in lines:
        assert e["user"] == "alice"
        assert e["actor"]
        assert e["correlation_id"]
        assert "reason" in e
    assert lines[-1]["reason"] == "done"
