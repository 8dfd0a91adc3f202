"""arq jobs: a few lines each that bind the log context and call the engine."""

from __future__ import annotations

from typing import Any

import structlog

from consent_flow._errors import ConsentError
from consent_flow._model import ConsentRecord, iso
from consent_flow._queue import Envelope, Outcome

from ._context import EVENT_MAX_TRIES, Services

log = structlog.get_logger("consent_flow.worker")


async def handle_event(ctx: dict[str, Any], data: dict[str, Any]) -> None:
    """Apply one consent event; report the outcome on the caller's reply key."""
    services: Services = ctx["services"]
    envelope = Envelope.from_job(data)
    structlog.contextvars.bind_contextvars(
        user=envelope.user,
        event_name=envelope.event.value,
        event_id=envelope.event_id,
        correlation_id=envelope.correlation_id,
        job_try=ctx.get("job_try"),
    )
    try:
        try:
            outcome = await services.engine.handle(envelope)
        except ConsentError as exc:
            # Refused or failed without a change: the caller gets the reason, nothing else moves.
            log.warning("event_rejected", error=exc.code, detail=str(exc))
            rec: ConsentRecord = await services.store.load(envelope.user)
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
                rec = await services.store.load(envelope.user)
                await services.bus.reply(
                    envelope.event_id,
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
        if envelope.reply:
            await services.bus.reply(envelope.event_id, outcome)
    finally:
        structlog.contextvars.clear_contextvars()
