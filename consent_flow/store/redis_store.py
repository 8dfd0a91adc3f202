"""The state store: a ``Protocol`` with a Redis implementation and an in-memory one for fast tests.

Redis layout (``cf`` is ``CONSENT_REDIS_PREFIX``, ``gh`` a provider's name; a connection is one
user's grant at one provider, and every key of one user shares the hash tag ``{user}`` so
per-user commands stay within one slot, whichever provider they are about)::

    cf:{alice}:gh:rec      hash   the record (state, version, since, sealed session, schedule)
    cf:{alice}:gh:tok      string the sealed tokens (binary; apart, so the record hash stays in
                                  Redis's compact encoding)
    cf:{alice}:gh:rvk      string sealed tokens still to revoke at the provider (binary)
    cf:{alice}:gh:hist     list   history entries, oldest first (JSON)
    cf:{alice}:gh:seen     zset   event ids already applied (exactly-once effect), scored by
                                  time, kept for the queue's redelivery window (SEEN_WINDOW)
    cf:{alice}:gh:in:<id>  string sealed authorization code waiting for its event (short TTL)
    cf:{alice}:gh:lock     string single-flight lock for provider calls, value = owner token
    cf:gh:idx:<state>      zset   users in that state at gh, scored by since (list, stats: no
                                  KEYS scans)
    cf:gh:sched            zset   users by next refresh due time at gh, in epoch milliseconds
    cf:gh:histidx          zset   users by the time of their oldest history entry (retention)
    cf:gh:outbox           zset   users with tokens still to revoke at gh, by next try
    cf:gh:upgrades         zset   users with an upgrade session open at gh, by its expiry
    cf:gh:halt             hash   refreshes at gh paused for everyone: invalid_client (reason,
                                  since)
    cf:gh:sess:<sha256>    string "user\nsession id" for a live authorization session's state
    cf:metrics:gh:*        hash   gh's counters for /metrics and stats (transitions, refresh
                                  outcomes, refresh lead time buckets, per-hour failures and
                                  rejections, provider revocations by outcome)
    cf:metrics:webhooks    hash   webhook deliveries by outcome: delivered, retried, dead
    cf:metrics:worker      hash   Redis outages the workers rode out, deferred commits
    cf:workers             zset   worker ids by last heartbeat (Redis's time)
    cf:workers:clock       hash   worker id -> its clock's offset from Redis's time, in seconds
    cf:invalidate          pubsub "provider\nuser" of connections whose cached tokens must be
                                  dropped (published by commits)
    cf:kids                hash   ciphertext count per key id, every provider's (start-up key
                                  check, rotation)
    cf:events              stream every transition of every provider, for `tail` and other
                                  consumers (bounded; entries carry the provider)

Refresh jobs' ids carry the prefix and the provider too (``refresh:cf:gh:alice:<due ms>``): two
deployments or two providers on one queue never share one.

Every time stored here is Redis's time (``TIME`` in scripts, a ``RedisClock`` in Python), never
the writing process's own clock: processes whose clocks disagree still agree on what is due.

A transition is one Lua script: the version check, the fields, the sealed tokens, the indexes,
the schedule, the history entry and the stream entry commit together or not at all (one
writer wins); a commit also queues the arq jobs it carries (the next refresh, a webhook notice),
adds its counters, releases the user's lock and pushes the caller's answer, only if it applies.
A record is read in one round trip too, hash and sealed keys alike (with the lock taken, for a
refresh).
The indexes are shard-wide keys: users are sharded across primaries, not across a Cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from consent_flow.core.connections import DEFAULT_PROVIDER
from consent_flow.core.records import (
    CIPHER_FIELDS,
    SEALED_KEYS,
    Change,
    CommitResult,
    ConsentRecord,
    HistoryEntry,
    ProviderRevocation,
)
from consent_flow.core.table import Event, State
from consent_flow.queue.jobs import ENQUEUE_LUA, REDELIVERY_WINDOW, score_arg
from consent_flow.store.scripts import lua
from consent_flow.store.vault import KeyRing

__all__ = [
    "SEEN_MAX_EVENTS",
    "SEEN_WINDOW",
    "Keys",
    "MemoryStore",
    "RedisStore",
    "Store",
    "due_ms",
    "state_hash",
]

log = structlog.get_logger("consent_flow.transitions")

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

assert SEALED_KEYS == ("tok", "rvk"), "the commit script knows them by position"
# Redis's defaults for a hash's compact (listpack) encoding: hash-max-listpack-entries and
# hash-max-listpack-value. A record within them takes about half the memory.
COMPACT_HASH_ENTRIES = 128
COMPACT_HASH_VALUE = 64


def due_ms(at: float) -> int:
    """Schedule scores are whole milliseconds: the same number in Lua, Python and job ids."""
    return int(at * 1000)


def state_hash(state: str) -> str:
    """The index key for an authorization ``state``: the value itself is never stored in clear."""
    return hashlib.sha256(state.encode()).hexdigest()


class Keys:
    """The names of every Redis key (and refresh job id) of one provider's connections, and the
    shared ones every provider's stack names alike. The only place the layout is spelled out."""

    __slots__ = ("prefix", "provider")

    def __init__(self, prefix: str = "cf", provider: str = DEFAULT_PROVIDER) -> None:
        self.prefix = prefix
        self.provider = provider

    def for_provider(self, provider: str) -> Keys:
        return Keys(self.prefix, provider)

    def _conn(self, user: str) -> str:
        """The head every key of the connection (user, this provider) starts with."""
        return f"{self.prefix}:{{{user}}}:{self.provider}"

    def rec(self, user: str) -> str:
        return f"{self._conn(user)}:rec"

    def sealed(self, user: str, name: str) -> str:
        """The key of one of ``SEALED_KEYS`` (``tok``, ``rvk``)."""
        return f"{self._conn(user)}:{name}"

    def hist(self, user: str) -> str:
        return f"{self._conn(user)}:hist"

    def hist_around_user(self) -> tuple[str, str]:
        """What comes before and after the user in :meth:`hist`: a script that visits users
        builds their keys from these."""
        return f"{self.prefix}:{{", f"}}:{self.provider}:hist"

    def seen(self, user: str) -> str:
        return f"{self._conn(user)}:seen"

    def inbox(self, user: str, event_id: str) -> str:
        return f"{self._conn(user)}:in:{event_id}"

    def lock(self, user: str) -> str:
        return f"{self._conn(user)}:lock"

    def import_cursor(self, source_digest: str) -> str:
        """Where ``consent-flow import`` keeps its place in one source between runs."""
        return f"{self.prefix}:{self.provider}:import:{source_digest}"

    def idx(self, state: State | str) -> str:
        return f"{self.prefix}:{self.provider}:idx:{State(state).value}"

    @property
    def sched(self) -> str:
        return f"{self.prefix}:{self.provider}:sched"

    @property
    def histidx(self) -> str:
        return f"{self.prefix}:{self.provider}:histidx"

    def refresh_job_id(self, user: str, due_ms: int) -> str:
        """The id of the deferred refresh job of the connection's schedule due at ``due_ms``."""
        return f"{self.refresh_job_head}{user}:{due_ms}"

    @property
    def refresh_job_head(self) -> str:
        """What every refresh job id of this provider starts with, before the user."""
        return f"refresh:{self.prefix}:{self.provider}:"

    @property
    def transition_counts(self) -> str:
        return f"{self.prefix}:metrics:{self.provider}:transitions"

    @property
    def refresh_counts(self) -> str:
        return f"{self.prefix}:metrics:{self.provider}:refresh"

    @property
    def revocation_counts(self) -> str:
        return f"{self.prefix}:metrics:{self.provider}:revocation"

    @property
    def refresh_lead(self) -> str:
        return f"{self.prefix}:metrics:{self.provider}:lead"

    @property
    def webhook_counts(self) -> str:
        """Webhook deliveries by outcome (delivered, retried, dead), every provider's."""
        return f"{self.prefix}:metrics:webhooks"

    @property
    def worker_counts(self) -> str:
        return f"{self.prefix}:metrics:worker"

    def hourly(self, hour: int) -> str:
        return f"{self.prefix}:metrics:{self.provider}:hour:{hour}"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def worker_clocks(self) -> str:
        return f"{self.prefix}:workers:clock"

    @property
    def outbox(self) -> str:
        return f"{self.prefix}:{self.provider}:outbox"

    @property
    def upgrades(self) -> str:
        return f"{self.prefix}:{self.provider}:upgrades"

    @property
    def invalidate(self) -> str:
        return f"{self.prefix}:invalidate"

    def invalidation(self, user: str) -> str:
        """The message on :attr:`invalidate` that drops the connection's cached tokens."""
        return f"{self.provider}\n{user}"

    @property
    def halt(self) -> str:
        return f"{self.prefix}:{self.provider}:halt"

    @property
    def kids(self) -> str:
        return f"{self.prefix}:kids"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:events"

    def sess(self, digest: str) -> str:
        return f"{self.prefix}:{self.provider}:sess:{digest}"

    def reply(self, event_id: str) -> str:
        return f"{self.prefix}:reply:{event_id}"


