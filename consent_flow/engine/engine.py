"""The engine: applies one queued event to one user, with the provider calls it needs.

Each handler reads the record, asks the machine which row the event takes, does its I/O (provider
calls, sealing tokens), then commits the change with the version it read. A step that loses the
race (the record moved meanwhile) commits nothing; tokens it obtained are revoked at the provider
at once and never stored (one writer wins; tokens of a losing step do not live on).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, TypeVar

import structlog
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from consent_flow.core.records import (
    Change,
    CommitResult,
    ConsentRecord,
    ProviderRevocation,
    RecordFields,
    check_scopes,
    clip,
    guard_facts,
    iso,
    join_scopes,
    revocation_note,
)
from consent_flow.core.table import ConsentMachine, Effect, Event, Facts, State, Transition
from consent_flow.engine.webhooks import Notice, NoticeKind, commit_notice, notice_kind
from consent_flow.errors import (
    ClientRejected,
    ConsentError,
    GrantRejected,
    IDTokenError,
    InvalidScope,
    InvalidTransition,
    ProviderError,
    ProviderUnavailable,
    VaultError,
)
from consent_flow.oidc import (
    OAuthClient,
    TokenSet,
    code_challenge_s256,
    new_code_verifier,
    new_nonce,
    new_state,
)
from consent_flow.queue.bus import Envelope, Outcome, new_id
from consent_flow.queue.commit_jobs import CommitJobs
from consent_flow.queue.jobs import JobQueue
from consent_flow.queue.scheduler import Scheduler
from consent_flow.settings import Settings
from consent_flow.store.redis_store import INBOX_TTL, RedisStore, session_state, state_hash
from consent_flow.store.vault import KeyRing, open_tokens, seal_tokens

_T = TypeVar("_T")

__all__ = [
    "Engine",
    "next_refresh_at",
    "refresh_expiry_after",
    "scheduling_lapse",
    "session_url",
]

log = structlog.get_logger("consent_flow.engine")

# A user's lock outlives any provider call made under it (several calls at the HTTP timeout);
# an event waits a little longer than that for another worker's call on the same user.
LOCK_TTL_FACTOR = 3
LOCK_WAIT_EXTRA = 5.0
MAX_CONFLICT_RETRIES = 5
# Seconds between two looks at a commit of new tokens that the replicas did not confirm.
REPLICATION_RECHECK = 1.0
MIN_REFRESH_DELAY = 1.0  # never schedule a refresh sooner than this after the last one
REFRESH_JITTER = 0.1  # up to this share of the lead time is taken off, so refreshes spread out
MAX_REFRESH_JITTER = 300.0
# A refresh token's lapse that a refresh moved by less than this did not move (the provider counts
# in whole seconds from its own clock): it is a fixed end that refreshing earlier cannot push back.
LAPSE_MOVE_SLACK = 2.0
# What an import hears back for a user it leaves alone, in the outcome's ``skipped`` detail.
IMPORT_SKIPPED_PROVISIONED = "already_provisioned"
IMPORT_SKIPPED_PENDING = "pending"
OUTBOX_RETRY_BASE = 30.0  # seconds before a provider revocation that failed is tried again
OUTBOX_RETRY_CAP = 3600.0
# Tries of one provider revocation before the outbox gives up on it (about a day of backoff).
OUTBOX_MAX_ATTEMPTS = 30

# The record attributes of an authorization session, and of a grant. A grant's import time is
# not one of them: no revocation clears it, so an import run leaves a grant that ended alone.
SESSION_FIELDS = (
    "session",
    "session_id",
    "session_expires_at",
    "session_digest",
    "session_claim",
    "requested_scopes",
)
TOKEN_FIELDS = (
    "tokens",
    "expires_at",
    "refresh_expires_at",
    "subject",
    "scopes",
    "scopes_missing",
    "next_refresh_at",
    "last_refresh_at",
    "refresh_failures",
    "last_refresh_error",
    "failing_since",
    "last_failure_at",
    "inflight",
)


def session_url(ring: KeyRing, rec: ConsentRecord) -> str | None:
    """The authorization URL of the user's open session (pending, or an upgrade), or None."""
    if rec.state not in (State.PENDING, State.PROVISIONED) or rec.session is None:
        return None
    try:
        data = json.loads(ring.decrypt(rec.session, user=rec.user, purpose="session"))
    except VaultError:
        return None
    url: str = data["url"]
    return url


