"""arq's job bookkeeping in single-slot scripts: a job's start, its end, and aborts.

arq's worker opens each job with one MULTI/EXEC (read the job, count the try), ends it with
another (keep the result, drop the job's keys and queue entry, or leave it queued for a retry),
and its ``enqueue_job`` and ``Job.abort`` use WATCH and MULTI/EXEC too. redis-py's asyncio
cluster client runs none of them. Here each step is one script over the job's own keys and its
queue: with a job id that starts with its queue's hash tag (``{s7}:...`` on ``name:{s7}``) they
all share one slot, so the same scripts run on one Redis and on a Redis Cluster. The keys, the
serialized job and result, the try counter and its ttl are arq's own: arq's ``Job(...).info()``
and ``result_info()`` (and on one Redis ``result()`` and ``status()``) read what is written here.

arq's abort set (``arq:abort``) names jobs of every queue, so it lives in a slot of its own and
is only ever read or written in a call of its own, never inside a script with a job's keys.
"""

from __future__ import annotations

from arq.connections import ArqRedis
from arq.constants import (
    abort_job_max_age,
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)

from consent_flow.store.scripts import lua

__all__ = ["RETRY_TTL", "JobStore"]

RETRY_TTL = 88400  # seconds arq keeps a job's try counter (its run_job's own figure)
ABORT_MAX_AGE_MS = abort_job_max_age * 1000  # how long arq keeps a request to abort


def _arg(value: int | None) -> str:
    return "" if value is None else str(value)


class JobStore:
    """The bookkeeping of arq jobs, each step one round trip."""

    def __init__(self, pool: ArqRedis) -> None:
        self.pool = pool
        self._start = pool.register_script(lua("job_start"))
        self._finish = pool.register_script(lua("job_finish"))
        self._aborts = pool.register_script(lua("job_aborts"))
        self._hurry = pool.register_script(lua("job_hurry"))

    async def start(self, job_id: str, retry_ttl: int = RETRY_TTL) -> tuple[bytes | None, int]:
        """The serialized job (None once it expired) and the number of this try."""
        job, tries = await self._start(
            keys=[job_key_prefix + job_id, retry_key_prefix + job_id], args=[retry_ttl]
        )
        return job, int(tries)

    async def finish(
        self,
        job_id: str,
        queue: str,
        *,
        done: bool,
        result: bytes | None = None,
        result_ms: int | None = None,
        later_ms: int | None = None,
        keep_in_progress_ms: int | None = None,
    ) -> None:
        """End a try of a job of ``queue``: ``done`` keeps ``result`` (if any) for
        ``result_ms`` (None: forever) and drops the job; otherwise it stays queued, ``later_ms``
        later if given. The in-progress key goes, or stays ``keep_in_progress_ms`` (a cron
        job's, against running it twice)."""
        await self._finish(
            keys=[
                in_progress_key_prefix + job_id,
                job_key_prefix + job_id,
                retry_key_prefix + job_id,
                result_key_prefix + job_id,
                queue,
            ],
            args=[
                job_id,
                "1" if done else "0",
                result or b"",
                _arg(result_ms),
                _arg(later_ms or None),
                _arg(keep_in_progress_ms),
            ],
        )

    async def aborts(self) -> list[str]:
        """The ids of the jobs asked to abort (of any queue), once stale requests are dropped."""
        ids = await self._aborts(keys=[abort_jobs_ss], args=[ABORT_MAX_AGE_MS])
        return [job_id.decode() for job_id in ids]

    async def forget_abort(self, *job_ids: str) -> bool:
        """Drop requests to abort these jobs; True if there was one."""
        return bool(await self.pool.zrem(abort_jobs_ss, *job_ids))

    async def abort(self, job_id: str, queue: str, at_ms: int) -> None:
        """Ask the workers to abort a job of ``queue`` (what arq's ``Job.abort`` writes): a job
        queued for later is made due now, so that a worker starts it and ends it as aborted."""
        await self._hurry(keys=[queue], args=[job_id])
        await self.pool.zadd(abort_jobs_ss, {job_id: at_ms})
