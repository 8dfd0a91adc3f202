"""The state store: a ``Protocol`` with a Redis implementation and an in-memory one for fast tests.

Redis layout (``cf`` is ``CONSENT_REDIS_PREFIX``, ``gh`` a provider's name; a connection is one
user's grant at one provider). Connections are spread over ``CONSENT_REDIS_SHARDS`` shards by
user (``crc32(user) % shards``, every provider alike), and ``{s7}`` is shard 7's hash tag: every
key of a shard hashes to one Redis Cluster slot, so every script below stays in one slot::

    cf:{s7}:gh:u:alice:rec      hash   the record (state, version, since, sealed session,
                                       schedule)
    cf:{s7}:gh:u:alice:tok      string the sealed tokens (binary; apart, so the record hash stays
                                       in Redis's compact encoding)
    cf:{s7}:gh:u:alice:rvk      string sealed tokens still to revoke at the provider (binary)
    cf:{s7}:gh:u:alice:hist     list   history entries, oldest first (JSON)
    cf:{s7}:gh:u:alice:seen     zset   event ids already applied (exactly-once effect), scored by
                                       time, kept for the queue's redelivery window (SEEN_WINDOW)
    cf:{s7}:gh:u:alice:in:<id>  string sealed authorization code waiting for its event (short TTL)
    cf:{s7}:gh:u:alice:lock     string single-flight lock for provider calls, value = owner token
    cf:{s7}:gh:idx:<state>      zset   the shard's users in that state at gh, scored by since
                                       (list, stats: no KEYS scans)
    cf:{s7}:gh:sched            zset   users by next refresh due time at gh, in epoch ms (a
                                       refresh a batch took: its lease, due again if its worker
                                       dies)
    cf:{s7}:gh:ready            zset   due refreshes waiting for a batch, by when the grant
                                       lapses (ms)
    cf:{s7}:gh:ready:due        zset   the same, by when each fell due (ms): the backlog's age
    cf:{s7}:gh:histidx          zset   users by the time of their oldest history entry
    cf:{s7}:gh:outbox           zset   users with tokens still to revoke at gh, by next try
    cf:{s7}:gh:upgrades         zset   users with an upgrade session open at gh, by its expiry
    cf:{s7}:gh:sess:<sha256>    string "user\nsession id" for a live authorization session's
                                       state (the state names its shard: "7.<random>")
    cf:{s7}:gh:metrics:*        hash   counters for /metrics and stats (transitions, refresh
                                       outcomes, lead time buckets, per-hour failures and
                                       rejections, provider revocations by outcome)
    cf:{s7}:gh:kids             hash   ciphertext count per key id (start-up key check, rotation)
    cf:{s7}:gh:events           stream every transition, for `tail` and other consumers (bounded)
    cf:{s7}:reply:<event id>    list   a caller's answer
    cf:{s7}:replicated          string a counter each WAIT follows, on the connection of the
                                       write it covers (CONSENT_REDIS_WAIT_REPLICAS)
    cf:{gh:limit}:log|leases|pause     the provider's fleet-wide call limits (a tag of their own)
    cf:gh:halt                  hash   refreshes at gh paused for everyone: invalid_client
                                       (reason, since); read beside scripts, never in one
    cf:gh:check                 hash   why gh's discovery document cannot be used now (url,
                                       problem, reach, since)
    cf:gh:import:<digest>       string ``consent-flow import``'s place in one source
    cf:metrics:webhooks         hash   webhook deliveries by outcome: delivered, retried, dead
    cf:metrics:worker           hash   Redis outages the workers rode out, deferred commits
    {cf:workers}                zset   worker ids by last heartbeat (Redis's time)
    {cf:workers}:clock          hash   worker id -> its clock's offset from Redis's time (s)
    cf:invalidate               pubsub "provider\nuser" of connections whose cached tokens must
                                       be dropped (published by commits)
    cf:shards                   string the shard count the data was laid out for

Each shard has its arq queue, ``<queue name>:{s7}``, and every job id starts with its shard's
tag (``{s7}:refresh:cf:gh:alice:<due ms>``, ``{s7}:ev:<id>``): arq's job, in-progress, retry
and result keys of a job land in its shard's slot. A user's jobs go to the user's shard; jobs
about no connection (cron) to shard 0.

Every time stored here is Redis's time (``TIME`` in scripts, a ``RedisClock`` in Python), never
the writing process's own clock: processes whose clocks disagree still agree on what is due.

The record hash's fields are the codec's (``codec.py``): the store passes what it writes and
reads through it, and nothing outside the store names a field.

A transition is one Lua script (``lua/commit.lua``): the version check, the fields, the sealed
tokens, the indexes, the schedule, the history entry and the stream entry commit together or not
at all (one writer wins); a commit also queues the arq jobs it carries (the next refresh, a
webhook notice; ``queue/commit_jobs.py`` makes them from the change's domain values), counts,
releases the user's lock and pushes the caller's answer, only if it applies.
A record is read in one round trip too, hash and sealed keys alike (with the lock taken, for a
refresh).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import secrets
import time
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from consent_flow.core.connections import DEFAULT_PROVIDER
from consent_flow.core.records import (
    Change,
    CommitResult,
    ConsentRecord,
    HistoryEntry,
    Job,
    ProviderRevocation,
    RefreshCount,
    RefreshJob,
)
from consent_flow.core.table import Event, State
from consent_flow.errors import SettingsError
from consent_flow.queue.jobs import REDELIVERY_WINDOW, score_arg
from consent_flow.settings import DEFAULT_REDIS_SHARDS
from consent_flow.store import codec
from consent_flow.store.scripts import lua, queue_script
from consent_flow.store.vault import KeyRing

__all__ = [
    "DEFAULT_SHARDS",
    "SEEN_MAX_EVENTS",
    "SEEN_WINDOW",
    "Keys",
    "MemoryStore",
    "RedisStore",
    "ShardKeys",
    "Store",
    "check_shards",
    "due_ms",
    "job_shard",
    "session_shard",
    "session_state",
    "shard_job_id",
    "shard_tag",
    "state_hash",
]

if TYPE_CHECKING:
    from consent_flow.queue.commit_jobs import CommitJobs

log = structlog.get_logger("consent_flow.transitions")

DEFAULT_SHARDS = DEFAULT_REDIS_SHARDS
HISTORY_MAX_ENTRIES = 1000  # a hard cap on top of the time-based retention
# Event ids are remembered per user for the queue's whole redelivery window (pruned by age), so a
# redelivered event never applies twice however many came after it; the count cap only bounds
# memory and sits far above what the window holds (a refresh a second for the whole window).
SEEN_WINDOW = REDELIVERY_WINDOW
SEEN_MAX_EVENTS = 10_000
STREAM_MAX_ENTRIES = 100_000  # approximate cap of the transition stream
INBOX_TTL = 120  # seconds a sealed code waits for its worker
# Milliseconds a commit that stores tokens waits for its replicas (CONSENT_REDIS_WAIT_REPLICAS):
# they answer within a round trip when they are there; when they are not, the commit is kept
# in the worker's spool until a later read shows it on the primary that remains.
REPLICA_WAIT_MS = 100
REPLY_TTL = 60  # seconds a reply waits for a caller that stopped listening

# Redis's defaults for a hash's compact (listpack) encoding: hash-max-listpack-entries and
# hash-max-listpack-value. A record within them takes about half the memory.
COMPACT_HASH_ENTRIES = 128
COMPACT_HASH_VALUE = 64


# Upper bounds, in seconds, of the refresh lead-time histogram's buckets.
LEAD_BUCKETS = (0.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 86400.0, math.inf)


def lead_bucket(lead: float) -> str:
    for bound in LEAD_BUCKETS:
        if lead <= bound:
            return "+Inf" if math.isinf(bound) else repr(bound)
    return "+Inf"


def refresh_counters(keys: ShardKeys, count: RefreshCount) -> tuple[tuple[str, str, str], ...]:
    """What one refresh adds to the counters: (hash key, field, amount as text). A successful
    refresh's commit carries these, so they count exactly the refreshes that applied."""
    counters = [(keys.refresh_counts, count.outcome, "1")]
    if count.lead is not None:
        lead = max(0.0, count.lead)
        counters.append((keys.refresh_lead, lead_bucket(lead), "1"))
        counters.append((keys.refresh_lead, "sum", f"{lead:.6f}"))
    return tuple(counters)


