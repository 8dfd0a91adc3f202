"""``keys rotate``: re-encrypt every sealed value under the ring's first key, while workers run.

Each record is rewritten through the same versioned commit as any transition (no history entry),
so a rotation racing a refresh simply retries that record; nothing is ever half-written. Tokens
still in an earlier version's layout (v1 text in the record hash) move into their own keys in
the v2 layout on the way, whatever key sealed them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._machine import Event, State
from ._model import Change
from ._queue import new_id
from ._vault import KeyRing, open_tokens, seal_tokens

if TYPE_CHECKING:
    from ._client import ConsentClient

__all__ = ["rotate_keys"]

BATCH = 500
MAX_ATTEMPTS = 5


async def rotate_keys(client: ConsentClient) -> dict[str, Any]:
    ring = client.ring
    store = client.store
    records = rewritten = 0
    for state in State:
        offset = 0
        while True:
            page = await store.users(state, offset=offset, limit=BATCH)
            if not page:
                break
            offset += len(page)
            for user, _ in page:
                records += 1
                for _attempt in range(MAX_ATTEMPTS):
                    rec = await store.load(user)
                    set_fields: dict[str, str] = {}
                    sealed: dict[str, bytes] = {}
                    if rec.session is not None and ring.needs_rotation(rec.session):
                        plain = ring.decrypt(rec.session, user=user, purpose="session")
                        set_fields["sess"] = ring.encrypt(plain, user=user, purpose="session")
                    for name, value in (("tok", rec.tokens), ("rvk", rec.revocation_pending)):
                        if value is not None and (
                            ring.needs_rotation(value) or not KeyRing.is_binary(value)
                        ):
                            sealed[name] = seal_tokens(ring, user, open_tokens(ring, user, value))
                    if not set_fields and not sealed:
                        break
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
                            set_fields=set_fields,
                            sealed=sealed,
                            record_history=False,
                        )
                    )
                    if result.ok:
                        rewritten += 1
                        break
    return {"records": records, "rewritten": rewritten, "primary_key_id": ring.primary_id}
