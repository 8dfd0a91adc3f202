"""Refresh scheduling at scale: one sweep tick over a million users, and Redis memory per user.

One run starts a private ``redis-server`` (a free port, a temporary folder; never the system Redis)
and loads ``--users`` provisioned users into it the way the project stores them, under the
default names (prefix ``cf``, queue ``consent-flow:queue``):

* a few *template* users go through the real path, only the provider stubbed in-process:
  ``Engine.handle(provision_requested)``, the callback's ``RedisStore.claim_session`` with the
  sealed code, ``Engine.handle(authorization_completed)`` (``RedisStore.commit``, then
  ``Scheduler.schedule``: the deferred arq job);
* every other user is written in bulk by a Lua script, in pipelined batches, mirroring exactly
  what a template user holds: the record hash (the template's fields), the tokens key (sealed per
  user by the project's ``seal_tokens``: a JWT-shaped 1 KiB access token and a 64-character
  refresh token, deflated, in the binary layout), the template's two history entries
  (``HistoryEntry.to_json`` with this user's times and ids), the seen-zset with both event ids,
  the memberships of ``cf:idx:provisioned``, ``cf:sched`` (ms) and ``cf:histidx``, the deferred
  arq job key (arq's ``serialize_job`` with the project's JSON serializer, arq's expiry) and its
  entry in the arq queue, plus the shared figures the commit script keeps (``cf:kids``,
  ``cf:metrics:transitions``, the ``cf:events`` stream up to its cap). Next refreshes are spread
  over the coming hour (one-hour access tokens).

Before measuring, the loader is checked against the real path: every key a template user has, a
bulk user has too, with the same type, encoding, fields and size (within 10 %); no key the commit
path writes is left out; ``RedisStore.load`` and ``RedisStore.history`` read a sample of bulk users
back (tokens decrypt to what was sealed); and the first sweep below must recognise the queued jobs
of template and bulk users alike. Any mismatch is a failure (exit 1), not a figure.

Then it measures:

(a) ``Scheduler.sweep`` ticks, each timed from the caller (Python, redis-py, Lua, round trips),
    ``--repeat`` times, p50 and max in ms: the steady state (the 1,000 earliest due entries, their
    jobs queued), the requeue path (the same 1,000 with their job keys and queue entries deleted
    before each tick), and an idle tick; next to a bare ``ZRANGEBYSCORE cf:sched -inf <now>
    WITHSCORES LIMIT 0 1000`` round trip on the same connection pool. Target: tick <= 20 ms.
(b) memory: ``INFO memory`` used_memory before and after loading, per user, broken down by
    ``MEMORY USAGE`` (``SAMPLES 0``) of a sample of each per-user key and of each shared key
    divided by the users, and the keyspace's own hash tables (``MEMORY STATS``). The target
    (<= 2 KiB) is for what a grant needs: the record hash, the tokens and the schedule (the
    ``cf:sched`` entry, the deferred job and its queue entry), with those keys' share of the
    keyspace's own overhead; the total with history, seen-ids and indexes is reported beside it.

Missed targets are reported, never an exit code: only a failure exits non-zero.

    .venv/bin/python benchmarks/bench_schedule.py [--users 1000000] [--repeat 30] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # _infra, also when loaded by path

import redis  # noqa: E402
from _infra import (  # noqa: E402
    BenchError,
    percentile,
    quiet_logs,
    run_measure,
    start_redis,
    stop_process,
)

from consent_flow.store import codec  # noqa: E402

TARGET_TICK_MS = 20.0
TARGET_BYTES_PER_USER = 2048
ACCESS_TOKEN_CHARS = 1024
REFRESH_TOKEN_CHARS = 64
TOKEN_TTL = 3600.0  # access tokens live an hour: next refreshes spread over the coming hour
TEMPLATE_USERS = 5
BATCH = 1000  # users per loader script call
SWEEP_WINDOW = 1000  # = consent_flow.queue.scheduler.SWEEP_LIMIT, checked at start
SAMPLE = 200  # users sampled for MEMORY USAGE and for the read-back check
SCOPES = "openid offline_access profile"


# --- infrastructure ----------------------------------------------------------------------------


def used_memory(r: redis.Redis) -> int:
    return int(r.info("memory")["used_memory"])


def mem(r: redis.Redis, key: str) -> int:
    return int(r.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0") or 0)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# --- the data a provisioned user holds ----------------------------------------------------------


def user_name(i: int) -> str:
    return f"user{i:08d}"  # 12 characters: every key and index entry of the user repeats it


def new_id() -> str:
    return os.urandom(16).hex()  # what consent_flow.queue.bus.new_id makes: 32 hex characters


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_JWT_HEADER = _b64url(json.dumps({"alg": "RS256", "typ": "at+jwt", "kid": "k" + "0" * 42}).encode())


def _jwt_claims(user: str, pad: int, jti: str, sid: str) -> bytes:
    iat = 1764175335
    return json.dumps(
        {
            "iss": "https://cloud.example.com",
            "sub": user,
            "aud": "https://cloud.example.com/api",
            "client_id": "consent-flow",
            "scope": SCOPES + " notes:read notes:write",
            "iat": iat,
            "nbf": iat,
            "exp": iat + int(TOKEN_TTL),
            "auth_time": iat,
            "jti": jti,
            "sid": sid,
            "ext": "x" * pad,
        }
    ).encode()


def _jwt_pad(user: str) -> int:
    """Padding that makes a token of ACCESS_TOKEN_CHARS: claims of fixed width per user."""
    want = ACCESS_TOKEN_CHARS - len(_JWT_HEADER) - 342 - 2  # RS256: 256-byte signature
    pad = 0
    while len(_b64url(_jwt_claims(user, pad, "0" * 32, "0" * 32))) < want:
        pad += 1
    return pad


_CLAIMS: dict[int, str] = {}  # json.dumps of the claims with %s for sub, jti and sid


def access_token(user: str) -> str:
    """A JWT-shaped access token of ACCESS_TOKEN_CHARS characters (random signature)."""
    template = _CLAIMS.get(len(user))
    jti, sid = os.urandom(16).hex(), os.urandom(16).hex()
    if template is None:
        pad = _jwt_pad(user)
        template = _CLAIMS[len(user)] = _jwt_claims("%s", pad, "%s", "%s").decode()
        if (template % (user, jti, sid)).encode() != _jwt_claims(user, pad, jti, sid):
            raise BenchError("the claims template differs from json.dumps")
    claims_json = (template % (user, jti, sid)).encode()
    claims = _b64url(claims_json)
    token = f"{_JWT_HEADER}.{claims}.{_b64url(os.urandom(256))}"
    return token[:ACCESS_TOKEN_CHARS]


def user_tokens(user: str) -> dict[str, str]:
    """What the engine seals after a code exchange: the access and the refresh token."""
    refresh = secrets.token_urlsafe(REFRESH_TOKEN_CHARS * 3 // 4)[:REFRESH_TOKEN_CHARS]
    return {"access_token": access_token(user), "refresh_token": refresh}


def seal_tokens(ring: Any, user: str) -> bytes:
    """The user's tokens as ``Engine.seal_tokens`` seals them (the project's own function)."""
    from consent_flow.store.vault import seal_tokens as seal

    return bytes(seal(ring, user, user_tokens(user)))


@dataclass
class Times:
    """One user's moments: asked at ``at1``, approved at ``at2``; tokens until ``exp``."""

    at1: float
    at2: float
    exp: float
    due: float  # next refresh, as next_refresh_at computes it

    @classmethod
    def draw(cls, now: float, rng: random.Random) -> Times:
        due = now + 300 + rng.random() * (TOKEN_TTL - 420)
        exp = due + 120 + 12 * rng.random()  # margin 120 s, up to 10 % jitter of it
        at2 = exp - TOKEN_TTL
        return cls(at1=at2 - 5 - 60 * rng.random(), at2=at2, exp=exp, due=due)


