"""Latency of ``ConsentClient.access_token``: the in-process cache, and the store path behind it.

One run starts a private ``redis-server`` (a free port, a temporary folder; never the system Redis)
and provisions ``--users`` users through the engine itself, only the provider stubbed in-process
(``Engine.handle`` of ``provision_requested``, the callback's session claim, ``Engine.handle`` of
``authorization_completed``: a sealed 1 KiB access token and a refresh token, an hour to live).
No provider or worker process is needed: neither lookup below reaches them, and a user
provisioned end to end holds exactly these records.

Then, each call timed on its own with ``time.perf_counter_ns``:

(a) baselines: a plain ``dict.get`` + ``time.time()`` (the least a cache lookup can cost), and the
    same inside an awaited coroutine (the least an ``async`` API can cost);
(b) the cache path: ``await client.access_token(user)`` round-robin over the users, once the
    broker has confirmed its invalidation subscription (it serves nothing from memory before);
    Redis's own command counters prove that no call of this phase reached Redis;
(c) the store path, for context: the user's cache entry dropped before each call (as an
    invalidation does), so every call reads the record (one script: HGETALL and the sealed tokens)
    and decrypts it; next to a bare HGETALL round trip on the same connection pool, and a
    breakdown of the client-side steps.

Missed targets are reported, never an exit code: only a failure exits non-zero.

    .venv/bin/python benchmarks/bench_broker.py [--calls 100000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # _infra, also when loaded by path

import redis  # noqa: E402
from _infra import (  # noqa: E402
    BenchError,
    Redis,
    percentile,
    quiet_logs,
    run_measure,
    start_redis,
    stop_process,
)

TARGET_P50_US = 50.0  # (b)
ACCESS_TOKEN_BYTES = 1024
TOKEN_TTL = 3600.0
CLIENT_ID = "consent-flow-bench"


# --- infrastructure ----------------------------------------------------------------------------


def summary(samples_ns: list[int]) -> dict[str, float]:
    us = [s / 1000 for s in samples_ns]
    return {
        "calls": len(us),
        "p50_us": round(percentile(us, 50), 2),
        "p99_us": round(percentile(us, 99), 2),
        "max_us": round(max(us), 2),
        "mean_us": round(sum(us) / len(us), 2),
    }


def command_calls(r: redis.Redis, command: str) -> int:
    stats = r.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# --- provisioning through the real commit path --------------------------------------------------


def bench_settings(server: Redis, workdir: Path) -> Any:
    from consent_flow import Settings, generate_key

    prefix = "bench" + uuid.uuid4().hex[:10]
    env = {
        "CONSENT_REDIS_URL": server.url,
        "CONSENT_REDIS_PREFIX": prefix,
        # Never contacted: the token broker's cache and store paths make no provider call.
        "CONSENT_ISSUER": "http://127.0.0.1:9/unused",
        "CONSENT_CLIENT_ID": CLIENT_ID,
        "CONSENT_CLIENT_SECRET": "bench-secret",
        "CONSENT_REDIRECT_URI": "http://127.0.0.1:9/oauth/callback",
        "CONSENT_SCOPES": "openid offline_access profile",
        "CONSENT_ENCRYPTION_KEYS": generate_key(),
        "CONSENT_LOG_FORMAT": "json",
        "CONSENT_DATA_DIR": str(workdir / "data"),
    }
    settings = Settings.from_env(env, require_provider=True, require_keys=True)
    return settings.with_changes(queue_name=f"{prefix}:queue")


class StubProvider:
    """The provider's side of the round trip, answered in-process, so that every other step is
    the engine's own: ``authorization_url``, ``exchange_code`` and ``validate_id_token`` are the
    only ``OAuthClient`` methods the two events call."""

    def __init__(self) -> None:
        self.grants: dict[str, tuple[Any, str]] = {}  # code -> (TokenSet, subject)

    async def authorization_url(
        self, *, state: str, nonce: str, code_challenge: str, **extra: Any
    ) -> str:
        return (
            "http://127.0.0.1:9/auth?response_type=code&client_id=consent-flow-bench"
            f"&scope=openid+offline_access+profile&state={state}&nonce={nonce}"
            f"&code_challenge={code_challenge}&code_challenge_method=S256"
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
            issuer="http://127.0.0.1:9",
            audience=(CLIENT_ID,),
            expires_at=now + 300,
            issued_at=now,
            nonce=nonce,
            claims={},
        )


async def provision(engine: Any, stub: StubProvider, user: str) -> str:
    """What a user who asks and approves goes through, the provider stubbed: the engine handles
    ``provision_requested``, the callback claims the session (as ``_web`` does), the engine
    handles ``authorization_completed``. Returns the access token it stored."""
    from consent_flow.core.table import Event, State
    from consent_flow.oidc import TokenSet
    from consent_flow.queue.bus import Envelope, new_id

    store, ring = engine.store, engine.ring
    outcome = await engine.handle(Envelope(Event.PROVISION_REQUESTED, user, "user"))
    if outcome.state != State.PENDING.value:
        raise BenchError(f"provision_requested did not apply for {user}: {outcome}")
    rec = await store.load(user)
    event_id, code = new_id(), "code-" + uuid.uuid4().hex
    access_token = (user + ".") * (ACCESS_TOKEN_BYTES // (len(user) + 1) + 1)
    access_token = access_token[:ACCESS_TOKEN_BYTES]
    stub.grants[code] = (
        TokenSet(
            access_token=access_token,
            refresh_token=uuid.uuid4().hex + uuid.uuid4().hex,
            id_token="stub-" + code,
            token_type="Bearer",
            expires_at=time.time() + TOKEN_TTL,
            scopes=("openid", "offline_access", "profile"),
        ),
        user,
    )
    sealed = ring.encrypt(code.encode(), user=user, purpose=f"code:{event_id}")
    if await store.claim_session(user, rec.session_id, event_id, sealed) != "ok":
        raise BenchError(f"the session claim failed for {user}")
    outcome = await engine.handle(
        Envelope(
            Event.AUTHORIZATION_COMPLETED,
            user,
            "browser",
            event_id=event_id,
            payload={"session_id": rec.session_id or ""},
        )
    )
    if outcome.state != State.PROVISIONED.value:
        raise BenchError(f"authorization_completed did not apply for {user}: {outcome}")
    return access_token


# --- measuring ---------------------------------------------------------------------------------


def time_sync(n: int, op: Callable[[int], object]) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        t0 = clock()
        op(i)
        samples[i] = clock() - t0
    return samples


async def time_async(n: int, op: Callable[[int], Awaitable[object]]) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        t0 = clock()
        await op(i)
        samples[i] = clock() - t0
    return samples


async def measure(calls: int, users: int, workdir: Path) -> dict[str, Any]:
    from consent_flow import ConsentClient
    from consent_flow.core.records import check_user
    from consent_flow.store import codec
    from consent_flow.store.vault import open_tokens

    quiet_logs()
    server = start_redis(workdir)
    try:
        settings = bench_settings(server, workdir)
        names = [f"user{i:08d}" for i in range(users)]
        async with ConsentClient(settings) as client:
            from consent_flow.engine.engine import Engine
            from consent_flow.queue.scheduler import Scheduler

            stub = StubProvider()
            scheduler = Scheduler(
                client.pool, keys=client.store.keys, queue_name=settings.queue_name
            )
            engine = Engine(
                settings=settings,
                store=client.store,
                oauth=stub,  # type: ignore[arg-type]
                ring=client.ring,
                on_scheduled=scheduler.schedule,
            )
            expected = {u: await provision(engine, stub, u) for u in names}
            store_calls = max(1000, calls // 10)

            # (a) baselines
            cache = {u: (expected[u], time.time() + TOKEN_TTL) for u in names}
            n_users = len(names)

            def plain(i: int) -> object:
                entry = cache.get(names[i % n_users])
                return entry, time.time()

            async def plain_async(i: int) -> object:
                entry = cache.get(names[i % n_users])
                return entry, time.time()

            # warm up, then measure with the collector out of the way for every phase alike
            time_sync(min(calls, 10_000), plain)
            gc.collect()
            gc.disable()
            try:
                base_sync = time_sync(calls, plain)
                base_async = await time_async(calls, plain_async)
            finally:
                gc.enable()

            # (b) the cache path: the first call per user reads the store and starts the
            # broker's invalidation listener; entries are kept once it is subscribed.
            broker_ready = time.monotonic() + 10
            while True:
                for u in names:
                    if await client.access_token(u) != expected[u]:
                        raise BenchError("access_token returned another token than provisioned")
                broker = client._broker
                if broker is not None and broker._listening and len(broker._cache) == n_users:
                    break
                if time.monotonic() > broker_ready:
                    raise BenchError("the token broker never subscribed to its invalidations")
                await asyncio.sleep(0.01)

            async def cached(i: int) -> object:
                return await client.access_token(names[i % n_users])

            await time_async(min(calls, 10_000), cached)  # warm-up
            with redis.Redis(port=server.port) as r:
                before = command_calls(r, "hgetall")
                gc.collect()
                gc.disable()
                try:
                    cache_path = await time_async(calls, cached)
                finally:
                    gc.enable()
                store_reads = command_calls(r, "hgetall") - before
            if store_reads:
                raise BenchError(f"the cache phase reached Redis {store_reads} times")
            for u in names:  # still the provisioned tokens
                if await client.access_token(u) != expected[u]:
                    raise BenchError("access_token returned another token than provisioned")

            # (c) the store path: the entry dropped before each call, as an invalidation does
            pool: Any = client.pool
            rec_keys = [client.store.keys.rec(u) for u in names]

            async def uncached(i: int) -> object:
                broker.forget(names[i % n_users])
                return await client.access_token(names[i % n_users])

            async def bare_hgetall(i: int) -> object:
                return await pool.hgetall(rec_keys[i % n_users])

            await time_async(min(store_calls, 2000), uncached)
            await time_async(min(store_calls, 2000), bare_hgetall)
            with redis.Redis(port=server.port) as r:
                before = command_calls(r, "hgetall")
                gc.collect()
                gc.disable()
                try:
                    store_path = await time_async(store_calls, uncached)
                    hgetall = await time_async(store_calls, bare_hgetall)
                finally:
                    gc.enable()
                store_reads = command_calls(r, "hgetall") - before
            if store_reads != 2 * store_calls:
                raise BenchError(
                    f"the store phase made {store_reads} HGETALLs, expected {2 * store_calls}"
                )

            # where the store path's client-side time goes, step by step
            raw = await pool.hgetall(rec_keys[0])
            decoded = {k.decode(): v.decode() for k, v in raw.items()}
            rec = await client.store.load(names[0])  # with its sealed tokens beside the hash
            ring = client.ring
            steps_n = min(store_calls, 5000)
            long_user = "u" * 64
            steps = {
                "client.store (builds a RedisStore)": time_sync(steps_n, lambda i: client.store),
                "check_user (12 characters)": time_sync(steps_n, lambda i: check_user(names[0])),
                "check_user (64 characters)": time_sync(steps_n, lambda i: check_user(long_user)),
                "decode HGETALL answer": time_sync(
                    steps_n, lambda i: {k.decode(): v.decode() for k, v in raw.items()}
                ),
                "codec.record_from_hash": time_sync(
                    steps_n, lambda i: codec.record_from_hash(names[0], decoded)
                ),
                "open_tokens (decrypt+inflate+JSON)": time_sync(
                    steps_n, lambda i: open_tokens(ring, names[0], rec.tokens)
                ),
            }
    finally:
        stop_process(server.process)

    a_sync, a_async = summary(base_sync), summary(base_async)
    b, c, h = summary(cache_path), summary(store_path), summary(hgetall)
    return {
        "cpus": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "calls": calls,
        "users": users,
        "access_token_bytes": ACCESS_TOKEN_BYTES,
        "baseline_dict_time": a_sync,
        "baseline_dict_time_async": a_async,
        "cache_path": b,
        "cache_path_redis_calls": 0,
        "store_path": c,
        "baseline_hgetall": h,
        "store_path_steps_p50_us": {
            name: round(percentile([s / 1000 for s in samples], 50), 2)
            for name, samples in steps.items()
        },
        "target_p50_us": TARGET_P50_US,
        "p50_met": b["p50_us"] <= TARGET_P50_US,
    }


def report(r: dict[str, Any]) -> str:
    def row(label: str, s: dict[str, float]) -> str:
        return (
            f"{label:<44} p50 {s['p50_us']:8.2f} us   p99 {s['p99_us']:8.2f} us   "
            f"max {s['max_us']:9.2f} us   ({s['calls']} calls)"
        )

    met = "met" if r["p50_met"] else "MISSED"
    lines = [
        f"consent-flow token broker benchmark: {r['users']} users, "
        f"{r['access_token_bytes']} B access tokens, {r['cpus']} CPUs (load average "
        f"{r['loadavg_1min']:.2f})",
        row("(a) baseline: dict.get + time.time()", r["baseline_dict_time"]),
        row("    baseline: same, in an awaited coroutine", r["baseline_dict_time_async"]),
        row("(b) access_token, in-process cache", r["cache_path"]),
        f"    target p50 <= {r['target_p50_us']:g} us: {met}; "
        f"ratio to the async baseline p50: "
        f"{r['cache_path']['p50_us'] / r['baseline_dict_time_async']['p50_us']:.1f}x; "
        "Redis calls during the phase: 0",
        row("(c) access_token, store path (entry dropped)", r["store_path"]),
        row("    baseline: bare HGETALL round trip", r["baseline_hgetall"]),
        "    client-side steps of the store path (p50):",
    ]
    for name, value in r["store_path_steps_p50_us"].items():
        lines.append(f"      {name:<40} {value:8.2f} us")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--calls",
        type=int,
        default=100_000,
        help="timed calls per cache-path phase (default 100000; the store path "
        "takes a tenth, at least 1000)",
    )
    parser.add_argument(
        "--users", type=int, default=100, help="provisioned users the calls go round (default 100)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.calls < 100 or args.users < 1:
        parser.error("--calls must be at least 100 and --users at least 1")

    return run_measure(
        lambda workdir: measure(args.calls, args.users, workdir), report, as_json=args.json
    )


if __name__ == "__main__":
    sys.exit(main())