def next_refresh_at(
    expires_at: float | None,
    now: float,
    *,
    margin: float,
    keepalive: float,
    jitter: float = 0.0,
    refresh_expires_at: float | None = None,
) -> float:
    """When to refresh next: ``margin`` before expiry, less a jitter, at least every keepalive.

    The expiry is the sooner of the access token's (``expires_at``) and the refresh token's own
    lapse (``refresh_expires_at``): a refresh token that lapses first would end the grant before
    the access token's refresh came due. A refresh-token lapse already past is ignored: the
    provider accepted that token after it, so the figure is stale, and a refresh now would loop.
    A token with no expiry (the provider sent no ``expires_in``) is treated as long-lived and
    refreshed at the keep-alive interval. A token that lives shorter than twice the margin is
    refreshed half-way through its life, so short-lived tokens are not refreshed in a loop.
    ``jitter`` in [0, 1) takes up to ``REFRESH_JITTER`` of the lead time off.
    """
    latest = now + keepalive
    if refresh_expires_at is not None and refresh_expires_at > now:
        expires_at = (
            refresh_expires_at if expires_at is None else min(expires_at, refresh_expires_at)
        )
    if expires_at is None:
        return latest
    lifetime = max(0.0, expires_at - now)
    lead = min(margin, lifetime / 2)
    spread = min(lead * REFRESH_JITTER, MAX_REFRESH_JITTER) * jitter
    due = expires_at - lead - spread
    return max(now + min(MIN_REFRESH_DELAY, lifetime / 2), min(due, latest))


def refresh_expiry_after(
    fresh: TokenSet, previous: float | None, *, rotated: bool, now: float
) -> float | None:
    """The refresh token's lapse to keep after a refresh answered ``fresh``.

    What the provider said wins (``0``: no lapse). When it said nothing, the previous lapse still
    holds only for the same refresh token, and only while it is ahead: a rotated token's
    lifetime is unknown.
    """
    if fresh.refresh_expiry_stated:
        return fresh.refresh_expires_at
    if rotated or previous is None or previous <= now:
        return None
    return previous


def scheduling_lapse(new: float | None, previous: float | None) -> float | None:
    """The refresh token's lapse a refresh should be scheduled by, or None.

    Only a lapse that refreshing pushes back: one that a refresh left where it was (a grant with
    a fixed end, such as Keycloak's maximum session length) cannot be helped by refreshing before
    it, and scheduling by it would refresh ever more often as it nears. Such a grant ends when
    the provider says; its access token is refreshed on its own schedule meanwhile.
    """
    if new is None or previous is None or new > previous + LAPSE_MOVE_SLACK:
        return new
    return None


