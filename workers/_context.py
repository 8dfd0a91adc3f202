"""What a worker process shares between jobs: built once in ``on_startup``."""

from __future__ import annotations

from dataclasses import dataclass

from consent_flow._clock import RedisClock
from consent_flow._engine import Engine
from consent_flow._jobs import EVENT_MAX_TRIES
from consent_flow._oidc import HttpClients, OAuthClient
from consent_flow._queue import EventBus
from consent_flow._refresh import Refresher
from consent_flow._schedule import Scheduler
from consent_flow._settings import Settings
from consent_flow._store import RedisStore
from consent_flow._vault import KeyRing
from consent_flow._webhooks import WebhookSender

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
