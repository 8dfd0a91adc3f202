"""The store's small scripts on their own, against a real Redis, by their headers' contracts."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from consent_flow.store.clock import redis_time
from consent_flow.store.scripts import lua


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[Redis]:
    client = Redis(port=redis_server.port)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def p() -> str:
    return "ls" + uuid.uuid4().hex[:8]


async def run(redis: Redis, name: str, keys: list[str], args: list[Any] | None = None) -> Any:
    return await redis.register_script(lua(name))(keys=keys, args=args or [])


async def test_claim_session_is_single_use_checked_against_the_record_and_redis_time(redis, p):
    now = await redis_time(redis)
    rec, inbox = f"{p}:rec", f"{p}:in"

    async def claim(session: str, event: str, sealed: str = "") -> bytes:
        result: bytes = await run(
            redis, "claim_session", [rec, inbox + event], [session, event, sealed, 30]
        )
        return result

    assert await claim("s1", "e0") == b"not_pending"
    await redis.hset(rec, mapping={"state": "pending", "sid": "s1", "sexp": repr(now + 60)})
    assert await claim("other", "e0") == b"unknown_session"
    assert await redis.exists(inbox + "e0") == 0
    assert await claim("s1", "e1", "sealed code") == b"ok"
    assert await redis.get(inbox + "e1") == b"sealed code"
    assert 0 < await redis.ttl(inbox + "e1") <= 30
    assert await redis.hget(rec, "claimed") == b"e1"
    assert await claim("s1", "e2", "another code") == b"already_used"
    assert await redis.exists(inbox + "e2") == 0
    await redis.hdel(rec, "claimed")
    await redis.hset(rec, "sexp", repr(now - 1))
    assert await claim("s1", "e3", "late code") == b"expired"
    assert await redis.exists(inbox + "e3") == 0


async def test_release_lock_only_for_its_owner(redis, p):
    await redis.set(f"{p}:lock", "owner")
    assert await run(redis, "release_lock", [f"{p}:lock"], ["someone else"]) == 0
    assert await redis.get(f"{p}:lock") == b"owner"
    assert await run(redis, "release_lock", [f"{p}:lock"], ["owner"]) == 1
    assert await redis.exists(f"{p}:lock") == 0
    assert await run(redis, "release_lock", [f"{p}:lock"], ["owner"]) == 0


async def test_lock_and_load_takes_a_free_lock_once_and_reads_either_way(redis, p):
    keys = [f"{p}:lock", f"{p}:rec", f"{p}:tok", f"{p}:rvk"]
    await redis.hset(f"{p}:rec", "state", "provisioned")
    await redis.set(f"{p}:tok", b"\x02sealed")
    got, rec, tok, rvk = await run(redis, "lock_and_load", keys, ["first", 5000])
    assert (got, rec, tok, rvk) == (1, [b"state", b"provisioned"], b"\x02sealed", None)
    assert 0 < await redis.pttl(f"{p}:lock") <= 5000
    got, rec, *_ = await run(redis, "lock_and_load", keys, ["second", 5000])
    assert got == 0 and rec == [b"state", b"provisioned"]
    assert await redis.get(f"{p}:lock") == b"first"


async def test_load_record_reads_the_hash_and_both_sealed_keys(redis, p):
    await redis.hset(f"{p}:rec", "state", "revoked")
    await redis.set(f"{p}:rvk", b"\x02to revoke")
    keys = [f"{p}:rec", f"{p}:tok", f"{p}:rvk"]
    assert await run(redis, "load_record", keys) == [
        [b"state", b"revoked"],
        None,
        b"\x02to revoke",
    ]


async def test_drop_revoked_compares_then_deletes_notes_and_counts(redis, p):
    rec, rvk, kids, outbox, counts = (f"{p}:{n}" for n in ("rec", "rvk", "kids", "out", "n"))
    keys = [rec, rvk, kids, outbox, counts]
    await redis.hset(rec, mapping={"state": "revoked", "rvktries": "3"})
    await redis.set(rvk, b"\x02newer")
    await redis.hset(kids, "k1", 1)
    await redis.zadd(outbox, {"alice": 1.0})
    assert await run(redis, "drop_revoked", keys, [b"\x02older", "k1", "alice", "done"]) == 0
    assert await redis.get(rvk) == b"\x02newer"  # a later revocation's tokens stay
    assert await redis.hget(rec, "rvktries") == b"3"
    assert await run(redis, "drop_revoked", keys, [b"\x02newer", "k1", "alice", "abandoned"]) == 1
    assert await redis.exists(rvk) == 0
    assert await redis.hgetall(rec) == {b"state": b"revoked", b"provrev": b"abandoned"}
    assert await redis.hget(kids, "k1") == b"0"
    assert await redis.zscore(outbox, "alice") is None
    assert await redis.hgetall(counts) == {b"abandoned": b"1"}
    # Provisioned again meanwhile: the old tokens go, the record says nothing of them.
    await redis.hset(rec, mapping={"state": "pending"})
    await redis.hdel(rec, "provrev")
    await redis.set(rvk, b"\x02old")
    assert await run(redis, "drop_revoked", keys, [b"\x02old", "k1", "alice", "done"]) == 1
    assert await redis.hget(rec, "provrev") is None


async def test_trim_history_drops_old_entries_and_keeps_the_index_true(redis, p):
    histidx = f"{p}:histidx"
    for user, times in (("old", (10.0, 20.0)), ("mixed", (10.0, 50.0)), ("new", (60.0,))):
        hist = f"{p}:{{{user}}}:hist"
        await redis.rpush(hist, *(json.dumps({"event": "x", "at": at}) for at in times))
        await redis.zadd(histidx, {user: times[0]})
    assert await run(redis, "trim_history", [histidx], [f"{p}:{{", "30", 10, "}:hist"]) == 3
    assert await redis.exists(f"{p}:{{old}}:hist") == 0
    assert await redis.llen(f"{p}:{{mixed}}:hist") == 1
    assert await redis.zrange(histidx, 0, -1, withscores=True) == [(b"mixed", 50.0), (b"new", 60.0)]
