"""What WAIT costs a refresh: commits of new tokens with and without a replica's confirmation.

One private primary and one replica on loopback (``--replicaof``). In the same run, alternating
blocks of each kind: a refresh-shaped commit (new sealed tokens, the record's fields, its
history) through ``RedisStore.commit`` and the in-flight mark (``RedisStore.mark_inflight``),
with ``wait_replicas`` 0 and 1. A refresh with ``CONSENT_REDIS_WAIT_REPLICAS=1`` pays one of
each: the difference of their sums is WAIT's cost per refresh.

    .venv/bin/python benchmarks/bench_wait.py            # 2,000 refreshes per kind
    .venv/bin/python benchmarks/bench_wait.py --n 500 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _infra import start_redis, stop_process

BLOCK = 50  # commits of one kind in a row before switching to the other


async def measure(n: int, primary_url: str) -> dict[str, Any]:
    from arq.connections import create_pool

    from consent_flow.core.records import Change
    from consent_flow.core.table import Event, State
    from consent_flow.store.connection import arq_redis_settings
    from consent_flow.store.redis_store import RedisStore

    pool = await create_pool(arq_redis_settings(primary_url))
    stores = {
        0: RedisStore(pool, prefix="bench0", wait_replicas=0),
        1: RedisStore(pool, prefix="bench1", wait_replicas=1),
    }
    versions = dict.fromkeys(stores, 0)
    states = dict.fromkeys(stores, State.UNPROVISIONED)
    timings: dict[str, list[float]] = {f"{k}{w}": [] for k in ("commit", "mark") for w in (0, 1)}

    async def refresh(wait: int, i: int) -> None:
        store = stores[wait]
        now = time.time()
        started = time.perf_counter()
        confirmed = await store.mark_inflight("alice", now)
        timings[f"mark{wait}"].append(time.perf_counter() - started)
        change = Change(
            user="alice",
            event=Event.TOKEN_REFRESHED,
            event_id=f"r{wait}-{i}",
            expect_state=states[wait],
            expect_version=versions[wait],
            to_state=State.PROVISIONED,
            actor="worker",
            at=now,
            fields={
                "tokens": bytes(180),
                "expires_at": now + 900,
                "last_refresh_at": now,
                "refresh_failures": 0,
            },
            clear=("inflight",),
        )
        started = time.perf_counter()
        result = await store.commit(change)
        timings[f"commit{wait}"].append(time.perf_counter() - started)
        assert result.ok and result.replicated and confirmed, result
        versions[wait] = result.version
        states[wait] = State.PROVISIONED

    for block in range(0, n, BLOCK):
        for wait in (0, 1):
            for i in range(block, min(n, block + BLOCK)):
                await refresh(wait, i)
    await pool.aclose()

    def us(values: list[float]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "mean_us": round(statistics.fmean(values) * 1e6, 1),
            "p50_us": round(ordered[len(ordered) // 2] * 1e6, 1),
            "p99_us": round(ordered[int(len(ordered) * 0.99)] * 1e6, 1),
        }

    figures = {name: us(values) for name, values in timings.items()}
    # Medians: on a shared machine the means carry other processes' stalls.
    per_refresh = {
        w: figures[f"commit{w}"]["p50_us"] + figures[f"mark{w}"]["p50_us"] for w in (0, 1)
    }
    return {
        "n": n,
        **figures,
        "refresh_redis_us_without_wait": round(per_refresh[0], 1),
        "refresh_redis_us_with_wait": round(per_refresh[1], 1),
        "wait_cost_us_per_refresh": round(per_refresh[1] - per_refresh[0], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="refreshes per kind")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import logging

    import structlog

    # Every commit logs its transition at INFO: thousands of lines that are not the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="bench-wait-") as tmp:
        (Path(tmp) / "primary").mkdir()
        (Path(tmp) / "replica").mkdir()
        primary = start_redis(Path(tmp) / "primary")
        replica = start_redis(
            Path(tmp) / "replica", args=("--replicaof", "127.0.0.1", str(primary.port))
        )
        try:
            import redis

            with redis.Redis(port=replica.port) as r:
                deadline = time.monotonic() + 10
                while r.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise SystemExit("the replica did not connect")
                    time.sleep(0.05)
            result = asyncio.run(measure(args.n, primary.url))
        finally:
            stop_process(replica.process)
            stop_process(primary.process)
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("mark0", "mark1", "commit0", "commit1"):
            f = result[name]
            mean, p50, p99 = f["mean_us"], f["p50_us"], f["p99_us"]
            print(f"{name:8} mean {mean:8.1f} µs  p50 {p50:8.1f}  p99 {p99:8.1f}")
        print(
            "Redis time per refresh (medians): "
            f"{result['refresh_redis_us_without_wait']} µs without WAIT, "
            f"{result['refresh_redis_us_with_wait']} µs with WAIT 1 "
            f"(+{result['wait_cost_us_per_refresh']} µs)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