class Engine:
    """Applies events to one provider's connections. One per provider in each worker process,
    built in ``on_startup`` on that provider's settings, store and ring."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: RedisStore,
        oauth: OAuthClient,
        ring: KeyRing,
        machine: ConsentMachine | None = None,
        clock: Callable[[], float] = time.time,
        on_scheduled: Callable[[str, float], Any] | None = None,
        jobs: JobQueue | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.oauth = oauth
        self.ring = ring
        self.machine = machine or ConsentMachine()
        # Redis's time in a worker (a RedisClock): other processes compare what the engine
        # stamps (session expiry, due times, history), so it must not be this process's clock.
        self.clock = clock
        self.on_scheduled = on_scheduled
        if store.commit_jobs is None:
            # The jobs this engine's commits carry go to the deployment's queue.
            scheduler = Scheduler(
                store.redis, keys=store.keys, queue_name=settings.queue_name, clock=clock
            )
            store.commit_jobs = CommitJobs(scheduler, prefix=settings.redis_prefix)
        if jobs is None and settings.webhook_url:
            if not isinstance(store.redis, ArqRedis):
                raise ValueError("webhook notices need a store on arq's pool, or a JobQueue")
            # A worker's store runs on arq's pool: notices' jobs are serialized as arq's own.
            jobs = JobQueue(store.redis, clock=clock)
        # Serializes webhook notices' jobs; None without a webhook URL: no notice is built.
        self.jobs = jobs if settings.webhook_url else None
        self._handlers: dict[Event, Callable[[Envelope], Any]] = {
            Event.PROVISION_REQUESTED: self._provision_requested,
            Event.AUTHORIZATION_COMPLETED: self._authorization_completed,
            Event.AUTHORIZATION_FAILED: self._authorization_failed,
            Event.SESSION_EXPIRED: self._session_expired,
            Event.REVOKE_REQUESTED: self._revoke_requested,
            Event.GRANT_IMPORTED: self._grant_imported,
        }

    @property
    def provider(self) -> str:
        """The provider whose connections this engine applies events to (one engine each)."""
        provider: str = self.store.keys.provider
        return provider

    # --- entry point ------------------------------------------------------------------------

    async def handle(self, envelope: Envelope) -> Outcome:
        handler = self._handlers.get(envelope.event)
        if handler is None:
            raise InvalidTransition(
                f"{envelope.event.value} is not emitted from outside",
                user=envelope.user,
                event=envelope.event.value,
            )
        outcome: Outcome = await handler(envelope)
        return outcome

    # --- helpers ----------------------------------------------------------------------------

    def outcome(
        self,
        rec: ConsentRecord,
        envelope: Envelope,
        result: str,
        *,
        url: str | None = None,
        error: str | None = None,
        reason: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> Outcome:
        """What a caller hears: the user's status after the event, and what happened."""
        return Outcome(
            user=rec.user,
            state=rec.state.value,
            since=iso(rec.since),
            reason=reason or rec.reason,
            event=envelope.event.value,
            result=result,
            authorization_url=url,
            error=error,
            detail=detail or {},
        )

    def change(
        self,
        envelope: Envelope,
        rec: ConsentRecord,
        row: Transition,
        *,
        reason: str | None,
        **kwargs: Any,
    ) -> Change:
        change = Change(
            user=rec.user,
            event=envelope.event,
            event_id=envelope.event_id,
            expect_state=rec.state,
            expect_version=rec.version,
            to_state=row.dest or rec.state,
            actor=envelope.actor,
            at=self.clock(),
            reason=clip(reason),
            correlation_id=envelope.correlation_id,
            **kwargs,
        )
        if self.jobs is not None:
            self.add_notice(change, notice_kind(change.event, change.expect_state, change.to_state))
        return change

    def add_notice(
        self,
        change: Change,
        kind: NoticeKind | None,
        *,
        reason: str | None = None,
        failures: int | None = None,
        failing_since: float | None = None,
    ) -> None:
        """Add to ``change`` the job delivering the webhook notice of ``kind`` about it, queued
        by the commit only if it applies. The notice's id derives from the change's event id: a
        redelivered event makes the same notice, which arq refuses to queue twice. Nothing
        without a webhook URL or a ``kind``; ``reason`` defaults to the change's."""
        if kind is None or self.jobs is None:
            return
        notice = Notice.of(
            kind,
            change.user,
            at=change.at,
            cause=change.event_id,
            provider=self.provider,
            from_state=change.expect_state,
            to_state=change.to_state,
            reason=change.reason if reason is None else reason,
            failures=failures,
            failing_since=failing_since,
        )
        change.jobs = (*change.jobs, commit_notice(notice))

    def seal_tokens(self, user: str, tokens: dict[str, str | None]) -> bytes:
        return seal_tokens(self.ring, user, tokens)

    def open_tokens(self, user: str, sealed: bytes) -> dict[str, str]:
        return open_tokens(self.ring, user, sealed)

    def _decide(self, rec: ConsentRecord, event: Event, facts: Facts | None = None) -> Transition:
        """The table's row for ``event`` on ``rec``: every decision the engine makes is one."""
        return self.machine.decide(rec.state, event, facts, user=rec.user)

    def _decide_or_none(
        self, rec: ConsentRecord, event: Event, facts: Facts | None = None
    ) -> Transition | None:
        """The table's row, or None where it has none (a stale or duplicate event)."""
        try:
            return self._decide(rec, event, facts)
        except InvalidTransition:
            return None

    async def reread_after(self, envelope: Envelope, status: str) -> Outcome:
        rec = await self.store.load(envelope.user)
        result = "unchanged" if status == "duplicate" else "rejected"
        error = None if status == "duplicate" else "conflict"
        return self.outcome(rec, envelope, result, error=error, url=self._live_url(rec))

    def _live_url(self, rec: ConsentRecord) -> str | None:
        return session_url(self.ring, rec)

    def refresh_due(
        self, expires_at: float | None, now: float, refresh_expires_at: float | None = None
    ) -> float:
        return next_refresh_at(
            expires_at,
            now,
            margin=self.settings.refresh_margin,
            keepalive=self.settings.keepalive,
            jitter=random.random(),
            refresh_expires_at=refresh_expires_at,
        )

    # --- provision_requested ----------------------------------------------------------------

    async def _provision_requested(self, envelope: Envelope) -> Outcome:
        try:
            asked = check_scopes(envelope.payload.get("scopes", "").split())
        except InvalidScope as exc:
            rec = await self.store.load(envelope.user)
            return self.outcome(rec, envelope, "rejected", error=exc.code, reason=str(exc))
        for _ in range(MAX_CONFLICT_RETRIES):
            rec = await self.store.load(envelope.user)
            now = self.clock()
            facts = guard_facts(rec, now=now, asked=asked)
            row = self._decide(rec, envelope.event, facts)
            if row.effect is Effect.SESSION_URL:
                url = self._live_url(rec)
                if url is not None:
                    return self.outcome(
                        rec, envelope, "unchanged", url=url, detail=self._session_detail(rec)
                    )
                # Sealed under a key this process lacks: the session cannot be shown again, so
                # the table is asked as for a session that does not hold the scopes.
                row = self._decide(rec, envelope.event, replace(facts, asked_in_session=False))
            if row.effect is Effect.NOTHING:
                return self.outcome(
                    rec,
                    envelope,
                    "unchanged",
                    detail={"already": True, "scopes": list(rec.scopes)},
                )
            change, outcome = await self._open_session(envelope, rec, row, asked, now)
            result = await self.store.commit(change)
            if result.ok:
                return outcome.sent() if envelope.reply else outcome
            if result.status == "duplicate":
                return await self.reread_after(envelope, "duplicate")
        return await self.reread_after(envelope, "conflict")

    async def _open_session(
        self,
        envelope: Envelope,
        rec: ConsentRecord,
        row: Transition,
        asked: tuple[str, ...],
        now: float,
    ) -> tuple[Change, Outcome]:
        """The change opening a session for the effect of ``row`` (``OPEN_SESSION`` or
        ``OPEN_UPGRADE``), and the caller's answer riding in it. A session asks for the
        provider's base scopes, what an open session (or the grant, for an upgrade) holds, and
        what is asked now."""
        upgrade = row.effect is Effect.OPEN_UPGRADE
        if row.effect not in (Effect.OPEN_SESSION, Effect.OPEN_UPGRADE):
            raise AssertionError(f"no session for {row.effect}")
        granted = rec.scopes if upgrade else ()
        scopes = join_scopes(self.settings.scopes, granted, rec.requested_scopes, asked)
        # The state names the user's shard: the callback finds the session from it alone.
        state = session_state(self.store.keys.shard_of(rec.user), new_state())
        verifier, nonce = new_code_verifier(), new_nonce()
        url = await self.oauth.authorization_url(
            state=state, nonce=nonce, code_challenge=code_challenge_s256(verifier), scopes=scopes
        )
        expires = now + self.settings.session_ttl
        sealed = self.ring.encrypt(
            json.dumps({"state": state, "verifier": verifier, "nonce": nonce, "url": url}).encode(),
            user=rec.user,
            purpose="session",
        )
        session: RecordFields = {
            "session": sealed,
            "session_id": new_id(),
            "session_expires_at": expires,
            "session_digest": state_hash(state),
            "requested_scopes": scopes,
        }
        common: dict[str, Any] = {
            "session_lookup": (state_hash(state), self.settings.session_ttl),
            "drop_session_lookup": rec.session_digest,
        }
        if upgrade:
            # The grant stays as it is, tokens and schedule alike, until the upgrade completes.
            change = self.change(
                envelope,
                rec,
                row,
                reason=None,
                fields=session,
                clear=("session_claim",),
                upgrade_until=expires,
                **common,
            )
        else:
            renewed = rec.state is State.PENDING
            change = self.change(
                envelope,
                rec,
                row,
                reason="authorization session renewed" if renewed else None,
                fields=session,
                clear=("session_claim", "reason", "provider_revocation", *TOKEN_FIELDS),
                unschedule=True,
                drop_refresh_at=rec.next_refresh_at,
                **common,
            )
        # The caller's answer rides in the commit itself: one round trip less per event.
        after = rec.after(change, rec.version + 1)
        outcome = self.outcome(
            after, envelope, "applied", url=url, detail=self._session_detail(after)
        )
        if envelope.reply:
            change.reply = (envelope.event_id, outcome.reply_json(envelope))
        return change, outcome

    @staticmethod
    def _session_detail(rec: ConsentRecord) -> dict[str, Any]:
        """What a caller hears about an open session: the scopes it asks for, the scopes
        granted, and whether it is an upgrade beside the grant."""
        detail: dict[str, Any] = {
            "requested_scopes": list(rec.requested_scopes),
            "scopes": list(rec.scopes) if rec.state is State.PROVISIONED else [],
        }
        if rec.upgrading:
            detail["upgrade"] = True
        return detail

    # --- authorization_completed ------------------------------------------------------------

    async def _authorization_completed(self, envelope: Envelope) -> Outcome:
        if (await self.store.load(envelope.user)).upgrading:
            # Under the user's lock: an upgrade replaces the tokens a refresh may be rewriting
            # (single flight). A first authorization has no tokens to race with, and a
            # revocation meanwhile must be able to beat it.
            async with self.user_lock(envelope.user):
                return await self._complete_authorization(envelope)
        return await self._complete_authorization(envelope)

    async def _complete_authorization(self, envelope: Envelope) -> Outcome:
        rec = await self.store.load(envelope.user)
        facts = guard_facts(
            rec, now=self.clock(), session_id=envelope.payload.get("session_id", "")
        )
        row = self._decide_or_none(rec, envelope.event, facts)
        if row is None or rec.session is None:
            # A duplicate of an event already applied, or a session that ended meanwhile.
            status = "duplicate" if await self._seen(envelope) else "conflict"
            return await self.reread_after(envelope, status)
        sealed_code = await self.store.take_inbox(rec.user, envelope.event_id)
        if sealed_code is None:
            # The code was taken by an earlier delivery of this event that did not finish: it
            # cannot be exchanged twice (providers revoke everything issued from a replayed code).
            return await self._fail_authorization(
                envelope,
                rec,
                "authorization was interrupted; request access again",
                error="interrupted",
            )
        session = json.loads(self.ring.decrypt(rec.session, user=rec.user, purpose="session"))
        code = self.ring.decrypt(
            sealed_code, user=rec.user, purpose=f"code:{envelope.event_id}"
        ).decode()
        # An upgrade must come from the subject who holds the grant, whatever subject match says.
        expected = rec.user if self.settings.subject_match else None
        if row.effect is Effect.REPLACE_GRANT and rec.subject:
            expected = rec.subject
        tokens: TokenSet | None = None
        try:
            tokens = await self.oauth.exchange_code(
                code, code_verifier=session["verifier"], scopes=rec.requested_scopes or None
            )
            if tokens.id_token is None:
                raise IDTokenError("the token response carries no ID token")
            claims = await self.oauth.validate_id_token(
                tokens.id_token,
                nonce=session["nonce"],
                expected_subject=expected,
                access_token=tokens.access_token,
            )
        except ProviderUnavailable as exc:
            return await self._fail_authorization(
                envelope,
                rec,
                f"provider unavailable during code exchange: {exc}",
                error=exc.code,
                obtained=tokens,
            )
        except ProviderError as exc:
            return await self._fail_authorization(
                envelope,
                rec,
                _describe(exc),
                error=exc.code,
                obtained=tokens,
            )
        if not tokens.refresh_token:
            return await self._fail_authorization(
                envelope,
                rec,
                "provider granted no offline access",
                error="no_refresh_token",
                obtained=tokens,
            )
        now = self.clock()
        due = self.refresh_due(tokens.expires_at, now, tokens.refresh_expires_at)
        missing = [s for s in rec.requested_scopes if s not in tokens.scopes]
        old = (
            self._replaced_tokens(rec, tokens)
            if row.effect is Effect.REPLACE_GRANT and self.settings.revoke_replaced_grant
            else None
        )
        fields: RecordFields = {
            "tokens": self.seal_tokens(
                rec.user,
                {"access_token": tokens.access_token, "refresh_token": tokens.refresh_token},
            ),
            "expires_at": tokens.expires_at,
            "refresh_expires_at": tokens.refresh_expires_at,
            "subject": claims.subject,
            "scopes": tokens.scopes,
            "scopes_missing": tuple(missing),
            "next_refresh_at": due,
            "last_refresh_at": now,
            "refresh_failures": 0,
        }
        if old is not None and rec.revocation_pending is None:
            # The replaced grant goes to the revocation outbox in the step that replaces it:
            # a provider that is down now does not make us forget to revoke it.
            fields["revocation_pending"] = rec.tokens
        change = self.change(
            envelope,
            rec,
            row,
            reason=None,
            fields=fields,
            clear=(
                *SESSION_FIELDS,
                "last_refresh_error",
                "reason",
                "failing_since",
                "last_failure_at",
                "inflight",
            ),
            drop_session_lookup=rec.session_digest,
            schedule_at=due,
            drop_refresh_at=rec.next_refresh_at,
            drop_upgrade=rec.upgrading,
        )
        result = await self.store.commit(change)
        if result.ok and not result.replicated:
            # The code is spent: these tokens are the grant's only copy. Shielded, so a job
            # timeout does not stop the confirmation half-way.
            result = await asyncio.shield(self._until_replicated(change))
        if not result.ok:
            # Lost the race (revoked meanwhile, say): these tokens must not live on.
            await self.revoke_obtained(rec.user, tokens, why="transition lost")
            return await self.reread_after(envelope, result.status)
        if self.on_scheduled is not None:
            await self.on_scheduled(rec.user, due)
        after = rec.after(change, result.version)
        detail: dict[str, Any] = {"scopes": list(after.scopes)}
        if old is not None:
            if "revocation_pending" in fields:
                outcome = await self.revoke_pending(rec.user)
            else:
                await self.revoke_obtained(rec.user, old, why="upgrade replaced it")
                outcome = ProviderRevocation.DONE
            detail["replaced_grant_revocation"] = outcome.value
        if missing:
            detail["scopes_missing"] = missing
        log.info(
            "consent_upgraded" if row.effect is Effect.REPLACE_GRANT else "consent_granted",
            user=rec.user,
            scopes=list(after.scopes),
            scopes_missing=missing,
        )
        return self.outcome(after, envelope, "applied", detail=detail)

    def _replaced_tokens(self, rec: ConsentRecord, new: TokenSet) -> TokenSet | None:
        """The grant an upgrade replaces, to revoke at the provider, when the new grant is a
        different one (another refresh token); None when it is the same or cannot be read."""
        if rec.tokens is None:
            return None
        try:
            held = self.open_tokens(rec.user, rec.tokens)
        except VaultError:
            return None
        if not held.get("refresh_token") or held["refresh_token"] == new.refresh_token:
            return None
        return TokenSet(
            access_token=held.get("access_token", ""),
            refresh_token=held["refresh_token"],
            id_token=None,
            token_type="Bearer",
            expires_at=None,
            scopes=rec.scopes,
        )

    async def _until_replicated(self, change: Change) -> CommitResult:
        """A commit of new tokens that its replicas did not confirm, committed again once the
        primary this process reaches has its replicas in step: a duplicate there means it
        survived; applied, it had been lost to a failover and is now stored again."""
        deadline = self.clock() + self.settings.commit_retry_limit
        while self.clock() < deadline:
            await asyncio.sleep(REPLICATION_RECHECK)
            try:
                if not await self.store.confirm_replicated(change.user):
                    continue
                again = await self.store.commit(change)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                continue
            if again.status == "duplicate":
                return CommitResult(status="ok", version=again.version, state=again.state)
            if not again.ok or again.replicated:
                return again
        log.error("commit_unconfirmed", user=change.user, event_name=change.event.value)
        return CommitResult(status="ok", version=change.expect_version + 1, replicated=False)

    async def _fail_authorization(
        self,
        envelope: Envelope,
        rec: ConsentRecord,
        reason: str,
        *,
        error: str,
        obtained: TokenSet | None = None,
    ) -> Outcome:
        if obtained is not None:
            await self.revoke_obtained(rec.user, obtained, why=error)
        failed = Envelope(
            event=Event.AUTHORIZATION_FAILED,
            user=rec.user,
            actor=envelope.actor,
            event_id=envelope.event_id,
            correlation_id=envelope.correlation_id,
            provider=envelope.provider,
        )
        facts = guard_facts(rec, now=self.clock(), session_id=rec.session_id)
        row = self._decide(rec, Event.AUTHORIZATION_FAILED, facts)
        change = self._drop_session(failed, rec, row, reason)
        result = await self.store.commit(change)
        if not result.ok:
            return await self.reread_after(envelope, result.status)
        log.info("consent_not_granted", user=rec.user, error=error, upgrade=rec.upgrading)
        rec = rec.after(change, result.version)
        return self.outcome(rec, failed, "failed", error=error)

    def _drop_session(
        self, envelope: Envelope, rec: ConsentRecord, row: Transition, reason: str
    ) -> Change:
        """The change ending the open session for ``row`` (``DROP_SESSION``: no grant;
        ``DROP_UPGRADE``: the grant stays untouched and the reason says the upgrade ended)."""
        if row.effect is Effect.DROP_UPGRADE:
            reason = f"upgrade dropped: {reason}"
        elif row.effect is not Effect.DROP_SESSION:
            raise AssertionError(f"no session to drop for {row.effect}")
        return self.change(
            envelope,
            rec,
            row,
            reason=reason,
            clear=SESSION_FIELDS,
            drop_session_lookup=rec.session_digest,
            drop_upgrade=rec.upgrading,
        )

    async def _seen(self, envelope: Envelope) -> bool:
        score = await self.store.redis.zscore(
            self.store.keys.seen(envelope.user), envelope.event_id
        )
        return score is not None

    # --- authorization_failed (error= on the callback) ---------------------------------------

    async def _authorization_failed(self, envelope: Envelope) -> Outcome:
        rec = await self.store.load(envelope.user)
        facts = guard_facts(rec, now=self.clock(), session_id=envelope.payload.get("session_id"))
        if self._decide_or_none(rec, envelope.event, facts) is None:
            status = "duplicate" if await self._seen(envelope) else "conflict"
            return await self.reread_after(envelope, status)
        error = envelope.payload.get("error", "unknown_error")
        description = envelope.payload.get("error_description")
        reason = f"{error}: {description}" if description else error
        return await self._fail_authorization(envelope, rec, reason, error=error)

    # --- session_expired (cleanup job) -------------------------------------------------------

    async def _session_expired(self, envelope: Envelope) -> Outcome:
        rec = await self.store.load(envelope.user)
        row = self._decide_or_none(rec, envelope.event, guard_facts(rec, now=self.clock()))
        if row is None:
            return await self.reread_after(envelope, "conflict")
        change = self._drop_session(envelope, rec, row, "authorization session expired")
        result = await self.store.commit(change)
        if not result.ok:
            return await self.reread_after(envelope, result.status)
        rec = rec.after(change, result.version)
        return self.outcome(rec, envelope, "applied")

    # --- grant_imported (consent-flow import) -------------------------------------------------

    async def _grant_imported(self, envelope: Envelope) -> Outcome:
        if await self._seen(envelope):
            return await self.reread_after(envelope, "duplicate")
        try:
            scopes = parse_imported_scopes(envelope.payload.get("scopes", ""))
            lapse = parse_imported_lapse(envelope.payload.get("refresh_expires_at", ""))
        except ValueError as exc:
            rec = await self.store.load(envelope.user)
            return self.outcome(rec, envelope, "failed", error="bad_import", reason=str(exc))
        # Taken once, before any decision: a redelivery finds nothing and changes nothing.
        sealed = await self.store.take_inbox(envelope.user, envelope.event_id)
        for _ in range(MAX_CONFLICT_RETRIES):
            rec = await self.store.load(envelope.user)
            row = self._decide(rec, envelope.event)
            if row.effect is Effect.SKIP_IMPORT:
                # The user holds a grant of ours, or is granting one right now: it wins over
                # the imported one, which is dropped (not revoked: it is the source's).
                skipped = (
                    IMPORT_SKIPPED_PENDING
                    if rec.state is State.PENDING
                    else IMPORT_SKIPPED_PROVISIONED
                )
                return self.outcome(rec, envelope, "unchanged", detail={"skipped": skipped})
            if sealed is None:
                return self.outcome(
                    rec,
                    envelope,
                    "failed",
                    error="interrupted",
                    reason="the imported token was not found (it waits "
                    f"{INBOX_TTL} s for a worker); run the import again",
                )
            refresh_token = self.ring.decrypt(
                sealed, user=rec.user, purpose=f"import:{envelope.event_id}"
            ).decode()
            now = self.clock()
            change = self.change(
                envelope,
                rec,
                row,
                reason=None,
                # No access token yet: stored as expired, so a caller asking for one gets it
                # refreshed, and the first refresh is due at once so a dead grant shows now.
                fields={
                    "tokens": self.seal_tokens(
                        rec.user, {"access_token": "", "refresh_token": refresh_token}
                    ),
                    "expires_at": now,
                    "refresh_expires_at": lapse,
                    "scopes": scopes,
                    "next_refresh_at": now,
                    "refresh_failures": 0,
                    "imported_at": now,
                },
                clear=(
                    *SESSION_FIELDS,
                    "subject",
                    "last_refresh_at",
                    "last_refresh_error",
                    "failing_since",
                    "last_failure_at",
                    "inflight",
                    "reason",
                    "provider_revocation",
                ),
                drop_session_lookup=rec.session_digest,
                schedule_at=now,
            )
            result = await self.store.commit(change)
            if result.status == "conflict":
                continue
            if not result.ok:
                return await self.reread_after(envelope, result.status)
            if self.on_scheduled is not None:
                await self.on_scheduled(rec.user, now)
            rec = rec.after(change, result.version)
            log.info("grant_imported", user=rec.user, scopes=list(rec.scopes))
            return self.outcome(rec, envelope, "applied", detail={"scopes": list(rec.scopes)})
        return await self.reread_after(envelope, "conflict")

    # --- revoke_requested -------------------------------------------------------------------

    async def _revoke_requested(self, envelope: Envelope) -> Outcome:
        async with self.user_lock(envelope.user):
            for _ in range(MAX_CONFLICT_RETRIES):
                rec = await self.store.load(envelope.user)
                row = self._decide(rec, envelope.event)
                if row.effect is Effect.NOTHING:
                    return self.outcome(rec, envelope, "unchanged")
                reason = envelope.payload.get("reason") or "revoked by " + envelope.actor
                # A provider without a revocation endpoint cannot take the tokens back: they are
                # wiped here and nothing goes to the outbox, where it would be retried in vain.
                unsupported = rec.tokens is not None and await self._cannot_revoke()
                # Otherwise the sealed tokens move to the revocation outbox in the same step
                # that wipes them, so no process hands them out again and a provider that is
                # down now does not make us forget to revoke them later.
                fields: RecordFields = {}
                if rec.tokens is not None:
                    pending = ProviderRevocation.UNSUPPORTED if unsupported else None
                    fields["provider_revocation"] = pending or ProviderRevocation.DEFERRED
                    if not unsupported:
                        fields["revocation_pending"] = rec.tokens
                change = self.change(
                    envelope,
                    rec,
                    row,
                    reason=reason,
                    fields=fields,
                    clear=(*SESSION_FIELDS, *TOKEN_FIELDS),
                    drop_session_lookup=rec.session_digest,
                    drop_upgrade=rec.upgrading,
                    unschedule=True,
                    drop_refresh_at=rec.next_refresh_at,
                )
                result = await self.store.commit(change)
                if result.status == "conflict":
                    continue
                if result.status == "duplicate":
                    return await self.reread_after(envelope, "duplicate")
                rec = rec.after(change, result.version)
                detail: dict[str, Any] = {}
                outcome: ProviderRevocation | None = None
                if unsupported:
                    outcome = ProviderRevocation.UNSUPPORTED
                    await self.store.redis.hincrby(
                        self.store.keys.of(rec.user).revocation_counts, outcome.value, 1
                    )
                    log.warning("provider_revocation_unsupported", user=rec.user)
                elif rec.revocation_pending:
                    outcome = await self.revoke_pending(rec.user)
                if outcome is not None:
                    detail["provider_revocation"] = outcome.value
                    detail["provider_revocation_note"] = revocation_note(outcome)
                return self.outcome(rec, envelope, "applied", detail=detail)
        return await self.reread_after(envelope, "conflict")

    async def _cannot_revoke(self) -> bool:
        """Whether the provider's discovery document names no revocation endpoint; False while
        discovery cannot be read (the outbox finds out later)."""
        try:
            meta = await self.oauth.metadata()
        except ProviderError:
            return False
        return not meta.revocation_endpoint

    async def revoke_pending(self, user: str) -> ProviderRevocation:
        """Revoke the tokens in a user's outbox at the provider (RFC 7009), then forget them.

        Returns ``DONE``; ``DEFERRED`` when the provider could not take it now (tried again by
        the cleanup job with backoff); ``UNSUPPORTED`` when the provider has no revocation
        endpoint, and ``ABANDONED`` after ``OUTBOX_MAX_ATTEMPTS`` failed tries: in both the
        tokens are dropped, never retried again.
        """
        keys = self.store.keys.of(user)
        redis = self.store.redis
        rec = await self.store.load(user)
        if rec.revocation_pending is None:
            await redis.zrem(keys.outbox, user)
            return ProviderRevocation.DONE
        if await self._cannot_revoke():
            await self.store.drop_revoked(
                user, rec.revocation_pending, outcome=ProviderRevocation.UNSUPPORTED
            )
            log.warning("provider_revocation_unsupported", user=user)
            return ProviderRevocation.UNSUPPORTED
        try:
            await self._revoke_tokens(self.open_tokens(user, rec.revocation_pending))
        except (ProviderError, VaultError) as exc:
            attempts = await self.store.count_revocation_attempt(user)
            if attempts >= OUTBOX_MAX_ATTEMPTS:
                await self.store.drop_revoked(
                    user, rec.revocation_pending, outcome=ProviderRevocation.ABANDONED
                )
                log.error(
                    "provider_revocation_abandoned", user=user, error=exc.code, attempts=attempts
                )
                return ProviderRevocation.ABANDONED
            delay = min(OUTBOX_RETRY_CAP, OUTBOX_RETRY_BASE * 2 ** (attempts - 1))
            await redis.zadd(keys.outbox, {user: self.clock() + delay})
            log.warning(
                "provider_revocation_deferred", user=user, error=exc.code, attempts=attempts
            )
            return ProviderRevocation.DEFERRED
        await self.store.drop_revoked(user, rec.revocation_pending)
        return ProviderRevocation.DONE

    async def _revoke_tokens(self, tokens: dict[str, str]) -> None:
        # Revoking the refresh token ends the grant (RFC 7009 section 2.1); the access token is
        # revoked too where the provider does not cascade.
        if tokens.get("refresh_token"):
            await self.oauth.revoke(tokens["refresh_token"], token_type_hint="refresh_token")
        if tokens.get("access_token"):
            try:
                await self.oauth.revoke(tokens["access_token"], token_type_hint="access_token")
            except ProviderError as exc:
                log.info("access_token_revocation_skipped", error=exc.code)

    async def revoke_obtained(self, user: str, tokens: TokenSet, *, why: str) -> None:
        """Tokens a losing or failing step obtained are revoked at once, never stored."""
        try:
            await self._revoke_tokens(
                {"refresh_token": tokens.refresh_token or "", "access_token": tokens.access_token}
            )
            log.info("obtained_tokens_revoked", user=user, why=why)
        except ProviderError as exc:
            log.error("obtained_tokens_not_revoked", user=user, why=why, error=exc.code)

    # --- single flight ----------------------------------------------------------------------

    @property
    def lock_ttl(self) -> float:
        return LOCK_TTL_FACTOR * self.settings.http_timeout

    def user_lock(self, user: str) -> UserLock:
        return UserLock(self.store, user, ttl=self.lock_ttl, wait=self.lock_ttl + LOCK_WAIT_EXTRA)