class Store(Protocol):
    """What the engine needs from a state store."""

    async def load(self, user: str) -> ConsentRecord: ...

    async def commit(self, change: Change) -> CommitResult: ...

    async def history(
        self, user: str, *, limit: int = HISTORY_MAX_ENTRIES
    ) -> list[HistoryEntry]: ...

    async def users(
        self, state: State, *, offset: int = 0, limit: int = 100
    ) -> list[tuple[str, float]]: ...

    async def counts(self) -> dict[State, int]: ...

    async def session_owner(self, digest: str) -> tuple[str, str] | None: ...

    async def claim_session(
        self, user: str, session_id: str, event_id: str, sealed: str | None
    ) -> str: ...

    async def put_inbox(self, user: str, event_id: str, sealed: str) -> None: ...

    async def take_inbox(self, user: str, event_id: str) -> str | None: ...

    async def acquire_lock(self, user: str, ttl: float) -> str | None: ...

    async def release_lock(self, user: str, token: str) -> bool: ...


# --- Lua ------------------------------------------------------------------------------------------

_COMMIT = (
    ENQUEUE_LUA
    + """
local rec, hist, seen, idx_from, idx_to, sched, kids, stream, sess_set, sess_del, histidx,
  outbox, counters = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8],
  KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local op = cjson.decode(ARGV[1])
if redis.call('ZSCORE', seen, op.event_id) then
  return {'duplicate', tonumber(redis.call('HGET', rec, 'v') or '0')}
end
local cur_state = redis.call('HGET', rec, 'state') or 'unprovisioned'
local cur_v = tonumber(redis.call('HGET', rec, 'v') or '0')
if cur_state ~= op.expect_state or cur_v ~= op.expect_v then
  return {'conflict', cur_v, cur_state}
end
local cipher, slots = op.cipher, op.slots
-- The key id of a ciphertext: v2 binary (byte 2, then 6 bytes of key id) or v1 text.
local function kid_of(v)
  if not v then return nil end
  if string.byte(v, 1) == 2 then
    if #v < 7 then return nil end
    return string.format('%02x%02x%02x%02x%02x%02x', string.byte(v, 2, 7))
  end
  return string.match(v, '^v1%.([^%.]+)%.')
end
-- Every ciphertext of the user: the hash's cipher fields, then the sealed keys (KEYS[15], ...),
-- each where it is (a record of an earlier version holds it in the hash, as v1 text).
local function ciphertexts()
  local out = redis.call('HMGET', rec, unpack(cipher))
  for i, name in ipairs(slots) do
    out[#cipher + i] = redis.call('GET', KEYS[14 + i]) or redis.call('HGET', rec, name)
  end
  return out
end
local before = ciphertexts()
if #op.del > 0 then redis.call('HDEL', rec, unpack(op.del)) end
local flat = {}
for k, v in pairs(op.set) do flat[#flat + 1] = k; flat[#flat + 1] = v end
local v = cur_v + 1
flat[#flat + 1] = 'v'; flat[#flat + 1] = tostring(v)
redis.call('HSET', rec, unpack(flat))
for i, name in ipairs(slots) do
  local arg = op.seal[name]
  if arg then
    redis.call('SET', KEYS[14 + i], ARGV[arg])
    redis.call('HDEL', rec, name)
  elseif op.wipe[name] then
    redis.call('DEL', KEYS[14 + i])
  end
end
-- A hash that once held a long value (a sealed session, a long reason) keeps Redis's large
-- encoding after the value is gone; written anew, it takes the compact one again if it fits.
if redis.call('OBJECT', 'ENCODING', rec) == 'hashtable' then
  local all = redis.call('HGETALL', rec)
  local fits = #all <= 2 * op.compact_entries
  for i = 1, #all do
    if #all[i] > op.compact_value then fits = false; break end
  end
  if fits then
    redis.call('DEL', rec)
    redis.call('HSET', rec, unpack(all))
  end
end
local after = ciphertexts()
for i = 1, #after do
  local a, b = kid_of(before[i]), kid_of(after[i])
  if a ~= b then
    if a then redis.call('HINCRBY', kids, a, -1) end
    if b then redis.call('HINCRBY', kids, b, 1) end
  end
end
local tok, rvk = #cipher + 1, #cipher + 2
if op.moved then
  redis.call('ZREM', idx_from, op.user)
  redis.call('ZADD', idx_to, op.since, op.user)
end
if op.schedule then
  redis.call('ZADD', sched, op.schedule, op.user)
elseif op.unschedule then
  redis.call('ZREM', sched, op.user)
end
if op.sess_value then redis.call('SET', sess_set, op.sess_value, 'EX', op.sess_ttl) end
if op.sess_drop then redis.call('DEL', sess_del) end
if after[rvk] and after[rvk] ~= before[rvk] then
  -- Tokens moved to the revocation outbox: the cleanup job retries what the provider missed.
  redis.call('ZADD', outbox, op.at, op.user)
end
if before[tok] and before[tok] ~= after[tok] then
  -- The tokens a process may have cached are gone or replaced: tell every process now.
  redis.call('PUBLISH', op.channel, op.invalidation)
end
if op.hist then
  local appended = true
  if op.collapse then
    -- Refreshes in a row share one history entry that counts them: a grant refreshed hourly
    -- for a year keeps a short timeline. The stream still carries every one.
    local last = redis.call('LINDEX', hist, -1)
    if last then
      local prev = cjson.decode(last)
      if prev.event == op.event_name then
        local entry = cjson.decode(op.hist)
        entry.count = (prev.count or 1) + 1
        entry.first_at = prev.first_at or prev.at
        redis.call('LSET', hist, -1, cjson.encode(entry))
        appended = false
      end
    end
  end
  if appended then
    redis.call('RPUSH', hist, op.hist)
    redis.call('LTRIM', hist, -tonumber(op.hist_max), -1)
    redis.call('ZADD', histidx, 'NX', op.at, op.user)
  end
  redis.call('XADD', stream, 'MAXLEN', '~', op.stream_max, '*', 'entry', op.hist, 'user', op.user,
    'provider', op.provider)
  redis.call('HINCRBY', counters, op.metric, 1)
end
redis.call('ZADD', seen, op.at, op.event_id)
redis.call('ZREMRANGEBYSCORE', seen, '-inf', '(' .. op.seen_after)
redis.call('ZREMRANGEBYRANK', seen, 0, -tonumber(op.seen_max) - 1)
-- A user that goes quiet drops the whole set once its newest id is out of the window.
redis.call('EXPIRE', seen, op.seen_ttl)
if op.reply then
  redis.call('RPUSH', KEYS[14], op.reply)
  redis.call('EXPIRE', KEYS[14], op.reply_ttl)
end
-- What rides along only when the step applies: the job of a cancelled or replaced schedule, the
-- arq jobs to queue (the next refresh, a webhook notice; their payloads are the arguments after
-- the sealed values), the release of the user's lock, and counters. Their keys follow the sealed
-- keys, in the order: the dropped job, the new jobs, the lock, the upgrade index, the counters.
local n = 14 + #slots
if op.drop_job then
  -- The job of the schedule this step cancels or replaces: nothing stale stays queued.
  redis.call('DEL', KEYS[n + 1])
  redis.call('ZREM', KEYS[n + 2], op.drop_job)
  n = n + 2
end
if op.jobs then
  -- Each job: expiry, score, id and the index of its payload in ARGV; three keys apiece.
  for _, job in ipairs(op.jobs) do
    enqueue(KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], ARGV[job[4]], job[1], job[2], job[3])
    n = n + 3
  end
end
if op.unlock then
  n = n + 1
  if redis.call('GET', KEYS[n]) == op.unlock then redis.call('DEL', KEYS[n]) end
end
if op.upgrade_until or op.upgrade_drop then
  -- Upgrade sessions by expiry, for the cleanup job: a grant's index does not say which is open.
  n = n + 1
  if op.upgrade_until then
    redis.call('ZADD', KEYS[n], op.upgrade_until, op.user)
  else
    redis.call('ZREM', KEYS[n], op.user)
  end
end
if op.counters then
  for _, c in ipairs(op.counters) do
    n = n + 1
    if string.find(c[2], '.', 1, true) then
      redis.call('HINCRBYFLOAT', KEYS[n], c[1], c[2])
    else
      redis.call('HINCRBY', KEYS[n], c[1], c[2])
    end
  end
end
return {'ok', v}
"""
)

