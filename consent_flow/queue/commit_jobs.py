"""The jobs a commit carries, turned from domain values into arq's jobs.

A :class:`~consent_flow.core.records.Change` says what should be queued if it applies ("the
refresh due at T", "notice N") and which queued refresh it cancels; the store's commit script
writes the arq jobs these become, in the same step. The refresh jobs are the scheduler's own (the
same ids and payloads its sweep would queue), so a commit and a sweep never queue a refresh twice.
"""

from __future__ import annotations

from consent_flow.core.records import Job, NoticeJob, RefreshJob
from consent_flow.queue.jobs import NOTICE_JOB, JobRef, QueuedJob
from consent_flow.queue.scheduler import Scheduler, refresh_job_ref

__all__ = ["CommitJobs"]


class CommitJobs:
    """Builds the arq jobs of commits, on the queue of the committing user's shard (the
    commit's script writes them: they must be in its slot)."""

    def __init__(self, scheduler: Scheduler, *, prefix: str) -> None:
        self.scheduler = scheduler
        self.prefix = prefix  # deployments sharing one Redis share arq's job keys

    def queued(self, user: str, job: Job) -> QueuedJob | None:
        """The arq job of ``job`` (None for a refresh when batched: workers take due refreshes
        from the schedule itself)."""
        if isinstance(job, RefreshJob):
            return self.scheduler.job_for(user, job.at)
        if isinstance(job, NoticeJob):
            shard = self.scheduler.keys.of(user)
            return self.scheduler.jobs.job(
                NOTICE_JOB,
                (job.notice,),
                # The notice's id: arq refuses a second one while the first is queued, retrying,
                # or remembered as done.
                job_id=shard.job_id(f"wh:{self.prefix}:{job.id}"),
                queue=shard.queue(self.scheduler.queue_name),
                expires_ms=int(job.keep_for * 1000),
            )
        raise TypeError(f"not a job a commit queues: {job!r}")

    def dropped(self, user: str, at: float) -> JobRef | None:
        """The queued job of the refresh due at ``at`` (None when batched: there is none)."""
        if self.scheduler.batched:
            return None
        return refresh_job_ref(self.scheduler.keys, user, at, self.scheduler.queue_name)
