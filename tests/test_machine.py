"""The transition table is the one source of truth.

The pure walk: every (state, event, guards' values) cell answers what docs/design.md's table
says, written out here by hand. The engine walk: every event, driven through the engine on a
real Redis store from every state (an upgrade open or not, its session live or lapsed), commits
only rows of the table, and does what each row's effect says.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

import pytest
import redis.asyncio as aioredis

from consent_flow import TRANSITIONS, Event, InvalidTransition, State, mermaid
from consent_flow.core.records import guard_facts
from consent_flow.core.table import (
    UPGRADE_EFFECTS,
    ConsentMachine,
    Effect,
    Facts,
    Guard,
    Transition,
    all_facts,
)
from consent_flow.engine.engine import Engine
from consent_flow.oidc import TokenSet
from consent_flow.queue.bus import Envelope, new_id
from consent_flow.settings import Settings
from consent_flow.store.redis_store import RedisStore
from consent_flow.store.vault import KeyRing, generate_key, open_tokens

U, P, V, R = State.UNPROVISIONED, State.PENDING, State.PROVISIONED, State.REVOKED
X = Effect


def design(event: Event, state: State, f: Facts) -> tuple[State, Effect] | None:
    """docs/design.md "States and the table", cell by cell: (to, effect), None for a rejection."""
    if event is Event.PROVISION_REQUESTED:
        if state in (U, R):
            return P, X.OPEN_SESSION
        if state is P:
            return (P, X.SESSION_URL) if f.asked_in_session else (P, X.OPEN_SESSION)
        if f.asked_granted:
            return V, X.NOTHING
        return (V, X.SESSION_URL) if f.asked_in_session else (V, X.OPEN_UPGRADE)
    if event is Event.AUTHORIZATION_COMPLETED and f.session_matches:
        return {P: (V, X.STORE_GRANT), V: (V, X.REPLACE_GRANT)}.get(state)
    if event is Event.AUTHORIZATION_FAILED and f.session_matches:
        return {P: (U, X.DROP_SESSION), V: (V, X.DROP_UPGRADE)}.get(state)
    if event is Event.SESSION_EXPIRED and f.session_lapsed:
        return {P: (U, X.DROP_SESSION), V: (V, X.DROP_UPGRADE)}.get(state)
    if event is Event.TOKEN_REFRESHED and state is V:
        return V, X.STORE_REFRESHED
    if event is Event.REFRESH_REJECTED and state is V:
        return R, X.END_GRANT
    if event is Event.REVOKE_REQUESTED:
        return (R, X.REVOKE) if state in (P, V) else (state, X.NOTHING)
    if event is Event.GRANT_IMPORTED:
        return (V, X.IMPORT_GRANT) if state in (U, R) else (state, X.SKIP_IMPORT)
    return None


NO_OPS = {
    (P, Event.PROVISION_REQUESTED, X.SESSION_URL),
    (V, Event.PROVISION_REQUESTED, X.NOTHING),
    (V, Event.PROVISION_REQUESTED, X.SESSION_URL),
    (U, Event.REVOKE_REQUESTED, X.NOTHING),
    (R, Event.REVOKE_REQUESTED, X.NOTHING),
    (P, Event.GRANT_IMPORTED, X.SKIP_IMPORT),
    (V, Event.GRANT_IMPORTED, X.SKIP_IMPORT),
}


@pytest.fixture(scope="module")
def machine() -> ConsentMachine:
    return ConsentMachine()


CELLS = [(e, s, f) for e in Event for s in State for f in all_facts()]


@pytest.mark.parametrize(("event", "state"), [(e, s) for e in Event for s in State])
def test_every_cell_answers_what_the_design_says(machine, event, state):
    for facts in all_facts():
        expected = design(event, state, facts)
        if expected is None:
            with pytest.raises(InvalidTransition) as info:
                machine.decide(state, event, facts, user="alice")
            assert (info.value.user, info.value.event) == ("alice", event.value)
            continue
        row = machine.decide(state, event, facts)
        assert ((row.dest or state), row.effect) == expected, facts
        assert row.changes is ((state, event, row.effect) not in NO_OPS)


def test_the_walk_covers_upgrades_and_every_guard():
    # Each guard changes the answer of some cell: none is decoration.
    for guard in Guard:
        assert any(
            design(e, s, f) != design(e, s, replace(f, **{guard.value: not f.holds(guard)}))
            for e, s, f in CELLS
        ), guard
    upgrade_rows = [row for row in TRANSITIONS if row.effect in UPGRADE_EFFECTS]
    assert {row.event for row in upgrade_rows} == {
        Event.PROVISION_REQUESTED,
        Event.AUTHORIZATION_COMPLETED,
        Event.AUTHORIZATION_FAILED,
        Event.SESSION_EXPIRED,
    }
    assert all(row.sources == (V,) and row.dest is None for row in upgrade_rows)


def test_one_model_free_machine_is_asked_with_get_transitions(machine):
    assert machine._machine.models == []
    for event, state in itertools.product(Event, State):
        made = machine._machine.get_transitions(event.value, state.value)
        rows = [row for row in TRANSITIONS if row.event is event and state in row.sources]
        assert len(made) == len(rows)
        assert machine.allowed(state, event) is bool(rows)


def test_unknown_names_are_invalid_transitions(machine):
    with pytest.raises(InvalidTransition):
        machine.decide("nowhere", Event.PROVISION_REQUESTED)
    with pytest.raises(InvalidTransition):
        machine.decide(U, "explode")


def test_diagram_is_generated_from_the_table_upgrades_included():
    text = mermaid()
    assert text.startswith("stateDiagram-v2\n")
    edges = [line.strip() for line in text.splitlines()[2:]]
    expected = [
        f"{s.value} --> {(row.dest or s).value}: {row.label()}"
        + ("" if row.changes else " (no-op)")
        for row in TRANSITIONS
        for s in row.sources
    ]
    assert edges == expected
    assert "provisioned --> provisioned: authorization_completed (upgrade) [session_matches]" in (
        edges
    )
    assert "provisioned --> provisioned: session_expired (upgrade) [session_lapsed]" in edges


def test_an_ambiguous_table_is_refused():
    row = TRANSITIONS[0]
    with pytest.raises(ValueError, match="two rows"):
        ConsentMachine((row, row))
    overlapping = Transition(
        Event.PROVISION_REQUESTED, (P,), None, X.SESSION_URL, "", when=(Guard.ASKED_GRANTED,)
    )
    with pytest.raises(ValueError, match="two rows"):
        ConsentMachine((*TRANSITIONS, overlapping))


# --- the engine walk -------------------------------------------------------------------------


class StubProvider:
    """The provider calls the engine makes, answered in memory: what is walked here is the
    engine's decisions, not the protocol (test_upgrade and test_roundtrip run the real one)."""

    def __init__(self) -> None:
        self.issued = 0
        self.revoked: list[str] = []

    async def authorization_url(self, *, state, nonce, code_challenge, scopes=None) -> str:
        return "https://op.example/auth?" + urlencode({"state": state, "scope": " ".join(scopes)})

    async def exchange_code(self, code, *, code_verifier, scopes=None) -> TokenSet:
        self.issued += 1
        return TokenSet(
            access_token=f"at-{self.issued}",
            refresh_token=f"rt-{self.issued}",
            id_token="id",
            token_type="Bearer",
            expires_at=None,
            scopes=tuple(scopes or ()),
        )

    async def validate_id_token(self, id_token, *, nonce, expected_subject, access_token=None):
        return SimpleNamespace(subject=expected_subject or "alice")

    async def metadata(self) -> Any:
        return SimpleNamespace(revocation_endpoint="https://op.example/revoke")

    async def revoke(self, token: str, *, token_type_hint: str | None = None) -> None:
        self.revoked.append(token)


