"""arq's worker, finding and claiming due jobs in one round trip per poll.

arq's ``Worker`` polls the queue (ZRANGEBYSCORE), then claims each job it saw with WATCH, EXISTS,
ZSCORE and MULTI/PSETEX/EXEC: four more round trips per job and per worker that tries it. With
several workers polling one queue, each sees the same due jobs and most claims are lost races
that cost as much as the won one (with three workers, 3.7 claim attempts per job run, even
with each claim in one script). Here one script reads the due part of the queue and marks as
many jobs in progress as this worker has free slots, stepping over jobs that run elsewhere.
A job's start and end (arq's MULTI/EXEC bookkeeping, which a Redis Cluster does not run) are
the single-slot scripts of ``consent_flow.queue.jobstore``, writing what arq writes. Nothing
else about arq changes: the keys, the in-progress marker and its timeout, the retries, the
semaphore, the job counter, aborts and the health check are arq's own; burst mode counts the
jobs a worker claimed (arq's count can stop a burst short).

One clock: what is due is decided by Redis's clock (``TIME`` in the poll script), and cron jobs
(the sweep, the cleanup) are timed and queued by it too, not by this process's clock: a worker
whose clock is off by minutes still runs events and refreshes when they fall due.

It also rides out Redis outages: a poll, a heartbeat, a cron enqueue or a job's bookkeeping that
finds Redis away no longer ends the worker (arq lets the error out of its loop). The outage is
logged once, with the address but no credentials, and reported to ``ctx["on_redis_back"]`` when it
ends; the worker then resumes by itself. Stopping it during an outage takes seconds, not the
client's reconnect attempts for every clean-up call.

A worker built outside a running event loop (``consent-flow worker``, ``run()``) runs on uvloop's:
the same asyncio, with the socket and callback machinery in C (about 6 % less CPU per refresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix
from arq.utils import to_ms, to_unix_ms
from arq.worker import Worker
from redis.exceptions import NoScriptError

from consent_flow.engine.refresh import REDIS_ERRORS
from consent_flow.queue.jobs import JobQueue, bell_key
from consent_flow.queue.jobstore import RETRY_TTL, JobStore
from consent_flow.store.clock import CLOCK_RESYNC_INTERVAL, RedisClock
from consent_flow.store.connection import create_redis_pool
from consent_flow.store.redis_store import Keys, job_shard, shard_job_id
from consent_flow.store.scripts import lua, queue_script

try:
    import uvloop
except ImportError:  # pragma: no cover - no Windows build; asyncio's own loop then
    uvloop = None  # type: ignore[assignment]

__all__ = ["ConsentWorker"]

log = structlog.get_logger("consent_flow.worker")

# Seconds an idle worker blocks on its queue's bell before it polls again: how late a deferred
# job (a retry, a webhook's backoff) may start past its time. Callers' jobs ring the bell.
BELL_WAIT = 0.1
OUTAGE_POLL_DELAY = 1.0  # seconds between polls while Redis is away (after the client's retries)
CLOSE_REDIS_TIMEOUT = 1.0  # seconds each clean-up step with Redis may take when the worker stops


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _Opening:
    """The worker's pool as arq's ``run_job`` sees it: its opening MULTI/EXEC (GET the job,
    INCR and EXPIRE its try counter, and ZREM it from the abort set when aborts are on) is
    answered by the job store's start script, with the abort set in a call of its own; every
    other attribute is the pool's. It refuses any other transaction, so an arq that opens jobs
    differently fails its first job instead of running it without its bookkeeping."""

    def __init__(self, worker: ConsentWorker, job_id: str) -> None:
        self._worker = worker
        self._job_id = job_id
        self._calls: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._worker.redis, name)

    def pipeline(self, transaction: bool = True) -> _Opening:
        return self

    async def __aenter__(self) -> _Opening:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def get(self, key: str) -> None:
        self._calls.append(("GET", key))

    def incr(self, key: str) -> None:
        self._calls.append(("INCR", key))

    def expire(self, key: str, seconds: int) -> None:
        self._calls.append(("EXPIRE", key, seconds))

    def zrem(self, key: str, *members: str) -> None:
        self._calls.append(("ZREM", key, *members))

    async def execute(self) -> list[Any]:
        worker, job_id = self._worker, self._job_id
        retry_key = retry_key_prefix + job_id
        opening: list[tuple[Any, ...]] = [
            ("GET", job_key_prefix + job_id),
            ("INCR", retry_key),
            ("EXPIRE", retry_key, RETRY_TTL),
        ]
        if worker.allow_abort_jobs:
            opening.append(("ZREM", abort_jobs_ss, job_id))
        if self._calls != opening:
            raise RuntimeError(f"arq's run_job opened {job_id} in a way the worker does not know")
        self._calls = []
        job, tries = await worker.jobs.start(job_id)
        if not worker.allow_abort_jobs:
            return [job, tries, True]
        return [job, tries, True, await worker.jobs.forget_abort(job_id)]


# What ``ConsentWorker.pool`` is in the task of a job that is opening (see _Opening).
_opening: ContextVar[_Opening | None] = ContextVar("opening", default=None)


class ConsentWorker(Worker):
    """``arq.worker.Worker`` whose poll claims due jobs in one round trip; built from
    ``worker_settings``."""

    def __init__(
        self, *args: Any, queue_shards: Sequence[int] | None = None, **kwargs: Any
    ) -> None:
        """``queue_shards``: the shards whose queues (``<queue_name>:{s<n>}``) this worker
        serves; None: the one queue ``queue_name`` (unsharded, as arq's own)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # arq binds the thread's event loop (and its signal handlers) here; run() uses it.
            if uvloop is not None:
                asyncio.set_event_loop(uvloop.new_event_loop())
        super().__init__(*args, **kwargs)
        self._claim_due: Any = None
        self._jobs: JobStore | None = None
        self.queue_shards = None if queue_shards is None else tuple(queue_shards)
        self._hot: list[tuple[str, int]] = []  # queues with jobs due at the last poll
        self._claimed = 0
        self._cron_jobs: JobQueue | None = None
        self._down_since: float | None = None
        self.redis_outages = 0
        self._bell = bell_key(self.queue_name)

    @property
    def clock(self) -> RedisClock:
        """Redis's time for this worker: the one ``on_startup`` put in ``ctx["clock"]``, or
        one of its own."""
        clock = self.ctx.get("clock")
        if not isinstance(clock, RedisClock):
            clock = self.ctx["clock"] = RedisClock(self.pool)
        return clock

    @property
    def redis(self) -> ArqRedis:
        """The worker's Redis client (``pool`` is arq's view of it: see ``run_job``)."""
        return self._pool  # type: ignore[return-value]

    @property
    def pool(self) -> ArqRedis:
        return _opening.get() or self.redis  # type: ignore[return-value]

    @property
    def jobs(self) -> JobStore:
        """arq's bookkeeping of this worker's jobs, in single-slot scripts."""
        if self._jobs is None or self._jobs.pool is not self.redis:
            self._jobs = JobStore(self.redis)
        return self._jobs

    async def run_job(self, job_id: str, score: int) -> None:
        # arq's, with its MULTI/EXEC bookkeeping done by the job store's scripts, which run on a
        # Redis Cluster too: the opening through the pool it sees (in this job's task only),
        # the end through finish_job and finish_failed_job.
        _opening.set(_Opening(self, job_id))
        await super().run_job(job_id, score)

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        await self.jobs.finish(
            job_id,
            self.queue_of(job_id),
            done=finish,
            result=result_data,
            result_ms=None if keep_result_forever else to_ms(result_timeout_s),
            later_ms=incr_score,
            keep_in_progress_ms=to_ms(keep_in_progress),
        )
        if finish and self.allow_abort_jobs:
            await self.jobs.forget_abort(job_id)

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        keep = self.keep_result_forever or self.keep_result_s > 0
        await self.jobs.finish(
            job_id,
            self.queue_of(job_id),
            done=True,
            result=result_data if keep else None,
            result_ms=None if self.keep_result_forever else to_ms(self.keep_result_s),
        )
        if self.allow_abort_jobs:
            await self.jobs.forget_abort(job_id)

    async def _cancel_aborted_jobs(self) -> None:
        # arq's, reading the abort set in a script of its own instead of a MULTI/EXEC.
        aborted = {job_id for job_id in await self.jobs.aborts() if job_id in self.job_tasks}
        for job_id in aborted:
            self.job_tasks[job_id].cancel()
        if aborted:
            self.aborting_tasks.update(aborted)
            await self.jobs.forget_abort(*aborted)

    @property
    def redis_address(self) -> str:
        """Where this worker's Redis is, without credentials (for logs)."""
        rs = self.redis_settings
        if rs is None:
            return "?"
        if rs.unix_socket_path:
            where = rs.unix_socket_path
        elif isinstance(rs.host, str):
            where = f"{rs.host}:{rs.port}"
        else:  # Sentinel: its addresses
            where = ",".join(f"{host}:{port}" for host, port in rs.host)
        return f"{where}/{rs.database}"

    async def main(self) -> None:
        # arq's, with the pool made like the project's other pools (a Sentinel's too).
        if self._pool is None and self.redis_settings is not None:
            self._pool = await create_redis_pool(
                self.redis_settings,
                job_deserializer=self.job_deserializer,
                job_serializer=self.job_serializer,
                default_queue_name=self.queue_name,
                expires_extra_ms=self.expires_extra_ms,
            )
        await super().main()

    async def _poll_iteration(self) -> None:
        try:
            claimed = self._claimed
            await self._poll_once()
            if self.burst and self.queue_shards is not None:
                await self._burst_on_shards()
            elif self._claimed == claimed and not self.burst:
                await self._wait_for_bell()
        except REDIS_ERRORS as exc:
            self._redis_down(exc)
            await asyncio.sleep(OUTAGE_POLL_DELAY)
            return
        if self._down_since is not None:
            await self._redis_back()

    async def _burst_on_shards(self) -> None:
        # arq ends a burst once its base queue is empty, and no job goes there once queues are
        # sharded: polling goes on here until the served queues are empty (a job stays in its
        # queue until it ends) or max_burst_jobs have started.
        while self.max_burst_jobs < 0 or self._jobs_started() < self.max_burst_jobs:
            if not await self._queued():
                return
            await asyncio.sleep(self.poll_delay_s)
            await self._poll_once()

    async def _queued(self) -> int:
        """Jobs in the queues this worker serves, due or not, running or not."""
        shards = self.queue_shards
        queues = (
            [self.queue_name]
            if shards is None
            else [Keys.queue(self.queue_name, s) for s in shards]
        )
        async with self.pool.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zcard(queue)
            return sum(await pipe.execute())

    async def _wait_for_bell(self) -> None:
        """Idle: block on the queue's bell until a caller's job comes in or ``BELL_WAIT`` has
        passed (for deferred jobs falling due), instead of polling every ``poll_delay``: each
        poll is a round trip, and round trips are most of an idle worker's CPU."""
        rung = await self.pool.execute_command("BLPOP", self._bell, BELL_WAIT)  # type: ignore[no-untyped-call]
        if rung is not None and self.job_counter >= self.max_jobs:
            # Busy: another worker takes it.
            await self.pool.execute_command("LPUSH", self._bell, b"1")  # type: ignore[no-untyped-call]

    def _redis_down(self, exc: BaseException) -> None:
        if self._down_since is not None:
            return  # logged once per outage, not per poll
        self._down_since = time.monotonic()
        self.redis_outages += 1
        log.error(
            "redis_unavailable",
            redis=self.redis_address,
            error=type(exc).__name__,
            outages=self.redis_outages,
        )

    async def _redis_back(self) -> None:
        assert self._down_since is not None
        down = time.monotonic() - self._down_since
        self._down_since = None
        log.warning("redis_available", redis=self.redis_address, down_s=round(down, 1))
        hook = self.ctx.get("on_redis_back")
        if hook is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await hook(self.ctx, down)

    async def _poll_once(self) -> None:
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
                exc = None if task.cancelled() else task.exception()
                if isinstance(exc, REDIS_ERRORS):
                    # arq's bookkeeping for the job met the outage: the job runs again once its
                    # in-progress mark lapses.
                    self._redis_down(exc)
                elif exc is not None:
                    raise exc  # other errors in run_job propagate, as in arq
        await self.heart_beat()

    def _jobs_started(self) -> int:
        # What burst mode counts. arq adds the finished jobs to the running tasks, and a task
        # still finishing (or finished since the last poll) is in both: a burst worker stopped
        # short. Every job this worker started went through one claim.
        return self._claimed

    def queue_of(self, job_id: str) -> str:
        """The queue a job of this worker's is on: its shard's, by the tag its id starts with."""
        shard = job_shard(job_id) if self.queue_shards is not None else None
        return self.queue_name if shard is None else Keys.queue(self.queue_name, shard)

    @staticmethod
    def _shares(due: list[tuple[str, int]], free: int) -> list[tuple[str, int]]:
        """``free`` slots shared among queues with work (queue, jobs due): busiest first, each
        at least one while slots last, so no poll claims more jobs than the worker can run."""
        due = sorted(due, key=lambda item: -item[1])
        total = sum(n for _, n in due)
        shares: list[tuple[str, int]] = []
        left = free
        for queue, n in due:
            if left <= 0:
                break
            share = max(1, min(left, n, free * n // max(1, total)))
            shares.append((queue, share))
            left -= share
        if left > 0 and shares:
            shares[0] = (shares[0][0], shares[0][1] + left)
        return shares

    def _queue_claims(
        self, pipe: Any, shares: list[tuple[str, int]], *, whole: bool = False
    ) -> None:
        ttl = int(self.in_progress_timeout_s * 1000)
        for queue, want in shares:
            args = [in_progress_key_prefix, ttl, want, max(self.queue_read_limit, want)]
            queue_script(pipe, self._claim_due, [queue], args, whole=whole)

    async def _claimed_from(self, shares: list[tuple[str, int]], answers: list[Any]) -> list[Any]:
        """The jobs the claims of ``shares`` took (job id, score, ...), from their answers in a
        pipeline. Claims that met a server without the script (a new primary, a cluster node
        that just took the queue's slot) ran nothing: sent again at once, whole, rather than
        left for a poll after the worker has slept on the bell."""
        missing = [s for s, a in zip(shares, answers, strict=True) if isinstance(a, NoScriptError)]
        if missing:
            async with self.pool.pipeline(transaction=False) as pipe:
                self._queue_claims(pipe, missing, whole=True)
                answers = [a for a in answers if not isinstance(a, NoScriptError)]
                answers += await pipe.execute(raise_on_error=False)
        claimed: list[Any] = []
        for answer in answers:
            if isinstance(answer, NoScriptError):
                continue  # still no script: a later poll claims there
            if isinstance(answer, BaseException):
                raise answer
            claimed += answer
        return claimed

    async def _claim_sharded(self, free: int) -> list[Any]:
        """One round trip counts what is due on each served queue (by this worker's estimate
        of Redis's time; the claims decide by Redis's clock) and claims on the queues that had
        work at the last poll: a busy worker claims in one round trip, as on one queue. Queues
        that show work only now are claimed in a second."""
        assert self.queue_shards is not None
        queues = [Keys.queue(self.queue_name, shard) for shard in self.queue_shards]
        hot = self._shares(self._hot, free)
        now_ms = int(self.clock() * 1000) + 1
        async with self.pool.pipeline(transaction=False) as pipe:
            for queue in queues:
                pipe.zcount(queue, "-inf", now_ms)
            self._queue_claims(pipe, hot)
            answers = await pipe.execute(raise_on_error=False)
        counts = answers[: len(queues)]
        for count in counts:
            if isinstance(count, BaseException):
                raise count
        claimed = await self._claimed_from(hot, answers[len(queues) :])
        self._hot = [(q, int(n)) for q, n in zip(queues, counts, strict=True) if int(n)]
        left = free - len(claimed) // 2
        tried = {queue for queue, _ in hot}
        cold = [(queue, n) for queue, n in self._hot if queue not in tried]
        if cold and left > 0:
            shares = self._shares(cold, left)
            async with self.pool.pipeline(transaction=False) as pipe:
                self._queue_claims(pipe, shares)
                answers = await pipe.execute(raise_on_error=False)
            claimed += await self._claimed_from(shares, answers)
        return claimed

    async def _start_due(self, free: int) -> None:
        if self._claim_due is None:
            self._claim_due = self.pool.register_script(lua("claim_due"))
        if self.queue_shards is None:
            shares = [(self.queue_name, free)]
            async with self.pool.pipeline(transaction=False) as pipe:
                self._queue_claims(pipe, shares)
                answers = await pipe.execute(raise_on_error=False)
            claimed = await self._claimed_from(shares, answers)
        else:
            claimed = await self._claim_sharded(free)
        self._claimed += len(claimed) // 2
        for i in range(0, len(claimed), 2):
            # Never blocks: this worker claimed no more jobs than it had free slots.
            await self.sem.acquire()
            self.job_counter = self.job_counter + 1
            job_id = claimed[i].decode()
            task = self.loop.create_task(self.run_job(job_id, int(float(claimed[i + 1]))))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            # Seen here even if the poll never gets to it: a job claimed again after an
            # outage replaces its dead task in ``tasks``.
            task.add_done_callback(_retrieve)
            self.tasks[job_id] = task

    async def record_health(self) -> None:
        # arq's, with ``queued`` counted on every queue this worker serves: arq counts its base
        # queue, which no job goes to once queues are sharded (its line always said queued=0).
        now = time.time()
        if now - self._last_health_check < self.health_check_interval:
            return
        self._last_health_check = now
        ongoing = sum(not task.done() for task in self.tasks.values())
        queued = await self._queued()
        info = (
            f"{datetime.now():%b-%d %H:%M:%S} j_complete={self.jobs_complete} "
            f"j_failed={self.jobs_failed} j_retried={self.jobs_retried} j_ongoing={ongoing} "
            f"queued={queued}"
        )
        ttl_ms = int((self.health_check_interval + 1) * 1000)
        await self.pool.psetex(self.health_check_key, ttl_ms, info.encode())

    async def heart_beat(self) -> None:
        # arq's, with the cron jobs timed by Redis's clock rather than this process's.
        clock = self.clock
        await clock.sync_if_stale(CLOCK_RESYNC_INTERVAL)
        await self.record_health()
        now = datetime.fromtimestamp(clock(), tz=self.timezone)
        await self.run_cron(now, max(self.poll_delay_s, 0.5))

    async def run_cron(self, n: datetime, delay: float, num_windows: int = 2) -> None:
        """arq's ``run_cron``, queueing through the one-script enqueue: a cron job that falls due
        now is scored with Redis's clock, so every worker queues the same job (same id) for the
        same instant, whatever its own clock says."""
        if self._cron_jobs is None:
            self._cron_jobs = JobQueue(self.pool, clock=self.clock)
        jobs = self._cron_jobs
        cutoff = n + timedelta(seconds=delay * num_windows)
        queued = []
        for cron_job in self.cron_jobs:
            if cron_job.next_run is None:
                if cron_job.run_at_startup:
                    cron_job.next_run = n
                else:
                    cron_job.calculate_next(n)
                    continue
            if cron_job.next_run < cutoff:
                run_at = to_unix_ms(cron_job.next_run)
                job_id = cron_job.job_id or (
                    f"{cron_job.name}:{run_at}" if cron_job.unique else uuid.uuid4().hex
                )
                queue = self.queue_name
                if self.queue_shards is not None:
                    # Jobs about no connection go to shard 0 (one id for the whole fleet).
                    job_id, queue = shard_job_id(0, job_id), Keys.queue(self.queue_name, 0)
                job = jobs.job(
                    cron_job.name,
                    (),
                    job_id=job_id,
                    queue=queue,
                    run_at_ms=run_at if cron_job.next_run > n else None,
                )
                queued.append(jobs.put(job))
                cron_job.calculate_next(cron_job.next_run)
        if queued:
            await asyncio.gather(*queued)

    async def close(self) -> None:
        # arq's close, with every call to Redis bounded: during an outage each would otherwise
        # wait out the client's reconnect attempts, and SIGTERM must stop the worker in seconds.
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        if self.tasks:
            # A cancelled job still records its end in Redis (arq shields that): bounded too.
            _, late = await asyncio.wait(list(self.tasks.values()), timeout=CLOSE_REDIS_TIMEOUT)
            for task in late:
                task.cancel()
        with contextlib.suppress(*REDIS_ERRORS):
            await asyncio.wait_for(self.pool.delete(self.health_check_key), CLOSE_REDIS_TIMEOUT)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(*REDIS_ERRORS):
            await asyncio.wait_for(
                self.pool.aclose(close_connection_pool=True), CLOSE_REDIS_TIMEOUT
            )
        self._pool = None
