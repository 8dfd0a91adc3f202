"""Fixtures of the OIDC unit tests: a fake provider, a settable clock, and a client on both
HTTP modes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from consent_flow.oidc import HttpClients, OAuthClient

from .fakes import NOW, SETTINGS, Clock, FakeProvider


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture(params=["shared", "lent"])
async def http(
    request: pytest.FixtureRequest, provider: FakeProvider
) -> AsyncIterator[httpx.AsyncClient | HttpClients]:
    """Every test twice: one shared client (callers, the server) and clients lent per request
    (workers)."""
    transport = httpx.MockTransport(provider)
    if request.param == "shared":
        async with httpx.AsyncClient(transport=transport, timeout=5.0) as client:
            yield client
    else:
        clients = HttpClients(transport=transport, timeout=5.0)
        try:
            yield clients
        finally:
            await clients.aclose()


@pytest.fixture
def make_client(http: httpx.AsyncClient | HttpClients, clock: Clock) -> Callable[..., OAuthClient]:
    def make(**changes: Any) -> OAuthClient:
        return OAuthClient(SETTINGS.with_changes(**changes), http, clock=clock)

    return make


@pytest.fixture
def client(make_client: Callable[..., OAuthClient]) -> OAuthClient:
    return make_client()
