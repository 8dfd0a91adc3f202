"""``ConsentClient``: the Python API that MCP servers, the CLI and the callback server share."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx
from arq.connections import ArqRedis

from consent_flow.core.connections import DEFAULT_PROVIDER
from consent_flow.core.records import (
    ConsentRecord,
    HistoryEntry,
    check_scopes,
    check_user,
    clip,
    iso,
)
from consent_flow.core.table import Event, State
from consent_flow.engine.broker import TokenBroker
from consent_flow.engine.engine import session_url
from consent_flow.errors import ConsentError, ProviderError, WorkerUnavailable
from consent_flow.oidc import OAuthClient
from consent_flow.queue.bus import JOB_SERIALIZERS, Envelope, EventBus, Outcome
from consent_flow.settings import Settings
from consent_flow.store.clock import RedisClock
from consent_flow.store.connection import connect, embedded_redis
from consent_flow.store.redis_store import Keys, RedisStore, check_shards
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
    """Where one connection's consent stands: one user's grant at one provider.

    ``scopes`` is what the provider granted; ``requested_scopes`` what the open session (a
    first authorization, or an upgrade beside the grant) asks for, empty when none is open;
    ``scopes_missing`` what the last authorization asked for and the provider did not grant.
    ``upgrade`` is True while an upgrade session is open: the grant keeps working meanwhile,
    and ``authorization_url`` is the upgrade's.
    """

    user: str
    state: State
    since: datetime | None
    reason: str | None = None
    authorization_url: str | None = None
    scopes: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    requested_scopes: tuple[str, ...] = ()
    scopes_missing: tuple[str, ...] = ()
    upgrade: bool = False
    provider: str = DEFAULT_PROVIDER

    @property
    def provisioned(self) -> bool:
        return self.state is State.PROVISIONED

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.details)
        out.update(
            user=self.user,
            provider=self.provider,
            state=self.state.value,
            since=iso(self.since.timestamp()) if self.since else None,
            reason=self.reason,
        )
        if self.authorization_url:
            out["authorization_url"] = self.authorization_url
        if self.scopes:
            out["scopes"] = list(self.scopes)
        if self.requested_scopes:
            out["requested_scopes"] = list(self.requested_scopes)
        if self.scopes_missing:
            out["scopes_missing"] = list(self.scopes_missing)
        if self.upgrade:
            out["upgrade"] = True
        return out

    @classmethod
    def from_outcome(cls, outcome: Outcome, *, provider: str = DEFAULT_PROVIDER) -> ConsentStatus:
        detail = dict(outcome.detail)
        scopes = tuple(detail.pop("scopes", ()) or ())
        return cls(
            provider=provider,
            user=outcome.user,
            state=State(outcome.state),
            since=_dt(outcome.since),
            reason=outcome.reason,
            authorization_url=outcome.authorization_url,
            scopes=scopes,
            requested_scopes=tuple(detail.pop("requested_scopes", ()) or ()),
            scopes_missing=tuple(detail.pop("scopes_missing", ()) or ()),
            upgrade=bool(detail.pop("upgrade", False)),
            details={"result": outcome.result, "error": outcome.error, **detail},
        )

    @classmethod
    def from_record(
        cls,
        rec: ConsentRecord,
        *,
        authorization_url: str | None = None,
        provider: str = DEFAULT_PROVIDER,
    ) -> ConsentStatus:
        public = rec.public()
        for name in ("user", "provider", "state", "since", "reason", "scopes", "requested_scopes"):
            public.pop(name, None)
        public.pop("scopes_missing", None)
        return cls(
            provider=provider,
            user=rec.user,
            state=rec.state,
            since=datetime.fromtimestamp(rec.since, UTC) if rec.since else None,
            reason=rec.reason,
            authorization_url=authorization_url,
            scopes=rec.scopes,
            details=public,
            requested_scopes=rec.requested_scopes if rec.session_id else (),
            scopes_missing=rec.scopes_missing if rec.state is State.PROVISIONED else (),
            upgrade=rec.upgrading,
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
        self._http: httpx.AsyncClient | None = None
        self._broker: TokenBroker | None = None
        self._bus: EventBus | None = None
        # Per provider, built on first use: a store registers its Lua scripts.
        self._stores: dict[str, RedisStore] = {}
        # Names already resolved: the token broker's cached path asks on every call.
        self._provider_names: dict[str | None, str] = {}
        self._oauths: dict[str, OAuthClient] = {}
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
            await check_shards(self._pool, self.keys)
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
        self._stores.clear()
        self._oauths.clear()
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
    def providers(self) -> tuple[str, ...]:
        """The configured providers' names, in configuration order."""
        return self.settings.provider_names

    def provider_name(self, provider: str | None = None) -> str:
        """``provider``'s name if it is configured; None: the only provider's. Raises
        :class:`UnknownProvider` (which lists the configured names) otherwise."""
        name = self._provider_names.get(provider)
        if name is None:
            name = self.settings.provider(provider).name  # raises for a name not configured
            self._provider_names[provider] = name
        return name

    def store_for(self, provider: str | None = None) -> RedisStore:
        """The store of ``provider``'s connections (None: the only provider's)."""
        name = self.provider_name(provider)
        store = self._stores.get(name)
        if store is None:
            store = RedisStore(
                self.pool,
                prefix=self.settings.redis_prefix,
                provider=name,
                wait_replicas=self.settings.wait_replicas,
                shards=self.settings.redis_shards,
            )
            self._stores[name] = store
        return store

    def ring_for(self, provider: str | None = None) -> KeyRing:
        """The key ring bound to ``provider``'s connections (None: the only provider's)."""
        name = self.provider_name(provider)
        if self._ring is None:
            self.settings.check_keys()
            raise AssertionError("unreachable")  # pragma: no cover
        return self._ring.for_provider(name)

    def oauth_for(self, provider: str | None = None) -> OAuthClient:
        """The OpenID client of ``provider`` (None: the only provider)."""
        name = self.provider_name(provider)
        oauth = self._oauths.get(name)
        if oauth is None:
            self.settings.check_provider()
            if self._http is None:
                self._http = httpx.AsyncClient(
                    timeout=self.settings.http_timeout, follow_redirects=False
                )
            oauth = OAuthClient(self.settings.for_provider(name), self._http, clock=self.clock)
            self._oauths[name] = oauth
        return oauth

    @property
    def store(self) -> RedisStore:
        """The only provider's store; with several, name one: :meth:`store_for`."""
        return self.store_for(None)

    @property
    def keys(self) -> Keys:
        """The deployment's key layout (``for_provider`` for a provider's keys)."""
        return Keys(self.settings.redis_prefix, shards=self.settings.redis_shards)

    @property
    def bus(self) -> EventBus:
        if self._bus is None:
            self._bus = EventBus(
                self.pool,
                keys=self.keys,
                queue_name=self.settings.queue_name,
                timeout=self.settings.event_timeout,
                clock=self.clock,
            )
        return self._bus

    @property
    def ring(self) -> KeyRing:
        """The only provider's key ring; with several, name one: :meth:`ring_for`."""
        return self.ring_for(None)

    @property
    def oauth(self) -> OAuthClient:
        """The only provider's OpenID client; with several, name one: :meth:`oauth_for`."""
        return self.oauth_for(None)

    # --- events -----------------------------------------------------------------------------

    async def emit(self, envelope: Envelope, *, timeout: float | None = None) -> Outcome:
        outcome = await self.bus.emit(envelope, timeout=timeout)
        if outcome is None:  # pragma: no cover - emit with reply=True always answers or raises
            raise WorkerUnavailable("no outcome", user=envelope.user, event=envelope.event.value)
        return outcome

    async def request_provisioning(
        self,
        user: str,
        provider: str | None = None,
        scopes: Sequence[str] = (),
        *,
        actor: str = "user",
    ) -> ConsentStatus:
        """Emit ``provision_requested`` for the connection (user, provider): a session for the
        provider's base scopes plus ``scopes``. ``provider`` may be left out when one is
        configured.

        The result carries the authorization URL while a session is open: the first one, or an
        upgrade when the user is provisioned without every scope asked (the grant keeps working
        meanwhile). Scopes already granted: nothing to do. Raises :class:`InvalidScope`, before
        anything is queued, for a scope that is not an RFC 6749 scope token or too many.
        """
        user = check_user(user)
        asked = check_scopes(list(scopes) if not isinstance(scopes, str) else scopes)
        name = self.provider_name(provider)
        payload = {"scopes": " ".join(asked)} if asked else {}
        envelope = Envelope(Event.PROVISION_REQUESTED, user, actor, payload=payload, provider=name)
        return self._raise_for(await self.emit(envelope), name)

    async def revoke(
        self,
        user: str,
        provider: str | None = None,
        *,
        actor: str = "user",
        reason: str | None = None,
    ) -> ConsentStatus:
        """Emit ``revoke_requested``: revoked at the provider, local tokens wiped. The user's
        connections at other providers are left as they are."""
        user = check_user(user)
        name = self.provider_name(provider)
        payload = {"reason": clip(reason) or ""} if reason else {}
        envelope = Envelope(Event.REVOKE_REQUESTED, user, actor, payload=payload, provider=name)
        outcome = await self.emit(envelope)
        if self._broker is not None:
            # This process, at once; others hear it on cf:invalidate.
            self._broker.forget(user, name)
        return self._raise_for(outcome, name)

    @staticmethod
    def _raise_for(outcome: Outcome, provider: str) -> ConsentStatus:
        if outcome.result == "rejected" and outcome.error not in (None, "conflict"):
            raise ConsentError(
                outcome.reason or outcome.error or "rejected",
                user=outcome.user,
                event=outcome.event,
            )
        return ConsentStatus.from_outcome(outcome, provider=provider)

    # --- reads ------------------------------------------------------------------------------

    async def describe_providers(self) -> list[dict[str, Any]]:
        """Each configured provider: its settings (no secret), the endpoints its discovery
        document names, and whether it can revoke (None while discovery does not answer: not
        known, rather than "no")."""
        described = []
        for config in self.settings.providers:
            out: dict[str, Any] = config.public()
            try:
                meta = await self.oauth_for(config.name).metadata()
            except ProviderError as exc:
                out.update(endpoints=None, can_revoke=None, discovery_error=str(exc))
            else:
                out.update(
                    endpoints={
                        "authorization": meta.authorization_endpoint,
                        "token": meta.token_endpoint,
                        "revocation": meta.revocation_endpoint,
                        "jwks": meta.jwks_uri,
                    },
                    can_revoke=bool(meta.revocation_endpoint),
                )
            described.append(out)
        return described

    async def status(self, user: str, provider: str | None = None) -> ConsentStatus:
        """Where the connection (user, provider) stands."""
        user = check_user(user)
        name = self.provider_name(provider)
        rec = await self.store_for(name).load(user)
        url = None
        if rec.session and self._ring is not None:
            url = session_url(self._ring.for_provider(name), rec)
        return ConsentStatus.from_record(rec, authorization_url=url, provider=name)

    async def connections(self, user: str) -> list[ConsentStatus]:
        """The user's connection at every configured provider, in configuration order (a
        provider never asked reads ``unprovisioned``)."""
        user = check_user(user)
        return [await self.status(user, name) for name in self.providers]

    async def history(
        self, user: str, provider: str | None = None, *, limit: int = 1000
    ) -> list[dict[str, Any]]:
        user = check_user(user)
        store = self.store_for(provider)
        entries: list[HistoryEntry] = await store.history(user, limit=limit)
        return [entry.public() for entry in entries]

    async def access_token(
        self, user: str, provider: str | None = None, *, min_ttl: float = DEFAULT_MIN_TTL
    ) -> str:
        """An access token for the connection (user, provider) valid for at least ``min_ttl``
        seconds.

        Raises :class:`NotProvisioned`, :class:`ConsentRevoked` (with the reason),
        :class:`ProviderUnavailable` or :class:`UnknownProvider`.
        """
        user = check_user(user)
        name = self.provider_name(provider)
        if self._broker is None:
            self._broker = TokenBroker(self)
        return await self._broker.access_token(user, name, min_ttl=min_ttl)
