"""Draining a backlog of scheduled refreshes: the batched path, next to the provider's capacity.

One run, on a private ``redis-server`` and the local OpenID provider (rotating refresh tokens; a
reused one ends the grant), with the set-up of ``bench_refresh.py`` (the same provider, worker
processes and environment; ``_infra`` for the processes):

(a) the provider's capacity: plain concurrent refreshes with httpx, each caller rotating a chain
    of its own (``bench_refresh.bench_provider``).
(b) a backlog drain: ``--backlog`` grants obtained from the provider and imported while no worker
    runs (``grant_imported``, as ``consent-flow import`` does: each due at once), then three
    worker processes (``ConsentWorker(**worker_settings(...))``, as ``consent-flow worker`` runs
    them) start and drain it. Refreshes per second from the first provider call to the last.
(c) the same drain (every grant due again) with ``CONSENT_MAX_REFRESH_RATE`` set to half of (a):
    its rate, and the most refreshes any one-second window held (refresh start times, Redis's
    clock, as the records hold them).
(d) the workers' CPU per scheduled refresh during (b) (Linux /proc).

Afterwards every grant must still be provisioned, its stored refresh token live at the provider
(``lost_grants`` counts those that are not), and the provider must have seen no reused token.
Missed targets are reported, never an exit code; a failure exits non-zero.

    .venv/bin/python benchmarks/bench_backlog.py [--backlog 5000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.append(str(Path(__file__).resolve().parent))  # _infra, also when loaded by path
sys.path.insert(0, str(ROOT / "examples" / "provider"))

from _infra import (  # noqa: E402
    BenchError,
    cpu_used,
    free_port,
    group_cpu_seconds,
    quiet_logs,
    run_measure,
    tail,
)
from bench_refresh import (  # noqa: E402
    WORKERS,
    bench_provider,
    bench_settings,
    direct_grants,
    infrastructure,
    project_env,
    start_worker,
    summary,
    wait_ready,
)

TARGET_RATIO = 0.8  # (b) / (a)
TARGET_RATE_SLACK = 0.05  # (c) within 5 % of the configured rate
TARGET_CPU_MS = 1.0  # (d)
CAPACITY_CALLERS = 50
DRAIN_TIMEOUT = 600.0
POLL = 0.05  # seconds between looks at the drain's progress


async def import_grants(settings: Any, tokens: dict[str, str]) -> None:
    """The grants, imported as ``consent-flow import`` does, applied here by the engine (no
    worker runs yet): each is due at once."""
    from consent_flow import ConsentClient
    from consent_flow.core.table import Event
    from consent_flow.engine.engine import Engine
    from consent_flow.oidc import HttpClients, OAuthClient
    from consent_flow.queue.bus import Envelope, new_id

    async with ConsentClient(settings) as client:
        http = HttpClients(timeout=settings.http_timeout, follow_redirects=False)
        engine = Engine(
            settings=settings,
            store=client.store,
            oauth=OAuthClient(settings, http, clock=client.clock),
            ring=client.ring,
            clock=client.clock,
        )
        gate = asyncio.Semaphore(50)

        async def one(user: str, token: str) -> None:
            async with gate:
                event_id = new_id()
                sealed = client.ring.encrypt(
                    token.encode(), user=user, purpose=f"import:{event_id}"
                )
                await client.store.put_inbox(user, event_id, sealed)
                envelope = Envelope(
                    Event.GRANT_IMPORTED,
                    user,
                    "bench",
                    event_id=event_id,
                    payload={"scopes": "openid offline_access profile"},
                    reply=False,
                )
                outcome = await engine.handle(envelope)
                if outcome.result != "applied":
                    raise BenchError(f"the import of {user} did not apply: {outcome}")

        try:
            await asyncio.gather(*(one(u, t) for u, t in tokens.items()))
        finally:
            await http.aclose()


async def all_due_now(settings: Any, users: list[str]) -> None:
    """Every grant due again, as after an outage as long as their tokens live."""
    from consent_flow import ConsentClient
    from consent_flow.store.redis_store import due_ms

    async with ConsentClient(settings) as client:
        now = due_ms(client.clock())
        keys = client.store.keys
        async with client.store.redis.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.zadd(keys.of(user).sched, {user: now})
            await pipe.execute()


async def refresh_starts(client: Any, users: list[str], after: float) -> list[float]:
    """When each grant's latest refresh started (Redis's time), for those after ``after``."""
    # A few loads at a time: the cluster client given 4,000 commands at once failed here ("Redis
    # Cluster cannot be connected"; 2,000 passed), where one Redis's client copes.
    gate = asyncio.Semaphore(64)

    async def load(user: str) -> Any:
        async with gate:
            return await client.store.load(user)

    recs = await asyncio.gather(*(load(u) for u in users))
    return [r.last_refresh_at for r in recs if (r.last_refresh_at or 0) > after]


def busiest_second(times: list[float]) -> int:
    """The most events any one-second window holds."""
    times = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= 1.0:
            start += 1
        most = max(most, end - start + 1)
    return most


async def drain(
    env: dict[str, str],
    workdir: Path,
    settings: Any,
    users: list[str],
    label: str,
    processes: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Start the workers on a backlog that is all due, and measure until it is drained; the
    workers' CPU, and that of each group of ``processes``, over the same window."""
    from consent_flow import ConsentClient

    async with ConsentClient(settings) as client:
        start = client.clock()
        redis = client.store.redis
        counts = [shard.refresh_counts for shard in client.store.keys.every_shard()]

        async def ended() -> tuple[int, int]:
            """Refreshes applied, and grants the provider refused (then the drain ends all the
            same, and the lost grants are counted afterwards), so far."""
            async with redis.pipeline(transaction=False) as pipe:
                for key in counts:
                    pipe.hmget(key, ("success", "rejected"))
                rows = await pipe.execute()
            return sum(int(row[0] or 0) for row in rows), sum(int(row[1] or 0) for row in rows)

        async def settled() -> int:
            return sum(await ended())

        before = await settled()
        refused_before = (await ended())[1]
        workers = [start_worker(f"{label}-{i + 1}", env, workdir) for i in range(WORKERS)]
        try:
            # Every worker's start-up done (imports alone are about a second of CPU each):
            # the CPU counted from here is the drain's, over the refreshes applied from here.
            wait_ready(
                workers, settings.redis_url, settings.queue_name + ":health-check", "worker_started"
            )
            groups = dict(processes or {}, workers=[w.process.pid for w in workers])
            cpu_before = group_cpu_seconds(groups)
            done_before = await settled() - before
            deadline = time.monotonic() + DRAIN_TIMEOUT
            # Drained when every grant's refresh ended (the counters every commit, or refusal,
            # adds to): a cheap read, so the end is seen within a poll.
            while await settled() - before < len(users):
                for worker in workers:
                    worker.check()
                if time.monotonic() > deadline:
                    raise BenchError(f"the {label} drain did not end in {DRAIN_TIMEOUT:g} s")
                await asyncio.sleep(POLL)
            end = client.clock()
            refused = (await ended())[1] - refused_before
            cpu = cpu_used(group_cpu_seconds(groups), cpu_before)
            starts = await refresh_starts(client, users, start)
        finally:
            for worker in workers:
                worker.stop()
        for worker in workers:
            if "Traceback" in tail(worker.log, 400):
                log = tail(worker.log)
                raise BenchError(f"the {worker.name} worker logged a traceback:\n{log}")
    took = end - min(starts) if starts else 0.0  # none: every grant refused
    counted = max(1, len(users) - done_before)  # the refreshes applied in the CPU window
    return {
        "per_s": round(len(users) / took, 1) if took > 0 else 0.0,
        "seconds": round(took, 2),
        "busiest_second": busiest_second(starts),
        "worker_cpu_ms_per_refresh": (
            round(1000 * cpu["workers"] / counted, 3) if "workers" in cpu else None
        ),
        "cpu_ms_per_refresh": {name: round(1000 * used / counted, 3) for name, used in cpu.items()},
        "refused": refused,
    }


