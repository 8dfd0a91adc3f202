"""Taking a batch of due scheduled refreshes in one round trip (``lua/claim_batch.lua``).

A provider's schedule (``cf:<provider>:sched``, by due time) feeds its ready set
(``cf:<provider>:ready``, by when each grant lapses), from which a worker takes the
soonest-lapsing, each under its user's lock, with the records read under the locks. See the
script for the lease that keeps a taken member scheduled.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from consent_flow.core.records import ConsentRecord
from consent_flow.core.table import State
from consent_flow.store import codec
from consent_flow.store.redis_store import Keys, RedisStore, _pairs, _record
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
    """The backlog of ``keys``' provider; ``now`` is Redis's time."""
    rate = await drain_rate(redis, keys, now)
    head, tail = _affixes(keys.rec("\x00"))
    due, oldest, lapsing, looked = await redis.eval(
        lua("backlog"),
        3,
        keys.sched,
        keys.ready,
        keys.ready_due,
        repr(rate),
        head,
        tail,
        BACKLOG_LOOK,
        *_LAPSE_FIELDS,
    )
    return Backlog(
        due=int(due),
        oldest_due_age=None if not oldest else max(0.0, now - int(oldest) / 1000),
        drain_per_s=rate,
        lapsing=int(lapsing),
        looked=int(looked),
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

    @property
    def locked(self) -> list[Claimed]:
        return [m for m in self.members if m.token is not None]


def _affixes(key: str) -> tuple[str, str]:
    """A per-user key's text before and after the user."""
    head, _, tail = key.partition("\x00")
    return head, tail


class BatchClaimer:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._claim = store.redis.register_script(lua("claim_batch"))
        k = store.keys
        marker = "\x00"
        self._affix_args: list[str] = []
        for key in (
            k.rec(marker),
            k.sealed(marker, codec.SEALED_KEYS["tokens"]),
            k.sealed(marker, codec.SEALED_KEYS["revocation_pending"]),
            k.lock(marker),
        ):
            self._affix_args += _affixes(key)

    async def claim(self, want: int, *, lock_ttl: float, lease: float) -> Claim:
        keys, args = self.claim_call(want, lock_ttl=lock_ttl, lease=lease)
        return self.claim_result(await self._claim(keys=keys, args=args))

    async def claim_into(
        self, pipe: Any, want: int, *, lock_ttl: float, lease: float, note: str
    ) -> None:
        """Queue the claim on ``pipe``, taking no more than the permits noted in ``note``."""
        keys, args = self.claim_call(want, lock_ttl=lock_ttl, lease=lease)
        queue_script(pipe, self._claim, [*keys, note], args)

    async def load_script(self) -> None:
        """Load the claim script (after a NoScriptError in a pipeline that sent its SHA)."""
        self._claim.sha = await self.store.redis.script_load(self._claim.script)

    def claim_call(
        self, want: int, *, lock_ttl: float, lease: float
    ) -> tuple[list[str], list[Any]]:
        k = self.store.keys
        args = [
            want,
            PROMOTE_MAX,
            int(lock_ttl * 1000),
            int(lease * 1000),
            secrets.token_hex(12),
            *self._affix_args,
            *_LAPSE_FIELDS,
            _STATE_FIELD,
            _INFLIGHT_FIELD,
            State.PROVISIONED.value,
        ]
        return [k.sched, k.ready, k.halt, k.ready_due], args

    @staticmethod
    def claim_result(raw: Any) -> Claim:
        now_ms, halt, taken = raw
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
        return Claim(int(now_ms) / 1000, _pairs(halt), members)


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
    values = await redis.mget([drain_key(keys, s) for s in slots])
    return sum(int(v) for v in values if v is not None) / (len(slots) * DRAIN_SLOT)
