"""The token broker: a valid access token at once, from a short in-process cache when it can.

Order of lookup: the cache (a dict; no I/O), then the store (one read and a decryption), then
an on-demand refresh through the queue, which takes the same single-flight path as scheduled
refreshes. Every commit that replaces or wipes a user's tokens publishes the user id on
``cf:invalidate``; each broker listens and drops its entry, and serves nothing from the cache
while it is not subscribed. Entries also age out after ``CACHE_MAX_AGE`` (invariant 9).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from ._errors import ConsentRevoked, NotProvisioned, ProviderUnavailable
from ._machine import Event, State
from ._queue import Envelope, new_id
from ._schedule import REFRESH_JOB
from ._vault import open_tokens

if TYPE_CHECKING:
    from ._client import ConsentClient

__all__ = ["CACHE_MAX_AGE", "TokenBroker"]

log = structlog.get_logger("consent_flow.broker")

CACHE_MAX_AGE = 30.0  # seconds an access token is served from memory without a second look
RESUBSCRIBE_DELAY = 1.0


@dataclass(frozen=True, slots=True)
class _Entry:
    token: str
    expires_at: float | None
    cached_at: float


class TokenBroker:
    def __init__(self, client: ConsentClient) -> None:
        self.client = client
        self._cache: dict[str, _Entry] = {}
        self._listening = False
        self._task: asyncio.Task[None] | None = None

    # --- public -------------------------------------------------------------------------------

    async def access_token(self, user: str, *, min_ttl: float = 30.0) -> str:
        # Expiry times are Redis's time: judged by this process's own clock, a clock that runs
        # behind would hand out tokens that expired.
        clock = self.client.clock
        await clock.sync_if_stale()
        now = clock()
        entry = self._cache.get(user)
        if (
            entry is not None
            and self._listening
            and now - entry.cached_at < CACHE_MAX_AGE
            and (entry.expires_at is None or entry.expires_at - now >= min_ttl)
        ):
            return entry.token
        self._ensure_listening()
        token = await self._from_store(user, now, min_ttl)
        if token is not None:
            return token
        await self._refresh(user, min_ttl)
        token = await self._from_store(user, clock(), min_ttl, refreshed=True)
        assert token is not None
        return token

    def forget(self, user: str) -> None:
        self._cache.pop(user, None)

    async def close(self) -> None:
        self._listening = False
        self._cache.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # --- lookups ------------------------------------------------------------------------------

    async def _from_store(
        self, user: str, now: float, min_ttl: float, *, refreshed: bool = False
    ) -> str | None:
        rec = await self.client.store.load(user)
        if rec.state is State.REVOKED:
            self.forget(user)
            raise ConsentRevoked(
                f"consent was revoked: {rec.reason}",
                user=user,
                state=rec.state.value,
                reason=rec.reason,
            )
        if rec.state is not State.PROVISIONED or rec.tokens is None:
            self.forget(user)
            raise NotProvisioned(
                f"{user} has not granted delegated access",
                user=user,
                state=rec.state.value,
                reason=rec.reason,
            )
        fresh_enough = rec.expires_at is None or rec.expires_at - now >= min_ttl
        lifetime = (
            None
            if rec.expires_at is None or rec.last_refresh_at is None
            else rec.expires_at - rec.last_refresh_at
        )
        if not fresh_enough and lifetime is not None and lifetime < min_ttl:
            # A refresh cannot help: this provider's tokens never live that long.
            raise ProviderUnavailable(
                f"the provider's access tokens live {lifetime:.0f} s, less than the "
                f"{min_ttl:.0f} s asked for",
                user=user,
            )
        if not fresh_enough and not refreshed:
            return None
        if not fresh_enough:
            raise ProviderUnavailable(
                "could not get a token valid for long enough: "
                + (rec.last_refresh_error or "the provider did not extend it"),
                user=user,
            )
        token = open_tokens(self.client.ring, user, rec.tokens)["access_token"]
        if self._listening:
            self._cache[user] = _Entry(token, rec.expires_at, now)
        return token

    async def _refresh(self, user: str, min_ttl: float) -> None:
        """On-demand refresh through the queue, on the same single-flight path as the schedule."""
        event_id = new_id()
        jobs = self.client.bus.jobs
        await jobs.put(
            jobs.job(
                REFRESH_JOB,
                (user,),
                {
                    "on_demand": True,
                    "min_ttl": min_ttl,
                    "event_id": event_id,
                    "reply": True,
                    "actor": "broker",
                },
                job_id=f"ondemand:{event_id}",
                queue=self.client.settings.queue_name,
                expires_ms=int(max(1.0, self.client.settings.event_timeout) * 1000),
            )
        )
        outcome = await self.client.bus.wait(
            Envelope(Event.TOKEN_REFRESHED, user, "broker", event_id=event_id)
        )
        if outcome.error == "invalid_client":
            raise ProviderUnavailable(outcome.reason or "refreshes are paused", user=user)
        if outcome.error and outcome.state == State.PROVISIONED.value:
            raise ProviderUnavailable(
                f"the provider is unavailable ({outcome.error}); the grant is kept", user=user
            )

    # --- invalidation -------------------------------------------------------------------------

    def _ensure_listening(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="consent-flow-invalidation")

    async def _listen(self) -> None:
        channel = self.client.store.keys.invalidate
        while True:
            pubsub: Any = self.client.pool.pubsub()
            try:
                await pubsub.subscribe(channel)
                # Serve from memory only once the server has confirmed the subscription.
                while True:
                    confirm = await pubsub.get_message(timeout=5.0)
                    if confirm is not None and confirm.get("type") == "subscribe":
                        break
                self._listening = True
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self.forget(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: stop serving from memory
                log.warning("invalidation_lost", error=type(exc).__name__)
            finally:
                self._listening = False
                self._cache.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_DELAY)
