"""arq's worker, claiming each job in one round trip.

arq's ``Worker.start_jobs`` claims a job with WATCH, EXISTS, ZSCORE and MULTI/PSETEX/EXEC: four
round trips per job and per worker that tries it. With several workers polling one queue most of
those claims are lost races, and the lost ones cost as much as the won one. One script does the
same check-and-mark atomically. Nothing else about arq changes: the keys, the in-progress marker
and its timeout, the retries, the semaphore and the job counter are arq's own.
"""

from __future__ import annotations

from typing import Any

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker

__all__ = ["ConsentWorker"]

# KEYS: the job's in-progress key, the queue. ARGV: job id, now (ms), in-progress ttl (ms).
# Returns the job's score when this worker now owns it, nil when it runs elsewhere, is gone,
# or is not due yet (queued again with a delay by another worker).
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[3])
return score
"""


class ConsentWorker(Worker):
    """``arq.worker.Worker`` with a one-round-trip job claim; built from ``worker_settings``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claim: Any = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if self._claim is None:
            self._claim = self.pool.register_script(_CLAIM)
        for job_id_b in job_ids:
            await self.sem.acquire()
            if self.job_counter >= self.max_jobs:
                self.sem.release()
                return
            self.job_counter = self.job_counter + 1
            job_id = job_id_b.decode()
            score = await self._claim(
                keys=[in_progress_key_prefix + job_id, self.queue_name],
                args=[job_id, timestamp_ms(), int(self.in_progress_timeout_s * 1000)],
            )
            if score is None:
                # Started elsewhere, finished, or queued again for later.
                self.job_counter = self.job_counter - 1
                self.sem.release()
                continue
            task = self.loop.create_task(self.run_job(job_id, int(float(score))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
