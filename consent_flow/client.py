"""``ConsentClient``: the Python API that MCP servers, the CLI and the callback server share."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx
from arq.connections import ArqRedis

from consent_flow.core.records import ConsentRecord, HistoryEntry, check_user, clip, iso
from consent_flow.core.table import Event, State
from consent_flow.engine.broker import TokenBroker
from consent_flow.engine.engine import session_url
from consent_flow.errors import ConsentError, WorkerUnavailable
from consent_flow.oidc import OAuthClient
from consent_flow.queue.bus import JOB_SERIALIZERS, Envelope, EventBus, Outcome
from consent_flow.settings import Settings
from consent_flow.store.clock import RedisClock
from consent_flow.store.connection import connect, embedded_redis
from consent_flow.store.redis_store import RedisStore
from consent_flow.store.vault import KeyRing

__all__ = ["ConsentClient", "ConsentStatus"]

STARTUP_RETRIES = 2  # a caller is told quickly that Redis is not there
DEFAULT_MIN_TTL = 30.0  # seconds the token must stay valid when the caller does not say
MAX_MIN_TTL = 3600.0  # no provider's access tokens are worth asking for longer


def _dt(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True, slots=True)
class ConsentStatus:
    """Where one user's consent stands."""

    user: str
    state: State
    since: datetime | None
    reason: str | None = None
    authorization_url: str | None = None
    scopes: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def provisioned(self) -> bool:
        return self.state is State.PROVISIONED

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.details)
        out.update(
            user=self.user,
            state=self.state.value,
            since=iso(self.since.timestamp()) if self.since else None,
            reason=self.reason,
        )
        if self.authorization_url:
            out["authorization_url"] = self.authorization_url
        if self.scopes:
            out["scopes"] = list(self.scopes)
        return out

    @classmethod
    def from_outcome(cls, outcome: Outcome) -> ConsentStatus:
        detail = dict(outcome.detail)
        scopes = tuple(detail.pop("scopes", ()) or ())
        return cls(
            user=outcome.user,
            state=State(outcome.state),
            since=_dt(outcome.since),
            reason=outcome.reason,
            authorization_url=outcome.authorization_url,
            scopes=scopes,
            details={"result": outcome.result, "error": outcome.error, **detail},
        )

    @classmethod
    def from_record(
        cls, rec: ConsentRecord, *, authorization_url: str | None = None
    ) -> ConsentStatus:
        public = rec.public()
        for name in ("user", "state", "since", "reason", "scopes"):
            public.pop(name, None)
        return cls(
            user=rec.user,
            state=rec.state,
            since=datetime.fromtimestamp(rec.since, UTC) if rec.since else None,
            reason=rec.reason,
            authorization_url=authorization_url,
            scopes=rec.scopes,
            details=public,
        )


