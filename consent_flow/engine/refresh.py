"""Keeping grants alive: single-flight refresh, failures that never lose a grant.

A refresh runs under the user's lock (owner token, compare-and-delete: single flight) and re-reads
the record under it, so two workers never present one refresh token twice. Only ``invalid_grant``
ends a grant. 5xx, 429, timeouts and other unexpected answers are retried with exponential
backoff and jitter, honouring ``Retry-After``; the failure is recorded on the record and the user
stays provisioned (a provider's trouble never revokes anyone). ``invalid_client`` means the
deployment's own credentials are wrong: refreshes pause for everyone, health turns red, and
nobody is revoked.

Once the provider answered, its tokens are stored whatever happens to Redis meanwhile: a commit
that conflicts with a change that left the grant alive (a key rotation, a reschedule) re-reads
the record and commits again; a slow commit spools the answer to disk; a failed one is retried in
the background, lock held or taken again, for up to ``commit_retry_limit`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from redis.exceptions import ClusterError, SlotNotCoveredError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from consent_flow.core.records import (
    Change,
    CommitResult,
    ConsentRecord,
    RecordFields,
    RefreshCount,
    RefreshJob,
    clip,
    cooldown_reason,
    iso,
)
from consent_flow.core.table import Event, State
from consent_flow.engine.engine import (
    REPLICATION_RECHECK,
    SESSION_FIELDS,
    TOKEN_FIELDS,
    Engine,
    UserLock,
    refresh_expiry_after,
    scheduling_lapse,
)
from consent_flow.engine.webhooks import refresh_notice_kind
from consent_flow.errors import (
    ClientRejected,
    GrantRejected,
    ProviderError,
    ProviderUnavailable,
    VaultError,
)
from consent_flow.oidc import TokenSet
from consent_flow.queue.bus import Envelope, Outcome
from consent_flow.queue.scheduler import Scheduler
from consent_flow.store.metrics import MetricsRecorder
from consent_flow.store.redis_store import due_ms
from consent_flow.store.spool import PendingTokens, TokenSpool, token_digest
from consent_flow.store.vault import KeyRing, open_tokens

__all__ = ["REDIS_ERRORS", "Fit", "Refresher", "RetryPolicy", "fits"]

log = structlog.get_logger("consent_flow.refresh")

# What Redis being away looks like to a caller (after the client's own reconnect attempts). A
# Redis Cluster also answers that it is down (CLUSTERDOWN: a primary with no replica is away, or
# a node back from an outage has not heard from the others yet) or leaves a slot out of reach.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    ClusterError,
    SlotNotCoveredError,
)
COMMIT_RETRY_BASE = 0.25  # seconds before a deferred commit is tried again, doubling
# A deferred commit is tried at least this often, so it lands as soon as Redis is back, before
# a refresh anywhere else could present the refresh token it replaced.
COMMIT_RETRY_CAP = 1.0
MAX_MERGE_ATTEMPTS = 5  # re-reads of a record that keeps changing under a refresh's commit
# Seconds a refresh's commit may take before its answer is written to the spool. A commit takes
# well under a millisecond; writing every answer would cost each refresh a file created and
# removed (about 0.1 ms of CPU, some 5 % of a refresh's).
SPOOL_AFTER = 0.01


class Committer(Protocol):
    """A store's ``commit``: the change, and the owner token of the lock it releases."""

    def __call__(self, change: Change, *, unlock: str | None = None) -> Awaitable[CommitResult]: ...


# Where a refresh's commit goes: the store's own, or (for a member of a batch) the batch's group,
# which sends the commits of the batch together (engine/batch.py).
commit_group: ContextVar[Committer | None] = ContextVar("commit_group", default=None)


class CommitConflict(Exception):
    """A refresh's commit met a new version of the record every time it re-read it."""


class NotReplicated(Exception):
    """A refresh's commit applied, but fewer replicas than ``CONSENT_REDIS_WAIT_REPLICAS``
    confirmed it in time: a failover now would lose it."""


# What sends a refresh's commit to the background retry.
_DEFERRABLE: tuple[type[BaseException], ...] = (*REDIS_ERRORS, CommitConflict, NotReplicated)