# Claim an authorization session for one callback: single use, checked against the record.
_CLAIM = """
local rec, inbox = KEYS[1], KEYS[2]
local state = redis.call('HGET', rec, 'state')
-- A session is open while pending, or beside a grant (an upgrade) while provisioned.
if state ~= 'pending' and state ~= 'provisioned' then return 'not_pending' end
if redis.call('HGET', rec, 'sid') ~= ARGV[1] then return 'unknown_session' end
if redis.call('HGET', rec, 'claimed') then return 'already_used' end
-- Session expiry is Redis's time, whoever wrote it and whichever clock this process keeps.
local now = redis.call('TIME')
local sexp = tonumber(redis.call('HGET', rec, 'sexp') or '0')
if sexp <= tonumber(now[1]) + tonumber(now[2]) / 1000000 then return 'expired' end
redis.call('HSET', rec, 'claimed', ARGV[2])
if ARGV[3] ~= '' then redis.call('SET', inbox, ARGV[3], 'EX', ARGV[4]) end
return 'ok'
"""

# Keys of the visited users are derived in the script: one primary holds a shard's users.
_TRIM = """
local histidx = KEYS[1]
local head, cutoff, limit, tail = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local users = redis.call('ZRANGEBYSCORE', histidx, '-inf', '(' .. ARGV[2], 'LIMIT', 0, limit)
local dropped = 0
for _, user in ipairs(users) do
  local hist = head .. user .. tail
  local oldest = nil
  while true do
    local head = redis.call('LINDEX', hist, 0)
    if not head then break end
    local at = tonumber(cjson.decode(head)['at'])
    if at >= cutoff then oldest = at; break end
    redis.call('LPOP', hist)
    dropped = dropped + 1
  end
  if oldest then
    redis.call('ZADD', histidx, string.format('%.3f', oldest), user)
  else
    redis.call('ZREM', histidx, user)
  end
end
return dropped
"""

