"""The public surface is pinned: it grows only on purpose."""

from __future__ import annotations

import types

import consent_flow

PUBLIC = [
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


def test_all_is_pinned():
    assert sorted(consent_flow.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(consent_flow, name) is not None


def test_every_error_derives_from_one_base_and_has_a_stable_code():
    errors = [
        getattr(consent_flow, n)
        for n in PUBLIC
        if n.endswith(("Error", "Rejected", "Unavailable", "Revoked", "Transition", "Provisioned"))
        and n != "Transition"
    ]
    assert len(errors) >= 14
    codes = set()
    for error in errors:
        assert issubclass(error, consent_flow.ConsentError)
        codes.add(error.code)
    assert len(codes) == len(errors)


def test_the_modules_under_the_package_are_its_layers_and_nothing_else_leaks():
    """The stable API is ``__all__`` and ``consent_flow.mcp``; the submodules an import makes
    visible are the layers that the package's docstring names as internal."""
    layers = {"core", "oidc", "store", "queue", "engine", "web"}
    modules = {"client", "cli", "importer", "settings", "errors", "logging", "mcp"}
    for name in dir(consent_flow):
        module = getattr(consent_flow, name)
        if isinstance(module, types.ModuleType) and name not in PUBLIC:
            assert name in layers | modules, name
    assert "internal" in (consent_flow.__doc__ or "")