async def live_grants(settings: Any, provider: Any, users: list[str]) -> dict[str, str]:
    """The stored refresh token of each grant that is provisioned with a token the provider
    still knows; a grant missing from the answer is lost."""
    from consent_flow import ConsentClient, State
    from consent_flow.store.vault import open_tokens

    live: dict[str, str] = {}
    gate = asyncio.Semaphore(8)  # the provider's control endpoint, a few calls at a time
    # provider.introspect's call, through one client: it makes a client per call (httpx.request),
    # 22 ms of CPU each here (its TLS context), minutes for a few thousand grants.
    introspect = f"{provider.issuer}/__test/introspect"
    async with ConsentClient(settings) as client, httpx.AsyncClient(timeout=30) as http:

        async def one(user: str) -> None:
            async with gate:
                rec = await client.store.load(user)
                if rec.state is not State.PROVISIONED or rec.tokens is None:
                    return
                token = open_tokens(client.ring, user, rec.tokens)["refresh_token"]
                answer = await http.post(introspect, json={"token": token})
                answer.raise_for_status()
                if answer.json().get("active"):
                    live[user] = token

        await asyncio.gather(*(one(u) for u in users))
    return live


async def lost(settings: Any, provider: Any, users: list[str]) -> int:
    """Grants not provisioned, or whose stored refresh token the provider no longer knows."""
    return len(users) - len(await live_grants(settings, provider, users))


