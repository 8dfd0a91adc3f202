"""arq jobs: a few lines each that bind the log context and call the engine."""

from __future__ import annotations

import time
from typing import Any

import structlog
from arq import Retry

from consent_flow.core.records import ConsentRecord, ProviderRevocation, iso
from consent_flow.core.table import Event, State
from consent_flow.engine.webhooks import Notice
from consent_flow.errors import ConsentError, UnknownProvider
from consent_flow.queue.bus import Envelope, Outcome, new_id

from ._context import EVENT_MAX_TRIES, ProviderStack, Services

log = structlog.get_logger("consent_flow.worker")


async def handle_event(ctx: dict[str, Any], data: dict[str, Any]) -> None:
    """Apply one consent event; report the outcome on the caller's reply key."""
    services: Services = ctx["services"]
    envelope = Envelope.from_job(data)
    structlog.contextvars.bind_contextvars(
        user=envelope.user,
        provider=envelope.provider,
        event_name=envelope.event.value,
        event_id=envelope.event_id,
        correlation_id=envelope.correlation_id,
        job_try=ctx.get("job_try"),
    )
    try:
        try:
            stack = services.stack(envelope.provider)
        except UnknownProvider as exc:
            # Queued by a process configured with another provider: nothing here can apply it.
            log.error("event_for_unknown_provider", error=exc.code)
            if envelope.reply:
                await services.bus.reply(
                    envelope,
                    Outcome(
                        user=envelope.user,
                        state=State.UNPROVISIONED.value,
                        since=None,
                        reason=str(exc),
                        event=envelope.event.value,
                        result="rejected",
                        error=exc.code,
                    ),
                )
            return
        try:
            outcome = await stack.engine.handle(envelope)
        except ConsentError as exc:
            # Refused or failed without a change: the caller gets the reason, nothing else moves.
            log.warning("event_rejected", error=exc.code, detail=str(exc))
            rec: ConsentRecord = await stack.store.load(envelope.user)
            outcome = Outcome(
                user=rec.user,
                state=rec.state.value,
                since=iso(rec.since),
                reason=str(exc),
                event=envelope.event.value,
                result="rejected",
                error=exc.code,
            )
        except Exception as exc:
            # Unexpected (Redis gone, a bug): arq runs the job again; on the last try the caller
            # hears of it instead of waiting out its timeout.
            log.exception("event_failed", error=type(exc).__name__)
            if envelope.reply and ctx.get("job_try", 1) >= ctx.get("max_tries", EVENT_MAX_TRIES):
                rec = await stack.store.load(envelope.user)
                await services.bus.reply(
                    envelope,
                    Outcome(
                        user=rec.user,
                        state=rec.state.value,
                        since=iso(rec.since),
                        reason="internal error while applying the event",
                        event=envelope.event.value,
                        result="failed",
                        error="internal_error",
                    ),
                )
            raise
        if envelope.reply and not outcome.replied:
            await services.bus.reply(envelope, outcome)
    finally:
        structlog.contextvars.clear_contextvars()


async def refresh_tokens(
    ctx: dict[str, Any],
    user: str,
    due_ms: int | None = None,
    provider: str | None = None,
    *,
    on_demand: bool = False,
    min_ttl: float = 0.0,
    event_id: str | None = None,
    correlation_id: str | None = None,
    reply: bool = False,
    actor: str = "worker",
) -> None:
    """Refresh one connection's grant: scheduled (deferred job or sweep: user, due time and
    provider) or on demand (the token broker: user, provider and keyword arguments)."""
    services: Services = ctx["services"]
    try:
        stack = services.stack(None if provider is None else str(provider))
    except UnknownProvider as exc:
        log.error("refresh_for_unknown_provider", user=str(user), error=exc.code)
        return
    if (wait := stack.refresher.held_for()) > 0:
        # Redis just came back: later, by arq, so the wait does not eat this job's time.
        raise Retry(defer=wait)
    user = str(user)
    envelope = Envelope(
        Event.TOKEN_REFRESHED,
        user,
        str(actor),
        event_id=str(event_id or new_id()),
        correlation_id=str(correlation_id or new_id()),
        reply=bool(reply),
        provider=stack.engine.provider,
    )
    structlog.contextvars.bind_contextvars(
        user=user,
        provider=stack.engine.provider,
        event_name="refresh",
        event_id=envelope.event_id,
        job_try=ctx.get("job_try"),
    )
    try:
        outcome = await stack.refresher.refresh(
            user,
            due=int(due_ms) if due_ms is not None else None,
            on_demand=bool(on_demand),
            min_ttl=float(min_ttl),
            envelope=envelope,
        )
        if envelope.reply and not outcome.replied:
            await services.bus.reply(envelope, outcome)
    finally:
        structlog.contextvars.clear_contextvars()


