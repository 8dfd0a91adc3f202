"""``keys rotate``: re-encrypt every sealed value under the ring's first key, while workers run.

Each record is rewritten through the same versioned commit as any transition (no history entry),
under the user's lock like anything else that rewrites a connection's tokens: a refresh in flight
finishes first, and the rotation then re-seals what it stored. Nothing is ever half-written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from consent_flow.core.records import Change, RecordFields
from consent_flow.core.table import Event, State
from consent_flow.engine.engine import LOCK_TTL_FACTOR, LOCK_WAIT_EXTRA, UserLock
from consent_flow.errors import ProviderUnavailable
from consent_flow.queue.bus import new_id
from consent_flow.store.redis_store import RedisStore
from consent_flow.store.vault import KeyRing, open_tokens, seal_tokens

if TYPE_CHECKING:
    from consent_flow.client import ConsentClient

__all__ = ["rotate_keys"]

BATCH = 500
MAX_ATTEMPTS = 5


async def rotate_keys(client: ConsentClient) -> dict[str, Any]:
    """Re-seal every connection's record, at every configured provider, under the ring's first
    key. Users whose lock stayed taken (a refresh waiting for its commit) are counted in
    ``skipped``: run it again for them."""
    totals = {"records": 0, "rewritten": 0, "skipped": 0}
    for provider in client.providers:
        counts = await _rotate_provider(client, provider)
        for name in totals:
            totals[name] += counts[name]
    return {**totals, "primary_key_id": client.ring_for(client.providers[0]).primary_id}


async def _rotate_provider(client: ConsentClient, provider: str) -> dict[str, int]:
    ring = client.ring_for(provider)
    store = client.store_for(provider)
    lock_ttl = LOCK_TTL_FACTOR * client.settings.http_timeout
    records = rewritten = skipped = 0
    for state in State:
        offset = 0
        while True:
            page = await store.users(state, offset=offset, limit=BATCH)
            if not page:
                break
            offset += len(page)
            for user, _ in page:
                records += 1
                lock = UserLock(store, user, ttl=lock_ttl, wait=lock_ttl + LOCK_WAIT_EXTRA)
                try:
                    async with lock:
                        rewritten += await _rotate_one(store, ring, user)
                except ProviderUnavailable:
                    skipped += 1
    return {"records": records, "rewritten": rewritten, "skipped": skipped}


async def _rotate_one(store: RedisStore, ring: KeyRing, user: str) -> int:
    """Re-seal one user's ciphertexts, under the user's lock. Returns 1 if it rewrote them."""
    for _attempt in range(MAX_ATTEMPTS):
        rec = await store.load(user)
        fields: RecordFields = {}
        if rec.session is not None and ring.needs_rotation(rec.session):
            plain = ring.decrypt(rec.session, user=user, purpose="session")
            fields["session"] = ring.encrypt(plain, user=user, purpose="session")
        if rec.tokens is not None and ring.needs_rotation(rec.tokens):
            fields["tokens"] = seal_tokens(ring, user, open_tokens(ring, user, rec.tokens))
        pending = rec.revocation_pending
        if pending is not None and ring.needs_rotation(pending):
            fields["revocation_pending"] = seal_tokens(ring, user, open_tokens(ring, user, pending))
        if not fields:
            return 0
        result = await store.commit(
            Change(
                user=user,
                event=Event.TOKEN_REFRESHED,
                event_id=new_id(),
                expect_state=rec.state,
                expect_version=rec.version,
                to_state=rec.state,
                actor="operator",
                at=rec.since or 0.0,
                fields=fields,
                record_history=False,
            )
        )
        if result.ok:
            return 1
    return 0