async def measure(backlog: int, seconds: float, warmup: float, workdir: Path) -> dict[str, Any]:
    quiet_logs()
    load_before = os.getloadavg()
    callback_port = free_port()
    with infrastructure(workdir, callback_port) as (server, provider):
        prefix = "bench" + uuid.uuid4().hex[:10]
        env = project_env(server, provider, workdir, prefix, f"{prefix}:queue", callback_port)
        settings = bench_settings(env)
        t0 = time.monotonic()
        users = [f"user{i:05d}" for i in range(backlog)]
        tokens = await direct_grants(provider, users)
        chains = await direct_grants(provider, [f"base{i:03d}" for i in range(CAPACITY_CALLERS)])
        await import_grants(settings, dict(zip(users, tokens, strict=True)))
        setup_s = time.monotonic() - t0
        node = getattr(provider, "_process", None)
        processes = {"client": [os.getpid()]}
        if node is not None:
            processes["provider"] = [node.pid]

        def alive() -> None:
            if not provider.running:
                raise BenchError("the provider stopped:\n" + "\n".join(provider.output[-20:]))

        capacity = summary(
            await bench_provider(provider, chains, warmup, seconds, alive, processes)
        )
        provider.reset_stats()
        load_drain = os.getloadavg()
        drained = await drain(env, workdir, settings, users, "drain")
        limit = max(1.0, round(capacity["per_s"] / 2, 1))
        await all_due_now(settings, users)
        limited_env = dict(env, CONSENT_MAX_REFRESH_RATE=repr(limit))
        limited = await drain(limited_env, workdir, settings, users, "limited")
        stats = provider.stats()
        lost_grants = await lost(settings, provider, users)

    if stats.get("refresh_reuse_detected"):
        raise BenchError(f"the provider saw {stats['refresh_reuse_detected']} reused tokens")
    ratio = drained["per_s"] / capacity["per_s"] if capacity["per_s"] else 0.0
    cpu = drained["worker_cpu_ms_per_refresh"]
    return {
        "provider_capacity_per_s": capacity["per_s"],
        "backlog_size": backlog,
        "backlog_drain_per_s": drained["per_s"],
        "backlog_ratio": round(ratio, 3),
        "rate_limit_per_s": limit,
        "rate_limited_drain_per_s": limited["per_s"],
        "rate_limited_busiest_second": limited["busiest_second"],
        "worker_cpu_ms_per_refresh": cpu,
        "lost_grants": lost_grants,
        "drain_seconds": drained["seconds"],
        "rate_limited_seconds": limited["seconds"],
        "drain_busiest_second": drained["busiest_second"],
        "provider_refresh_requests": stats.get("refresh_requests"),
        "provider_refresh_errors": stats.get("refresh_errors", 0),
        "workers": WORKERS,
        "capacity_callers": CAPACITY_CALLERS,
        "capacity_seconds": seconds,
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_at_drain": [round(x, 2) for x in load_drain],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "setup_seconds": round(setup_s, 1),
        "targets": {
            "backlog_ratio": TARGET_RATIO,
            "rate_limited_within": TARGET_RATE_SLACK,
            "worker_cpu_ms_per_refresh": TARGET_CPU_MS,
            "lost_grants": 0,
        },
        "met": {
            "backlog_ratio": ratio >= TARGET_RATIO,
            "rate_limited_drain": abs(limited["per_s"] - limit) <= TARGET_RATE_SLACK * limit
            and limited["busiest_second"] <= limit,
            "worker_cpu_ms_per_refresh": cpu is not None and cpu <= TARGET_CPU_MS,
            "lost_grants": lost_grants == 0,
        },
    }