class Fit(enum.Enum):
    """What a refresh's answer is to the record as it is now."""

    STORE = "store"  # same grant, nothing newer stored: commit it
    STORED = "stored"  # this very answer is stored already (a commit whose reply was lost)
    OVERTAKEN = "overtaken"  # another refresh of the same grant is stored: this one is dropped
    ENDED = "ended"  # the grant ended (revoked, authorized anew): revoke the answer at once


def fits(pending: PendingTokens, rec: ConsentRecord, ring: KeyRing) -> Fit:
    """The merge rule for a refresh whose commit conflicted: changes that did not end the grant
    (a key rotation, a reschedule, a failure count) leave its answer to be stored."""
    if rec.state is not State.PROVISIONED or rec.tokens is None or rec.since != pending.since:
        return Fit.ENDED
    if rec.last_refresh_at == pending.at:
        return Fit.STORED
    if rec.last_refresh_at is not None and rec.last_refresh_at > pending.at:
        return Fit.OVERTAKEN
    try:
        stored = open_tokens(ring, rec.user, rec.tokens)
    except VaultError:
        return Fit.STORE  # sealed under a key this process lacks: the refresh time decided
    if token_digest(stored.get("refresh_token", "")) != pending.base:
        return Fit.OVERTAKEN  # another refresh of this grant committed first
    return Fit.STORE


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
        self,
        engine: Engine,
        scheduler: Scheduler,
        *,
        retry: RetryPolicy | None = None,
        spool: TokenSpool | None = None,
    ) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.retry = retry or RetryPolicy()
        settings = engine.settings
        # A folder per provider: a spool file holds one connection's answer, and replaying it
        # needs that provider's engine.
        self.spool = spool or TokenSpool(
            settings.data_dir / "spool" / settings.redis_prefix / engine.provider
        )
        self.retry_limit = settings.commit_retry_limit
        # Deferred commits of this process by user, and when refreshes may start again after
        # Redis came back (``hold``).
        self._pending: dict[str, asyncio.Task[Outcome]] = {}
        self._hold_until = 0.0
        self._spooled: set[str] = set()  # event ids of the answers in the spool
        self.metrics = MetricsRecorder(engine.store.redis, engine.store.keys, clock=engine.clock)
        # Told of a provider's 429 or Retry-After: slows every worker's calls to it (the fleet's
        # limiter), not just this grant's.
        self.throttle: Callable[[float | None], Awaitable[None]] | None = None
        self.fingerprint = hashlib.sha256(
            f"{settings.client_id}\x00{settings.client_secret.reveal()}".encode()
        ).hexdigest()[:16]

    @property
    def store(self):  # type: ignore[no-untyped-def]
        return self.engine.store

    def hold(self, seconds: float) -> None:
        """Start no refresh for ``seconds``: Redis just came back, and a worker that holds
        tokens from before the outage commits them first."""
        self._hold_until = max(self._hold_until, time.monotonic() + seconds)

    def held_for(self) -> float:
        """Seconds until refreshes may start again (0 when they may now); see ``hold``."""
        return max(0.0, self._hold_until - time.monotonic())

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

    async def may_probe(self) -> bool:
        """Whether this process may try the provider while refreshes are paused: one try per
        ``halt_probe`` seconds across every worker (a refresh or a client check)."""
        key = self.store.keys.halt + ":probe"
        return bool(
            await self.store.redis.set(key, "1", nx=True, px=int(self.retry.halt_probe * 1000))
        )

    async def paused(self) -> bool:
        return bool(await self.store.redis.exists(self.store.keys.halt))

    async def lift_pause(self, why: str) -> bool:
        """End the pause for everyone; whether there was one."""
        lifted = bool(await self.store.redis.delete(self.store.keys.halt))
        if lifted:
            log.warning("refresh_pause_lifted", why=why)
        return lifted

    async def pause(self, exc: ClientRejected) -> None:
        """Pause refreshes for everyone: the provider refused this deployment's client."""
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
        envelope = envelope or Envelope(
            Event.TOKEN_REFRESHED, user, "worker", reply=False, provider=self.engine.provider
        )
        deferred = self._pending.get(user)
        if deferred is not None:
            # This process holds the user's newest tokens, waiting for Redis: presenting the
            # refresh token they replaced would end the grant at a rotating provider.
            return await asyncio.shield(deferred)
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
            if halt is not None and not await self.may_probe():
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
        marked: bool = False,
    ) -> Outcome:
        """The refresh itself, under the lock; ``rec`` was read under it (and marked in flight
        by the read, when ``marked``)."""
        user = rec.user
        now = self.engine.clock()
        if not self.engine.machine.allowed(rec.state, Event.TOKEN_REFRESHED) or rec.tokens is None:
            # The table has no refresh from this state: nothing to refresh, nothing to schedule.
            await self.store.redis.zrem(self.store.keys.of(user).sched, user)
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
        if marked:
            # The batch's claim marked it: the replicas must hold the mark, and the lock and
            # record read with it, before the request leaves (as ``mark_inflight`` waits).
            confirmed = await self.store.confirm_replicated(user)
        else:
            confirmed = await self.store.mark_inflight(user, now)
        if not confirmed:
            # The replicas did not confirm what this refresh read and marked: it may have been
            # read from a primary a failover is replacing. The token is not spent yet.
            raise RedisConnectionError("the replicas did not confirm the refresh's start")
        call = asyncio.ensure_future(
            self.engine.oauth.refresh(tokens["refresh_token"], scopes=rec.scopes)
        )
        try:
            fresh = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The job timed out or the worker is stopping while the request is at the provider:
            # its answer may be the grant's only copy, so it is awaited and stored regardless.
            unlock, lock.token = lock.token, None
            self._track(rec.user, self._finish_later(call, rec, tokens, envelope, now, unlock))
            raise
        except GrantRejected as exc:
            # An earlier attempt's mark still there: it sent a refresh and never heard back. With
            # rotating refresh tokens the provider took that as the last use of this token.
            await self.metrics.refresh("rejected", user=rec.user)
            return await self._reject(
                rec,
                envelope,
                lost_response=rec.inflight is not None,
                description=exc.description,
            )
        except ClientRejected as exc:
            await self.metrics.refresh("client_rejected", user=rec.user)
            await self.pause(exc)
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
            await self.metrics.refresh("transient_failure", user=rec.user)
            retry_after = exc.retry_after if isinstance(exc, ProviderUnavailable) else None
            throttled = isinstance(exc, ProviderUnavailable) and (
                exc.status == 429 or retry_after is not None
            )
            if throttled and self.throttle is not None:
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.throttle(retry_after)
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
        pending = self._answer(rec, tokens, fresh, envelope, now)
        # A commit that has not applied after SPOOL_AFTER is slow (Redis failing over, paused,
        # the loop overloaded): its answer goes to the spool then, and a worker killed while it
        # waits loses nothing. Commits that apply in time never touch the disk.
        timer = asyncio.get_running_loop().call_later(SPOOL_AFTER, self._spool, pending)
        if probing:
            # The provider took the credentials. A lift lost to Redis being away only costs one
            # more probe.
            with contextlib.suppress(*REDIS_ERRORS):
                await self.store.redis.delete(self.store.keys.halt)
                log.warning("refresh_pause_lifted", why="a refresh succeeded")
        lead = None if rec.expires_at is None else rec.expires_at - now
        try:
            outcome = await self._store(rec, pending, envelope, unlock=lock.token, lead=lead)
            if outcome.result == "applied":
                lock.token = None  # released by the commit
            return outcome
        except _DEFERRABLE as exc:
            timer.cancel()
            # The provider answered and Redis is away: the commit is retried in the background,
            # the lock going with it, and this job waits for it as long as arq lets it.
            unlock, lock.token = lock.token, None
            return await asyncio.shield(
                self._defer(pending, envelope, unlock=unlock, lead=lead, error=exc)
            )
        except asyncio.CancelledError:
            # The job timed out or the worker is stopping in the middle of the commit: the
            # commit goes on in the background (finding it applied, if it did).
            unlock, lock.token = lock.token, None
            self._defer(pending, envelope, unlock=unlock, lead=lead, error=None)
            raise
        finally:
            timer.cancel()

    # --- storing a refresh's answer -----------------------------------------------------------

    def _answer(
        self,
        rec: ConsentRecord,
        tokens: dict[str, str],
        fresh: TokenSet,
        envelope: Envelope,
        now: float,
    ) -> PendingTokens:
        refresh_token = fresh.refresh_token or tokens["refresh_token"]  # kept when not rotated
        refresh_expires_at = refresh_expiry_after(
            fresh,
            rec.refresh_expires_at,
            rotated=refresh_token != tokens["refresh_token"],
            now=now,
        )
        return PendingTokens(
            user=rec.user,
            event_id=envelope.event_id,
            at=now,
            since=rec.since,
            base=token_digest(tokens["refresh_token"]),
            sealed=self.engine.seal_tokens(
                rec.user, {"access_token": fresh.access_token, "refresh_token": refresh_token}
            ),
            expires_at=fresh.expires_at,
            refresh_expires_at=refresh_expires_at,
            scopes=tuple(fresh.scopes or rec.scopes),
            due_at=self.engine.refresh_due(
                fresh.expires_at,
                now,
                scheduling_lapse(refresh_expires_at, rec.refresh_expires_at),
            ),
        )

    async def _finish_later(
        self,
        call: asyncio.Future[TokenSet],
        rec: ConsentRecord,
        tokens: dict[str, str],
        envelope: Envelope,
        now: float,
        unlock: str | None,
    ) -> Outcome:
        """The rest of a refresh whose job was cancelled with its request at the provider."""
        try:
            fresh = await call
        except ProviderError as exc:
            # No answer to keep; the record's in-flight mark tells the next attempt what happened.
            log.warning("refresh_cancelled_unanswered", user=rec.user, error=exc.code)
            if unlock is not None:
                with contextlib.suppress(*REDIS_ERRORS):
                    await self.store.release_lock(rec.user, unlock)
            return self.engine.outcome(rec, envelope, "failed", error=exc.code)
        pending = self._answer(rec, tokens, fresh, envelope, now)
        self._spool(pending)
        lead = None if rec.expires_at is None else rec.expires_at - now
        try:
            return await self._store(rec, pending, envelope, unlock=unlock, lead=lead)
        except _DEFERRABLE as exc:
            log.warning("refresh_commit_deferred", user=rec.user, error=type(exc).__name__)
            with contextlib.suppress(OSError):
                self.spool.make_durable(pending)
            return await self._retry_commit(
                pending,
                envelope,
                unlock=unlock,
                lead=lead,
                unconfirmed=isinstance(exc, NotReplicated),
            )

    def _track(self, user: str, work: Coroutine[Any, Any, Outcome]) -> asyncio.Task[Outcome]:
        """Run ``work`` in the background as this process's pending work for ``user``: later
        refreshes of the user here wait for it, and a stopping worker gives it a moment."""
        task = asyncio.get_running_loop().create_task(work, name=f"consent-flow-commit-{user}")
        self._pending[user] = task
        task.add_done_callback(lambda _: self._forget(user, task))
        return task

    def _spool(self, pending: PendingTokens) -> bool:
        if pending.event_id in self._spooled:
            return True
        try:
            self.spool.write(pending)
        except OSError as exc:
            # Not fatal: the commit goes on; only a worker killed before it would lose them.
            log.error("spool_write_failed", user=pending.user, error=type(exc).__name__)
            return False
        self._spooled.add(pending.event_id)
        return True

    def _unspool(self, pending: PendingTokens) -> None:
        if pending.event_id in self._spooled:
            self._spooled.discard(pending.event_id)
            self.spool.remove(pending)

    async def _store(
        self,
        rec: ConsentRecord,
        pending: PendingTokens,
        envelope: Envelope,
        *,
        unlock: str | None,
        lead: float | None,
    ) -> Outcome:
        """Commit ``pending`` on top of ``rec``. A conflict with a change that did not end the
        grant (a key rotation, a reschedule) re-reads the record and commits again: the refresh
        token it replaced is spent at a rotating provider. Raises Redis's errors."""
        user = pending.user
        for _ in range(MAX_MERGE_ATTEMPTS):
            fit = fits(pending, rec, self.engine.ring)
            if fit is not Fit.STORE:
                return await self._settle(rec, pending, envelope, fit)
            commit = commit_group.get() or self.store.commit
            row = self.engine.machine.decide(rec.state, Event.TOKEN_REFRESHED, user=user)
            change = Change(
                user=user,
                event=Event.TOKEN_REFRESHED,
                event_id=pending.event_id,
                expect_state=rec.state,
                expect_version=rec.version,
                to_state=row.dest or rec.state,
                actor=envelope.actor,
                at=pending.at,
                reason=None,
                correlation_id=envelope.correlation_id,
                fields={
                    "tokens": pending.sealed,
                    "expires_at": pending.expires_at,
                    "refresh_expires_at": pending.refresh_expires_at,
                    "scopes": pending.scopes,
                    "next_refresh_at": pending.due_at,
                    "last_refresh_at": pending.at,
                    "refresh_failures": 0,
                },
                clear=("last_refresh_error", "failing_since", "last_failure_at", "inflight"),
                schedule_at=pending.due_at,
                # Riding in the same commit: the next refresh's job (and a notice's, below), the
                # counters, the release of the lock and the caller's answer. One round trip.
                jobs=(RefreshJob(pending.due_at),),
                drop_refresh_at=self._replaced(rec, pending.due_at),
                refresh_count=RefreshCount("success", lead),
            )
            # The success that ends a long run of failures: the run's length and start go out.
            self.engine.add_notice(
                change,
                refresh_notice_kind(
                    rec.refresh_failures, 0, self.engine.settings.webhook_failing_after
                ),
                failures=rec.refresh_failures,
                failing_since=rec.failing_since,
            )
            outcome = self.engine.outcome(
                rec.after(change, rec.version + 1), envelope, "applied", detail={"lead": lead}
            )
            if envelope.reply:
                change.reply = (envelope.event_id, outcome.reply_json(envelope))
            result = await commit(change, unlock=unlock)
            if result.ok and not result.replicated:
                # The provider spent the refresh token this answer replaces: the spool file
                # stays until the commit is known to have outlived any failover.
                raise NotReplicated(user)
            if result.ok:
                self._unspool(pending)
                log.debug(  # the transition line already says it at INFO
                    "token_refreshed",
                    user=user,
                    lead_s=None if lead is None else round(lead, 1),
                    next_in_s=round(pending.due_at - pending.at, 1),
                )
                return outcome.sent() if envelope.reply else outcome
            if result.status == "duplicate":
                # This very commit applied before (its answer was lost on the way back).
                self._unspool(pending)
                return await self.engine.reread_after(envelope, "duplicate")
            rec = await self.store.load(user)
            log.info("refresh_commit_merged", user=user, version=rec.version)
        # Still conflicting after several re-reads: the commit goes on in the background.
        raise CommitConflict(pending.user)

    async def _settle(
        self, rec: ConsentRecord, pending: PendingTokens, envelope: Envelope, fit: Fit
    ) -> Outcome:
        """``pending`` is not to be stored: the grant ended meanwhile (its tokens are revoked at
        once), or it holds a later refresh of the same grant (kept; ours is dropped unrevoked,
        since revoking it could end the grant the record holds)."""
        if fit is Fit.STORED and not await self.store.confirm_replicated(pending.user):
            # Read from a primary whose replicas may not have it yet (the commit that stored
            # it went unconfirmed, or its reply was lost): the spool keeps the answer until
            # they do.
            raise NotReplicated(pending.user)
        self._unspool(pending)
        if fit is Fit.ENDED:
            tokens = open_tokens(self.engine.ring, pending.user, pending.sealed)
            obtained = TokenSet(
                access_token=tokens.get("access_token", ""),
                refresh_token=tokens.get("refresh_token"),
                id_token=None,
                token_type="Bearer",
                expires_at=pending.expires_at,
                scopes=pending.scopes,
            )
            await self.engine.revoke_obtained(pending.user, obtained, why="the grant ended")
        elif fit is Fit.STORED:
            log.info("refresh_already_stored", user=pending.user)
        else:
            log.warning("refresh_superseded", user=pending.user)
        return self.engine.outcome(rec, envelope, "rejected" if fit is Fit.ENDED else "unchanged")

    def _defer(
        self,
        pending: PendingTokens,
        envelope: Envelope,
        *,
        unlock: str | None,
        lead: float | None,
        error: BaseException | None,
    ) -> asyncio.Task[Outcome]:
        """Hand ``pending`` to a background task that commits it when Redis answers again."""
        try:
            if self._spool(pending):
                self.spool.make_durable(pending)
        except OSError as exc:
            log.error("spool_sync_failed", user=pending.user, error=type(exc).__name__)
        log.warning(
            "refresh_commit_deferred",
            user=pending.user,
            error=type(error).__name__ if error is not None else "cancelled",
            retry_limit_s=self.retry_limit,
        )
        return self._track(
            pending.user,
            self._retry_commit(
                pending,
                envelope,
                unlock=unlock,
                lead=lead,
                unconfirmed=isinstance(error, NotReplicated),
            ),
        )

    def _forget(self, user: str, task: asyncio.Task[Outcome]) -> None:
        if self._pending.get(user) is task:
            del self._pending[user]
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, ProviderError):
                # Not one of the ends the commit logs itself: nobody awaits this task, and the
                # answer now waits in the spool for a worker's start.
                log.error(
                    "refresh_commit_failed",
                    user=user,
                    error=type(exc).__name__,
                    lost="nothing yet: the spool file is committed when a worker starts on "
                    "this machine",
                )

    async def _retry_commit(
        self,
        pending: PendingTokens,
        envelope: Envelope,
        *,
        unlock: str | None,
        lead: float | None,
        unconfirmed: bool = False,
    ) -> Outcome:
        """Commit ``pending`` once Redis answers again, with the user's lock (still held, or
        taken again) and the record re-read; for up to ``commit_retry_limit`` seconds.
        ``unconfirmed``: it applied without its replicas' confirmation; it is read back only
        from a primary whose replicas are in step."""
        deadline = pending.at + self.retry_limit
        delay = COMMIT_RETRY_BASE
        while True:
            if unconfirmed:
                await asyncio.sleep(REPLICATION_RECHECK)
            try:
                if unconfirmed and not await self.store.confirm_replicated(pending.user):
                    raise NotReplicated(pending.user)
                token = await self._lock_again(pending.user, unlock)
                if token is not None:
                    try:
                        rec = await self.store.load(pending.user)
                        outcome = await self._store(rec, pending, envelope, unlock=token, lead=lead)
                    finally:
                        # Released by the commit when it applied; otherwise here.
                        with contextlib.suppress(*REDIS_ERRORS):
                            await self.store.release_lock(pending.user, token)
                    log.info("refresh_commit_recovered", user=pending.user)
                    with contextlib.suppress(*REDIS_ERRORS):
                        await self.metrics.worker_event("commits_deferred")
                    return outcome
            except NotReplicated:
                unconfirmed = True
            except _DEFERRABLE:
                pass
            if self.engine.clock() > deadline:
                log.error(
                    "refresh_commit_abandoned",
                    user=pending.user,
                    retry_limit_s=self.retry_limit,
                    spool=str(self.spool.path(pending)),
                    lost="nothing yet: the spool file is committed when a worker starts on "
                    "this machine; if it is never replayed, the grant ends at its next refresh",
                )
                raise ProviderUnavailable(
                    "the refreshed tokens could not be stored: Redis is unreachable",
                    user=pending.user,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, COMMIT_RETRY_CAP)

    async def _lock_again(self, user: str, held: str | None) -> str | None:
        """The user's lock for a deferred commit: the one still held, or taken anew; None while
        another holder has it."""
        token: str | None = await self.store.acquire_lock(user, self.engine.lock_ttl)
        if token is None and held is not None:
            current: bytes | None = await self.store.redis.get(self.store.keys.lock(user))
            if current is not None and current.decode() == held:
                return held
        return token

    @property
    def pending_users(self) -> list[str]:
        """Users whose refreshed tokens wait for Redis in this process."""
        return sorted(self._pending)

    async def replay(self, *, min_age: float = 0.0) -> int:
        """Commit every spooled refresh of a worker that died before its commit: at start-up,
        before this worker takes any job, and from the cleanup job for entries that could not
        be settled then (``min_age`` seconds old at least). Returns how many were settled."""
        settled = 0
        for pending in self.spool.entries(min_age=min_age):
            if pending.event_id in self._spooled:
                continue  # this process's own, with its commit still under way
            try:
                open_tokens(self.engine.ring, pending.user, pending.sealed)
            except VaultError as exc:
                log.error("spool_entry_unusable", user=pending.user, error=exc.code)
                continue
            envelope = Envelope(
                Event.TOKEN_REFRESHED,
                pending.user,
                "worker",
                event_id=pending.event_id,
                reply=False,
                provider=self.engine.provider,
            )
            try:
                async with self.engine.user_lock(pending.user):
                    self._spooled.add(pending.event_id)
                    rec = await self.store.load(pending.user)
                    # Released on the way out whatever the commit did, not by the commit: a
                    # replay is rare, and the lock is then released exactly once.
                    outcome = await self._store(rec, pending, envelope, unlock=None, lead=None)
            except (ProviderUnavailable, CommitConflict, NotReplicated):
                # The user's lock stayed taken, the record kept moving, or the replicas did not
                # confirm the commit yet: the next cleanup.
                log.warning("spool_entry_postponed", user=pending.user)
                continue
            finally:
                self._spooled.discard(pending.event_id)
            log.warning("spool_replayed", user=pending.user, result=outcome.result)
            await self.metrics.worker_event("spool_replayed")
            settled += 1
        return settled

    async def abandon_pending(self, wait: float) -> list[str]:
        """At shutdown: give deferred commits ``wait`` seconds, then stop them. Returns the users
        whose tokens stayed unsaved (their spool files remain)."""
        tasks = list(self._pending.values())
        if tasks:
            await asyncio.wait(tasks, timeout=wait)
        unsaved = []
        for user, task in list(self._pending.items()):
            if not task.done():
                task.cancel()
                unsaved.append(user)
                log.error(
                    "refresh_tokens_unsaved",
                    user=user,
                    spool=str(self.spool.directory),
                    lost="the grant's current tokens, unless a worker with the same data "
                    "folder starts on this machine and commits the spool file (there if the "
                    "provider had answered); otherwise the next refresh presents the spent "
                    "token and the grant ends",
                )
        return unsaved

    async def _reschedule(
        self,
        rec: ConsentRecord,
        envelope: Envelope,
        at: float,
        *,
        error: str | None,
        keep_inflight: bool = False,
    ) -> None:
        since = rec.since
        for _ in range(MAX_MERGE_ATTEMPTS):
            fields: RecordFields = {"next_refresh_at": at}
            failures = rec.refresh_failures
            failing_since = rec.failing_since
            if error is not None:
                now = self.engine.clock()
                failures += 1
                # The first failure of a run: cleared by the next success.
                failing_since = failing_since if failing_since is not None else now
                fields.update(
                    {
                        "last_refresh_error": clip(error),
                        "refresh_failures": failures,
                        "last_failure_at": now,
                        "failing_since": failing_since,
                    }
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
                fields=fields,
                clear=() if keep_inflight else ("inflight",),
                schedule_at=at,
                record_history=False,
                jobs=(RefreshJob(at),),
                drop_refresh_at=self._replaced(rec, at),
            )
            # Once per run of failures: at the one that reaches the threshold.
            self.engine.add_notice(
                change,
                refresh_notice_kind(
                    rec.refresh_failures, failures, self.engine.settings.webhook_failing_after
                ),
                reason=clip(error),
                failures=failures,
                failing_since=failing_since,
            )
            result = await self.store.commit(change)
            if result.status != "conflict":
                return
            # A key rotation rewrote the record meanwhile: the grant still needs its schedule.
            rec = await self.store.load(rec.user)
            if rec.state is not State.PROVISIONED or rec.since != since:
                return

    def _replaced(self, rec: ConsentRecord, due: float) -> float | None:
        """The due time of the schedule a refresh due at ``due`` replaces, for the commit to
        remove its job, unless it is the same job. Removing it is harmless when it is the one
        running (arq's own clean-up finds nothing left) and spares the queue a stale job when it
        is a later one (an on-demand refresh came first)."""
        old = rec.next_refresh_at
        return None if old is None or due_ms(old) == due_ms(due) else old

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
            provider=envelope.provider,
        )
        row = self.engine.machine.decide(rec.state, Event.REFRESH_REJECTED, user=rec.user)
        change = self.engine.change(
            rejected,
            rec,
            row,
            reason=reason,
            # An upgrade session open beside the dead grant ends with it.
            clear=(*TOKEN_FIELDS, *SESSION_FIELDS),
            drop_session_lookup=rec.session_digest,
            drop_upgrade=rec.upgrading,
            unschedule=True,
            drop_refresh_at=rec.next_refresh_at,
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
