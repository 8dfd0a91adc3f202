"""``keys rotate``: re-encrypt every sealed field under the ring's first key, while workers run.

Each record is rewritten through the same versioned commit as any transition (no history entry),
so a rotation racing a refresh simply retries that record; nothing is ever half-written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._machine import Event, State
from ._model import CIPHER_FIELDS, Change
from ._queue import new_id

if TYPE_CHECKING:
    from ._client import ConsentClient

__all__ = ["rotate_keys"]

BATCH = 500
MAX_ATTEMPTS = 5


async def rotate_keys(client: ConsentClient) -> dict[str, Any]:
    ring = client.ring
    store = client.store
    purposes = {"tok": "tokens", "sess": "session", "rvk": "tokens"}
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
                    raw = await store.redis.hmget(store.keys.rec(user), list(CIPHER_FIELDS))
                    fields = {
                        name: (v.decode() if isinstance(v, bytes) else v)
                        for name, v in zip(CIPHER_FIELDS, raw, strict=True)
                        if v
                    }
                    stale = {n: v for n, v in fields.items() if ring.needs_rotation(v)}
                    if not stale:
                        break
                    fresh = {
                        n: ring.encrypt(
                            ring.decrypt(v, user=user, purpose=purposes[n]),
                            user=user,
                            purpose=purposes[n],
                        )
                        for n, v in stale.items()
                    }
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
                            set_fields=fresh,
                            record_history=False,
                        )
                    )
                    if result.ok:
                        rewritten += 1
                        break
    return {"records": records, "rewritten": rewritten, "primary_key_id": ring.primary_id}