def report(r: dict[str, Any]) -> str:
    def met(name: str) -> str:
        return "met" if r["met"][name] else "MISSED"

    return "\n".join(
        [
            f"consent-flow backlog benchmark: {r['backlog_size']} grants due at once, "
            f"{r['workers']} worker processes, {r['cpus']} CPUs (load average "
            f"{r['loadavg_before'][0]:.2f} before, {r['loadavg_at_drain'][0]:.2f} at the drain, "
            f"{r['loadavg_after'][0]:.2f} after); set-up {r['setup_seconds']:g} s",
            f"(a) provider capacity, plain httpx ({r['capacity_callers']} callers): "
            f"{r['provider_capacity_per_s']:.1f} refreshes/s",
            f"(b) backlog drain: {r['backlog_drain_per_s']:.1f} refreshes/s "
            f"({r['drain_seconds']:g} s; busiest second {r['drain_busiest_second']})",
            f"    ratio (b)/(a) = {r['backlog_ratio']:.3f}   target >= "
            f"{r['targets']['backlog_ratio']}: {met('backlog_ratio')}",
            f"(c) drain at max_refresh_rate {r['rate_limit_per_s']:g}/s: "
            f"{r['rate_limited_drain_per_s']:.1f} refreshes/s, busiest second "
            f"{r['rate_limited_busiest_second']}   target within 5 % and never above: "
            f"{met('rate_limited_drain')}",
            f"(d) worker CPU per scheduled refresh: {r['worker_cpu_ms_per_refresh']} ms   "
            f"target <= {r['targets']['worker_cpu_ms_per_refresh']}: "
            f"{met('worker_cpu_ms_per_refresh')}",
            f"lost grants: {r['lost_grants']}   target 0: {met('lost_grants')}; provider: "
            f"{r['provider_refresh_requests']} refresh requests, "
            f"{r['provider_refresh_errors']} errors",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backlog", type=int, default=5000, help="grants due at once (default 5000)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="seconds measuring (a) (default 10)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.backlog < 1:
        parser.error("--seconds must be positive and --backlog at least 1")
    warmup = min(3.0, max(0.5, args.seconds / 2))
    return run_measure(
        lambda workdir: measure(args.backlog, args.seconds, warmup, workdir),
        report,
        as_json=args.json,
    )


if __name__ == "__main__":
    sys.exit(main())
