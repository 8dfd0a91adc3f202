"""Keeping grants alive: single-flight refresh, failures that never lose a grant.

A refresh runs under the user's lock (owner token, compare-and-delete; invariant 4) and re-reads
the record under it, so two workers never present one refresh token twice. Only ``invalid_grant``
ends a grant. 5xx, 429, timeouts and other unexpected answers are retried with exponential
backoff and jitter, honouring ``Retry-After``; the failure is recorded on the record and the user
stays provisioned (invariant 5). ``invalid_client`` means the deployment's own credentials are
wrong: refreshes pause for everyone, health turns red, and nobody is revoked.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import structlog

from ._engine import (
    TOKEN_FIELDS,
    Engine,
    UserLock,
    refresh_expiry_after,
    scheduling_lapse,
)
from ._errors import (
    ClientRejected,
    GrantRejected,
    ProviderError,
    ProviderUnavailable,
)
from ._jobs import JobRef, QueuedJob
from ._machine import Event, State
from ._metrics import MetricsRecorder
from ._model import Change, ConsentRecord, clip, cooldown_reason, iso
from ._queue import Envelope, Outcome
from ._schedule import Scheduler
from ._store import due_ms

__all__ = ["Refresher", "RetryPolicy"]

log = structlog.get_logger("consent_flow.refresh")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with equal jitter for transient refresh failures, and the pace of
    refreshes while they are paused for everyone (invalid_client)."""

    base: float = 2.0
    cap: float = 300.0
    halt_retry: float = 60.0  # a user whose refresh met the pause is tried again this much later
    halt_probe: float = 30.0  # while paused, one refresh per this many seconds tries the provider

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        raw = min(self.cap, self.base * 2.0 ** max(0, failures - 1))
        delay = raw / 2 + random.random() * raw / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cap))
        return delay