def due_ms(at: float) -> int:
    """Schedule scores are whole milliseconds: the same number in Lua, Python and job ids."""
    return int(at * 1000)


def session_state(shard: int, random_part: str) -> str:
    """An authorization ``state`` carrying its session's shard (not a secret) before the random
    part, so the callback finds the session from the state alone."""
    return f"{shard}.{random_part}"


def session_shard(state: str, shards: int) -> int | None:
    """The shard an authorization ``state`` names; None when it names none of ``shards``."""
    number, dot, rest = state.partition(".")
    if not dot or not rest or not number.isdigit() or len(number) > 4:
        return None
    shard = int(number)
    return shard if shard < shards and str(shard) == number else None


def state_hash(state: str) -> str:
    """The index key for an authorization ``state``: the value itself is never stored in clear."""
    return hashlib.sha256(state.encode()).hexdigest()


class Keys:
    """The names of every Redis key (and job id) of one provider's connections, and the
    fleet-wide ones every provider's stack names alike. The only place the layout is spelled out.

    Connections are spread over ``shards`` shards by user (:meth:`shard_of`); the keys of one
    shard, per provider, are a :class:`ShardKeys` (:meth:`shard`, :meth:`of`)."""

    __slots__ = ("prefix", "provider", "shards")

    def __init__(
        self, prefix: str = "cf", provider: str = DEFAULT_PROVIDER, shards: int = DEFAULT_SHARDS
    ) -> None:
        self.prefix = prefix
        self.provider = provider
        self.shards = shards

    def for_provider(self, provider: str) -> Keys:
        return Keys(self.prefix, provider, self.shards)

    def shard_of(self, user: str) -> int:
        """The shard of the user's connections (every provider's): a user's keys share a slot."""
        return zlib.crc32(user.encode()) % self.shards

    def shard(self, number: int) -> ShardKeys:
        if not 0 <= number < self.shards:
            raise ValueError(f"no shard {number} among {self.shards}")
        return ShardKeys(self.prefix, self.provider, number)

    def of(self, user: str) -> ShardKeys:
        """The keys of the user's shard at this provider."""
        return ShardKeys(self.prefix, self.provider, self.shard_of(user))

    def every_shard(self, only: Sequence[int] | None = None) -> list[ShardKeys]:
        """Each shard's keys (or those of ``only``), in shard order: what sums and sweeps visit."""
        return [self.shard(n) for n in (range(self.shards) if only is None else only)]

    def rec(self, user: str) -> str:
        return self.of(user).rec(user)

    def sealed(self, user: str, name: str) -> str:
        """The key of a sealed value beside the record (``codec.SEALED_KEYS``: ``tok``, ``rvk``)."""
        return self.of(user).sealed(user, name)

    def hist(self, user: str) -> str:
        return self.of(user).hist(user)

    def seen(self, user: str) -> str:
        return self.of(user).seen(user)

    def inbox(self, user: str, event_id: str) -> str:
        return self.of(user).inbox(user, event_id)

    def lock(self, user: str) -> str:
        return self.of(user).lock(user)

    def reply(self, user: str, event_id: str) -> str:
        return self.of(user).reply(event_id)

    def import_cursor(self, source_digest: str) -> str:
        """Where ``consent-flow import`` keeps its place in one source between runs."""
        return f"{self.prefix}:{self.provider}:import:{source_digest}"

    @property
    def shards_record(self) -> str:
        """The shard count the data was laid out for (written by the first start)."""
        return f"{self.prefix}:shards"

    @property
    def webhook_counts(self) -> str:
        """Webhook deliveries by outcome (delivered, retried, dead), every provider's."""
        return f"{self.prefix}:metrics:webhooks"

    @property
    def worker_counts(self) -> str:
        return f"{self.prefix}:metrics:worker"

    @property
    def workers(self) -> str:
        """Live workers by last heartbeat; tagged with :attr:`worker_clocks`, which the
        heartbeat's script writes with it."""
        return f"{{{self.prefix}:workers}}"

    @property
    def worker_clocks(self) -> str:
        return f"{{{self.prefix}:workers}}:clock"

    @property
    def invalidate(self) -> str:
        return f"{self.prefix}:invalidate"

    def invalidation(self, user: str) -> str:
        """The message on :attr:`invalidate` that drops the connection's cached tokens."""
        return f"{self.provider}\n{user}"

    @property
    def halt(self) -> str:
        return f"{self.prefix}:{self.provider}:halt"

    def limit(self, name: str) -> str:
        """The provider's fleet-wide call limiter (``log``, ``leases``, ``pause``): one tag of
        their own, so its script stays in one slot."""
        return f"{self.prefix}:{{{self.provider}:limit}}:{name}"

    @property
    def provider_check(self) -> str:
        """Why the provider's discovery document cannot be used now (absent: it can)."""
        return f"{self.prefix}:{self.provider}:check"

    @staticmethod
    def queue(queue_name: str, shard: int) -> str:
        """Shard ``shard``'s arq queue: its jobs' ids carry the same tag (:func:`shard_job_id`)."""
        return f"{queue_name}:{shard_tag(shard)}"