# Forget tokens revoked at the provider (or given up on), unless a later revocation replaced them
# meanwhile; a still revoked record notes what became of them, and the outcome is counted.
# ARGV: sealed tokens, their key id, user, outcome.
_DROP_REVOKED = """
local rec, rvk, kids, outbox, counts = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local sealed, kid, user, outcome = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('GET', rvk) == sealed then
  redis.call('DEL', rvk)
elseif redis.call('HGET', rec, 'rvk') == sealed then
  redis.call('HDEL', rec, 'rvk')
else
  return 0
end
redis.call('HDEL', rec, 'rvktries')
if redis.call('HGET', rec, 'state') == 'revoked' then
  redis.call('HSET', rec, 'provrev', outcome)
end
redis.call('HINCRBY', kids, kid, -1)
redis.call('ZREM', outbox, user)
redis.call('HINCRBY', counts, outcome, 1)
return 1
"""

# Take the user's lock when it is free, and read the record (hash and sealed keys) and another
# hash (the refresh pause) in the same round trip. ARGV: owner token, ttl (ms).
_LOCK_AND_LOAD = """
local got = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX')
return {got and 1 or 0, redis.call('HGETALL', KEYS[2]), redis.call('GET', KEYS[3]),
  redis.call('GET', KEYS[4]), redis.call('HGETALL', KEYS[5])}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: list[Any]) -> dict[str, str]:
    """A Lua HGETALL answer (a flat list) as a dict of text."""
    return {_decode(flat[i]): _decode(flat[i + 1]) for i in range(0, len(flat), 2)}


def _record(user: str, flat: list[Any], tok: bytes | None, rvk: bytes | None) -> ConsentRecord:
    """A record from its hash (HGETALL, flat) and its sealed keys."""
    sealed = {name: value for name, value in (("tok", tok), ("rvk", rvk)) if value}
    return ConsentRecord.from_hash(user, _pairs(flat), sealed)


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
    ) -> None:
        """``wait_replicas``: a commit that stores tokens returns once that many replicas hold
        it, or after ``REPLICA_WAIT_MS`` with ``replicated=False`` (see ``commit``)."""
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStore needs a client without decode_responses")
        # redis-py types its asyncio client with sync|async unions that mypy cannot await: the
        # store treats it as untyped rather than scatter ignores over every call.
        self.redis: Any = redis
        self.keys = Keys(prefix, provider)
        self.wait_replicas = wait_replicas
        self._load = redis.register_script(lua("load_record"))
        self._drop_revoked = redis.register_script(_DROP_REVOKED)
        self._commit = redis.register_script(_COMMIT)
        self._claim = redis.register_script(_CLAIM)
        self._release = redis.register_script(_RELEASE)
        self._lock_and_load = redis.register_script(_LOCK_AND_LOAD)
        self._trim = redis.register_script(_TRIM)

    async def load(self, user: str) -> ConsentRecord:
        k = self.keys
        flat, tok, rvk = await self._load(
            keys=[k.rec(user), k.sealed(user, "tok"), k.sealed(user, "rvk")]
        )
        return _record(user, flat, tok, rvk)

    async def commit(self, change: Change) -> CommitResult:
        k = self.keys
        set_fields, delete_fields = change.writes()
        blobs = list(change.sealed.values())
        op: dict[str, Any] = {
            "user": change.user,
            "event_id": change.event_id,
            "expect_state": change.expect_state.value,
            "expect_v": change.expect_version,
            "set": set_fields,
            "del": list(delete_fields),
            "cipher": list(CIPHER_FIELDS),
            "slots": list(SEALED_KEYS),
            "compact_entries": COMPACT_HASH_ENTRIES,
            "compact_value": COMPACT_HASH_VALUE,
            # Sealed values travel as arguments of their own (binary): ARGV[2], ARGV[3], ...
            "seal": {name: 2 + i for i, name in enumerate(change.sealed)},
            "wipe": {name: True for name in SEALED_KEYS if name in delete_fields},
            "channel": k.invalidate,
            "invalidation": k.invalidation(change.user),
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
            "reply": change.reply[1] if change.reply else None,
            "reply_ttl": str(REPLY_TTL),
            "hist_max": str(HISTORY_MAX_ENTRIES),
            "stream_max": str(STREAM_MAX_ENTRIES),
            "seen_max": str(SEEN_MAX_EVENTS),
            "seen_after": repr(change.at - SEEN_WINDOW),
            "seen_ttl": str(math.ceil(SEEN_WINDOW)),
        }
        sess_set = sess_drop = k.sess("-")
        if change.session_lookup is not None:
            digest, ttl = change.session_lookup
            sess_set = k.sess(digest)
            op["sess_value"] = f"{change.user}\n{change.set_fields['sid']}"
            op["sess_ttl"] = str(max(1, ttl))
        if change.drop_session_lookup is not None:
            sess_drop = k.sess(change.drop_session_lookup)
            op["sess_drop"] = True
        extra_keys: list[str] = []
        if change.drop_job is not None:
            extra_keys += change.drop_job.keys
            op["drop_job"] = change.drop_job.job_id
        if change.jobs:
            # Scores and expiries travel as strings: cjson prints numbers with 14 digits.
            op["jobs"] = [
                [str(job.expires_ms), score_arg(job.score_ms), job.job_id, 2 + len(blobs) + i]
                for i, job in enumerate(change.jobs)
            ]
            for job in change.jobs:
                extra_keys += job.keys
        if change.unlock is not None:
            extra_keys.append(k.lock(change.user))
            op["unlock"] = change.unlock
        if change.upgrade_until is not None or change.drop_upgrade:
            extra_keys.append(k.upgrades)
            if change.upgrade_until is not None:
                op["upgrade_until"] = repr(change.upgrade_until)
            else:
                op["upgrade_drop"] = True
        if change.counters:
            extra_keys += [key for key, _, _ in change.counters]
            op["counters"] = [[name, amount] for _, name, amount in change.counters]
        commit_keys = [
            k.rec(change.user),
            k.hist(change.user),
            k.seen(change.user),
            k.idx(change.expect_state),
            k.idx(change.to_state),
            k.sched,
            k.kids,
            k.stream,
            sess_set,
            sess_drop,
            k.histidx,
            k.outbox,
            k.transition_counts,
            change.reply[0] if change.reply else k.reply("-"),
            *(k.sealed(change.user, name) for name in SEALED_KEYS),
            *extra_keys,
        ]
        # cjson turns null into a truthy userdata: absent keys are the only safe "no".
        commit_args: list[Any] = [
            json.dumps(
                {k: v for k, v in op.items() if v is not None and v is not False},
                separators=(",", ":"),
            ),
            *blobs,
            *(job.payload for job in change.jobs),
        ]
        replicated = True
        wait = await self.replicas_to_wait() if "tok" in change.sealed else 0
        if wait:
            result, replicated = await self._commit_and_wait(commit_keys, commit_args, wait)
        else:
            result = await self._commit(keys=commit_keys, args=commit_args)
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

    async def replicas_to_wait(self) -> int:
        """``wait_replicas``, or fewer when Sentinel sees fewer replicas up: waiting for one that
        is down would hold every refresh, and a failover could not promote it anyway."""
        if not self.wait_replicas:
            return 0
        healthy = getattr(self.redis, "healthy_replicas", None)
        if healthy is None:
            return self.wait_replicas
        return min(self.wait_replicas, int(await healthy()))

    async def mark_inflight(self, user: str, at: float) -> bool:
        """Note on the record that a refresh is at the provider. True once as many replicas as
        a commit waits for hold the mark, and with it the lock and the record it was read with:
        a failover from now on keeps them, so no other worker presents the refresh token this
        refresh is about to spend."""
        wait = await self.replicas_to_wait()
        if not wait:
            await self.redis.hset(self.keys.rec(user), "inflight", repr(at))
            return True
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.rec(user), "inflight", repr(at))
        pipe.execute_command("WAIT", wait, REPLICA_WAIT_MS)
        _, acks = await pipe.execute()
        return int(acks) >= wait

    async def confirm_replicated(self) -> bool:
        """Whether the primary this store reaches now has every write it took so far on as
        many replicas as a commit waits for."""
        wait = await self.replicas_to_wait()
        if not wait:
            return True
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(self.keys.prefix + ":replicated")
        pipe.execute_command("WAIT", wait, REPLICA_WAIT_MS)
        _, acks = await pipe.execute()
        return int(acks) >= wait

    async def _commit_and_wait(
        self, keys: list[str], args: list[Any], wait: int
    ) -> tuple[Any, bool]:
        """The commit, then WAIT for ``wait_replicas`` replicas, on one connection.

        WAIT counts the replicas that hold this connection's last write. A write of its own
        goes between the two: when the pipeline is sent again on a new connection (a failover)
        and the commit finds itself applied already (a duplicate writes nothing), WAIT still
        covers everything up to that write, the commit included.
        """
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            await self._commit(keys=keys, args=args, client=pipe)
            pipe.incr(self.keys.prefix + ":replicated")
            pipe.execute_command("WAIT", wait, REPLICA_WAIT_MS)
            try:
                result, _, acks = await pipe.execute()
            except NoScriptError:
                # Sent again on a new primary that does not have the script yet: nothing ran.
                if attempt:
                    raise
                await self.redis.script_load(self._commit.script)
                continue
            return result, int(acks) >= wait
        raise AssertionError("unreachable")  # pragma: no cover

    async def history(self, user: str, *, limit: int = HISTORY_MAX_ENTRIES) -> list[HistoryEntry]:
        raw = await self.redis.lrange(self.keys.hist(user), -limit, -1)
        return [HistoryEntry.from_json(item) for item in raw]

    async def users(
        self, state: State, *, offset: int = 0, limit: int = 100
    ) -> list[tuple[str, float]]:
        rows = await self.redis.zrange(
            self.keys.idx(state), offset, offset + limit - 1, withscores=True
        )
        return [(_decode(user), float(score)) for user, score in rows]

    async def users_before(self, state: State, before: float, *, limit: int = 500) -> list[str]:
        """Users in ``state`` since before ``before``: O(log n + found)."""
        rows = await self.redis.zrangebyscore(
            self.keys.idx(state), "-inf", repr(before), start=0, num=limit
        )
        return [_decode(user) for user in rows]

    async def outbox_due(self, now: float, *, limit: int = 100) -> list[str]:
        rows = await self.redis.zrangebyscore(
            self.keys.outbox, "-inf", repr(now), start=0, num=limit
        )
        return [_decode(user) for user in rows]

    async def upgrades_due(self, now: float, *, limit: int = 500) -> list[str]:
        """Users whose upgrade session expired by ``now``: O(log n + found)."""
        rows = await self.redis.zrangebyscore(
            self.keys.upgrades, "-inf", repr(now), start=0, num=limit
        )
        return [_decode(user) for user in rows]

    async def counts(self) -> dict[State, int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for state in State:
                pipe.zcard(self.keys.idx(state))
            values = await pipe.execute()
        return {state: int(n) for state, n in zip(State, values, strict=True)}

    async def session_owner(self, digest: str) -> tuple[str, str] | None:
        raw = await self.redis.get(self.keys.sess(digest))
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
        now (under the lock when taken), and ``also``'s fields.
        """
        k = self.keys
        token = secrets.token_hex(16)
        got, flat, tok, rvk, other = await self._lock_and_load(
            keys=[k.lock(user), k.rec(user), k.sealed(user, "tok"), k.sealed(user, "rvk"), also],
            args=[token, int(ttl * 1000)],
        )
        return (token if int(got) else None), _record(user, flat, tok, rvk), _pairs(other)

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
        k = self.keys
        return bool(
            await self._drop_revoked(
                keys=[k.rec(user), k.sealed(user, "rvk"), k.kids, k.outbox, k.revocation_counts],
                args=[sealed, KeyRing.key_id_of(sealed), user, outcome.value],
            )
        )

    async def key_ids_in_use(self) -> dict[str, int]:
        raw = await self.redis.hgetall(self.keys.kids)
        return {_decode(k): int(v) for k, v in raw.items() if int(v) > 0}

    async def trim_history(self, older_than: float, *, limit: int = 500) -> int:
        """Drop history entries older than ``older_than`` for up to ``limit`` users.

        Only users whose oldest entry is that old are visited (``histidx``): O(log n + due).
        """
        return int(
            await self._trim(
                keys=[self.keys.histidx],
                args=[
                    self.keys.hist_around_user()[0],
                    repr(older_than),
                    limit,
                    self.keys.hist_around_user()[1],
                ],
            )
        )


