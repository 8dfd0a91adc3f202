"""commit.lua on its own, against a real Redis: the step is built here by hand, by its header's
contract (named key positions, absent means no), not by the store."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from consent_flow.store.scripts import lua

SEALED = b"\x02" + bytes.fromhex("a1b2c3d4e5f6") + b"sealed tokens"
OTHER = b"\x02" + bytes.fromhex("0f0e0d0c0b0a") + b"the other tokens"


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[Redis]:
    client = Redis(port=redis_server.port)
    try:
        yield client
    finally:
        await client.aclose()


class Step:
    """One call of the commit script: keys by name, the op, binary arguments."""

    def __init__(self, prefix: str, **op: Any) -> None:
        self.prefix = prefix
        self.keys: list[str] = []
        self.args: list[bytes] = []
        self.op: dict[str, Any] = {
            "keys": {},
            "user": "alice",
            "event_id": uuid.uuid4().hex,
            "expect_state": "unprovisioned",
            "expect_v": 0,
            "set": {"state": "pending"},
            "del": [],
            "cipher": ["sess"],
            "seal": {},
            "wipe": {},
            "compact_entries": 128,
            "compact_value": 64,
            "channel": f"{prefix}:invalidate",
            "invalidation": "gh\nalice",
            "provider": "gh",
            "since": "1000.0",
            "at": "1000.0",
            "hist_max": "100",
            "stream_max": "100",
            "seen_max": "100",
            "seen_after": "0",
            "seen_ttl": "3600",
        }
        for name in (
            "rec",
            "hist",
            "seen",
            "idx_from",
            "idx_to",
            "sched",
            "kids",
            "stream",
            "histidx",
            "outbox",
            "transitions",
            "tokens",
            "revoke",
        ):
            self.name(name, f"{prefix}:{name}")
        self.op.update(op)

    def key(self, key: str) -> int:
        self.keys.append(key)
        return len(self.keys)

    def name(self, name: str, key: str) -> None:
        self.op["keys"][name] = self.key(key)

    def arg(self, value: bytes) -> int:
        self.args.append(value)
        return len(self.args) + 1

    async def run(self, redis: Redis) -> list[Any]:
        script = redis.register_script(lua("enqueue_function") + lua("commit"))
        return await script(keys=self.keys, args=[json.dumps(self.op), *self.args])  # type: ignore[no-any-return]


async def dump(redis: Redis, prefix: str) -> dict[bytes, Any]:
    """Every key under ``prefix`` with its value, to compare before and after."""
    out: dict[bytes, Any] = {}
    async for key in redis.scan_iter(match=f"{prefix}*"):
        out[key] = await redis.dump(key)
    return out


def prefix() -> str:
    return "lc" + uuid.uuid4().hex[:8]


async def test_a_step_applies_fields_sealed_keys_indexes_history_and_its_version(redis):
    p = prefix()
    step = Step(
        p,
        moved=True,
        schedule="5000",
        hist=json.dumps({"event": "provision_requested", "at": 1000.0}),
        event_name="provision_requested",
        metric="provision_requested|unprovisioned|pending",
    )
    step.op["seal"] = {"tokens": step.arg(SEALED)}
    assert await step.run(redis) == [b"ok", 1]
    assert await redis.hgetall(f"{p}:rec") == {b"state": b"pending", b"v": b"1"}
    assert await redis.get(f"{p}:tokens") == SEALED
    assert await redis.zscore(f"{p}:idx_to", "alice") == 1000.0
    assert await redis.zscore(f"{p}:idx_from", "alice") is None
    assert await redis.zscore(f"{p}:sched", "alice") == 5000.0
    assert await redis.zscore(f"{p}:seen", step.op["event_id"]) == 1000.0
    assert await redis.llen(f"{p}:hist") == 1 and await redis.xlen(f"{p}:stream") == 1
    assert await redis.hgetall(f"{p}:kids") == {b"a1b2c3d4e5f6": b"1"}
    assert await redis.hget(f"{p}:transitions", step.op["metric"]) == b"1"


async def test_a_step_that_read_another_version_commits_nothing_not_even_what_rides_along(redis):
    p = prefix()
    first = Step(p)
    assert (await first.run(redis))[0] == b"ok"
    await redis.set(f"{p}:lock", "owner")
    before = await dump(redis, p)
    stale = Step(
        p,
        set={"state": "pending", "sid": "x"},
        moved=True,
        schedule="5000",
        hist=json.dumps({"event": "provision_requested", "at": 1000.0}),
        event_name="provision_requested",
        metric="m",
        unlock="owner",
        reply='{"result":"applied"}',
        reply_ttl="60",
    )
    stale.name("lock", f"{p}:lock")
    stale.name("reply", f"{p}:reply")
    stale.op["seal"] = {"tokens": stale.arg(SEALED)}
    job = {
        "job_key": stale.key(f"{p}:job:j1"),
        "result_key": stale.key(f"{p}:result:j1"),
        "queue": stale.key(f"{p}:queue"),
        "payload": stale.arg(b"payload"),
        "px": "60000",
        "score": "",
        "id": "j1",
    }
    stale.op["jobs"] = [job]
    stale.op["counters"] = [{"key": stale.key(f"{p}:counts"), "field": "f", "amount": "1"}]
    assert await stale.run(redis) == [b"conflict", 1, b"pending"]
    assert await dump(redis, p) == before  # no field, key, job, reply, counter; lock kept


async def test_an_event_applied_before_is_a_duplicate_that_changes_nothing(redis):
    p = prefix()
    first = Step(p)
    assert (await first.run(redis))[0] == b"ok"
    before = await dump(redis, p)
    again = Step(p, event_id=first.op["event_id"], expect_state="pending", expect_v=1)
    again.name("reply", f"{p}:reply")
    again.op.update(reply="{}", reply_ttl="60")
    assert await again.run(redis) == [b"duplicate", 1]
    assert await dump(redis, p) == before


async def test_the_reply_jobs_counters_and_lock_ride_along_when_it_applies(redis):
    p = prefix()
    await redis.set(f"{p}:lock", "owner")
    await redis.set(f"{p}:job:held", "arq still holds it")
    step = Step(p, unlock="owner", reply='{"result":"applied"}', reply_ttl="60")
    step.name("lock", f"{p}:lock")
    step.name("reply", f"{p}:reply")
    step.op["jobs"] = [
        {
            "job_key": step.key(f"{p}:job:{name}"),
            "result_key": step.key(f"{p}:result:{name}"),
            "queue": step.key(f"{p}:queue"),
            "payload": step.arg(name.encode()),
            "px": "60000",
            "score": "7000",
            "id": name,
        }
        for name in ("new", "held")
    ]
    step.op["counters"] = [
        {"key": step.key(f"{p}:counts"), "field": "whole", "amount": "2"},
        {"key": step.key(f"{p}:counts"), "field": "part", "amount": "0.5"},
    ]
    assert (await step.run(redis))[0] == b"ok"
    assert await redis.lrange(f"{p}:reply", 0, -1) == [b'{"result":"applied"}']
    assert 0 < await redis.ttl(f"{p}:reply") <= 60
    assert await redis.get(f"{p}:job:new") == b"new"
    assert await redis.zrange(f"{p}:queue", 0, -1, withscores=True) == [(b"new", 7000.0)]
    assert await redis.get(f"{p}:job:held") == b"arq still holds it"  # not queued twice
    assert await redis.hgetall(f"{p}:counts") == {b"whole": b"2", b"part": b"0.5"}
    assert await redis.exists(f"{p}:lock") == 0


async def test_the_lock_is_released_only_for_its_owner(redis):
    p = prefix()
    await redis.set(f"{p}:lock", "someone else")
    step = Step(p, unlock="owner")
    step.name("lock", f"{p}:lock")
    assert (await step.run(redis))[0] == b"ok"
    assert await redis.get(f"{p}:lock") == b"someone else"


async def test_tokens_moved_to_the_outbox_are_counted_published_and_queued_for_revocation(redis):
    p = prefix()
    first = Step(p)
    first.op["seal"] = {"tokens": first.arg(SEALED)}
    assert (await first.run(redis))[0] == b"ok"
    pubsub = redis.pubsub()
    await pubsub.subscribe(f"{p}:invalidate")
    revoke = Step(p, expect_state="pending", expect_v=1, set={"state": "revoked"}, at="2000.0")
    revoke.op["seal"] = {"revoke": revoke.arg(SEALED)}
    revoke.op["wipe"] = {"tokens": True}
    assert await revoke.run(redis) == [b"ok", 2]
    assert await redis.exists(f"{p}:tokens") == 0
    assert await redis.get(f"{p}:revoke") == SEALED
    assert await redis.zscore(f"{p}:outbox", "alice") == 2000.0
    assert await redis.hgetall(f"{p}:kids") == {b"a1b2c3d4e5f6": b"1"}  # moved, not doubled
    messages = []
    async with pubsub:
        while (message := await pubsub.get_message(timeout=1.0)) is not None:
            messages.append(message)
    assert any(m["type"] == "message" and m["data"] == b"gh\nalice" for m in messages)
    # Re-sealed under another key: the counts follow the key ids.
    rotate = Step(p, expect_state="revoked", expect_v=2, set={"state": "revoked"})
    rotate.op["seal"] = {"revoke": rotate.arg(OTHER)}
    assert (await rotate.run(redis))[0] == b"ok"
    assert await redis.hgetall(f"{p}:kids") == {b"a1b2c3d4e5f6": b"0", b"0f0e0d0c0b0a": b"1"}


async def test_refreshes_in_a_row_share_one_history_entry_the_stream_has_each(redis):
    p = prefix()
    version = 0
    for i in range(3):
        step = Step(
            p,
            expect_state="unprovisioned" if version == 0 else "provisioned",
            expect_v=version,
            set={"state": "provisioned"},
            hist=json.dumps({"event": "token_refreshed", "at": 1000.0 + i}),
            event_name="token_refreshed",
            collapse=True,
            metric="m",
        )
        status, version = await step.run(redis)
        assert status == b"ok"
    [entry] = await redis.lrange(f"{p}:hist", 0, -1)
    assert json.loads(entry) == {
        "event": "token_refreshed",
        "at": 1002.0,
        "count": 3,
        "first_at": 1000.0,
    }
    assert await redis.xlen(f"{p}:stream") == 3


async def test_a_hash_that_held_a_long_value_takes_the_compact_encoding_again(redis):
    p = prefix()
    long = Step(p, set={"state": "pending", "reason": "x" * 200})
    assert (await long.run(redis))[0] == b"ok"
    assert await redis.object("encoding", f"{p}:rec") == b"hashtable"
    short = Step(
        p, expect_state="pending", expect_v=1, set={"state": "pending"}, **{"del": ["reason"]}
    )
    assert (await short.run(redis))[0] == b"ok"
    assert await redis.object("encoding", f"{p}:rec") in (b"listpack", b"ziplist")