class Walk:
    def __init__(self, redis: Any, url: str) -> None:
        key = generate_key()
        self.settings = Settings.from_env(
            {
                "CONSENT_REDIS_URL": url,
                "CONSENT_REDIS_PREFIX": "w" + uuid.uuid4().hex[:10],
                "CONSENT_ISSUER": "https://op.example",
                "CONSENT_CLIENT_ID": "c",
                "CONSENT_CLIENT_SECRET": "s",
                "CONSENT_REDIRECT_URI": "http://127.0.0.1:1/cb",
                "CONSENT_SCOPES": "openid offline_access",
                "CONSENT_ENCRYPTION_KEYS": key,
                "CONSENT_SESSION_TTL": "300",
                # The walk's provider issues a separate grant per consent: the replaced one goes.
                "CONSENT_REVOKE_REPLACED_GRANT": "on",
            }
        )
        self.now = 1_900_000_000.0
        self.ring = KeyRing.from_strings([key])
        self.store = RedisStore(redis, prefix=self.settings.redis_prefix)
        self.oauth = StubProvider()
        self.engine = Engine(
            settings=self.settings,
            store=self.store,
            oauth=self.oauth,  # type: ignore[arg-type]
            ring=self.ring,
            clock=lambda: self.now,
        )
        self.committed: list[tuple[str, str, str]] = []
        commit = self.store.commit

        async def recording(change):  # type: ignore[no-untyped-def]
            result = await commit(change)
            if result.ok:
                self.committed.append(
                    (change.event.value, change.expect_state.value, change.to_state.value)
                )
            return result

        self.store.commit = recording  # type: ignore[method-assign]

    async def send(self, event: Event, user: str, **payload: str) -> Any:
        envelope = Envelope(event, user, "test", event_id=new_id(), reply=False, payload=payload)
        if event is Event.AUTHORIZATION_COMPLETED:
            sealed = self.ring.encrypt(b"code", user=user, purpose=f"code:{envelope.event_id}")
            await self.store.put_inbox(user, envelope.event_id, sealed)
        if event is Event.GRANT_IMPORTED:
            sealed = self.ring.encrypt(
                b"imported-rt", user=user, purpose=f"import:{envelope.event_id}"
            )
            await self.store.put_inbox(user, envelope.event_id, sealed)
        return await self.engine.handle(envelope)

    async def seed(self, user: str, start: str) -> None:
        """Bring ``user`` to ``start`` through the engine itself."""
        if start == "unprovisioned":
            return
        await self.send(Event.PROVISION_REQUESTED, user)
        if start == "pending":
            return
        rec = await self.store.load(user)
        await self.send(Event.AUTHORIZATION_COMPLETED, user, session_id=rec.session_id or "")
        if start == "revoked":
            await self.send(Event.REVOKE_REQUESTED, user)
        elif start == "upgrading":
            await self.send(Event.PROVISION_REQUESTED, user, scopes="notes:write")