class Refresher:
    def __init__(
        self, engine: Engine, scheduler: Scheduler, *, retry: RetryPolicy | None = None
    ) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.retry = retry or RetryPolicy()
        self.metrics = MetricsRecorder(engine.store.redis, engine.store.keys, clock=engine.clock)
        settings = engine.settings
        self.fingerprint = hashlib.sha256(
            f"{settings.client_id}\x00{settings.client_secret.reveal()}".encode()
        ).hexdigest()[:16]

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.engine.store

    # --- the pause for everyone (invalid_client) ---------------------------------------------

    async def _pause_from(self, halt: dict[str, str]) -> dict[str, str] | None:
        """Why refreshes are paused for everyone (``cf:halt`` as read), or None."""
        if not halt:
            return None
        if halt.get("fingerprint") != self.fingerprint:
            # This process runs with other credentials than the ones that were refused: the
            # operator fixed them. Lift the pause and let this refresh prove it.
            await self.store.redis.delete(self.store.keys.halt)
            log.warning("refresh_pause_lifted", why="client credentials changed")
            return None
        return halt

    async def _may_probe(self) -> bool:
        key = self.store.keys.halt + ":probe"
        return bool(
            await self.store.redis.set(key, "1", nx=True, px=int(self.retry.halt_probe * 1000))
        )

    async def _halt(self, exc: ClientRejected) -> None:
        await self.store.redis.hset(
            self.store.keys.halt,
            mapping={
                "reason": "the provider rejected this deployment's client credentials "
                f"({_client_error(exc)}): refreshes are paused for everyone; no consent was "
                "revoked",
                "since": repr(self.engine.clock()),
                "fingerprint": self.fingerprint,
            },
        )
        log.error("refresh_paused", error=exc.code, provider_error=exc.error)

    # --- one refresh --------------------------------------------------------------------------

    async def refresh(
        self,
        user: str,
        *,
        due: int | None = None,
        on_demand: bool = False,
        min_ttl: float = 0.0,
        envelope: Envelope | None = None,
    ) -> Outcome:
        envelope = envelope or Envelope(Event.TOKEN_REFRESHED, user, "worker", reply=False)
        lock = self.engine.user_lock(user)

        async def attempt() -> tuple[str | None, tuple[ConsentRecord, dict[str, str]]]:
            # The lock, the record under it and the pause for everyone: one round trip.
            token, rec, halt = await self.store.lock_and_load(
                user, self.engine.lock_ttl, also=self.store.keys.halt
            )
            return token, (rec, halt)

        if on_demand:
            rec, raw_halt = await lock.take(attempt)
        else:
            # Scheduled: when another worker is refreshing (or revoking) this grant right now,
            # it schedules the next refresh itself.
            lock.token, (rec, raw_halt) = await attempt()
        try:
            halt = await self._pause_from(raw_halt)
            if halt is not None and not await self._may_probe():
                if lock.token is not None and not on_demand and rec.state is State.PROVISIONED:
                    await self._reschedule(
                        rec, envelope, self.engine.clock() + self.retry.halt_retry, error=None
                    )
                return self.engine.outcome(
                    rec, envelope, "failed", error="invalid_client", reason=halt.get("reason")
                )
            if lock.token is None:
                return self.engine.outcome(rec, envelope, "unchanged")
            return await self._refresh_locked(
                rec,
                lock,
                due=due,
                on_demand=on_demand,
                min_ttl=min_ttl,
                envelope=envelope,
                probing=halt is not None,
            )
        finally:
            await lock.__aexit__(None, None, None)

    async def _refresh_locked(
        self,
        rec: ConsentRecord,
        lock: UserLock,
        *,
        due: int | None,
        on_demand: bool,
        min_ttl: float,
        envelope: Envelope,
        probing: bool,
    ) -> Outcome:
        """The refresh itself, under the lock; ``rec`` was read under it."""
        user = rec.user
        now = self.engine.clock()
        if rec.state is not State.PROVISIONED or rec.tokens is None:
            await self.store.redis.zrem(self.store.keys.sched, user)
            return self.engine.outcome(rec, envelope, "unchanged")
        if on_demand:
            if rec.expires_at is None or rec.expires_at - now >= min_ttl:
                return self.engine.outcome(rec, envelope, "unchanged")
            retry_at = rec.on_demand_retry_at()
            if retry_at is not None and retry_at > now:
                # The last refresh failed and its retry is not due: a caller asking again and
                # again during an outage gets the record's answer, and the provider is spared.
                return self.engine.outcome(
                    rec,
                    envelope,
                    "failed",
                    error="provider_unavailable",
                    reason=cooldown_reason(rec, retry_at),
                    detail={"retry_at": iso(retry_at)},
                )
        elif due is not None and (
            rec.next_refresh_at is None or due_ms(rec.next_refresh_at) != due
        ):
            # A job for a schedule that a later refresh already replaced.
            return self.engine.outcome(rec, envelope, "unchanged")
        tokens = self.engine.open_tokens(user, rec.tokens)
        # Marked before the call: if this process dies with the request in flight, the next
        # attempt knows an invalid_grant may be the provider punishing a rotated token's reuse.
        await self.store.redis.hset(self.store.keys.rec(user), "inflight", repr(now))
        try:
            fresh = await self.engine.oauth.refresh(tokens["refresh_token"], scopes=rec.scopes)
        except GrantRejected as exc:
            # An earlier attempt's mark still there: it sent a refresh and never heard back. With
            # rotating refresh tokens the provider took that as the last use of this token.
            await self.metrics.refresh("rejected")
            return await self._reject(
                rec,
                envelope,
                lost_response=rec.inflight is not None,
                description=exc.description,
            )
        except ClientRejected as exc:
            await self.metrics.refresh("client_rejected")
            await self._halt(exc)
            await self._reschedule(
                rec,
                envelope,
                now + self.retry.halt_retry,
                error=f"client credentials rejected ({_client_error(exc)})",
            )
            return self.engine.outcome(rec, envelope, "failed", error=exc.code)
        except ProviderError as exc:
            # Down, slow, rate limited, or an answer we do not understand: never a reason to end
            # a grant. Back off and try again.
            await self.metrics.refresh("transient_failure")
            retry_after = exc.retry_after if isinstance(exc, ProviderUnavailable) else None
            failures = rec.refresh_failures + 1
            delay = self.retry.delay(failures, retry_after)
            answered = isinstance(exc, ProviderUnavailable) and exc.status is not None
            reason = f"{_brief(exc)} (attempt {failures}; next try in {delay:.0f} s)"
            if not answered and isinstance(exc, ProviderUnavailable):
                reason = f"no answer from the provider, response may be lost: {reason}"
            await self._reschedule(
                rec, envelope, now + delay, error=reason, keep_inflight=not answered
            )
            log.warning(
                "refresh_failed", error=exc.code, failures=failures, retry_in=round(delay, 1)
            )
            rec = await self.store.load(user)
            return self.engine.outcome(rec, envelope, "failed", error=exc.code)
        if probing:
            await self.store.redis.delete(self.store.keys.halt)
            log.warning("refresh_pause_lifted", why="a refresh succeeded")
        refresh_token = fresh.refresh_token or tokens["refresh_token"]  # kept when not rotated
        refresh_expires_at = refresh_expiry_after(
            fresh,
            rec.refresh_expires_at,
            rotated=refresh_token != tokens["refresh_token"],
            now=now,
        )
        due_at = self.engine.refresh_due(
            fresh.expires_at, now, scheduling_lapse(refresh_expires_at, rec.refresh_expires_at)
        )
        job = self.scheduler.job_for(user, due_at)
        lead = None if rec.expires_at is None else rec.expires_at - now
        change = Change(
            user=user,
            event=Event.TOKEN_REFRESHED,
            event_id=envelope.event_id,
            expect_state=rec.state,
            expect_version=rec.version,
            to_state=State.PROVISIONED,
            actor=envelope.actor,
            at=now,
            reason=None,
            correlation_id=envelope.correlation_id,
            sealed={
                "tok": self.engine.seal_tokens(
                    user,
                    {
                        "access_token": fresh.access_token,
                        "refresh_token": refresh_token,
                    },
                ),
            },
            set_fields={
                "exp": repr(fresh.expires_at) if fresh.expires_at is not None else "",
                "rexp": "" if refresh_expires_at is None else repr(refresh_expires_at),
                "scopes": " ".join(fresh.scopes or rec.scopes),
                "next": repr(due_at),
                "lastref": repr(now),
                "fails": "0",
            },
            delete_fields=("referr", "failsince", "failat", "inflight"),
            schedule_at=due_at,
            # Riding in the same commit: the next refresh's job, the counters, the release of
            # the lock and the caller's answer. One round trip for all of it.
            job=job,
            drop_job=self._replaced(rec, job),
            counters=self.metrics.refresh_counters("success", lead=lead),
            unlock=lock.token,
        )
        outcome = self.engine.outcome(
            rec.after(change, rec.version + 1), envelope, "applied", detail={"lead": lead}
        )
        if envelope.reply:
            change.reply = (self.store.keys.reply(envelope.event_id), outcome.reply_json(envelope))
        result = await self.store.commit(change)
        if not result.ok:
            # Cannot happen while we hold the lock, unless the lock expired under a very slow
            # provider: the new tokens must not live on (invariant 3).
            await self.engine.revoke_obtained(user, fresh, why="refresh lost the race")
            return await self.engine.reread_after(envelope, result.status)
        lock.token = None  # released by the commit
        log.debug(  # the transition line already says it at INFO
            "token_refreshed",
            user=user,
            lead_s=None if lead is None else round(lead, 1),
            next_in_s=round(due_at - now, 1),
        )
        return outcome.sent() if envelope.reply else outcome

    async def _reschedule(
        self,
        rec: ConsentRecord,
        envelope: Envelope,
        at: float,
        *,
        error: str | None,
        keep_inflight: bool = False,
    ) -> None:
        fields = {"next": repr(at)}
        job = self.scheduler.job_for(rec.user, at)
        if error is not None:
            now = self.engine.clock()
            fields.update(
                referr=clip(error) or "",
                fails=str(rec.refresh_failures + 1),
                failat=repr(now),
                # The first failure of a run: cleared by the next success.
                failsince=repr(rec.failing_since if rec.failing_since is not None else now),
            )
        change = Change(
            user=rec.user,
            event=Event.TOKEN_REFRESHED,
            event_id=envelope.event_id,
            expect_state=rec.state,
            expect_version=rec.version,
            to_state=rec.state,
            actor=envelope.actor,
            at=self.engine.clock(),
            set_fields=fields,
            delete_fields=() if keep_inflight else ("inflight",),
            schedule_at=at,
            record_history=False,
            job=job,
            drop_job=self._replaced(rec, job),
        )
        await self.store.commit(change)

    def _replaced(self, rec: ConsentRecord, job: QueuedJob) -> JobRef | None:
        """The job of the schedule ``job`` replaces, for the commit to remove, unless it is the
        same job. Removing it is harmless when it is the one running (arq's own clean-up finds
        nothing left) and spares the queue a stale job when it is a later one (an on-demand
        refresh came first)."""
        old = self.engine.scheduled_job(rec)
        return None if old is None or old.job_id == job.job_id else old

    async def _reject(
        self,
        rec: ConsentRecord,
        envelope: Envelope,
        *,
        lost_response: bool,
        description: str | None = None,
    ) -> Outcome:
        reason = "refresh token rejected by provider: invalid_grant"
        if description:
            # Sanitised by the OAuth client: "consent withdrawn" and "token expired" differ.
            reason += f" ({description})"
        if lost_response:
            reason += (
                " (an earlier refresh's response was lost after the provider rotated the "
                "token, so the retry counted as reuse)"
            )
        rejected = Envelope(
            Event.REFRESH_REJECTED,
            rec.user,
            envelope.actor,
            event_id=envelope.event_id,
            correlation_id=envelope.correlation_id,
        )
        row = self.engine.machine.decide(rec.state, Event.REFRESH_REJECTED, user=rec.user)
        change = Change(
            user=rec.user,
            event=Event.REFRESH_REJECTED,
            event_id=envelope.event_id,
            expect_state=rec.state,
            expect_version=rec.version,
            to_state=row.dest or rec.state,
            actor=envelope.actor,
            at=self.engine.clock(),
            reason=reason,
            correlation_id=envelope.correlation_id,
            delete_fields=TOKEN_FIELDS,
            unschedule=True,
            drop_job=self.engine.scheduled_job(rec),
        )
        result = await self.store.commit(change)
        if not result.ok:
            return await self.engine.reread_after(rejected, result.status)
        log.warning(
            "grant_ended", user=rec.user, error="invalid_grant", lost_response=lost_response
        )
        rec = rec.after(change, result.version)
        return self.engine.outcome(rec, rejected, "applied", error="invalid_grant")


def _client_error(exc: ClientRejected) -> str:
    if exc.error == exc.code:
        return exc.code
    return f"{exc.error}, a client-level error: {exc.code}"


def _brief(exc: ProviderError) -> str:
    if isinstance(exc, ProviderUnavailable):
        return f"provider unavailable ({exc.status})" if exc.status else "provider unreachable"
    return f"provider error ({exc.code})"
