"""The store contract, held by the Redis store and the in-memory one alike (invariant 1, 2, 10)."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis

from consent_flow import Event, State
from consent_flow._model import Change, ConsentRecord, HistoryEntry
from consent_flow._store import MemoryStore, RedisStore


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
            set_fields={"sid": "s1", "sexp": "2000"},
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
    assert await store.session_owner("digest1") == ("alice", "s1")
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
    first = change(rec, Event.PROVISION_REQUESTED, State.PENDING, set_fields={"sid": "a"})
    second = change(rec, Event.PROVISION_REQUESTED, State.PENDING, set_fields={"sid": "b"})
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


async def test_no_history_for_silent_commits(store):
    rec = await store.load("dave")
    await store.commit(change(rec, Event.PROVISION_REQUESTED, State.PENDING))
    rec = await store.load("dave")
    await store.commit(
        change(
            rec,
            Event.PROVISION_REQUESTED,
            State.PENDING,
            set_fields={"sid": "z"},
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
            set_fields={"sid": "s", "sexp": "9999999999"},
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
        change(rec, Event.PROVISION_REQUESTED, State.PENDING, set_fields={"sid": "s", "sexp": "1"})
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


async def test_users_are_paginated_in_since_order(store):
    for i in range(5):
        rec = await store.load(f"u{i}")
        await store.commit(change(rec, Event.PROVISION_REQUESTED, State.PENDING, at=100.0 + i))
    page1 = await store.users(State.PENDING, offset=0, limit=2)
    page2 = await store.users(State.PENDING, offset=2, limit=2)
    assert [u for u, _ in page1 + page2] == ["u0", "u1", "u2", "u3"]