class ConsentClient:
    """Drive and read consent for users. Use it as an async context manager::

        async with ConsentClient.from_env() as consent:
            status = await consent.request_provisioning("alice")
            print(status.authorization_url)

    Events go through the queue; the call waits for the worker's outcome up to the event timeout
    (``CONSENT_EVENT_TIMEOUT``) and raises :class:`WorkerUnavailable` after it.
    """

    def __init__(self, settings: Settings, *, redis_url: str | None = None) -> None:
        self.settings = settings
        self._redis_url = redis_url or settings.redis_url
        self._stack: contextlib.AsyncExitStack | None = None
        self._pool: ArqRedis | None = None
        self._ring: KeyRing | None = None
        self._oauth: OAuthClient | None = None
        self._http: httpx.AsyncClient | None = None
        self._broker: TokenBroker | None = None
        self._store: RedisStore | None = None
        self._bus: EventBus | None = None
        self._clock: RedisClock | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ConsentClient:
        return cls(Settings.from_env(environ))

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> ConsentClient:
        stack = contextlib.AsyncExitStack()
        try:
            url = self._redis_url or stack.enter_context(embedded_redis(self.settings))
            self._pool = await connect(
                url,
                startup_retries=STARTUP_RETRIES,
                default_queue_name=self.settings.queue_name,
                **JOB_SERIALIZERS,
            )
            stack.push_async_callback(self._pool.aclose)
            self._clock = RedisClock(self._pool)
            await self._clock.sync()
            if self.settings.encryption_keys:
                self._ring = KeyRing.from_strings(k.reveal() for k in self.settings.encryption_keys)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._broker is not None:
            await self._broker.close()
            self._broker = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
        self._pool = None
        self._store = None
        self._bus = None
        self._clock = None

    @property
    def pool(self) -> ArqRedis:
        if self._pool is None:
            raise ConsentError("ConsentClient is not open: use `async with ConsentClient(...)`")
        return self._pool

    @property
    def clock(self) -> RedisClock:
        """Redis's time, as this client last measured it: the clock every process shares."""
        if self._clock is None:
            raise ConsentError("ConsentClient is not open: use `async with ConsentClient(...)`")
        return self._clock

    @property
    def store(self) -> RedisStore:
        if self._store is None:  # built once per open client: it registers its Lua scripts
            self._store = RedisStore(
                self.pool,
                prefix=self.settings.redis_prefix,
                wait_replicas=self.settings.wait_replicas,
            )
        return self._store

    @property
    def bus(self) -> EventBus:
        if self._bus is None:
            self._bus = EventBus(
                self.pool,
                keys=self.store.keys,
                queue_name=self.settings.queue_name,
                timeout=self.settings.event_timeout,
                clock=self.clock,
            )
        return self._bus

    @property
    def ring(self) -> KeyRing:
        if self._ring is None:
            self.settings.check_keys()
            raise AssertionError("unreachable")  # pragma: no cover
        return self._ring

    @property
    def oauth(self) -> OAuthClient:
        if self._oauth is None:
            self.settings.check_provider()
            self._http = httpx.AsyncClient(
                timeout=self.settings.http_timeout, follow_redirects=False
            )
            self._oauth = OAuthClient(self.settings, self._http, clock=self.clock)
        return self._oauth

    # --- events -----------------------------------------------------------------------------

    async def emit(self, envelope: Envelope, *, timeout: float | None = None) -> Outcome:
        outcome = await self.bus.emit(envelope, timeout=timeout)
        if outcome is None:  # pragma: no cover - emit with reply=True always answers or raises
            raise WorkerUnavailable("no outcome", user=envelope.user, event=envelope.event.value)
        return outcome

    async def request_provisioning(self, user: str, *, actor: str = "user") -> ConsentStatus:
        """Emit ``provision_requested``; the result carries the authorization URL while pending."""
        envelope = Envelope(Event.PROVISION_REQUESTED, check_user(user), actor)
        return self._raise_for(await self.emit(envelope))

    async def revoke(
        self, user: str, *, actor: str = "user", reason: str | None = None
    ) -> ConsentStatus:
        """Emit ``revoke_requested``: revoked at the provider, local tokens wiped."""
        payload = {"reason": clip(reason) or ""} if reason else {}
        envelope = Envelope(Event.REVOKE_REQUESTED, check_user(user), actor, payload=payload)
        outcome = await self.emit(envelope)
        if self._broker is not None:
            self._broker.forget(user)  # this process, at once; others hear it on cf:invalidate
        return self._raise_for(outcome)

    @staticmethod
    def _raise_for(outcome: Outcome) -> ConsentStatus:
        if outcome.result == "rejected" and outcome.error not in (None, "conflict"):
            raise ConsentError(
                outcome.reason or outcome.error or "rejected",
                user=outcome.user,
                event=outcome.event,
            )
        return ConsentStatus.from_outcome(outcome)

    # --- reads ------------------------------------------------------------------------------

    async def status(self, user: str) -> ConsentStatus:
        rec = await self.store.load(check_user(user))
        url = None
        if rec.state is State.PENDING and rec.session and self._ring is not None:
            url = session_url(self._ring, rec)
        return ConsentStatus.from_record(rec, authorization_url=url)

    async def history(self, user: str, *, limit: int = 1000) -> list[dict[str, Any]]:
        entries: list[HistoryEntry] = await self.store.history(check_user(user), limit=limit)
        return [entry.public() for entry in entries]

    async def access_token(self, user: str, *, min_ttl: float = DEFAULT_MIN_TTL) -> str:
        """An access token for ``user`` valid for at least ``min_ttl`` seconds.

        Raises :class:`NotProvisioned`, :class:`ConsentRevoked` (with the reason) or
        :class:`ProviderUnavailable`.
        """
        if self._broker is None:
            self._broker = TokenBroker(self)
        return await self._broker.access_token(check_user(user), min_ttl=min_ttl)