def shard_tag(shard: int) -> str:
    """The hash tag of a shard: Redis Cluster hashes a key's first ``{...}``."""
    return f"{{s{shard}}}"


def shard_job_id(shard: int, rest: str) -> str:
    """An arq job id in shard ``shard``: arq's job, in-progress, retry and result keys of the
    job then hash like the shard's queue."""
    return f"{shard_tag(shard)}:{rest}"


def job_shard(job_id: str) -> int | None:
    """The shard a job id carries (None: not a shard's)."""
    if not job_id.startswith("{s"):
        return None
    number, closed, _ = job_id[2:].partition("}")
    return int(number) if closed and number.isdigit() else None


class ShardKeys:
    """The keys of one shard at one provider: its connections' keys and the shard's indexes,
    schedule, counters and stream. Every key here hashes to the shard's slot."""

    __slots__ = ("head", "number", "prefix", "provider", "tag")

    def __init__(self, prefix: str, provider: str, number: int) -> None:
        self.prefix = prefix
        self.provider = provider
        self.number = number
        self.tag = shard_tag(number)
        self.head = f"{prefix}:{self.tag}:{provider}"

    def _conn(self, user: str) -> str:
        """The head every key of the connection (user, this provider) starts with."""
        return f"{self.head}:u:{user}"

    def rec(self, user: str) -> str:
        return f"{self._conn(user)}:rec"

    def sealed(self, user: str, name: str) -> str:
        return f"{self._conn(user)}:{name}"

    def hist(self, user: str) -> str:
        return f"{self._conn(user)}:hist"

    def around_user(self, name: str) -> tuple[str, str]:
        """What comes before and after the user in the connection key ``name`` (``rec``,
        ``hist``, ``lock``...): a script that visits users builds their keys from these."""
        return f"{self.head}:u:", f":{name}"

    def seen(self, user: str) -> str:
        return f"{self._conn(user)}:seen"

    def inbox(self, user: str, event_id: str) -> str:
        return f"{self._conn(user)}:in:{event_id}"

    def lock(self, user: str) -> str:
        return f"{self._conn(user)}:lock"

    def reply(self, event_id: str) -> str:
        return f"{self.prefix}:{self.tag}:reply:{event_id}"

    @property
    def replicated(self) -> str:
        return f"{self.prefix}:{self.tag}:replicated"

    def idx(self, state: State | str) -> str:
        return f"{self.head}:idx:{State(state).value}"

    @property
    def sched(self) -> str:
        return f"{self.head}:sched"

    @property
    def ready(self) -> str:
        """Due scheduled refreshes waiting for a batch, by when each grant lapses."""
        return f"{self.head}:ready"

    @property
    def ready_due(self) -> str:
        """The same refreshes by when each fell due: how long the backlog has waited."""
        return f"{self.head}:ready:due"

    @property
    def histidx(self) -> str:
        return f"{self.head}:histidx"

    @property
    def outbox(self) -> str:
        return f"{self.head}:outbox"

    @property
    def upgrades(self) -> str:
        return f"{self.head}:upgrades"

    def sess(self, digest: str) -> str:
        return f"{self.head}:sess:{digest}"

    @property
    def kids(self) -> str:
        return f"{self.head}:kids"

    @property
    def stream(self) -> str:
        return f"{self.head}:events"

    @property
    def transition_counts(self) -> str:
        return f"{self.head}:metrics:transitions"

    @property
    def refresh_counts(self) -> str:
        return f"{self.head}:metrics:refresh"

    @property
    def revocation_counts(self) -> str:
        return f"{self.head}:metrics:revocation"

    @property
    def refresh_lead(self) -> str:
        return f"{self.head}:metrics:lead"

    def hourly(self, hour: int) -> str:
        return f"{self.head}:metrics:hour:{hour}"

    def refresh_job_id(self, user: str, due_ms: int) -> str:
        """The id of the deferred refresh job of the connection's schedule due at ``due_ms``."""
        return f"{self.refresh_job_head}{user}:{due_ms}"

    @property
    def refresh_job_head(self) -> str:
        """What every refresh job id of this shard and provider starts with, before the user."""
        return shard_job_id(self.number, f"refresh:{self.prefix}:{self.provider}:")

    def job_id(self, rest: str) -> str:
        return shard_job_id(self.number, rest)

    def queue(self, queue_name: str) -> str:
        return Keys.queue(queue_name, self.number)


