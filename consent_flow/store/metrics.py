"""Operational figures, kept in Redis so that every worker process adds to the same numbers.

Workers record; ``stats`` and ``/metrics`` read. Transition counts are incremented by the commit
script itself, in the same step as the transition. Refresh outcomes, the refresh lead time (how
long before expiry a refresh happened) and per-hour failure counts are recorded by the refresher.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from consent_flow.core.records import ProviderRevocation, RefreshCount
from consent_flow.core.table import State
from consent_flow.store.batch import Backlog, read_backlog
from consent_flow.store.clock import redis_time, skew_problem, worst_offset
from consent_flow.store.redis_store import (
    LEAD_BUCKETS,
    Keys,
    ShardKeys,
    due_ms,
    refresh_counters,
)
from consent_flow.store.scripts import lua

__all__ = [
    "HEARTBEAT_INTERVAL",
    "LEAD_BUCKETS",
    "REFRESH_OUTCOMES",
    "WORKER_EVENTS",
    "MetricsRecorder",
    "Snapshot",
    "live_clock_offsets",
    "merged_snapshot",
    "read_snapshot",
]

REFRESH_OUTCOMES = ("success", "transient_failure", "rejected", "client_rejected")
# What workers count about Redis itself: outages ridden out (and their seconds), refreshes whose
# commit waited for Redis and landed, refreshes committed from the spool at a worker's start.
WORKER_EVENTS = ("redis_outages", "redis_outage_seconds", "commits_deferred", "spool_replayed")
HOURLY_TTL = 26 * 3600  # per-hour buckets outlive the 24-hour window they serve
HEARTBEAT_INTERVAL = 5.0  # seconds between a worker's heartbeats
HEARTBEAT_STALE = 3 * HEARTBEAT_INTERVAL  # a worker silent this long is not counted as live
WORKER_FORGET_AFTER = 3600  # seconds after which a silent worker's entries are dropped


class MetricsRecorder:
    def __init__(self, redis: Any, keys: Keys, *, clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self.clock = clock  # Redis's time: every process files a failure under the same hour
        self._heartbeat = redis.register_script(lua("heartbeat"))

    async def refresh(self, outcome: str, *, user: str, lead: float | None = None) -> None:
        """Count one refresh of ``user``'s connection that applied nothing (a success's commit
        counts itself), in the user's shard."""
        hour = int(self.clock() // 3600)
        shard = self.keys.of(user)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, name, amount in refresh_counters(shard, RefreshCount(outcome, lead)):
                if "." in amount:
                    pipe.hincrbyfloat(key, name, float(amount))
                else:
                    pipe.hincrby(key, name, int(amount))
            if outcome != "success":
                pipe.hincrby(shard.hourly(hour), outcome, 1)
                pipe.expire(shard.hourly(hour), HOURLY_TTL)
            await pipe.execute()

    async def redis_outage(self, seconds: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.keys.worker_counts, "redis_outages", 1)
            pipe.hincrbyfloat(self.keys.worker_counts, "redis_outage_seconds", seconds)
            await pipe.execute()

    async def worker_event(self, name: str) -> None:
        await self.redis.hincrby(self.keys.worker_counts, name, 1)

    async def heartbeat(self, worker_id: str, *, clock_offset: float = 0.0) -> None:
        """The worker is live (by Redis's clock), and its own clock is ``clock_offset`` seconds
        behind Redis's (negative: ahead)."""
        await self._heartbeat(
            keys=[self.keys.workers, self.keys.worker_clocks],
            args=[worker_id, f"{clock_offset:.6f}", WORKER_FORGET_AFTER],
        )


async def live_clock_offsets(redis: Any, keys: Keys, now: float) -> dict[str, float]:
    """Each live worker's clock offset from Redis's time, as its last heartbeat reported it."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(keys.workers, now - HEARTBEAT_STALE, "+inf")
        pipe.hgetall(keys.worker_clocks)
        live, clocks = await pipe.execute()
    return _live_offsets(live, clocks)


def _live_offsets(live: list[Any], clocks: dict[Any, Any]) -> dict[str, float]:
    live_ids = {_text(w) for w in live}
    return {_text(w): float(v) for w, v in clocks.items() if _text(w) in live_ids}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything ``stats`` and ``/metrics`` show, read in one pipeline."""

    states: dict[str, int]
    refreshes_due_next_hour: int
    refresh_failures_24h: int
    refresh_rejections_24h: int
    queue_depth: int
    deferred_jobs: int
    workers_alive: int
    refreshes_paused: str | None
    transitions: dict[tuple[str, str, str], int]
    refresh_outcomes: dict[str, int]
    lead_buckets: dict[str, int]
    lead_sum: float
    revocation_outcomes: dict[str, int]
    worker_events: dict[str, float]

    clock_offsets: dict[str, float] = field(default_factory=dict)
    """Live workers' clock offsets from Redis's time, in seconds (positive: behind)."""

    backlogs: dict[str, Backlog] = field(default_factory=dict)
    """Due scheduled refreshes not yet taken, by provider: how many, how long the oldest has
    waited, the drain rate, and how many grants lapse before their turn at that rate."""

    provider_states: dict[str, dict[str, int]] = field(default_factory=dict)
    """Connections in each state by provider, in a snapshot merged over providers."""

    webhook_outcomes: dict[str, int] = field(default_factory=dict)
    """Webhook deliveries by outcome: delivered, retried (an attempt that failed and will be
    tried again), dead (given up after the last attempt, or refused with 410 Gone)."""

    @property
    def webhooks_dead(self) -> int:
        """Webhook notices given up: the dead-letter count."""
        return self.webhook_outcomes.get("dead", 0)

    @property
    def clock_skew(self) -> tuple[str, float] | None:
        """The live worker whose clock is furthest from Redis's, and its offset."""
        return worst_offset(self.clock_offsets)

    @property
    def revocations_abandoned(self) -> int:
        """Provider revocations the outbox gave up after its bounded number of attempts."""
        return self.revocation_outcomes.get(ProviderRevocation.ABANDONED.value, 0)

    def public(self) -> dict[str, Any]:
        skew = self.clock_skew
        return {
            "states": self.states,
            "refreshes_due_next_hour": self.refreshes_due_next_hour,
            "refresh_failures_24h": self.refresh_failures_24h,
            "refresh_rejections_24h": self.refresh_rejections_24h,
            "queue_depth": self.queue_depth,
            "deferred_jobs": self.deferred_jobs,
            "backlog": {name: b.public() for name, b in self.backlogs.items()},
            "workers_alive": self.workers_alive,
            "refreshes_paused": self.refreshes_paused,
            "revocations_abandoned": self.revocations_abandoned,
            "webhooks_dead": self.webhooks_dead,
            "clock_skew": None if skew is None else round(skew[1], 3),
            "clock_skew_worker": None if skew is None else skew[0],
            "clock_skew_problem": None
            if skew is None
            else skew_problem(f"worker {skew[0]}", skew[1]),
        }


# What each shard contributes to a snapshot, in the order read_snapshot asks for it.
_PER_SHARD = len(State) + 1 + 24 + 2 + 4


def _shard_reads(pipe: Any, shard: ShardKeys, queue: str, now: float) -> None:
    """Queue one shard's figures on ``pipe`` (``_PER_SHARD`` answers)."""
    hour = int(now // 3600)
    for state in State:
        pipe.zcard(shard.idx(state))
    pipe.zcount(shard.sched, due_ms(now), due_ms(now + 3600))
    for h in range(hour - 23, hour + 1):
        pipe.hgetall(shard.hourly(h))
    pipe.zcount(queue, "-inf", due_ms(now))
    pipe.zcount(queue, f"({due_ms(now)}", "+inf")
    pipe.hgetall(shard.transition_counts)
    pipe.hgetall(shard.refresh_counts)
    pipe.hgetall(shard.refresh_lead)
    pipe.hgetall(shard.revocation_counts)


def _sum_hashes(rows: list[dict[Any, Any]], value: Callable[[Any], Any] = int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for row in rows:
        for k, v in row.items():
            out[_text(k)] = out.get(_text(k), 0) + value(v)
    return out


async def read_snapshot(redis: Any, keys: Keys, queue_name: str) -> Snapshot:
    """One provider's figures, summed over its shards (one round trip), and the shared ones."""
    now = await redis_time(redis)  # what is due, live or recent is by Redis's clock
    shards = keys.every_shard()
    async with redis.pipeline(transaction=False) as pipe:
        for shard in shards:
            _shard_reads(pipe, shard, shard.queue(queue_name), now)
        pipe.zcount(keys.workers, now - HEARTBEAT_STALE, "+inf")
        pipe.hget(keys.halt, "reason")
        pipe.zrangebyscore(keys.workers, now - HEARTBEAT_STALE, "+inf")
        pipe.hgetall(keys.worker_clocks)
        pipe.hgetall(keys.webhook_counts)
        pipe.hgetall(keys.worker_counts)
        values = await pipe.execute()
    per = [values[i * _PER_SHARD : (i + 1) * _PER_SHARD] for i in range(len(shards))]
    n = len(State)
    states = {state.value: sum(int(p[i]) for p in per) for i, state in enumerate(State)}
    due_next_hour = sum(int(p[n]) for p in per)
    hourly = [h for p in per for h in p[n + 1 : n + 25]]
    failures = sum(int(h.get(b"transient_failure", h.get("transient_failure", 0))) for h in hourly)
    rejections = sum(int(h.get(b"rejected", h.get("rejected", 0))) for h in hourly)
    queue_depth = sum(int(p[n + 25]) for p in per)
    deferred = sum(int(p[n + 26]) for p in per)
    transitions = _sum_hashes([p[n + 27] for p in per])
    outcomes = _sum_hashes([p[n + 28] for p in per])
    lead_text = _sum_hashes([p[n + 29] for p in per], float)
    revocations = _sum_hashes([p[n + 30] for p in per])
    alive, halt, live, clocks, webhooks, worker = values[len(shards) * _PER_SHARD :]
    backlog = await read_backlog(redis, keys, now)
    return Snapshot(
        states=states,
        refreshes_due_next_hour=due_next_hour,
        refresh_failures_24h=failures,
        refresh_rejections_24h=rejections,
        queue_depth=int(queue_depth),
        deferred_jobs=int(deferred),
        workers_alive=int(alive),
        refreshes_paused=None if halt is None else _text(halt),
        transitions={
            tuple(_text(k).split("|", 2)): int(v)  # type: ignore[misc]
            for k, v in transitions.items()
        },
        refresh_outcomes={_text(k): int(v) for k, v in outcomes.items()},
        lead_buckets={k: int(v) for k, v in lead_text.items() if k != "sum"},
        lead_sum=float(lead_text.get("sum", 0.0)),
        revocation_outcomes={_text(k): int(v) for k, v in revocations.items()},
        clock_offsets=_live_offsets(live, clocks),
        webhook_outcomes={_text(k): int(v) for k, v in webhooks.items()},
        backlogs={keys.provider: backlog},
        worker_events={
            **dict.fromkeys(WORKER_EVENTS, 0.0),
            **{_text(k): float(v) for k, v in worker.items()},
        },
    )


def _add(a: dict[Any, Any], b: dict[Any, Any]) -> dict[Any, Any]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


async def merged_snapshot(redis: Any, keys: Keys, providers: Any, queue_name: str) -> Snapshot:
    """One snapshot of the whole deployment: each provider's figures summed over
    ``providers`` (names), the shared ones (queue, workers, webhooks) once, and the states of
    each provider's connections in ``provider_states``."""
    merged: Snapshot | None = None
    by_provider: dict[str, dict[str, int]] = {}
    for name in providers:
        one = await read_snapshot(redis, keys.for_provider(name), queue_name)
        by_provider[name] = one.states
        if merged is None:
            merged = one
            continue
        merged = replace(
            merged,
            states=_add(merged.states, one.states),
            refreshes_due_next_hour=merged.refreshes_due_next_hour + one.refreshes_due_next_hour,
            refresh_failures_24h=merged.refresh_failures_24h + one.refresh_failures_24h,
            refresh_rejections_24h=merged.refresh_rejections_24h + one.refresh_rejections_24h,
            refreshes_paused=merged.refreshes_paused or one.refreshes_paused,
            transitions=_add(merged.transitions, one.transitions),
            refresh_outcomes=_add(merged.refresh_outcomes, one.refresh_outcomes),
            lead_buckets=_add(merged.lead_buckets, one.lead_buckets),
            lead_sum=merged.lead_sum + one.lead_sum,
            revocation_outcomes=_add(merged.revocation_outcomes, one.revocation_outcomes),
            # Each provider's backlog is its own: kept side by side, never summed.
            backlogs={**merged.backlogs, **one.backlogs},
        )
    assert merged is not None, "a deployment has at least one provider"
    return replace(merged, provider_states=by_provider)