STARTS = ["unprovisioned", "pending", "provisioned", "upgrading", "revoked"]
# (event, payload): the scopes asked, and whether a callback names the open session or another.
VARIANTS: list[tuple[Event, dict[str, str]]] = [
    (Event.PROVISION_REQUESTED, {}),
    (Event.PROVISION_REQUESTED, {"scopes": "notes:write"}),
    (Event.PROVISION_REQUESTED, {"scopes": "notes:delete"}),
    (Event.AUTHORIZATION_COMPLETED, {"session_id": "open"}),
    (Event.AUTHORIZATION_COMPLETED, {"session_id": "stale"}),
    (Event.AUTHORIZATION_FAILED, {"session_id": "open", "error": "access_denied"}),
    (Event.AUTHORIZATION_FAILED, {"session_id": "stale", "error": "access_denied"}),
    (Event.SESSION_EXPIRED, {}),
    (Event.REVOKE_REQUESTED, {}),
    (Event.GRANT_IMPORTED, {"scopes": "openid offline_access"}),
]


@pytest.fixture
async def walk(redis_server) -> AsyncIterator[Walk]:
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        yield Walk(client, redis_server.url)
    finally:
        await client.aclose()


async def test_the_engine_commits_only_table_rows_and_does_each_rows_effect(walk):
    seen_effects: set[Effect] = set()
    cells = 0
    for start, (event, payload), lapsed in itertools.product(STARTS, VARIANTS, (False, True)):
        user = f"u{uuid.uuid4().hex[:12]}"
        walk.now = 1_900_000_000.0
        await walk.seed(user, start)
        before = await walk.store.load(user)
        walk.now += walk.settings.session_ttl + 1 if lapsed else 1
        payload = dict(payload)
        if payload.get("session_id") == "open":
            payload["session_id"] = before.session_id or "none"
        asked = (
            tuple(payload.get("scopes", "").split()) if event is Event.PROVISION_REQUESTED else ()
        )
        facts = guard_facts(before, now=walk.now, asked=asked, session_id=payload.get("session_id"))
        try:
            row: Transition | None = walk.engine.machine.decide(before.state, event, facts)
        except InvalidTransition:
            row = None
        walk.committed.clear()
        revoked_before = len(walk.oauth.revoked)
        await walk.send(event, user, **payload)
        after = await walk.store.load(user)
        where = (start, event.value, payload, lapsed)
        cells += 1
        table = {
            (r.event.value, s.value, (r.dest or s).value)
            for r in TRANSITIONS
            if r.changes
            for s in r.sources
        }
        assert all(c in table for c in walk.committed), (where, walk.committed)
        if row is not None:
            seen_effects.add(row.effect)
        if row is None or not row.changes:
            assert after.version == before.version, where
            assert walk.committed == [], where
            continue
        source = before.state.value
        assert walk.committed == [(event.value, source, (row.dest or before.state).value)], where
        assert after.state is (row.dest or before.state), where
        if row.effect in (X.OPEN_SESSION, X.OPEN_UPGRADE):
            assert after.session_id not in (None, before.session_id), where
            assert set(asked) <= set(after.requested_scopes), where
        if row.effect is X.OPEN_UPGRADE:
            assert after.upgrading and after.tokens == before.tokens, where
        if row.effect in (X.DROP_UPGRADE, X.DROP_SESSION):
            assert after.session_id is None and after.requested_scopes == (), where
        if row.effect is X.DROP_UPGRADE:
            assert (after.tokens, after.scopes) == (before.tokens, before.scopes), where
            assert (after.reason or "").startswith("upgrade dropped"), where
        if row.effect in (X.STORE_GRANT, X.REPLACE_GRANT):
            assert after.tokens != before.tokens and after.session_id is None, where
        if row.effect is X.REPLACE_GRANT:
            old = open_tokens(walk.ring, user, before.tokens)["refresh_token"]
            assert old in walk.oauth.revoked[revoked_before:], where
            assert not after.upgrading and after.revocation_pending is None, where
        if row.effect is X.REVOKE:
            assert after.tokens is None and after.session_id is None, where
        shard = walk.store.keys.shard_of(user)
        upgrades = await walk.store.upgrades_due(walk.now + 10_000, shard=shard)
        assert (user in upgrades) is after.upgrading, where
    assert cells == len(STARTS) * len(VARIANTS) * 2
    # Every effect the engine applies for events from outside was walked (the refresher's own
    # two, token_refreshed and refresh_rejected, are walked by test_refresh).
    assert seen_effects == set(Effect) - {X.STORE_REFRESHED, X.END_GRANT}