class StubProvider:
    """The provider's side of the round trip, answered in-process, so that every other step is
    the engine's own: ``authorization_url``, ``exchange_code`` and ``validate_id_token`` are the
    only ``OAuthClient`` methods the two events call."""

    def __init__(self) -> None:
        self.grants: dict[str, tuple[Any, str]] = {}  # code -> (TokenSet, subject)

    def grant(self, code: str, user: str, expires_at: float) -> None:
        from consent_flow.oidc import TokenSet

        refresh = secrets.token_urlsafe(REFRESH_TOKEN_CHARS * 3 // 4)[:REFRESH_TOKEN_CHARS]
        self.grants[code] = (
            TokenSet(
                access_token=access_token(user),
                refresh_token=refresh,
                id_token="stub",
                token_type="Bearer",
                expires_at=expires_at,
                scopes=tuple(SCOPES.split()),
            ),
            user,
        )

    async def authorization_url(
        self, *, state: str, nonce: str, code_challenge: str, **extra: Any
    ) -> str:
        return (
            "http://127.0.0.1:8080/auth?response_type=code&client_id=consent-flow"
            "&redirect_uri=http%3A%2F%2F127.0.0.1%3A8080%2Foauth%2Fcallback"
            f"&scope={SCOPES.replace(' ', '+')}&state={state}&nonce={nonce}"
            f"&code_challenge={code_challenge}&code_challenge_method=S256&prompt=consent"
        )

    async def exchange_code(self, code: str, **extra: Any) -> Any:
        return self.grants[code][0]

    async def validate_id_token(self, id_token: str, *, nonce: str, **extra: Any) -> Any:
        from consent_flow.oidc import IDTokenClaims

        code = next(c for c, (t, _) in self.grants.items() if t.id_token == id_token)
        user = self.grants.pop(code)[1]
        now = time.time()
        return IDTokenClaims(
            subject=user,
            issuer="http://127.0.0.1:8080",
            audience=("consent-flow",),
            expires_at=now + 300,
            issued_at=now,
            nonce=nonce,
            claims={},
        )


async def provision_for_real(engine: Any, stub: StubProvider, user: str, expires_at: float) -> None:
    """What a user who asks and approves goes through, with the provider stubbed: the engine
    handles ``provision_requested``, the callback's session claim (as ``_web`` makes it), then
    the engine handles ``authorization_completed`` (commit, then ``Scheduler.schedule``)."""
    from consent_flow.core.table import Event, State
    from consent_flow.queue.bus import Envelope

    store, ring = engine.store, engine.ring
    outcome = await engine.handle(Envelope(Event.PROVISION_REQUESTED, user, "user"))
    if outcome.state != State.PENDING.value or outcome.result != "applied":
        raise BenchError(f"provision_requested did not apply for {user}: {outcome}")
    rec = await store.load(user)
    event_id, code = new_id(), "code-" + secrets.token_urlsafe(32)
    stub.grant(code, user, expires_at)
    sealed = ring.encrypt(code.encode(), user=user, purpose=f"code:{event_id}")
    claimed = await store.claim_session(user, rec.session_id, event_id, sealed)
    if claimed != "ok":
        raise BenchError(f"the session claim failed for {user}: {claimed}")
    outcome = await engine.handle(
        Envelope(
            Event.AUTHORIZATION_COMPLETED,
            user,
            "browser",
            event_id=event_id,
            payload={"session_id": rec.session_id or ""},
        )
    )
    if outcome.state != State.PROVISIONED.value or outcome.result != "applied":
        raise BenchError(f"authorization_completed did not apply for {user}: {outcome}")


# The bulk loader. KEYS: idx:provisioned, sched, histidx, the arq queue, the stream.
# ARGV: prefix, stream (1/0), stream cap, job key prefix, provider, the per-user fields' names
# (the codec's: PER_USER_FIELDS), n constant fields, their pairs, then
# per user: user, sealed tokens, exp, at2, next, at1, ev1, ev2, hist1, hist2, due ms, job
# payload, job ttl.
_LOAD = """
local idx, sched, histidx, queue, stream = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix, with_stream, cap, jobp = ARGV[1], ARGV[2] == '1', ARGV[3], ARGV[4]
local provider = ARGV[5]
local f_exp, f_since, f_lastref, f_next, f_sub = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local nconst = tonumber(ARGV[11])
local const = {}
for i = 1, 2 * nconst do const[i] = ARGV[11 + i] end
local n = 0
for i = 12 + 2 * nconst, #ARGV, 13 do
  local user, tok, exp, at2, nxt, at1 = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4],
    ARGV[i+5]
  local ev1, ev2, h1, h2, due, payload, ttl = ARGV[i+6], ARGV[i+7], ARGV[i+8], ARGV[i+9],
    ARGV[i+10], ARGV[i+11], ARGV[i+12]
  local tag = prefix .. ':{s0}:' .. provider .. ':u:' .. user .. ':'
  local f = {f_exp, exp, f_since, at2, f_lastref, at2, f_next, nxt, f_sub, user}
  for j = 1, #const do f[#f + 1] = const[j] end
  redis.call('HSET', tag .. 'rec', unpack(f))
  redis.call('SET', tag .. 'tok', tok)
  redis.call('RPUSH', tag .. 'hist', h1, h2)
  redis.call('ZADD', tag .. 'seen', at1, ev1, at2, ev2)
  redis.call('EXPIRE', tag .. 'seen', SEEN_TTL)
  redis.call('ZADD', idx, at2, user)
  redis.call('ZADD', sched, due, user)
  redis.call('ZADD', histidx, 'NX', at1, user)
  local id = '{s0}:refresh:' .. prefix .. ':' .. provider .. ':' .. user .. ':' .. due
  redis.call('SET', jobp .. id, payload, 'PX', ttl)
  redis.call('ZADD', queue, due, id)
  if with_stream then
    redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 'entry', h1, 'user', user,
      'provider', provider)
    redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', 'entry', h2, 'user', user,
      'provider', provider)
  end
  n = n + 1
end
return n
"""

# The fields the loader writes per user, in the order its script takes them (named by the codec).
PER_USER_FIELDS = tuple(
    codec.field_name(attribute)
    for attribute in ("expires_at", "since", "last_refresh_at", "next_refresh_at", "subject")
)
BENCH_PREFIX = "cf"  # the default Settings' key prefix, which the benchmark runs under


def resp(args: list[bytes]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        parts.append(b"$%d\r\n" % len(a))
        parts.append(a)
        parts.append(b"\r\n")
    return b"".join(parts)


class Loader:
    """Pipelined EVALSHA batches on one connection: the next batch is built while Redis runs
    the previous one."""

    def __init__(self, port: int, sha: str, keys: list[str], header: list[bytes]) -> None:
        self.conn = redis.Connection(port=port, socket_timeout=120)
        self.conn.connect()
        self.head = [
            b"EVALSHA",
            sha.encode(),
            str(len(keys)).encode(),
            *(k.encode() for k in keys),
            *header,
        ]
        self.stream_arg = 3 + len(keys) + 1  # ARGV[2]
        self.in_flight = 0
        self.loaded = 0

    def send(self, stream: bool, users: list[bytes]) -> None:
        head = list(self.head)
        head[self.stream_arg] = b"1" if stream else b"0"
        self.collect()
        self.conn.send_packed_command([resp(head + users)], check_health=False)
        self.in_flight += 1

    def collect(self) -> None:
        while self.in_flight:
            reply = self.conn.read_response()
            if isinstance(reply, Exception):
                raise BenchError(f"the loader script failed: {reply}")
            self.loaded += int(reply)
            self.in_flight -= 1

    def close(self) -> None:
        self.collect()
        self.conn.disconnect()


def history_templates(entries: list[Any]) -> list[tuple[Any, str]]:
    """``HistoryEntry.to_json`` of a template user's entries, with %(at)s, %(c)s and %(e)s for
    what differs per user (checked against ``to_json`` itself once per batch)."""
    from consent_flow.core.records import HistoryEntry

    out = []
    for e in entries:
        probe = (
            HistoryEntry(
                e.event, e.from_state, e.to_state, 1234567.25, e.actor, e.reason, "C" * 32, "E" * 32
            )
            .to_json()
            .replace("%", "%%")
        )
        text = (
            probe.replace("1234567.25", "%(at)s")
            .replace("C" * 32, "%(c)s")
            .replace("E" * 32, "%(e)s")
        )
        out.append((e, text))
    return out


def bulk_users(
    start: int,
    stop: int,
    now: float,
    ring: Any,
    rng: random.Random,
    history: list[tuple[Any, str]],
) -> tuple[list[bytes], list[tuple[str, Times]]]:
    from arq.jobs import serialize_job

    from consent_flow.core.records import HistoryEntry
    from consent_flow.queue.bus import dump_job
    from consent_flow.queue.scheduler import REFRESH_JOB
    from consent_flow.store.redis_store import Keys, due_ms

    keys = Keys(BENCH_PREFIX, shards=1).shard(0)  # one shard: see main()

    out: list[bytes] = []
    made: list[tuple[str, Times]] = []
    enqueue_ms = int(now * 1000)
    for i in range(start, stop):
        user = user_name(i)
        t = Times.draw(now, rng)
        ms = due_ms(t.due)
        c1, ev1, c2, ev2 = new_id(), new_id(), new_id(), new_id()
        (e1, t1), (e2, t2) = history
        h1 = t1 % {"at": repr(t.at1), "c": c1, "e": ev1}
        h2 = t2 % {"at": repr(t.at2), "c": c2, "e": ev2}
        if i == start and (
            h1
            != HistoryEntry(
                e1.event, e1.from_state, e1.to_state, t.at1, e1.actor, e1.reason, c1, ev1
            ).to_json()
            or h2
            != HistoryEntry(
                e2.event, e2.from_state, e2.to_state, t.at2, e2.actor, e2.reason, c2, ev2
            ).to_json()
        ):
            raise BenchError("the history templates differ from HistoryEntry.to_json")
        payload = serialize_job(
            REFRESH_JOB, (user, ms, keys.provider), {}, None, enqueue_ms, serializer=dump_job
        )
        assert keys.refresh_job_id(user, ms) == f"{{s0}}:refresh:{BENCH_PREFIX}:default:{user}:{ms}"
        out += [
            user.encode(),
            seal_tokens(ring, user),
            repr(t.exp).encode(),
            repr(t.at2).encode(),
            repr(t.due).encode(),
            repr(t.at1).encode(),
            ev1.encode(),
            ev2.encode(),
            h1.encode(),
            h2.encode(),
            str(ms).encode(),
            payload,
            str(ms - enqueue_ms + 86_400_000).encode(),
        ]
        made.append((user, t))
    return out, made


# --- fidelity checks ----------------------------------------------------------------------------


def user_keys(r: redis.Redis, prefix: str, user: str) -> dict[str, str]:
    """The user's own keys, by role: rec, hist, seen, ... and 'job' for its arq job (a SCAN:
    call it while the keyspace is small)."""
    keys = {
        _s(k).rsplit(":", 1)[-1]: _s(k)
        for k in r.scan_iter(match=f"{prefix}:{{s0}}:default:u:{user}:*", count=1000)
    }
    jobs = [
        _s(k) for k in r.scan_iter(match=f"arq:job:{{s0}}:refresh:{prefix}:*:{user}:*", count=1000)
    ]
    if jobs:
        keys["job"] = jobs[0]
    return keys


def same_roles(
    r: redis.Redis, prefix: str, roles: dict[str, str], user: str, sched: str
) -> dict[str, str]:
    """The keys ``user`` should hold in each of a template user's roles."""
    from arq.constants import job_key_prefix

    from consent_flow.store.redis_store import Keys

    keys = Keys(prefix, shards=1).shard(0)
    out = {role: keys.sealed(user, role) for role in roles if role != "job"}
    if "job" in roles:
        out["job"] = job_key_prefix + keys.refresh_job_id(user, int(r.zscore(sched, user) or 0))
    missing = [role for role, key in out.items() if not r.exists(key)]
    if missing:
        raise BenchError(
            f"a real user has keys {sorted(roles)}; bulk-loaded {user} lacks {missing}"
        )
    return out


def describe_key(r: redis.Redis, key: str) -> dict[str, Any]:
    kind = _s(r.type(key))
    out: dict[str, Any] = {
        "type": kind,
        "encoding": _s(r.object("encoding", key)),
        "bytes": mem(r, key),
        "ttl": r.pttl(key) > 0,
    }
    if kind == "hash":
        out["fields"] = sorted(_s(f) for f in r.hkeys(key))
    elif kind == "list":
        out["len"] = r.llen(key)
    elif kind == "zset":
        out["len"] = r.zcard(key)
    return out


def check_same_shape(r: redis.Redis, a: dict[str, str], b: dict[str, str]) -> dict[str, Any]:
    shapes = {}
    for role in sorted(a):
        da, db = describe_key(r, a[role]), describe_key(r, b[role])
        for field in ("type", "encoding", "fields", "len", "ttl"):
            if da.get(field) != db.get(field):
                raise BenchError(
                    f"{role} key differs in {field}: real {da.get(field)!r}, bulk {db.get(field)!r}"
                )
        if abs(da["bytes"] - db["bytes"]) > 0.1 * da["bytes"]:
            raise BenchError(
                f"{role} key differs in size: real {da['bytes']} B, bulk {db['bytes']} B"
            )
        shapes[role] = {
            "real_bytes": da["bytes"],
            "bulk_bytes": db["bytes"],
            "type": da["type"],
            "encoding": da["encoding"],
        }
    return shapes


# --- measuring ---------------------------------------------------------------------------------


async def timed(repeat: int, call: Any, before: Any = None) -> list[float]:
    out = []
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def stats_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 50), 3),
        "max_ms": round(max(values), 3),
        "runs": len(values),
    }


