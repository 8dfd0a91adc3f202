"""Seed many users in every state through the store's real commit path (fast, no provider)."""

from __future__ import annotations

import time
import uuid

from consent_flow import Event, State
from consent_flow.core.records import Change
from consent_flow.store.redis_store import RedisStore

PATHS: dict[State, list[tuple[Event, State]]] = {
    State.PENDING: [(Event.PROVISION_REQUESTED, State.PENDING)],
    State.PROVISIONED: [
        (Event.PROVISION_REQUESTED, State.PENDING),
        (Event.AUTHORIZATION_COMPLETED, State.PROVISIONED),
    ],
    State.UNPROVISIONED: [
        (Event.PROVISION_REQUESTED, State.PENDING),
        (Event.AUTHORIZATION_FAILED, State.UNPROVISIONED),
    ],
    State.REVOKED: [
        (Event.PROVISION_REQUESTED, State.PENDING),
        (Event.AUTHORIZATION_COMPLETED, State.PROVISIONED),
        (Event.REVOKE_REQUESTED, State.REVOKED),
    ],
}


async def seed(
    store: RedisStore, counts: dict[State, int], *, start: float | None = None, prefix: str = ""
) -> list[str]:
    """Users named ``<prefix><state>-<n>``, walked through their state's path; returns them."""
    at = start or time.time() - 3600
    users = []
    for state, count in counts.items():
        for n in range(count):
            user = f"{prefix}{state.value}-{n:04d}"
            users.append(user)
            for event, to in PATHS[state]:
                rec = await store.load(user)
                at += 0.001
                result = await store.commit(
                    Change(
                        user=user,
                        event=event,
                        event_id=uuid.uuid4().hex,
                        expect_state=rec.state,
                        expect_version=rec.version,
                        to_state=to,
                        actor="seed",
                        at=at,
                        reason="access_denied" if event is Event.AUTHORIZATION_FAILED else None,
                        correlation_id=uuid.uuid4().hex,
                    )
                )
                assert result.ok
    return users