class UserLock:
    """One provider conversation per user at a time, across every worker (single flight)."""

    def __init__(self, store: RedisStore, user: str, *, ttl: float, wait: float) -> None:
        self.store = store
        self.user = user
        self.ttl = ttl
        self.wait = wait
        self.token: str | None = None

    async def __aenter__(self) -> UserLock:
        async def attempt() -> tuple[str | None, None]:
            return await self.store.acquire_lock(self.user, self.ttl), None

        await self.take(attempt)
        return self

    async def take(self, attempt: Callable[[], Awaitable[tuple[str | None, _T]]]) -> _T:
        """Run ``attempt`` until it returns an owner token (kept here), backing off in between;
        returns what the successful attempt read with it."""
        deadline = time.monotonic() + self.wait
        delay = 0.01
        while True:
            self.token, read = await attempt()
            if self.token is not None:
                return read
            if time.monotonic() > deadline:
                raise ProviderUnavailable(
                    "another worker is still talking to the provider for this user",
                    user=self.user,
                )
            await asyncio.sleep(delay + random.random() * delay)
            delay = min(delay * 2, 0.5)

    async def __aexit__(self, *exc: object) -> None:
        if self.token is not None and not await self.store.release_lock(self.user, self.token):
            # It ran out while held, or a failover lost it: another worker may have talked to
            # the provider for this user meanwhile, and nothing else would say so.
            log.warning("lock_not_held_at_release", user=self.user, lock_ttl_s=self.ttl)


def parse_imported_scopes(text: str) -> tuple[str, ...]:
    """The scopes a ``grant_imported`` event carries, space separated (RFC 6749 3.3)."""
    scopes = tuple(dict.fromkeys(text.split()))
    for scope in scopes:
        if not all(0x21 <= ord(ch) <= 0x7E and ch not in ('"', "\\") for ch in scope):
            raise ValueError("an imported scope is not an RFC 6749 scope token")
    return scopes


def parse_imported_lapse(text: str) -> float | None:
    """The imported refresh token's own expiry (seconds since the epoch), empty for none."""
    if not text:
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("an imported expiry is not a finite number")
    return value


def _describe(exc: ConsentError) -> str:
    if isinstance(exc, GrantRejected):
        return "the provider rejected the authorization code (invalid_grant)"
    if isinstance(exc, ClientRejected):
        return "the provider rejected this client's credentials (invalid_client)"
    return str(exc)
