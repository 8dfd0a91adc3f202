"""consent-flow: progressive consent for MCP servers.

Each user's delegated, revocable offline access to a downstream API lives in an explicit state
machine (unprovisioned, pending, provisioned, revoked) driven by events through an arq queue.

The stable API is what this module exports (``__all__``) and ``consent_flow.mcp``. The folders
(``core``, ``oidc``, ``store``, ``queue``, ``engine``, ``web``) are the layers of the design and
internal: their modules may change between releases.
"""

from consent_flow.client import ConsentClient, ConsentStatus
from consent_flow.core.records import ProviderRevocation
from consent_flow.core.table import TRANSITIONS, Event, State, Transition, mermaid
from consent_flow.errors import (
    CallbackRejected,
    ClientRejected,
    ConsentError,
    ConsentRevoked,
    GrantRejected,
    IDTokenError,
    InvalidScope,
    InvalidTransition,
    NotProvisioned,
    ProviderError,
    ProviderResponseError,
    ProviderUnavailable,
    SettingsError,
    StoreError,
    UnknownKeyError,
    UnknownProvider,
    VaultError,
    WorkerUnavailable,
)
from consent_flow.settings import ProviderConfig, Settings
from consent_flow.store.vault import KeyRing, generate_key
from consent_flow.web.api import api_routes
from consent_flow.web.callback import consent_routes, create_app
from consent_flow.web.ops import ops_routes

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
    "InvalidScope",
    "InvalidTransition",
    "KeyRing",
    "NotProvisioned",
    "ProviderConfig",
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
    "UnknownProvider",
    "VaultError",
    "WorkerUnavailable",
    "api_routes",
    "consent_routes",
    "create_app",
    "generate_key",
    "mermaid",
    "ops_routes",
]
