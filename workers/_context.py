"""What a worker process shares between jobs: built once in ``on_startup``.

Each configured provider has an engine stack of its own (settings as that provider sees them,
store on its keys, OpenID client, ring bound to it, engine, scheduler, refresher); the rest (the
Redis pool's bus, the provider session, the clock, the webhook sender) is shared by all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consent_flow.engine.batch import BatchRefresher
from consent_flow.engine.engine import Engine
from consent_flow.engine.refresh import Refresher
from consent_flow.engine.webhooks import WebhookSender
from consent_flow.errors import UnknownProvider
from consent_flow.oidc import OAuthClient, ProviderSession
from consent_flow.queue.bus import EventBus
from consent_flow.queue.jobs import EVENT_MAX_TRIES
from consent_flow.queue.scheduler import Scheduler
from consent_flow.settings import ProviderConfig, Settings
from consent_flow.store.clock import RedisClock
from consent_flow.store.redis_store import RedisStore
from consent_flow.store.vault import KeyRing

__all__ = ["EVENT_MAX_TRIES", "ProviderStack", "Services"]


@dataclass
class ProviderStack:
    """One provider's engine stack in a worker."""

    config: ProviderConfig
    settings: Settings  # as this provider sees them (Settings.for_provider)
    store: RedisStore
    oauth: OAuthClient
    ring: KeyRing  # bound to this provider
    engine: Engine
    scheduler: Scheduler
    refresher: Refresher
    batches: BatchRefresher  # its scheduled refreshes, in batches (when the worker runs them)


@dataclass
class Services:
    settings: Settings
    bus: EventBus
    http: ProviderSession
    ring: KeyRing
    clock: RedisClock  # Redis's time: every time this worker shares with other processes
    stacks: dict[str, ProviderStack] = field(default_factory=dict)  # by provider name
    webhooks: WebhookSender | None = None  # None: CONSENT_WEBHOOK_URL is not set

    def stack(self, provider: str | None) -> ProviderStack:
        """The stack of ``provider`` (None: the only one). Raises :class:`UnknownProvider`."""
        if provider is None and len(self.stacks) == 1:
            return next(iter(self.stacks.values()))
        found = self.stacks.get(provider) if provider is not None else None
        if found is None:
            raise UnknownProvider(provider, list(self.stacks))
        return found

    @property
    def refreshers(self) -> list[Refresher]:
        return [stack.refresher for stack in self.stacks.values()]
