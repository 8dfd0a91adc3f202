"""The token broker: a valid access token at once, from a short in-process cache when it can.

The cache is keyed by connection (user, provider). Order of lookup: the cache (a dict; no I/O),
then the provider's store (one read and a decryption), then an on-demand refresh through the
queue, which takes the same single-flight path as scheduled refreshes. Every commit that replaces
or wipes a connection's tokens publishes the connection (``provider\nuser``) on
``cf:invalidate``; each broker listens and drops its entry, and serves nothing from the cache
while it is not subscribed. Entries also age out after ``CACHE_MAX_AGE``.

A fill (a read of the store that ends in the cache) can lose a race with a revocation elsewhere:
it reads the record, the revocation commits and its invalidation arrives, then the fill inserts
the token it read. So each fill notes, before it reads, the subscription's epoch (which moves
whenever the subscription starts or ends, since messages are lost while it is down) and how many
invalidations for its user arrived so far; if either moved by the time it would insert, it reads
again, and a fill that keeps losing serves its last read without caching it. After a revocation
completes, a process hands out the token again only if it took the token from the cache before
the invalidation message reached it (a few hundred microseconds on one host) or the pub/sub
connection died silently (noticed within two ``PUBSUB_PING_EVERY``, then the cache is cleared).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from consent_flow.core.connections import DEFAULT_PROVIDER
from consent_flow.core.records import ConsentRecord, cooldown_reason
from consent_flow.core.table import Event, State
from consent_flow.errors import ConsentRevoked, NotProvisioned, ProviderUnavailable
from consent_flow.queue.bus import Envelope, new_id
from consent_flow.queue.jobs import bell_key
from consent_flow.queue.scheduler import REFRESH_JOB
from consent_flow.store.vault import open_tokens

if TYPE_CHECKING:
    from consent_flow.client import ConsentClient

__all__ = ["CACHE_MAX_AGE", "TokenBroker"]

log = structlog.get_logger("consent_flow.broker")

CACHE_MAX_AGE = 30.0  # seconds an access token is served from memory without a second look
RESUBSCRIBE_DELAY = 1.0
FILL_ATTEMPTS = 3  # reads of one fill while invalidations for its user keep arriving
# Seconds of silence on the subscription before it is probed with a PING; a probe unanswered for
# as long again counts as a lost connection.
PUBSUB_PING_EVERY = 5.0


@dataclass(frozen=True, slots=True)
class _Entry:
    token: str
    expires_at: float | None
    cached_at: float


class TokenBroker:
    def __init__(self, client: ConsentClient) -> None:
        self.client = client
        self._cache: dict[tuple[str, str], _Entry] = {}  # by (provider, user)
        self._listening = False
        self._task: asyncio.Task[None] | None = None
        # Moves whenever the subscription starts or ends: a fill that saw another epoch may have
        # missed an invalidation.
        self._epoch = 0
        # Per connection with a fill in flight: [fills in flight, invalidations received
        # meanwhile].
        self._fills: dict[tuple[str, str], list[int]] = {}

    # --- public -------------------------------------------------------------------------------

    async def access_token(
        self, user: str, provider: str = DEFAULT_PROVIDER, *, min_ttl: float = 30.0
    ) -> str:
        # Expiry times are Redis's time: judged by this process's own clock, a clock that runs
        # behind would hand out tokens that expired.
        clock = self.client.clock
        await clock.sync_if_stale()
        now = clock()
        conn = (provider, user)
        entry = self._cache.get(conn)
        if (
            entry is not None
            and self._listening
            and now - entry.cached_at < CACHE_MAX_AGE
            and (entry.expires_at is None or entry.expires_at - now >= min_ttl)
        ):
            return entry.token
        self._ensure_listening()
        token = await self._from_store(conn, now, min_ttl)
        if token is not None:
            return token
        await self._refresh(conn, min_ttl)
        token = await self._from_store(conn, clock(), min_ttl, refreshed=True)
        assert token is not None
        return token

    def forget(self, user: str, provider: str = DEFAULT_PROVIDER) -> None:
        """Drop the connection's cached token; a fill for it in flight reads again."""
        conn = (provider, user)
        self._cache.pop(conn, None)
        fill = self._fills.get(conn)
        if fill is not None:
            fill[1] += 1

    async def close(self) -> None:
        self._set_listening(False)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # --- lookups ------------------------------------------------------------------------------

    async def read_record(self, user: str, provider: str = DEFAULT_PROVIDER) -> ConsentRecord:
        """A fill's read of the store. A seam: a subclass may wrap it (tests hold a fill there,
        between its read and its insert into the cache)."""
        return await self.client.store_for(provider).load(user)

    async def _read(self, conn: tuple[str, str]) -> tuple[ConsentRecord, bool]:
        """The record, and whether its token may be cached: the subscription was up when the
        read began and nothing that could invalidate it arrived until the read ended."""
        provider, user = conn
        fill = self._fills.setdefault(conn, [0, 0])
        fill[0] += 1
        try:
            for _ in range(FILL_ATTEMPTS):
                listening, epoch, seen = self._listening, self._epoch, fill[1]
                rec = await self.read_record(user, provider)
                if (epoch, seen) == (self._epoch, fill[1]):
                    return rec, listening
            return rec, False
        finally:
            fill[0] -= 1
            if not fill[0]:
                del self._fills[conn]

    async def _from_store(
        self, conn: tuple[str, str], now: float, min_ttl: float, *, refreshed: bool = False
    ) -> str | None:
        provider, user = conn
        rec, cacheable = await self._read(conn)
        # From here to the insert nothing awaits: no invalidation can land in between.
        if rec.state is State.REVOKED:
            self.forget(user, provider)
            raise ConsentRevoked(
                f"consent was revoked: {rec.reason}",
                user=user,
                state=rec.state.value,
                reason=rec.reason,
            )
        if rec.state is not State.PROVISIONED or rec.tokens is None:
            self.forget(user, provider)
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
            retry_at = rec.on_demand_retry_at()
            if retry_at is not None and retry_at > now:
                # Refreshes are failing and the retry is not due: no job, no provider call.
                raise ProviderUnavailable(
                    cooldown_reason(rec, retry_at), retry_after=retry_at - now, user=user
                )
            return None
        if not fresh_enough:
            raise ProviderUnavailable(
                "could not get a token valid for long enough: "
                + (rec.last_refresh_error or "the provider did not extend it"),
                user=user,
            )
        token = open_tokens(self.client.ring_for(provider), user, rec.tokens)["access_token"]
        if cacheable:
            self._cache[conn] = _Entry(token, rec.expires_at, now)
        return token

    async def _refresh(self, conn: tuple[str, str], min_ttl: float) -> None:
        """On-demand refresh through the queue, on the same single-flight path as the schedule."""
        provider, user = conn
        event_id = new_id()
        jobs = self.client.bus.jobs
        shard = self.client.bus.keys.of(user)  # the user's: its reply and its keys are there
        await jobs.put(
            jobs.job(
                REFRESH_JOB,
                (user, None, provider),
                {
                    "on_demand": True,
                    "min_ttl": min_ttl,
                    "event_id": event_id,
                    "reply": True,
                    "actor": "broker",
                },
                job_id=shard.job_id(f"ondemand:{event_id}"),
                queue=shard.queue(self.client.settings.queue_name),
                expires_ms=int(max(1.0, self.client.settings.event_timeout) * 1000),
            ),
            ring=bell_key(self.client.settings.queue_name),
        )
        outcome = await self.client.bus.wait(
            Envelope(Event.TOKEN_REFRESHED, user, "broker", event_id=event_id, provider=provider)
        )
        if outcome.error == "invalid_client":
            raise ProviderUnavailable(outcome.reason or "refreshes are paused", user=user)
        if outcome.error and outcome.state == State.PROVISIONED.value:
            why = f": {outcome.reason}" if outcome.reason else ""
            raise ProviderUnavailable(
                f"the provider is unavailable ({outcome.error}); the grant is kept{why}", user=user
            )

    # --- invalidation -------------------------------------------------------------------------

    def _set_listening(self, listening: bool) -> None:
        self._listening = listening
        self._epoch += 1
        self._cache.clear()

    def _ensure_listening(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._listen(), name="consent-flow-invalidation")

    def _connection_lost(self, _connection: object) -> None:
        # redis-py reconnects a subscription and subscribes again by itself: whatever was
        # published in between is lost, so nothing cached before may be trusted.
        if self._listening:
            self._set_listening(False)

    async def _listen(self) -> None:
        channel = self.client.bus.keys.invalidate
        while True:
            pubsub: Any = self.client.pool.pubsub()
            connection: Any = None
            try:
                await pubsub.subscribe(channel)
                connection = pubsub.connection
                connection.register_connect_callback(self._connection_lost)
                probing = False
                while True:
                    message = await pubsub.get_message(timeout=PUBSUB_PING_EVERY)
                    if message is None:
                        # A connection that died without a reset delivers nothing, not an error.
                        if probing:
                            raise ConnectionError("the subscription did not answer a PING")
                        await pubsub.ping()
                        probing = True
                        continue
                    probing = False
                    kind = message.get("type")
                    if kind == "subscribe" and not self._listening:
                        # Serve from memory only once the server confirmed the subscription.
                        self._set_listening(True)
                    elif kind == "message":
                        data = message["data"]
                        text = data.decode() if isinstance(data, bytes) else str(data)
                        provider, _, user = text.partition("\n")
                        self.forget(user, provider)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: stop serving from memory
                log.warning("invalidation_lost", error=type(exc).__name__)
            finally:
                if self._listening:
                    self._set_listening(False)
                if connection is not None:
                    # The connection goes back to the pool: it must not call us when reused.
                    connection.deregister_connect_callback(self._connection_lost)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_DELAY)