async def check_shards(redis: Any, keys: Keys) -> None:
    """Record the shard count at the first start, and refuse a start with another one: every
    connection's keys, queue and job ids are laid out for that count, fixed for the data's life."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.set(keys.shards_record, keys.shards, nx=True)
        pipe.get(keys.shards_record)
        _, recorded = await pipe.execute()
    if int(recorded) != keys.shards:
        raise SettingsError(
            "CONSENT_REDIS_SHARDS",
            f"is {keys.shards}, but the data was laid out for {int(recorded)} shards "
            f"(set CONSENT_REDIS_SHARDS={int(recorded)}; the count cannot change)",
        )


class Store(Protocol):
    """What the engine needs from a state store."""

    async def load(self, user: str) -> ConsentRecord: ...

    async def commit(self, change: Change, *, unlock: str | None = None) -> CommitResult: ...

    async def history(
        self, user: str, *, limit: int = HISTORY_MAX_ENTRIES
    ) -> list[HistoryEntry]: ...

    async def users(
        self, state: State, *, offset: int = 0, limit: int = 100
    ) -> list[tuple[str, float]]: ...

    async def counts(self) -> dict[State, int]: ...

    async def session_owner(self, shard: int, digest: str) -> tuple[str, str] | None: ...

    async def claim_session(
        self, user: str, session_id: str, event_id: str, sealed: str | None
    ) -> str: ...

    async def put_inbox(self, user: str, event_id: str, sealed: str) -> None: ...

    async def take_inbox(self, user: str, event_id: str) -> str | None: ...

    async def acquire_lock(self, user: str, ttl: float) -> str | None: ...

    async def release_lock(self, user: str, token: str) -> bool: ...


# The commit script's names for the sealed keys.
_SEALED_ROLE = {
    codec.SEALED_KEYS["tokens"]: "tokens",
    codec.SEALED_KEYS["revocation_pending"]: "revoke",
}


@dataclasses.dataclass(frozen=True, slots=True)
class _CommitCall:
    """One commit script call: its keys, its arguments, and whether it stores tokens."""

    keys: list[str]
    args: list[Any]
    stores_tokens: bool


class _Layout:
    """The keys and binary arguments of one script call, each added once and known to the
    script by the position this returns (the step names them), never by arithmetic."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.args: list[bytes] = []
        self.named: dict[str, int] = {}

    def key(self, key: str) -> int:
        self.keys.append(key)
        return len(self.keys)

    def arg(self, value: bytes) -> int:
        self.args.append(value)
        return len(self.args) + 1  # ARGV[1] is the step itself


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _str_dict(raw: dict[Any, Any]) -> dict[str, str]:
    """A client's HGETALL answer (bytes) as a dict of text."""
    return {_decode(k): _decode(v) for k, v in raw.items()}


def _pairs(flat: list[Any]) -> dict[str, str]:
    """A Lua HGETALL answer (a flat list) as a dict of text."""
    return {_decode(flat[i]): _decode(flat[i + 1]) for i in range(0, len(flat), 2)}


def _record(user: str, flat: list[Any], tok: bytes | None, rvk: bytes | None) -> ConsentRecord:
    """A record from its hash (HGETALL, flat) and its sealed keys."""
    sealed = dict(zip(codec.SEALED_KEYS.values(), (tok, rvk), strict=True))
    return codec.record_from_hash(user, _pairs(flat), sealed)


