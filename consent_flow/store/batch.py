"""Taking a batch of due scheduled refreshes in one round trip (``lua/claim_batch.lua``).

Each shard of a provider has its schedule (``cf:{s<n>}:<provider>:sched``, by due time) feeding
its ready set (``...:ready``, by when each grant lapses), from which a worker takes the
soonest-lapsing, each under its user's lock, with the records read under the locks. See the
script for the lease that keeps a taken member scheduled.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from redis.exceptions import NoScriptError

from consent_flow.core.records import ConsentRecord
from consent_flow.core.table import State
from consent_flow.store import codec
from consent_flow.store.redis_store import Keys, RedisStore, _record
from consent_flow.store.scripts import lua, queue_script

__all__ = [
    "DRAIN_SLOT",
    "Backlog",
    "BatchClaimer",
    "Claim",
    "Claimed",
    "drain_key",
    "drain_rate",
    "read_backlog",
]

DRAIN_SLOT = 10  # seconds per drain-rate bucket
DRAIN_TTL = 180  # seconds a drain bucket is kept
PROMOTE_MAX = 1000  # due entries one claim moves into the ready set at most
# The record's fields the claim reads or marks, named by the codec: the refresh token's lapse,
# the access token's; the state; the time a refresh request was sent and not answered.
_LAPSE_FIELDS = (codec.field_name("refresh_expires_at"), codec.field_name("expires_at"))
_STATE_FIELD = codec.STATE
_INFLIGHT_FIELD = codec.field_name("inflight")


BACKLOG_LOOK = 50_000  # due connections the backlog's lapse count looks at, at most


@dataclass(frozen=True, slots=True)
class Backlog:
    """Due scheduled refreshes not yet taken, as ``stats``, ``/metrics`` and ``/ops`` show them."""

    due: int
    oldest_due_age: float | None  # seconds since the oldest of them fell due
    drain_per_s: float  # scheduled refreshes applied per second, over the last minute
    lapsing: int  # grants that lapse before their turn at that rate (of the first ``looked``)
    looked: int

    def public(self) -> dict[str, Any]:
        return {
            "due": self.due,
            "oldest_due_age_s": None
            if self.oldest_due_age is None
            else round(self.oldest_due_age, 1),
            "drain_per_s": round(self.drain_per_s, 2),
            "lapsing_before_turn": self.lapsing,
        }


async def read_backlog(redis: Any, keys: Keys, now: float) -> Backlog:
    """The backlog of ``keys``' provider, summed over its shards; ``now`` is Redis's time.

    Batches take from every shard alike, so each shard's lapse count assumes its share of the
    drain rate."""
    rate = await drain_rate(redis, keys, now)
    script = lua("backlog")
    async with redis.pipeline(transaction=False) as pipe:
        for shard in keys.every_shard():
            head, tail = shard.around_user("rec")
            pipe.eval(
                script,
                3,
                shard.sched,
                shard.ready,
                shard.ready_due,
                repr(rate / keys.shards),
                head,
                tail,
                max(1, BACKLOG_LOOK // keys.shards),
                *_LAPSE_FIELDS,
            )
        rows = await pipe.execute()
    oldest = [int(row[1]) for row in rows if row[1]]
    return Backlog(
        due=sum(int(row[0]) for row in rows),
        oldest_due_age=None if not oldest else max(0.0, now - min(oldest) / 1000),
        drain_per_s=rate,
        lapsing=sum(int(row[2]) for row in rows),
        looked=sum(int(row[3]) for row in rows),
    )


@dataclass(frozen=True, slots=True)
class Claimed:
    """A member of a batch: locked (``token``) with its record read under the lock, or not."""

    user: str
    token: str | None
    record: ConsentRecord | None


@dataclass(frozen=True, slots=True)
class Claim:
    now: float  # Redis's time of the claim
    halt: dict[str, str]  # the pause for everyone, as read
    members: list[Claimed] = field(default_factory=list)
    throttled_until: float = 0.0  # the provider's 429 pause as read with the claim (0: none)

    @property
    def locked(self) -> list[Claimed]:
        return [m for m in self.members if m.token is not None]


class BatchClaimer:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._claim = store.redis.register_script(lua("claim_batch"))
        self._affixes: dict[int, list[str]] = {}

    def _affix_args(self, shard: int) -> list[str]:
        """The text before and after the user in the shard's per-user keys the claim builds."""
        if shard not in self._affixes:
            k = self.store.keys.shard(shard)
            names = ("rec", *codec.SEALED_KEYS.values(), "lock")
            self._affixes[shard] = [part for name in names for part in k.around_user(name)]
        return self._affixes[shard]

    async def due(self, shards: Sequence[int], now: float) -> dict[int, int]:
        """How many refreshes wait in each of ``shards`` (ready, or due by ``now``, Redis's
        time), in one round trip: a lane claims where there is work."""
        now_ms = str(int(now * 1000))
        async with self.store.redis.pipeline(transaction=False) as pipe:
            for n in shards:
                k = self.store.keys.shard(n)
                pipe.zcard(k.ready)
                pipe.zcount(k.sched, "-inf", now_ms)
            counts = await pipe.execute()
        return {
            n: int(counts[2 * i]) + int(counts[2 * i + 1])
            for i, n in enumerate(shards)
            if int(counts[2 * i]) + int(counts[2 * i + 1])
        }

    async def claim(
        self, shard: int, want: int, *, lock_ttl: float, lease: float, throttle: str | None = None
    ) -> Claim:
        """Take up to ``want`` due members of ``shard``. The refresh pause and the provider's
        429 pause (the string key ``throttle``) are fleet-wide keys, so not the script's: they
        are read in the same round trip."""
        keys, args = self.claim_call(shard, want, lock_ttl=lock_ttl, lease=lease)
        for attempt in range(2):
            async with self.store.redis.pipeline(transaction=False) as pipe:
                queue_script(pipe, self._claim, keys, args, whole=bool(attempt))
                pipe.hgetall(self.store.keys.halt)
                if throttle is not None:
                    pipe.get(throttle)
                raw, halt, *until = await pipe.execute(raise_on_error=False)
            if isinstance(raw, NoScriptError) and not attempt:
                continue  # a server without the script yet (a new primary): nothing ran
            for answer in (raw, halt, *until):
                if isinstance(answer, BaseException):
                    raise answer
            break
        claim = self.claim_result(raw, halt)
        if until and until[0] is not None:
            claim = replace(claim, throttled_until=int(until[0]) / 1000)
        return claim

    def claim_call(
        self, shard: int, want: int, *, lock_ttl: float, lease: float
    ) -> tuple[list[str], list[Any]]:
        k = self.store.keys.shard(shard)
        args = [
            want,
            PROMOTE_MAX,
            int(lock_ttl * 1000),
            int(lease * 1000),
            secrets.token_hex(12),
            *self._affix_args(shard),
            *_LAPSE_FIELDS,
            _STATE_FIELD,
            _INFLIGHT_FIELD,
            State.PROVISIONED.value,
        ]
        return [k.sched, k.ready, k.ready_due], args

    @staticmethod
    def claim_result(raw: Any, halt: dict[Any, Any]) -> Claim:
        now_ms, taken = raw
        halt = {_text(k): _text(v) for k, v in halt.items()}
        members = []
        for item in taken:
            user = _text(item[0])
            if len(item) < 2 or not item[1]:
                members.append(Claimed(user, None, None))
                continue
            flat: list[Any] = item[2]
            tok = item[3] if len(item) > 3 else None
            rvk = item[4] if len(item) > 4 else None
            members.append(Claimed(user, _text(item[1]), _record(user, flat, tok, rvk)))
        return Claim(int(now_ms) / 1000, halt, members)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def drain_key(keys: Keys, slot: int) -> str:
    """Scheduled refreshes of ``keys``' provider applied in one ``DRAIN_SLOT``-second slot."""
    return f"{keys.prefix}:metrics:{keys.provider}:drain:{slot}"


async def drain_rate(redis: Any, keys: Keys, now: float, *, window: int = 60) -> float:
    """Scheduled refreshes applied per second over the last ``window`` seconds (whole slots
    before the current one)."""
    current = int(now // DRAIN_SLOT)
    slots = [current - 1 - i for i in range(max(1, window // DRAIN_SLOT))]
    # GETs in a pipeline, not one MGET: the slots' keys hash apart, and a cluster refuses an
    # MGET across slots (its pipeline sends each node its own).
    async with redis.pipeline(transaction=False) as pipe:
        for s in slots:
            pipe.get(drain_key(keys, s))
        values = await pipe.execute()
    return sum(int(v) for v in values if v is not None) / (len(slots) * DRAIN_SLOT)
