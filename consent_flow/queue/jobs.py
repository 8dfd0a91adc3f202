"""Queueing arq jobs in one round trip.

arq's ``ArqRedis.enqueue_job`` spends three round trips (WATCH, EXISTS, then MULTI/EXEC) on what
one script does atomically: refuse a job id arq still holds (queued or running, or with a
result), otherwise write the job and its queue entry. The keys, the payload and the scores are
arq's own, so arq's workers run these jobs exactly as if arq had queued them. Every event, every
on-demand refresh and every scheduled refresh is queued here; a commit that schedules the next
refresh writes the same job inside its own script (``QueuedJob`` carries what both need).

A job due now is scored with Redis's own clock (``TIME``), never the caller's: workers judge
what is due by Redis's clock too, so callers and workers whose clocks disagree still agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from consent_flow.settings import MAX_EVENT_TIMEOUT
from consent_flow.store.scripts import lua, queue_script

__all__ = [
    "EVENT_MAX_TRIES",
    "JOB_TIMEOUT",
    "NOTICE_JOB",
    "REDELIVERY_WINDOW",
    "REFRESH_MAX_TRIES",
    "JobQueue",
    "JobRef",
    "QueuedJob",
    "score_arg",
]

# How arq runs the project's jobs (workers/ hands these to arq); the store's duplicate detection
# is derived from them, so they live beside the queue rather than in the worker.
JOB_TIMEOUT = 60  # seconds; longer than a provider round trip with its retries
EVENT_MAX_TRIES = 3
REFRESH_MAX_TRIES = 5  # arq re-runs a refresh whose worker died; failures reschedule themselves
NOTICE_JOB = "deliver_webhook"  # the arq function that delivers one webhook notice
ARQ_IN_PROGRESS_GRACE = 10  # arq holds a running job's claim this long past the job's timeout
# How long after an event was queued arq can still run it: its job key lives at most the event's
# expiry, and a try that starts just before that may run and be retried for every try it has left.
# An event id is remembered at least this long, so a redelivery never applies twice.
REDELIVERY_WINDOW = MAX_EVENT_TIMEOUT + max(EVENT_MAX_TRIES, REFRESH_MAX_TRIES) * (
    JOB_TIMEOUT + ARQ_IN_PROGRESS_GRACE
)

# The enqueue() function (enqueue_function.lua) and the script that calls it once.
_ENQUEUE = lua("enqueue_function") + lua("enqueue")
# A queue's bell: a list an idle worker blocks on (BLPOP) between polls. Enough entries to wake
# every idle worker of a fleet; gone a minute after the last ring when no worker listens.
BELL_MAX = 64
BELL_TTL_MS = 60_000


def bell_key(queue_name: str) -> str:
    """The bell of the queue ``queue_name`` (rung by ``JobQueue.put(..., ring=...)``)."""
    return f"{queue_name}:bell"


@dataclass(frozen=True, slots=True)
class QueuedJob:
    """One arq job, serialized and ready to be written (here or inside a commit script)."""

    job_id: str
    queue: str
    payload: bytes
    score_ms: int | None  # None: due now, by Redis's clock when it is written
    expires_ms: int

    @property
    def keys(self) -> list[str]:
        return [job_key_prefix + self.job_id, result_key_prefix + self.job_id, self.queue]

    @property
    def args(self) -> list[Any]:
        return [self.payload, self.expires_ms, score_arg(self.score_ms), self.job_id]


def score_arg(score_ms: int | None) -> str:
    """A score as the scripts take it: whole milliseconds, or empty for Redis's time now."""
    return "" if score_ms is None else str(score_ms)


@dataclass(frozen=True, slots=True)
class JobRef:
    """A queued arq job that a commit removes (its key and its queue entry): the job of a
    schedule the commit cancels or replaces."""

    job_id: str
    queue: str

    @property
    def keys(self) -> list[str]:
        return [job_key_prefix + self.job_id, self.queue]


class JobQueue:
    """Writes arq jobs onto a queue with arq's layout, one round trip each."""

    def __init__(self, pool: ArqRedis, *, clock: Callable[[], float] = time.time) -> None:
        self.pool = pool
        self.clock = clock  # Redis's time (a RedisClock) in the project's processes
        self._enqueue = pool.register_script(_ENQUEUE)

    def job(
        self,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        *,
        job_id: str,
        queue: str,
        run_at_ms: int | None = None,
        expires_ms: int | None = None,
    ) -> QueuedJob:
        """Serialize a job as ``enqueue_job`` would: run at ``run_at_ms`` (Redis's time; now by
        default, read by the script that writes it), dropped by arq if no worker started it
        ``expires_ms`` after it was queued (by default a day after it falls due)."""
        now = int(self.clock() * 1000)
        if expires_ms is None:
            due_in = 0 if run_at_ms is None else run_at_ms - now
            expires_ms = due_in + self.pool.expires_extra_ms
        payload = serialize_job(
            function, args, kwargs or {}, None, now, serializer=self.pool.job_serializer
        )
        return QueuedJob(job_id, queue, payload, run_at_ms, max(1, expires_ms))

    async def put(self, job: QueuedJob, *, ring: str | None = None) -> bool:
        """Queue the job; False when arq still holds a job with its id (that job stands).

        ``ring``: the queue's bell (``bell_key``), for a job someone waits on: an idle worker
        blocked on the bell takes it at once instead of at its next poll. Rung in the same
        round trip; a bell for a job that was not queued only costs a worker one poll.
        """
        if ring is None:
            return bool(await self._enqueue(keys=job.keys, args=job.args))
        if isinstance(self.pool, RedisCluster):
            # A cluster pipeline sends each node its commands at once, in no order across
            # nodes: the bell (a slot of its own) could wake a worker before its job is there,
            # and the worker would sleep again on a due job. Rung once the job is queued.
            queued = bool(await self._enqueue(keys=job.keys, args=job.args))
            if queued:
                async with self.pool.pipeline(transaction=False) as pipe:
                    self._ring(pipe, ring)
                    await pipe.execute()
            return queued
        for attempt in range(2):
            async with self.pool.pipeline(transaction=False) as pipe:
                queue_script(pipe, self._enqueue, job.keys, job.args, whole=bool(attempt))
                self._ring(pipe, ring)
                queued, *_ = await pipe.execute(raise_on_error=False)
            if not isinstance(queued, NoScriptError) or attempt:
                break
            # A server without the script (a new primary, a flushed cache): it ran nothing.
        if isinstance(queued, BaseException):
            raise queued
        return bool(queued)

    @staticmethod
    def _ring(pipe: Any, bell: str) -> None:
        pipe.lpush(bell, b"1")
        pipe.ltrim(bell, 0, BELL_MAX - 1)
        pipe.pexpire(bell, BELL_TTL_MS)