async def measure(users: int, repeat: int, workdir: Path) -> dict[str, Any]:
    from arq.connections import create_pool
    from arq.constants import job_key_prefix

    from consent_flow import KeyRing, Settings, generate_key
    from consent_flow.core.table import State
    from consent_flow.engine.engine import Engine
    from consent_flow.queue.bus import JOB_SERIALIZERS, load_job
    from consent_flow.queue.scheduler import REFRESH_JOB, SWEEP_LIMIT, Scheduler
    from consent_flow.store.connection import arq_redis_settings
    from consent_flow.store.redis_store import STREAM_MAX_ENTRIES, Keys, RedisStore, due_ms
    from consent_flow.store.vault import open_tokens

    if SWEEP_LIMIT != SWEEP_WINDOW:
        raise BenchError(
            f"SWEEP_LIMIT is {SWEEP_LIMIT}; this benchmark is written for {SWEEP_WINDOW}"
        )
    quiet_logs()
    # The default names (prefix cf, queue consent-flow:queue), on one shard: the loader writes
    # every user's keys in shard 0's layout (the shard tag costs each key name its five bytes).
    settings = Settings().with_changes(redis_shards=1)
    if settings.redis_prefix != BENCH_PREFIX:
        raise BenchError(f"the default prefix is {settings.redis_prefix}, not {BENCH_PREFIX}")
    prefix, queue = settings.redis_prefix, Keys.queue(settings.queue_name, 0)
    keys = Keys(prefix, shards=1).shard(0)
    ring = KeyRing.from_strings([generate_key()])
    rng = random.Random(1)
    now = time.time()
    timings: dict[str, float] = {}

    server = start_redis(workdir)
    r = redis.Redis(port=server.port)
    pool = await create_pool(
        arq_redis_settings(server.url), default_queue_name=queue, **JOB_SERIALIZERS
    )
    try:
        store = RedisStore(pool, prefix=prefix, shards=1)
        scheduler = Scheduler(pool, keys=store.keys, queue_name=settings.queue_name)
        base_memory = used_memory(r)

        # -- template users, through the real path. Their tokens live 200 s, so their refreshes
        # are due before any bulk user's: the first sweep below looks at their real jobs and at
        # bulk ones in the same tick.
        t0 = time.perf_counter()
        stub = StubProvider()
        engine = Engine(
            settings=settings,
            store=store,
            oauth=stub,  # type: ignore[arg-type]
            ring=ring,
            on_scheduled=scheduler.schedule,
        )
        templates = [user_name(i) for i in range(TEMPLATE_USERS)]
        for user in templates:
            await provision_for_real(engine, stub, user, time.time() + 200)
        real_user = templates[0]
        real_roles = user_keys(r, prefix, real_user)
        shared_expected = {
            keys.idx(State.PROVISIONED),
            keys.sched,
            keys.histidx,
            keys.kids,
            keys.stream,
            keys.transition_counts,
            queue,
        }
        written = {_s(k) for k in r.scan_iter(count=1000)}
        per_user = {k for k in written if "}:" in k or k.startswith(job_key_prefix)}
        # Reply lists are the callers' answers: transient (a minute), not part of a user's cost.
        replies = {k for k in written if k.startswith(keys.reply(""))}
        unknown = written - per_user - shared_expected - replies
        if unknown:
            raise BenchError(
                f"the commit path writes keys this loader does not mirror: {sorted(unknown)}"
            )
        rec = {_s(k): _s(v) for k, v in r.hgetall(keys.rec(real_user)).items()}
        missing = [f for f in PER_USER_FIELDS if f not in rec]
        if missing:
            raise BenchError(f"a provisioned record has no {missing} field(s)")
        if "tok" in rec or "tok" not in real_roles:
            raise BenchError("the sealed tokens are no longer in a key of their own: mirror it")
        constants = [(f, v) for f, v in rec.items() if f not in PER_USER_FIELDS]
        history = history_templates(await store.history(real_user))
        seen = [_s(m) for m in r.zrange(keys.seen(real_user), 0, -1)]
        if len(history) != 2 or seen != [e.event_id for e, _ in history]:
            raise BenchError(
                "a provisioned user now holds other than two history entries and "
                "their two event ids: the loader mirrors two transitions"
            )
        last = r.xrevrange(keys.stream, count=1)[0][1]
        if sorted(_s(k) for k in last) != ["entry", "provider", "user"]:
            raise BenchError(f"stream entries now carry {sorted(last)}: mirror them")
        job_key = next(
            _s(k)
            for k in r.scan_iter(match=f"{job_key_prefix}{keys.refresh_job_head}{real_user}:*")
        )
        job = load_job(r.get(job_key) or b"")
        if job != {
            "t": None,
            "f": REFRESH_JOB,
            "a": [real_user, int(job_key.rsplit(":", 1)[1]), keys.provider],
            "k": {},
            "et": job["et"],
        }:
            raise BenchError(f"the deferred job now holds {job}: mirror it")

        # -- the bulk load
        from consent_flow.store.redis_store import SEEN_WINDOW

        # The commit script gives the seen-ids their window as a time to live.
        sha = _s(r.script_load(_LOAD.replace("SEEN_TTL", str(math.ceil(SEEN_WINDOW)))))
        header = [
            prefix.encode(),
            b"0",
            str(STREAM_MAX_ENTRIES).encode(),
            job_key_prefix.encode(),
            keys.provider.encode(),
            *(f.encode() for f in PER_USER_FIELDS),
            str(len(constants)).encode(),
        ]
        for f, v in constants:
            header += [f.encode(), v.encode()]
        loader = Loader(
            server.port,
            sha,
            [keys.idx(State.PROVISIONED), keys.sched, keys.histidx, queue, keys.stream],
            header,
        )
        stream_from = max(TEMPLATE_USERS, users - STREAM_MAX_ENTRIES // 2)
        sample_users: list[tuple[str, Times]] = []
        wanted = set(
            random.Random(2).sample(
                range(TEMPLATE_USERS, max(users, TEMPLATE_USERS + 1)),
                min(SAMPLE, max(0, users - TEMPLATE_USERS)),
            )
        )
        first_bulk: list[tuple[str, Times]] = []
        i = TEMPLATE_USERS
        while i < users:
            end = min(users, i + BATCH)
            if i < stream_from < end:
                end = stream_from
            batch, made = bulk_users(i, end, now, ring, rng, history)
            loader.send(i >= stream_from, batch)
            for j, item in enumerate(made):
                if i + j in wanted:
                    sample_users.append(item)
            if not first_bulk:
                first_bulk = made[:1]
            i = end
        loader.close()
        if loader.loaded != users - TEMPLATE_USERS:
            raise BenchError(
                f"the loader wrote {loader.loaded} users, not {users - TEMPLATE_USERS}"
            )
        bulk_n = users - TEMPLATE_USERS
        for field, count in r.hgetall(keys.transition_counts).items():
            r.hincrby(keys.transition_counts, field, bulk_n * int(count) // TEMPLATE_USERS)
        r.hincrby(keys.kids, ring.primary_id, bulk_n)
        timings["load_s"] = round(time.perf_counter() - t0, 1)
        loaded_memory = used_memory(r)

        # -- fidelity: shapes, counts, read-back through the project's own code
        shapes = {}
        if first_bulk:
            bulk_roles = same_roles(r, prefix, real_roles, first_bulk[0][0], keys.sched)
            shapes = check_same_shape(r, real_roles, bulk_roles)
        for key, expected in (
            (keys.idx(State.PROVISIONED), users),
            (keys.sched, users),
            (keys.histidx, users),
            (queue, users),
        ):
            if r.zcard(key) != expected:
                raise BenchError(f"{key} holds {r.zcard(key)} entries, expected {expected}")
        for user, t in sample_users:
            loaded = await store.load(user)
            if loaded.state is not State.PROVISIONED or loaded.tokens is None:
                raise BenchError(f"RedisStore.load does not see {user} as provisioned")
            tokens = open_tokens(ring, user, loaded.tokens)
            if len(tokens["access_token"]) != ACCESS_TOKEN_CHARS or not tokens["refresh_token"]:
                raise BenchError(f"the tokens of {user} do not read back")
            if loaded.next_refresh_at != t.due or loaded.expires_at != t.exp:
                raise BenchError(f"the schedule fields of {user} do not read back")
            history = await store.history(user)
            if [h.event for h in history] != ["provision_requested", "authorization_completed"]:
                raise BenchError(f"the history of {user} does not read back")
            if not r.exists(job_key_prefix + keys.refresh_job_id(user, due_ms(t.due))):
                raise BenchError(f"the deferred job of {user} is not where the sweep looks")

        # -- (b) memory, before anything below changes the data
        timings["check_s"] = round(time.perf_counter() - t0 - timings["load_s"], 1)
        memory = memory_report(
            r,
            keys,
            ring,
            queue,
            users,
            base_memory,
            loaded_memory,
            [u for u, _ in sample_users] or [real_user],
        )
        memory["shapes_real_vs_bulk"] = shapes

        timings["memory_s"] = round(
            time.perf_counter() - t0 - timings["load_s"] - timings["check_s"], 1
        )
        # -- (a) sweep ticks
        scores = r.zrange(keys.sched, 0, SWEEP_WINDOW - 1, withscores=True)
        window = [(_s(u), int(s)) for u, s in scores]
        edge = window[-1][1]
        sweep_now = (edge + 0.5) / 1000
        first = await scheduler.sweep(now=sweep_now)
        if first != {"due": len(window), "requeued": 0}:
            raise BenchError(f"the sweep did not recognise the queued jobs: {first}")
        if not set(templates) <= {u for u, _ in window}:
            raise BenchError("the template users are not in the first sweep window")

        async def tick() -> None:
            await scheduler.sweep(now=sweep_now)

        async def bare() -> None:
            await pool.zrangebyscore(
                keys.sched, "-inf", edge, start=0, num=SWEEP_WINDOW, withscores=True
            )

        job_ids = [keys.refresh_job_id(u, s) for u, s in window]

        def drop_jobs() -> None:
            with r.pipeline(transaction=False) as pipe:
                pipe.delete(*(job_key_prefix + j for j in job_ids))
                pipe.zrem(queue, *job_ids)
                pipe.execute()

        await timed(5, bare)
        await timed(5, tick)
        baseline = await timed(repeat, bare)
        steady = await timed(repeat, tick)
        idle = await timed(repeat, lambda: scheduler.sweep(now=now))
        requeue_counts: list[dict[str, int]] = []

        async def requeue_tick() -> None:
            requeue_counts.append(await scheduler.sweep(now=sweep_now))

        requeue = await timed(repeat, requeue_tick, before=drop_jobs)
        if any(c != {"due": len(window), "requeued": len(window)} for c in requeue_counts):
            raise BenchError(
                f"the requeue tick did not requeue every dropped job: {requeue_counts[:3]}"
            )
        parts = await requeue_parts(scheduler, keys, queue, sweep_now, repeat, drop_jobs)
        probe = await backlog_probe(r, scheduler, keys, queue)
        timings["total_s"] = round(time.perf_counter() - t0, 1)

    finally:
        await pool.aclose()
        r.close()
        stop_process(server.process)

    tick_p50 = percentile(steady, 50)
    requeue_p50 = percentile(requeue, 50)
    return {
        "cpus": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "users": users,
        "template_users_real_path": TEMPLATE_USERS,
        "load_seconds": timings["load_s"],
        "phase_seconds": timings,
        "access_token_chars": ACCESS_TOKEN_CHARS,
        "refresh_token_chars": REFRESH_TOKEN_CHARS,
        "sweep_window": len(window),
        "baseline_zrangebyscore": stats_ms(baseline),
        "sweep_steady": stats_ms(steady),
        "sweep_requeue": stats_ms(requeue),
        "sweep_idle": stats_ms(idle),
        "sweep_requeue_parts_p50_ms": parts,
        "sweep_backlog_probe": probe,
        "target_tick_ms": TARGET_TICK_MS,
        "tick_met": max(tick_p50, requeue_p50) <= TARGET_TICK_MS,
        "memory": memory,
        "target_bytes_per_user": TARGET_BYTES_PER_USER,
        "memory_met": memory["grant_bytes_per_user"] <= TARGET_BYTES_PER_USER,
    }


async def requeue_parts(
    scheduler: Any, keys: Any, queue: str, now: float, repeat: int, drop_jobs: Any
) -> dict[str, float]:
    """Where a requeue tick's time goes: ``Scheduler.sweep``'s three steps, timed one by one
    (its own registered scripts, its own payload building)."""
    from arq.constants import job_key_prefix

    from consent_flow.queue.scheduler import (
        JOB_EXPIRY_MS,
        SWEEP_LIMIT,
        SWEEP_SCAN_FACTOR,
        refresh_payload,
    )
    from consent_flow.store.redis_store import due_ms

    steps: dict[str, list[float]] = {
        "due script (ZRANGEBYSCORE + EXISTS per entry)": [],
        "payloads in Python (refresh_payload per job)": [],
        "enqueue script (SET NX + ZADD per job)": [],
    }
    names = list(steps)
    for _ in range(repeat):
        drop_jobs()
        now_ms = due_ms(now)
        t0 = time.perf_counter()
        _found, missing, _more, _now = await scheduler._due(
            keys=[keys.sched],
            args=[
                now_ms,
                SWEEP_LIMIT,
                job_key_prefix + keys.refresh_job_head,
                SWEEP_SCAN_FACTOR * SWEEP_LIMIT,
            ],
        )
        t1 = time.perf_counter()
        args: list[Any] = []
        for i in range(0, len(missing), 2):
            user, score = _s(missing[i]), int(missing[i + 1])
            job_id = keys.refresh_job_id(user, score)
            payload = refresh_payload(user, score, now_ms, keys.provider)
            args += [job_key_prefix + job_id, payload, now_ms, job_id]
        t2 = time.perf_counter()
        await scheduler._enqueue(keys=[queue], args=[JOB_EXPIRY_MS, *args])
        t3 = time.perf_counter()
        for name, took in zip(names, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            steps[name].append(took * 1000)
    return {name: round(percentile(v, 50), 3) for name, v in steps.items()}


async def backlog_probe(r: redis.Redis, scheduler: Any, keys: Any, queue: str) -> dict[str, Any]:
    """2,000 due: the first 1,000 with their jobs queued (workers behind), the next 1,000 with
    their jobs lost. Does one tick find the lost ones?"""
    from arq.constants import job_key_prefix

    scores = r.zrange(keys.sched, 0, 2 * SWEEP_WINDOW - 1, withscores=True)
    if len(scores) < 2 * SWEEP_WINDOW:
        return {"skipped": f"needs {2 * SWEEP_WINDOW} users"}
    later = [keys.refresh_job_id(_s(u), int(s)) for u, s in scores[SWEEP_WINDOW:]]
    saved = {j: r.dump(job_key_prefix + j) for j in later}
    ttls = {j: r.pttl(job_key_prefix + j) for j in later}
    with r.pipeline(transaction=False) as pipe:
        pipe.delete(*(job_key_prefix + j for j in later))
        pipe.zrem(queue, *later)
        pipe.execute()
    now = (int(scores[-1][1]) + 0.5) / 1000
    counts = await scheduler.sweep(now=now)
    lost_after = sum(1 for j in later if not r.exists(job_key_prefix + j))
    # put the lost jobs back as they were
    with r.pipeline(transaction=False) as pipe:
        for j in later:
            pipe.delete(job_key_prefix + j)
            pipe.restore(job_key_prefix + j, max(1, ttls[j]), saved[j])
            pipe.zadd(queue, {j: int(j.rsplit(":", 1)[1])})
        pipe.execute()
    return {
        "due": 2 * SWEEP_WINDOW,
        "queued_first": SWEEP_WINDOW,
        "lost_behind": len(later),
        "sweep_saw": counts["due"],
        "requeued": counts["requeued"],
        "still_lost": lost_after,
    }


# --- memory -------------------------------------------------------------------------------------


GRANT_ROLES = ("rec", "tok", "job")  # a user's own keys that hold the grant and its schedule
GRANT_SHARED = ("cf:sched entry", "arq queue entry")


def memory_report(
    r: redis.Redis,
    keys: Any,
    ring: Any,
    queue: str,
    users: int,
    base: int,
    loaded: int,
    sample: list[str],
) -> dict[str, Any]:
    from arq.constants import job_key_prefix

    from consent_flow.core.table import State

    t0 = time.perf_counter()
    per_user_total = (loaded - base) / users
    roles: dict[str, list[int]] = {}
    encodings: dict[str, str] = {}
    for user in sample:
        due = int(r.zscore(keys.sched, user) or 0)
        for role, key in (
            ("rec", keys.rec(user)),
            ("tok", keys.sealed(user, "tok")),
            ("hist", keys.hist(user)),
            ("seen", keys.seen(user)),
            ("job", f"{job_key_prefix}{keys.refresh_job_id(user, due)}"),
        ):
            roles.setdefault(role, []).append(mem(r, key))
            encodings.setdefault(role, _s(r.object("encoding", key)))
    own = {role: sum(values) / len(values) for role, values in roles.items()}
    labels = {
        "rec": "cf:{u}:rec record hash",
        "tok": "cf:{u}:tok sealed tokens string",
        "hist": "cf:{u}:hist history list",
        "seen": "cf:{u}:seen seen-id zset",
        "job": "arq:job:refresh:... job string",
    }
    breakdown: dict[str, float] = {
        f"{labels[role]} ({encodings[role]})": own[role] for role in labels
    }
    shared = {
        "cf:idx:provisioned entry": keys.idx(State.PROVISIONED),
        "cf:sched entry": keys.sched,
        "cf:histidx entry": keys.histidx,
        "arq queue entry": queue,
    }
    entries = {label: mem(r, key) / users for label, key in shared.items()}
    breakdown.update(entries)
    fixed = mem(r, keys.stream) + mem(r, keys.kids) + mem(r, keys.transition_counts)
    breakdown["cf:events stream + cf:kids + metrics (shared, capped), per user"] = fixed / users
    stats = r.execute_command("MEMORY", "STATS")
    stats = dict(zip(stats[::2], stats[1::2], strict=True))
    db0 = stats.get(b"db.0") or stats.get("db.0") or []
    db0 = {_s(k): int(v) for k, v in zip(db0[::2], db0[1::2], strict=True)}
    tables = db0.get("overhead.hashtable.main", 0) + db0.get("overhead.hashtable.expires", 0)
    expires = db0.get("overhead.hashtable.expires", 0) / users
    # MEMORY USAGE counts a key's own dict entry; the keyspace's bucket arrays, the expiry
    # table (the arq job keys have a TTL) and allocator slack are what remains.
    accounted = sum(breakdown.values())
    remainder = per_user_total - accounted
    breakdown["the rest: keyspace buckets, expiry table, allocator (remainder)"] = remainder
    # What a grant needs: its record, its tokens and its schedule. Their share of the remainder:
    # the expiry table is the job keys' (the only keys here with a TTL), the rest is split
    # evenly over the user's own keys.
    spread = (remainder - expires) * len(GRANT_ROLES) / len(roles)
    grant_usage = sum(own[role] for role in GRANT_ROLES) + sum(entries[k] for k in GRANT_SHARED)
    grant = grant_usage + expires + spread
    t_breakdown = time.perf_counter() - t0
    return {
        "used_memory_before": base,
        "used_memory_after": loaded,
        "bytes_per_user": round(per_user_total, 1),
        "grant_bytes_per_user": round(grant, 1),
        "grant_memory_usage_bytes_per_user": round(grant_usage, 1),
        "grant_parts_bytes_per_user": {
            "record hash": round(own["rec"], 1),
            "tokens": round(own["tok"], 1),
            "arq job": round(own["job"], 1),
            **{k: round(entries[k], 1) for k in GRANT_SHARED},
        },
        "grant_keyspace_share_bytes_per_user": round(expires + spread, 1),
        "breakdown_bytes_per_user": {k: round(v, 1) for k, v in breakdown.items()},
        "memory_stats_keyspace_overhead_per_user": round(tables / users, 1),
        "tok_bytes": len(r.get(keys.sealed(sample[0], "tok")) or b""),
        "rec_encoding": encodings["rec"],
        # Redis 7 calls it hash-max-listpack-value (ziplist is its alias); 6.2 only ziplist.
        "hash_max_listpack_value": int(next(iter(r.config_get("hash-max-*-value").values()))),
        "breakdown_seconds": round(t_breakdown, 1),
    }


def report(r: dict[str, Any]) -> str:
    def met(ok: bool) -> str:
        return "met" if ok else "MISSED"

    def ms(s: dict[str, float]) -> str:
        return f"p50 {s['p50_ms']:7.3f} ms   max {s['max_ms']:7.3f} ms"

    m = r["memory"]
    lines = [
        f"consent-flow schedule benchmark: {r['users']:,} provisioned users "
        f"({r['template_users_real_path']} through the engine, provider stubbed; the rest "
        f"bulk-loaded alike in {r['load_seconds']:g} s), {r['access_token_chars']} B access "
        f"tokens; "
        f"{r['cpus']} CPUs (load average {r['loadavg_1min']:.2f})",
        f"(a) sweep tick, {r['sweep_window']} due entries, {r['sweep_steady']['runs']} runs each:",
        f"    baseline ZRANGEBYSCORE WITHSCORES LIMIT 0 1000:  {ms(r['baseline_zrangebyscore'])}",
        f"    sweep, jobs queued (steady state):              {ms(r['sweep_steady'])}",
        f"    sweep, jobs missing (requeue path):             {ms(r['sweep_requeue'])}",
        f"    sweep, nothing due (idle tick):                 {ms(r['sweep_idle'])}",
        f"    target tick <= {r['target_tick_ms']:g} ms (p50, both paths): {met(r['tick_met'])}",
    ]
    lines.append(
        "    requeue tick, step by step (p50): "
        + "; ".join(f"{k} {v:.2f} ms" for k, v in r["sweep_requeue_parts_p50_ms"].items())
    )
    p = r["sweep_backlog_probe"]
    if "skipped" not in p:
        lines.append(
            f"    backlog probe: {p['due']} due, first {p['queued_first']} queued, "
            f"{p['lost_behind']} lost behind them: one tick saw {p['sweep_saw']}, "
            f"requeued {p['requeued']}, {p['still_lost']} still lost"
        )
    b = m["breakdown_bytes_per_user"]
    grant_parts = ", ".join(f"{k} {v:.0f}" for k, v in m["grant_parts_bytes_per_user"].items())
    lines += [
        f"(b) memory per provisioned user: record, tokens, schedule "
        f"{m['grant_bytes_per_user']:.0f} B; target <= {r['target_bytes_per_user']} B: "
        f"{met(r['memory_met'])}",
        f"    = {m['grant_memory_usage_bytes_per_user']:.0f} B by MEMORY USAGE ({grant_parts}) + "
        f"{m['grant_keyspace_share_bytes_per_user']:.0f} B, their share of the keyspace "
        "remainder",
        f"    all of it, with history, seen-ids and indexes: used_memory "
        f"{m['used_memory_before']:,} -> {m['used_memory_after']:,} B: "
        f"{m['bytes_per_user']:.0f} B per provisioned user",
        f"    per user, by key (MEMORY USAGE SAMPLES 0; record hash {m['rec_encoding']}, "
        f"hash-max-listpack-value {m['hash_max_listpack_value']}; sealed tokens "
        f"{m['tok_bytes']} B):",
    ]
    for k, v in b.items():
        lines.append(f"      {v:8.1f} B  {k}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--users", type=int, default=1_000_000, help="provisioned users to load (default 1000000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=30, help="timed sweep ticks per case (default 30)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.users < TEMPLATE_USERS + 1 or args.repeat < 1:
        parser.error(f"--users must be at least {TEMPLATE_USERS + 1}, --repeat at least 1")

    return run_measure(
        lambda workdir: measure(args.users, args.repeat, workdir), report, as_json=args.json
    )


if __name__ == "__main__":
    sys.exit(main())
