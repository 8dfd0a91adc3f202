"""What a worker process shares between jobs: built once in ``on_startup``."""

from __future__ import annotations

from dataclasses import dataclass

from consent_flow.engine.engine import Engine
from consent_flow.engine.refresh import Refresher
from consent_flow.engine.webhooks import WebhookSender
from consent_flow.oidc import HttpClients, OAuthClient
from consent_flow.queue.bus import EventBus
from consent_flow.queue.jobs import EVENT_MAX_TRIES
from consent_flow.queue.scheduler import Scheduler
from consent_flow.settings import Settings
from consent_flow.store.clock import RedisClock
from consent_flow.store.redis_store import RedisStore
from consent_flow.store.vault import KeyRing

__all__ = ["EVENT_MAX_TRIES", "Services"]


@dataclass
class Services:
    settings: Settings
    store: RedisStore
    bus: EventBus
    http: HttpClients
    oauth: OAuthClient
    ring: KeyRing
    engine: Engine
    scheduler: Scheduler
    refresher: Refresher
    clock: RedisClock  # Redis's time: every time this worker shares with other processes
    webhooks: WebhookSender | None = None  # None: CONSENT_WEBHOOK_URL is not set