class MemoryStore:
    """The same contract in a process's memory: for fast tests of the engine's logic."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.records: dict[str, dict[str, str]] = {}
        self.sealed: dict[str, dict[str, bytes]] = {}  # the keys beside the record
        self.histories: dict[str, list[HistoryEntry]] = {}
        self.seen: dict[str, dict[str, float]] = {}  # event id: when it applied
        self.indexes: dict[State, dict[str, float]] = {state: {} for state in State}
        self.schedule: dict[str, float] = {}
        self.sessions: dict[str, tuple[str, str]] = {}
        self.inboxes: dict[tuple[str, str], str] = {}
        self.locks: dict[str, str] = {}
        self.jobs: dict[str, bytes] = {}  # queued arq jobs by id (payloads)
        self.counters: dict[tuple[str, str], float] = {}
        self.upgrades: dict[str, float] = {}  # upgrade sessions open, by expiry

    async def load(self, user: str) -> ConsentRecord:
        return ConsentRecord.from_hash(
            user, dict(self.records.get(user, {})), dict(self.sealed.get(user, {}))
        )

    async def commit(self, change: Change) -> CommitResult:
        user = change.user
        rec = self.records.setdefault(user, {})
        if change.event_id in self.seen.get(user, []):
            return CommitResult("duplicate", int(rec.get("v", "0")))
        current = State(rec.get("state", State.UNPROVISIONED.value))
        version = int(rec.get("v", "0"))
        if current is not change.expect_state or version != change.expect_version:
            return CommitResult("conflict", version, current)
        writes, deletes = change.writes()
        sealed = self.sealed.setdefault(user, {})
        for name in deletes:
            rec.pop(name, None)
            sealed.pop(name, None)
        rec.update(writes)
        rec["v"] = str(version + 1)
        for name, value in change.sealed.items():
            sealed[name] = value
            rec.pop(name, None)  # an earlier version's layout kept it in the record
        if change.moves:
            self.indexes[change.expect_state].pop(user, None)
            self.indexes[change.to_state][user] = change.at
        if change.schedule_at is not None:
            self.schedule[user] = change.schedule_at
        elif change.unschedule:
            self.schedule.pop(user, None)
        if change.session_lookup is not None:
            self.sessions[change.session_lookup[0]] = (user, change.set_fields["sid"])
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
        if change.drop_job is not None:
            self.jobs.pop(change.drop_job.job_id, None)
        for job in change.jobs:
            self.jobs.setdefault(job.job_id, job.payload)
        if change.unlock is not None and self.locks.get(user) == change.unlock:
            del self.locks[user]
        for key, name, amount in change.counters:
            self.counters[key, name] = self.counters.get((key, name), 0.0) + float(amount)
        return CommitResult("ok", version + 1)

    async def history(self, user: str, *, limit: int = HISTORY_MAX_ENTRIES) -> list[HistoryEntry]:
        return list(self.histories.get(user, [])[-limit:])

    async def users(
        self, state: State, *, offset: int = 0, limit: int = 100
    ) -> list[tuple[str, float]]:
        rows = sorted(self.indexes[state].items(), key=lambda item: (item[1], item[0]))
        return rows[offset : offset + limit]

    async def counts(self) -> dict[State, int]:
        return {state: len(members) for state, members in self.indexes.items()}

    async def session_owner(self, digest: str) -> tuple[str, str] | None:
        return self.sessions.get(digest)

    async def upgrades_due(self, now: float, *, limit: int = 500) -> list[str]:
        due = sorted((at, user) for user, at in self.upgrades.items() if at <= now)
        return [user for _, user in due[:limit]]

    async def claim_session(
        self, user: str, session_id: str, event_id: str, sealed: str | None
    ) -> str:
        rec = self.records.get(user, {})
        if rec.get("state") not in (State.PENDING.value, State.PROVISIONED.value):
            return "not_pending"
        if rec.get("sid") != session_id:
            return "unknown_session"
        if "claimed" in rec:
            return "already_used"
        if float(rec.get("sexp", "0")) <= self.clock():
            return "expired"
        rec["claimed"] = event_id
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
        held = self.sealed.get(user, {})
        if held.get("rvk") == sealed:
            del held["rvk"]
        elif self.records.get(user, {}).get("rvk", "").encode() == sealed:
            del self.records[user]["rvk"]
        else:
            return False
        self.records[user].pop("rvktries", None)
        if self.records[user].get("state") == State.REVOKED.value:
            self.records[user]["provrev"] = outcome.value
        return True