async def sweep(ctx: dict[str, Any]) -> None:
    """Queue every due refresh whose job went missing (lost enqueue, Redis failover)."""
    services: Services = ctx["services"]
    for name, stack in services.stacks.items():
        counts = await stack.scheduler.sweep()
        if counts["requeued"]:
            log.warning("sweep_requeued", provider=name, **counts)


async def cleanup(ctx: dict[str, Any]) -> None:
    """Expire stale authorization sessions (upgrades too), retry provider revocations, trim
    history, commit spooled refreshes left behind."""
    services: Services = ctx["services"]
    for stack in services.stacks.values():
        await _cleanup(services, stack)


async def _cleanup(services: Services, stack: ProviderStack) -> None:
    """One provider's share of the cleanup, shard by shard."""
    totals = {"sessions_expired": 0, "revocations_sent": 0, "history_trimmed": 0}
    for shard in range(stack.store.keys.shards):
        expired, revoked, trimmed = await _cleanup_shard(services, stack, shard)
        totals["sessions_expired"] += expired
        totals["revocations_sent"] += revoked
        totals["history_trimmed"] += trimmed
    # Spooled refreshes a start-up could not settle (their user's lock was taken then). A file
    # younger than a lock's lifetime is most likely a sibling worker's commit still under way
    # (its user locked meanwhile): reading it would cost CPU for a postponement.
    replayed = await stack.refresher.replay(min_age=stack.engine.lock_ttl)
    if any(totals.values()) or replayed:
        log.info("cleanup", provider=stack.config.name, spool_replayed=replayed, **totals)


async def _cleanup_shard(
    services: Services, stack: ProviderStack, shard: int
) -> tuple[int, int, int]:
    """One shard's: sessions expired, revocations sent, history entries trimmed."""
    settings = stack.settings
    store = stack.store
    now = services.clock()
    expired = 0
    candidates = await store.users_before(
        State.PENDING, now - settings.session_ttl, shard=shard, limit=500
    )
    for user in candidates:
        rec = await store.load(user)
        if rec.state is State.PENDING and (rec.session_expires_at or 0) <= now:
            await services.bus.emit(
                Envelope(
                    Event.SESSION_EXPIRED, user, "worker", reply=False, provider=stack.config.name
                )
            )
            expired += 1
    # Upgrade sessions beside a grant: the grant's own index does not say which are open.
    for user in await store.upgrades_due(now, shard=shard, limit=500):
        await services.bus.emit(
            Envelope(Event.SESSION_EXPIRED, user, "worker", reply=False, provider=stack.config.name)
        )
        expired += 1
    revoked = 0
    for user in await store.outbox_due(now, shard=shard, limit=100):
        result = await stack.engine.revoke_pending(user)
        if result is ProviderRevocation.DONE:
            revoked += 1
    trimmed = await store.trim_history(now - settings.history_retention, shard=shard)
    return expired, revoked, trimmed


async def deliver_webhook(ctx: dict[str, Any], data: dict[str, Any]) -> None:
    """One attempt to deliver a webhook notice; a failed one is tried again later by arq, under
    the same job id (the notice's), until the sender gives it up as a dead letter."""
    services: Services = ctx["services"]
    notice = Notice.from_job(data)
    if services.webhooks is None:
        log.warning("webhook_dropped", notice_id=notice.id, why="CONSENT_WEBHOOK_URL is not set")
        return
    structlog.contextvars.bind_contextvars(
        user=notice.user,
        provider=notice.provider,
        notice_id=notice.id,
        job_try=ctx.get("job_try"),
    )
    attempt = int(ctx.get("job_try") or 1)
    try:
        delay = await services.webhooks.attempt(notice, attempt)
    except Exception as exc:
        # Redis away or a bug: tried again later like a failed attempt, never silently lost.
        log.exception("webhook_failed", error=type(exc).__name__)
        delay = services.webhooks.retry.delay(attempt)
    finally:
        structlog.contextvars.clear_contextvars()
    if delay is not None:
        # arq schedules the retry by this process's clock: the offset makes it Redis's.
        raise Retry(defer=max(0.001, delay + services.clock() - time.time()))
