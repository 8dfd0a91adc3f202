"""consent-flow: progressive consent for MCP servers.

Each user's delegated, revocable offline access to a downstream API lives in an explicit state
machine (unprovisioned, pending, provisioned, revoked) driven by events through an arq queue.
"""

from ._api import api_routes
from ._client import ConsentClient, ConsentStatus
from ._errors import (
    CallbackRejected,
    ClientRejected,
    ConsentError,
    ConsentRevoked,
    GrantRejected,
    IDTokenError,
    InvalidTransition,
    NotProvisioned,
    ProviderError,
    ProviderResponseError,
    ProviderUnavailable,
    SettingsError,
    StoreError,
    UnknownKeyError,
    VaultError,
    WorkerUnavailable,
)
from ._machine import TRANSITIONS, Event, State, Transition, mermaid
from ._model import ProviderRevocation
from ._ops import ops_routes
from ._settings import Settings
from ._vault import KeyRing, generate_key
from ._web import consent_routes, create_app

__all__ = [
    "TRANSITIONS",
    "CallbackRejected",
    "ClientRejected",
    "ConsentClient",
    "ConsentError",
    "ConsentRevoked",
    "ConsentStatus",
    "Event",
    "GrantRejected",
    "IDTokenError",
    "InvalidTransition",
    "KeyRing",
    "NotProvisioned",
    "ProviderError",
    "ProviderResponseError",
    "ProviderRevocation",
    "ProviderUnavailable",
    "Settings",
    "SettingsError",
    "State",
    "StoreError",
    "Transition",
    "UnknownKeyError",
    "VaultError",
    "WorkerUnavailable",
    "api_routes",
    "consent_routes",
    "create_app",
    "generate_key",
    "mermaid",
    "ops_routes",
]