class RedisStore:
    """The production store, on a ``redis.asyncio.Redis`` that answers bytes (as arq's pool does:
    the sealed tokens are binary)."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str = "cf",
        provider: str = DEFAULT_PROVIDER,
        wait_replicas: int = 0,
        shards: int = DEFAULT_SHARDS,
    ) -> None:
        """``wait_replicas``: a commit that stores tokens returns once that many replicas hold
        it, or after ``REPLICA_WAIT_MS`` with ``replicated=False`` (see ``commit``)."""
        if redis.get_connection_kwargs().get("decode_responses"):  # type: ignore[no-untyped-call]
            raise ValueError("RedisStore needs a client without decode_responses")
        # redis-py types its asyncio client with sync|async unions that mypy cannot await: the
        # store treats it as untyped rather than scatter ignores over every call.
        self.redis: Any = redis
        self.keys = Keys(prefix, provider, shards)
        # Turns the jobs commits carry into arq's; set where a scheduler runs (a worker).
        self.commit_jobs: CommitJobs | None = None
        self.wait_replicas = wait_replicas
        self._load = redis.register_script(lua("load_record"))
        self._drop_revoked = redis.register_script(lua("drop_revoked"))
        self._commit = redis.register_script(lua("enqueue_function") + lua("commit"))
        self._claim = redis.register_script(lua("claim_session"))
        self._release = redis.register_script(lua("release_lock"))
        self._lock_and_load = redis.register_script(lua("lock_and_load"))
        self._trim = redis.register_script(lua("trim_history"))

    def _commit_jobs(self) -> CommitJobs:
        if self.commit_jobs is None:
            raise RuntimeError("this store queues no jobs: set its commit_jobs")
        return self.commit_jobs

    def _sealed_keys(self, user: str) -> list[str]:
        """The keys of the sealed tokens and of the tokens to revoke, in that order."""
        return [self.keys.sealed(user, suffix) for suffix in codec.SEALED_KEYS.values()]

    async def load(self, user: str) -> ConsentRecord:
        k = self.keys
        flat, tok, rvk = await self._load(keys=[k.rec(user), *self._sealed_keys(user)])
        return _record(user, flat, tok, rvk)

    async def commit(self, change: Change, *, unlock: str | None = None) -> CommitResult:
        """Apply ``change`` if the record is still as it read it; then (only then) release the
        user's lock if ``unlock`` is its owner token."""
        call = self.commit_call(change, unlock=unlock)
        replicated = True
        wait = await self.replicas_to_wait(self.keys.of(change.user)) if call.stores_tokens else 0
        if wait:
            result, replicated = await self._commit_and_wait(change.user, call, wait)
        else:
            result = await self._commit(keys=call.keys, args=call.args)
        return self.commit_result(change, result, replicated=replicated)

    async def commit_many(
        self, changes: Sequence[tuple[Change, str | None]]
    ) -> list[CommitResult | BaseException]:
        """Commit changes of different users in one round trip, each with the owner token of
        the lock it releases: each is its own script, atomic for its user alone, and applies or
        fails on its own (an error is returned in its place).

        When a member stores tokens, one WAIT ends the pipeline (after a write of its own, as
        in ``_commit_and_wait``): it covers every member before it, and those members' results
        say ``replicated=False`` when fewer replicas than a commit waits for answered. The
        members of each shard go in a pipeline of their own (one, for a batch): on a Redis
        Cluster, a WAIT covers only the node it is sent to.
        """
        if not changes:
            return []
        calls = [self.commit_call(change, unlock=unlock) for change, unlock in changes]
        shards: dict[int, list[int]] = {}
        for i, (change, _) in enumerate(changes):
            shards.setdefault(self.keys.shard_of(change.user), []).append(i)
        raw: list[Any] = [None] * len(calls)
        confirmed = [True] * len(calls)
        sent = await asyncio.gather(
            *(
                self._commit_shard(self.keys.shard(shard), [calls[i] for i in members])
                for shard, members in shards.items()
            ),
            return_exceptions=True,
        )
        for members, outcome in zip(shards.values(), sent, strict=True):
            if isinstance(outcome, BaseException):
                outcome = ([outcome] * len(members), False)
            answers, replicated = outcome
            for i, item in zip(members, answers, strict=True):
                raw[i], confirmed[i] = item, replicated
        return [
            item
            if isinstance(item, BaseException)
            else self.commit_result(change, item, replicated=ok or not call.stores_tokens)
            for (change, _), call, item, ok in zip(changes, calls, raw, confirmed, strict=True)
        ]

    async def _commit_shard(
        self, shard: ShardKeys, calls: list[_CommitCall]
    ) -> tuple[list[Any], bool]:
        """``commit_many`` for the calls of one shard: their answers (an error in place of a
        call that failed), and whether the replicas confirmed them."""
        stores_tokens = any(call.stores_tokens for call in calls)
        wait = await self.replicas_to_wait(shard) if stores_tokens else 0
        raw: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        acks: Any = None
        for attempt in range(2):
            async with self._pipeline_on(shard.replicated) as pipe:
                for i in todo:
                    queue_script(
                        pipe, self._commit, calls[i].keys, calls[i].args, whole=bool(attempt)
                    )
                if wait:
                    pipe.incr(shard.replicated)
                    pipe.execute_command("WAIT", wait, REPLICA_WAIT_MS)
                answers = await pipe.execute(raise_on_error=False)
            if wait:
                acks, answers = answers[-1], answers[:-2]
            for i, item in zip(todo, answers, strict=True):
                raw[i] = item
            # A server without the script yet (a new primary): those ran nothing.
            todo = [i for i in todo if isinstance(raw[i], NoScriptError)]
            if not todo or attempt:
                break
        return raw, not wait or (not isinstance(acks, BaseException) and int(acks) >= wait)

    def commit_call(self, change: Change, *, unlock: str | None = None) -> _CommitCall:
        """The commit script's keys and arguments for ``change``, and whether it stores
        tokens (a commit a failover must not lose: see ``wait_replicas``)."""
        k = self.keys.of(change.user)
        writes = codec.hash_writes(change)
        layout = _Layout()
        keys = layout.named
        for name, key in (
            ("rec", k.rec(change.user)),
            ("hist", k.hist(change.user)),
            ("seen", k.seen(change.user)),
            ("idx_from", k.idx(change.expect_state)),
            ("idx_to", k.idx(change.to_state)),
            ("sched", k.sched),
            ("kids", k.kids),
            ("stream", k.stream),
            ("histidx", k.histidx),
            ("outbox", k.outbox),
            ("transitions", k.transition_counts),
            ("tokens", k.sealed(change.user, codec.SEALED_KEYS["tokens"])),
            ("revoke", k.sealed(change.user, codec.SEALED_KEYS["revocation_pending"])),
        ):
            keys[name] = layout.key(key)
        op: dict[str, Any] = {
            "keys": keys,
            "user": change.user,
            "event_id": change.event_id,
            "expect_state": change.expect_state.value,
            "expect_v": change.expect_version,
            "set": writes.set,
            "del": list(writes.delete),
            "cipher": list(codec.CIPHER_FIELDS),
            "compact_entries": COMPACT_HASH_ENTRIES,
            "compact_value": COMPACT_HASH_VALUE,
            # Sealed values travel as arguments of their own (binary).
            "seal": {_SEALED_ROLE[name]: layout.arg(value) for name, value in writes.seal.items()},
            "wipe": {_SEALED_ROLE[name]: True for name in writes.wipe},
            "channel": self.keys.invalidate,
            "invalidation": self.keys.invalidation(change.user),
            "provider": k.provider,
            "moved": change.moves,
            # Scores travel as strings: Lua numbers are doubles, which Redis refuses as arguments.
            "since": repr(change.at),
            "at": repr(change.at),
            "schedule": str(due_ms(change.schedule_at)) if change.schedule_at is not None else None,
            "unschedule": change.unschedule,
            "hist": change.history_entry().to_json() if change.record_history else None,
            "metric": f"{change.event.value}|{change.expect_state.value}|{change.to_state.value}",
            "event_name": change.event.value,
            "collapse": change.event is Event.TOKEN_REFRESHED,
            "hist_max": str(HISTORY_MAX_ENTRIES),
            "stream_max": str(STREAM_MAX_ENTRIES),
            "seen_max": str(SEEN_MAX_EVENTS),
            "seen_after": repr(change.at - SEEN_WINDOW),
            "seen_ttl": str(math.ceil(SEEN_WINDOW)),
        }
        if change.session_lookup is not None:
            digest, ttl = change.session_lookup
            keys["sess_set"] = layout.key(k.sess(digest))
            op["sess_value"] = f"{change.user}\n{change.fields.get('session_id')}"
            op["sess_ttl"] = str(max(1, ttl))
        if change.drop_session_lookup is not None:
            keys["sess_drop"] = layout.key(k.sess(change.drop_session_lookup))
        if change.reply is not None:
            keys["reply"] = layout.key(k.reply(change.reply[0]))
            op["reply"] = change.reply[1]
            op["reply_ttl"] = str(REPLY_TTL)
        # A batched deployment queues no refresh jobs (the schedule alone): none to drop.
        dropped = (
            None
            if change.drop_refresh_at is None
            else self._commit_jobs().dropped(change.user, change.drop_refresh_at)
        )
        if dropped is not None:
            job_key, queue = dropped.keys
            op["drop_job"] = {
                "id": dropped.job_id,
                "job_key": layout.key(job_key),
                "queue": layout.key(queue),
            }
        queued = [
            job
            for job in (self._commit_jobs().queued(change.user, j) for j in change.jobs)
            if job is not None
        ]
        if queued:
            # Scores and expiries travel as strings: cjson prints numbers with 14 digits.
            op["jobs"] = [
                {
                    "job_key": layout.key(job.keys[0]),
                    "result_key": layout.key(job.keys[1]),
                    "queue": layout.key(job.keys[2]),
                    "payload": layout.arg(job.payload),
                    "px": str(job.expires_ms),
                    "score": score_arg(job.score_ms),
                    "id": job.job_id,
                }
                for job in queued
            ]
        if unlock is not None:
            keys["lock"] = layout.key(k.lock(change.user))
            op["unlock"] = unlock
        if change.upgrade_until is not None or change.drop_upgrade:
            keys["upgrades"] = layout.key(k.upgrades)
            if change.upgrade_until is not None:
                op["upgrade_until"] = repr(change.upgrade_until)
            else:
                op["upgrade_drop"] = True
        if change.refresh_count is not None:
            op["counters"] = [
                {"key": layout.key(key), "field": name, "amount": amount}
                for key, name, amount in refresh_counters(k, change.refresh_count)
            ]
        # cjson turns null into a truthy userdata: absent keys are the only safe "no".
        step = {k: v for k, v in op.items() if v is not None and v is not False}
        commit_args: list[Any] = [json.dumps(step, separators=(",", ":")), *layout.args]
        return _CommitCall(
            keys=layout.keys,
            args=commit_args,
            stores_tokens=codec.SEALED_KEYS["tokens"] in writes.seal,
        )

    def commit_result(self, change: Change, result: Any, *, replicated: bool) -> CommitResult:
        """What the commit script answered for ``change`` (and its transition's log line)."""
        status = _decode(result[0])
        version = int(result[1])
        if status == "ok" and change.record_history:
            # One line per transition, for log pipelines; the history holds the same entry.
            log.info(
                "transition",
                user=change.user,
                event_name=change.event.value,
                **{"from": change.expect_state.value, "to": change.to_state.value},
                actor=change.actor,
                reason=change.reason,
                correlation_id=change.correlation_id,
            )
        state = State(_decode(result[2])) if len(result) > 2 else None
        return CommitResult(status=status, version=version, state=state, replicated=replicated)

    async def replicas_to_wait(self, shard: ShardKeys) -> int:
        """``wait_replicas``, or fewer when the primary serving ``shard`` has fewer replicas up
        (as Sentinel or the cluster sees them): waiting for one that is down would hold every
        refresh, and a failover could not promote it anyway."""
        if not self.wait_replicas:
            return 0
        healthy = getattr(self.redis, "healthy_replicas", None)
        if healthy is None:
            return self.wait_replicas
        return min(self.wait_replicas, int(await healthy(shard.replicated)))

    def _pipeline_on(self, key: str) -> Any:
        """A pipeline sent on one connection to the primary that serves ``key``: a write and
        the WAIT after it must share one (a cluster pipeline sends WAIT to a node of its own)."""
        node_pipeline = getattr(self.redis, "node_pipeline", None)
        if node_pipeline is None:
            return self.redis.pipeline(transaction=False)
        return node_pipeline(key)

    async def mark_inflight(self, user: str, at: float) -> bool:
        """Note on the record that a refresh is at the provider (outside any commit: it must be
        there before the request leaves). True once as many replicas as
        a commit waits for hold the mark, and with it the lock and the record it was read with:
        a failover from now on keeps them, so no other worker presents the refresh token this
        refresh is about to spend."""
        wait = await self.replicas_to_wait(self.keys.of(user))
        if not wait:
            await self.redis.hset(self.keys.rec(user), codec.field_name("inflight"), repr(at))
            return True
        pipe = self._pipeline_on(self.keys.of(user).replicated)
        pipe.hset(self.keys.rec(user), codec.field_name("inflight"), repr(at))
        pipe.execute_command("WAIT", wait, REPLICA_WAIT_MS)
        _, acks = await pipe.execute()
        return int(acks) >= wait

    async def confirm_replicated(self, user: str) -> bool:
        """Whether the primary serving ``user`` now has every write it took so far on as many
        replicas as a commit waits for."""
        wait = await self.replicas_to_wait(self.keys.of(user))
        if not wait:
            return True
        key = self.keys.of(user).replicated
        pipe = self._pipeline_on(key)
        pipe.incr(key)
        pipe.execute_command("WAIT", wait, REPLICA_WAIT_MS)
        _, acks = await pipe.execute()
        return int(acks) >= wait

    async def _commit_and_wait(self, user: str, call: _CommitCall, wait: int) -> tuple[Any, bool]:
        """The commit, then WAIT for ``wait_replicas`` replicas, on one connection.

        WAIT counts the replicas that hold this connection's last write. A write of its own
        goes between the two: when the pipeline is sent again on a new connection (a failover)
        and the commit finds itself applied already (a duplicate writes nothing), WAIT still
        covers everything up to that write, the commit included.
        """
        key = self.keys.of(user).replicated
        for attempt in range(2):
            pipe = self._pipeline_on(key)
            queue_script(pipe, self._commit, call.keys, call.args, whole=bool(attempt))
            pipe.incr(key)
            pipe.execute_command("WAIT", wait, REPLICA_WAIT_MS)
            try:
                result, _, acks = await pipe.execute()
            except NoScriptError:
                # Sent again on a new primary that does not have the script yet: nothing ran.
                if attempt:
                    raise
                continue
            return result, int(acks) >= wait
        raise AssertionError("unreachable")  # pragma: no cover

    async def history(self, user: str, *, limit: int = HISTORY_MAX_ENTRIES) -> list[HistoryEntry]:
        raw = await self.redis.lrange(self.keys.hist(user), -limit, -1)
        return [HistoryEntry.from_json(item) for item in raw]

    async def users(
        self, state: State, *, offset: int = 0, limit: int = 100
    ) -> list[tuple[str, float]]:
        """Users in ``state`` by since, every shard's merged: a page costs each shard its first
        ``offset + limit`` members."""
        if limit <= 0:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in self.keys.every_shard():
                pipe.zrange(shard.idx(state), 0, offset + limit - 1, withscores=True)
            pages = await pipe.execute()
        rows = sorted(
            ((_decode(user), float(score)) for page in pages for user, score in page),
            key=lambda row: (row[1], row[0]),
        )
        return rows[offset : offset + limit]

    async def users_before(
        self, state: State, before: float, *, shard: int, limit: int = 500
    ) -> list[str]:
        """Users of ``shard`` in ``state`` since before ``before``: O(log n + found)."""
        rows = await self.redis.zrangebyscore(
            self.keys.shard(shard).idx(state), "-inf", repr(before), start=0, num=limit
        )
        return [_decode(user) for user in rows]

    async def outbox_due(self, now: float, *, shard: int, limit: int = 100) -> list[str]:
        rows = await self.redis.zrangebyscore(
            self.keys.shard(shard).outbox, "-inf", repr(now), start=0, num=limit
        )
        return [_decode(user) for user in rows]

    async def upgrades_due(self, now: float, *, shard: int, limit: int = 500) -> list[str]:
        """Users of ``shard`` whose upgrade session expired by ``now``: O(log n + found)."""
        rows = await self.redis.zrangebyscore(
            self.keys.shard(shard).upgrades, "-inf", repr(now), start=0, num=limit
        )
        return [_decode(user) for user in rows]

    async def counts(self) -> dict[State, int]:
        """Connections per state, summed over the shards (one round trip)."""
        shards = self.keys.every_shard()
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in shards:
                for state in State:
                    pipe.zcard(shard.idx(state))
            values = await pipe.execute()
        totals = dict.fromkeys(State, 0)
        for i, n in enumerate(values):
            totals[list(State)[i % len(State)]] += int(n)
        return totals

    async def session_owner(self, shard: int, digest: str) -> tuple[str, str] | None:
        """The user and session id of the live session of ``shard`` whose state hashes to
        ``digest`` (the state names its shard: :func:`session_shard`)."""
        raw = await self.redis.get(self.keys.shard(shard).sess(digest))
        if raw is None:
            return None
        user, _, session_id = _decode(raw).partition("\n")
        return user, session_id

    async def claim_session(
        self, user: str, session_id: str, event_id: str, sealed: str | None
    ) -> str:
        result = await self._claim(
            keys=[self.keys.rec(user), self.keys.inbox(user, event_id)],
            args=[session_id, event_id, sealed or "", INBOX_TTL],
        )
        return _decode(result)

    async def put_inbox(self, user: str, event_id: str, sealed: str) -> None:
        """Leave a sealed secret for the worker that applies event ``event_id``."""
        await self.redis.set(self.keys.inbox(user, event_id), sealed, ex=INBOX_TTL)

    async def take_inbox(self, user: str, event_id: str) -> str | None:
        raw = await self.redis.getdel(self.keys.inbox(user, event_id))
        return None if raw is None else _decode(raw)

    async def acquire_lock(self, user: str, ttl: float) -> str | None:
        token = secrets.token_hex(16)
        ok = await self.redis.set(self.keys.lock(user), token, px=int(ttl * 1000), nx=True)
        return token if ok else None

    async def release_lock(self, user: str, token: str) -> bool:
        return bool(await self._release(keys=[self.keys.lock(user)], args=[token]))

    async def lock_and_load(
        self, user: str, ttl: float, *, also: str
    ) -> tuple[str | None, ConsentRecord, dict[str, str]]:
        """Try the user's lock and read the record (and the hash ``also``) in one round trip.

        Returns the lock's owner token (None when another holder has it), the record as it is
        now (under the lock when taken), and ``also``'s fields. ``also`` is a fleet-wide key (the
        refresh pause), read beside the script in the same pipeline rather than in it: no
        script touches two slots, and the pause only decides whether a refresh starts.
        """
        k = self.keys
        token = secrets.token_hex(16)
        keys = [k.lock(user), k.rec(user), *self._sealed_keys(user)]
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                queue_script(
                    pipe, self._lock_and_load, keys, [token, int(ttl * 1000)], whole=bool(attempt)
                )
                pipe.hgetall(also)
                answer, other = await pipe.execute(raise_on_error=False)
            if isinstance(answer, NoScriptError) and not attempt:
                continue  # a server without the script yet (a new primary): nothing ran
            for item in (answer, other):
                if isinstance(item, BaseException):
                    raise item
            break
        got, flat, tok, rvk = answer
        return (token if int(got) else None), _record(user, flat, tok, rvk), _str_dict(other)

    async def actors_and_reasons(self, users: list[str]) -> list[tuple[str | None, str | None]]:
        """Who made each user's last transition and why, in one round trip (for listings)."""
        names = codec.field_name("actor"), codec.field_name("reason")
        async with self.redis.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.hmget(self.keys.rec(user), *names)
            rows = await pipe.execute()
        return [
            (
                None if actor is None else _decode(actor),
                None if reason is None else _decode(reason),
            )
            for actor, reason in rows
        ]

    async def count_revocation_attempt(self, user: str) -> int:
        """Count one more failed try to revoke the user's outbox tokens; returns the count."""
        key, name = self.keys.rec(user), codec.field_name("revocation_attempts")
        return int(await self.redis.hincrby(key, name, 1))

    async def drop_revoked(
        self,
        user: str,
        sealed: bytes,
        *,
        outcome: ProviderRevocation = ProviderRevocation.DONE,
    ) -> bool:
        """Forget ``sealed`` tokens once the provider revoked them, or once revoking them there
        was given up (``outcome``; compare-and-delete: tokens that a later revocation put there
        stay). Returns whether they were still there."""
        k = self.keys.of(user)
        return bool(
            await self._drop_revoked(
                keys=[
                    k.rec(user),
                    k.sealed(user, codec.SEALED_KEYS["revocation_pending"]),
                    k.kids,
                    k.outbox,
                    k.revocation_counts,
                ],
                args=[sealed, KeyRing.key_id_of(sealed), user, outcome.value],
            )
        )

    async def key_ids_in_use(self, providers: Sequence[str] = ()) -> dict[str, int]:
        """Ciphertexts per key id, summed over the shards of this store's provider and of
        ``providers`` (one round trip)."""
        names = dict.fromkeys([self.keys.provider, *providers])
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                for shard in self.keys.for_provider(name).every_shard():
                    pipe.hgetall(shard.kids)
            rows = await pipe.execute()
        totals: dict[str, int] = {}
        for raw in rows:
            for k, v in raw.items():
                totals[_decode(k)] = totals.get(_decode(k), 0) + int(v)
        return {k: v for k, v in totals.items() if v > 0}

    async def trim_history(self, older_than: float, *, shard: int, limit: int = 500) -> int:
        """Drop history entries older than ``older_than`` for up to ``limit`` users of ``shard``.

        Only users whose oldest entry is that old are visited (``histidx``): O(log n + due).
        """
        k = self.keys.shard(shard)
        before, after = k.around_user("hist")
        return int(
            await self._trim(keys=[k.histidx], args=[before, repr(older_than), limit, after])
        )


