"""Refresh scheduling: a deferred arq job per grant, backed by a sorted set that a sweep reads.

Each provider has its own schedule per shard (one Scheduler per provider's stack). Each
provisioned connection has one entry in its shard's ``cf:{s<n>}:<provider>:sched`` scored by the
next refresh's due time (ms), written in the same commit as the tokens, with a deferred arq job
on the shard's queue of the deterministic id ``{s<n>}:refresh:<prefix>:<provider>:<user>:<due
ms>`` (``ShardKeys.refresh_job_id``): a refresh's commit
queues it itself (and removes the job it replaces), a new grant's right after its commit. Its
arguments are just the user, the due time and the provider, positional (a million of them wait
in Redis). A cron sweep reads the due part of the
set (O(log n + due)) and queues again, in one round trip, whatever job is missing (lost between
commit and enqueue, or by a Redis failover); a job that is still queued is recognised by its id.
Due times are Redis's time: the engine computes them with a clock that tracks it, and the sweep
asks Redis's own clock what is due.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from arq.connections import ArqRedis
from arq.constants import job_key_prefix

from consent_flow.queue.jobs import JobQueue, JobRef, QueuedJob
from consent_flow.store.clock import redis_time
from consent_flow.store.redis_store import Keys, ShardKeys, due_ms
from consent_flow.store.scripts import lua

__all__ = ["REFRESH_JOB", "Scheduler", "refresh_job_id", "refresh_job_ref", "refresh_payload"]

REFRESH_JOB = "refresh_tokens"
SWEEP_LIMIT = 1000  # missing jobs one sweep batch requeues
SWEEP_SCAN_FACTOR = 20  # a batch steps over at most this many queued due entries per missing one
SWEEP_BATCHES = 5  # batches per tick while each finds a full batch: up to 5,000 per tick
JOB_EXPIRY_MS = 24 * 3600 * 1000  # how long a queued job waits for a worker before arq drops it


def refresh_job_id(keys: Keys, user: str, due: int) -> str:
    """The id of the connection's refresh job due at ``due`` (ms): shard tag, prefix and
    provider in it."""
    return keys.of(user).refresh_job_id(user, due)


def refresh_job_ref(keys: Keys, user: str, due: float, queue_name: str) -> JobRef:
    """The queued job of the schedule due at ``due`` (seconds), for a commit to remove."""
    shard = keys.of(user)
    return JobRef(shard.refresh_job_id(user, due_ms(due)), shard.queue(queue_name))


def refresh_payload(user: str, due: int, enqueued_ms: int, provider: str) -> bytes:
    """The refresh job as ``arq.jobs.serialize_job(REFRESH_JOB, (user, due, provider), {}, None,
    enqueued_ms, serializer=dump_job)`` writes it (a test holds them equal), built directly:
    a sweep that requeues a thousand jobs spends a few milliseconds less."""
    return b'{"f":"%s","a":[%s,%d,%s],"et":%d}' % (
        REFRESH_JOB.encode(),
        json.dumps(user).encode(),
        due,
        json.dumps(provider).encode(),
        enqueued_ms,
    )


class Scheduler:
    def __init__(
        self,
        pool: ArqRedis,
        *,
        keys: Keys,
        queue_name: str,
        clock: Callable[[], float] = time.time,
        batched: bool = False,
    ) -> None:
        self.pool = pool
        # Batched: workers take due refreshes from the schedule itself (engine/batch.py), so no
        # refresh gets a job of its own and nothing needs sweeping.
        self.batched = batched
        self.keys = keys
        self.queue_name = queue_name
        self.jobs = JobQueue(pool, clock=clock)
        self._due = pool.register_script(lua("due_without_job"))
        self._enqueue = pool.register_script(lua("enqueue_missing"))

    def job_for(self, user: str, due: float) -> QueuedJob | None:
        """The deferred refresh job for a due time, for a commit to queue with the schedule
        (None when batched)."""
        if self.batched:
            return None
        ms = due_ms(due)
        return self.jobs.job(
            REFRESH_JOB,
            (user, ms, self.keys.provider),
            job_id=refresh_job_id(self.keys, user, ms),
            queue=self.keys.of(user).queue(self.queue_name),
            run_at_ms=ms,
        )

    async def schedule(self, user: str, due: float) -> None:
        """Queue the deferred refresh job for a due time the store already holds."""
        job = self.job_for(user, due)
        if job is not None:
            await self.jobs.put(job)

    async def sweep(self, *, now: float | None = None, limit: int = SWEEP_LIMIT) -> dict[str, int]:
        """Queue every due refresh whose job is missing, shard by shard. Returns counts: due
        looked at, requeued.

        "Due" is by Redis's clock unless ``now`` is given. One batch costs O(log n + due looked
        at); a tick runs batches while they come back full.
        """
        looked = requeued = 0
        for shard in self.keys.every_shard():
            counts = await self._sweep_shard(shard, now=now, limit=limit)
            looked += counts["due"]
            requeued += counts["requeued"]
        return {"due": looked, "requeued": requeued}

    async def _sweep_shard(
        self, shard: ShardKeys, *, now: float | None, limit: int
    ) -> dict[str, int]:
        now_arg = "" if now is None else str(due_ms(now))
        looked = requeued = 0
        for _ in range(SWEEP_BATCHES):
            found, missing, more, now_used = await self._due(
                keys=[shard.sched],
                args=[
                    now_arg,
                    limit,
                    job_key_prefix + shard.refresh_job_head,
                    SWEEP_SCAN_FACTOR * limit,
                ],
            )
            now_ms = int(now_used)
            now_arg = str(now_ms)  # every batch of one tick looks at the same instant
            looked += int(found)
            if not missing:
                break
            requeued += await self._requeue(shard, missing, now_ms)
            if len(missing) < 2 * limit or not more:
                break
        return {"due": looked, "requeued": requeued}

    async def _requeue(self, shard: ShardKeys, missing: list[Any], now_ms: int) -> int:
        args: list[Any] = []
        for i in range(0, len(missing), 2):
            user = missing[i].decode() if isinstance(missing[i], bytes) else str(missing[i])
            score = int(missing[i + 1])
            job_id = shard.refresh_job_id(user, score)
            payload = refresh_payload(user, score, now_ms, self.keys.provider)
            # Due now: the job's queue score is the present, whatever the schedule said.
            args += [job_key_prefix + job_id, payload, now_ms, job_id]
        return int(
            await self._enqueue(keys=[shard.queue(self.queue_name)], args=[JOB_EXPIRY_MS, *args])
        )

    async def due_count(self, within: float) -> int:
        """Refreshes due between now (Redis's time) and ``within`` seconds from now, every
        shard's."""
        now = await redis_time(self.pool)
        async with self.pool.pipeline(transaction=False) as pipe:
            for shard in self.keys.every_shard():
                pipe.zcount(shard.sched, due_ms(now), due_ms(now + within))
            counts = await pipe.execute()
        return sum(int(n) for n in counts)