def _job_id(user: str, job: Job) -> str:
    """A job's identity, as arq's job ids make it: a refresh per user and due time, a notice
    per notice."""
    if isinstance(job, RefreshJob):
        return f"refresh:{user}:{due_ms(job.at)}"
    return f"notice:{job.id}"


class MemoryStore:
    """The same contract in a process's memory: for fast tests of the engine's logic."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.records: dict[str, ConsentRecord] = {}
        self.histories: dict[str, list[HistoryEntry]] = {}
        self.seen: dict[str, dict[str, float]] = {}  # event id: when it applied
        self.indexes: dict[State, dict[str, float]] = {state: {} for state in State}
        self.schedule: dict[str, float] = {}
        self.sessions: dict[str, tuple[str, str]] = {}
        self.inboxes: dict[tuple[str, str], str] = {}
        self.locks: dict[str, str] = {}
        self.jobs: dict[str, Job] = {}  # queued jobs, by an id of the same kind as arq's
        self.refresh_counts: list[RefreshCount] = []
        self.upgrades: dict[str, float] = {}  # upgrade sessions open, by expiry

    async def load(self, user: str) -> ConsentRecord:
        return self.records.get(user) or ConsentRecord(user=user)

    async def commit(self, change: Change, *, unlock: str | None = None) -> CommitResult:
        """Apply ``change`` if the record is still as it read it; then (only then) release the
        user's lock if ``unlock`` is its owner token."""
        user = change.user
        rec = await self.load(user)
        if change.event_id in self.seen.get(user, []):
            return CommitResult("duplicate", rec.version)
        if rec.state is not change.expect_state or rec.version != change.expect_version:
            return CommitResult("conflict", rec.version, rec.state)
        codec.hash_writes(change)  # refuses what Redis would not store
        self.records[user] = rec.after(change, rec.version + 1)
        if change.moves:
            self.indexes[change.expect_state].pop(user, None)
            self.indexes[change.to_state][user] = change.at
        if change.schedule_at is not None:
            self.schedule[user] = change.schedule_at
        elif change.unschedule:
            self.schedule.pop(user, None)
        if change.session_lookup is not None:
            self.sessions[change.session_lookup[0]] = (user, change.fields.get("session_id") or "")
        if change.drop_session_lookup is not None:
            self.sessions.pop(change.drop_session_lookup, None)
        if change.upgrade_until is not None:
            self.upgrades[user] = change.upgrade_until
        elif change.drop_upgrade:
            self.upgrades.pop(user, None)
        if change.record_history:
            entries = self.histories.setdefault(user, [])
            entries.append(change.history_entry())
            del entries[:-HISTORY_MAX_ENTRIES]
        seen = self.seen.setdefault(user, {})
        seen[change.event_id] = change.at
        kept = sorted(
            ((at, eid) for eid, at in seen.items() if at >= change.at - SEEN_WINDOW),
            reverse=True,
        )[:SEEN_MAX_EVENTS]
        self.seen[user] = {eid: at for at, eid in kept}
        if change.drop_refresh_at is not None:
            self.jobs.pop(_job_id(user, RefreshJob(change.drop_refresh_at)), None)
        for job in change.jobs:
            self.jobs.setdefault(_job_id(user, job), job)
        if unlock is not None and self.locks.get(user) == unlock:
            del self.locks[user]
        if change.refresh_count is not None:
            self.refresh_counts.append(change.refresh_count)
        return CommitResult("ok", rec.version + 1)

    async def history(self, user: str, *, limit: int = HISTORY_MAX_ENTRIES) -> list[HistoryEntry]:
        return list(self.histories.get(user, [])[-limit:])

    async def users(
        self, state: State, *, offset: int = 0, limit: int = 100
    ) -> list[tuple[str, float]]:
        rows = sorted(self.indexes[state].items(), key=lambda item: (item[1], item[0]))
        return rows[offset : offset + limit]

    async def counts(self) -> dict[State, int]:
        return {state: len(members) for state, members in self.indexes.items()}

    async def session_owner(self, shard: int, digest: str) -> tuple[str, str] | None:
        return self.sessions.get(digest)

    async def upgrades_due(self, now: float, *, shard: int = 0, limit: int = 500) -> list[str]:
        due = sorted((at, user) for user, at in self.upgrades.items() if at <= now)
        return [user for _, user in due[:limit]]

    async def claim_session(
        self, user: str, session_id: str, event_id: str, sealed: str | None
    ) -> str:
        rec = await self.load(user)
        if rec.state not in (State.PENDING, State.PROVISIONED):
            return "not_pending"
        if rec.session_id != session_id:
            return "unknown_session"
        if rec.session_claim is not None:
            return "already_used"
        if (rec.session_expires_at or 0.0) <= self.clock():
            return "expired"
        self.records[user] = dataclasses.replace(rec, session_claim=event_id)
        if sealed:
            self.inboxes[(user, event_id)] = sealed
        return "ok"

    async def put_inbox(self, user: str, event_id: str, sealed: str) -> None:
        self.inboxes[(user, event_id)] = sealed

    async def take_inbox(self, user: str, event_id: str) -> str | None:
        return self.inboxes.pop((user, event_id), None)

    async def lock_and_load(
        self, user: str, ttl: float, *, also: str
    ) -> tuple[str | None, ConsentRecord, dict[str, str]]:
        return await self.acquire_lock(user, ttl), await self.load(user), {}

    async def acquire_lock(self, user: str, ttl: float) -> str | None:
        if user in self.locks:
            return None
        token = secrets.token_hex(16)
        self.locks[user] = token
        return token

    async def release_lock(self, user: str, token: str) -> bool:
        if self.locks.get(user) == token:
            del self.locks[user]
            return True
        return False

    async def drop_revoked(
        self,
        user: str,
        sealed: bytes,
        *,
        outcome: ProviderRevocation = ProviderRevocation.DONE,
    ) -> bool:
        rec = await self.load(user)
        if rec.revocation_pending is None or rec.revocation_pending != sealed:
            return False
        self.records[user] = dataclasses.replace(
            rec,
            revocation_pending=None,
            revocation_attempts=0,
            provider_revocation=outcome if rec.state is State.REVOKED else rec.provider_revocation,
        )
        return True
