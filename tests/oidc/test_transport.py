"""The provider transport: default timeouts, bounded reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from consent_flow.errors import (
    ProviderResponseError,
)
from consent_flow.oidc import (
    HttpClients,
    OAuthClient,
)
from consent_flow.oidc.transport import MAX_RESPONSE_BYTES

from .fakes import (
    CODE,
    REFRESH,
    SETTINGS,
    VERIFIER,
    Clock,
    FakeProvider,
    expect,
)


async def test_unbounded_client_timeouts_get_a_default(
    provider: FakeProvider, clock: Clock
) -> None:
    unbounded = httpx.Timeout(None)
    transport = httpx.MockTransport(provider)
    async with httpx.AsyncClient(transport=transport, timeout=unbounded) as http:
        await OAuthClient(SETTINGS, http, clock=clock).exchange_code(CODE, code_verifier=VERIFIER)
    timeout = provider.requests["/token"][0].extensions["timeout"]
    assert all(isinstance(v, float) and v > 0 for v in timeout.values())


async def test_oversize_body_is_not_read_in_full(
    client: OAuthClient, provider: FakeProvider
) -> None:
    consumed = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal consumed
        for _ in range(1000):
            consumed += 1
            yield b"x" * 65536

    provider.token = lambda r: httpx.Response(200, content=body())
    await expect(ProviderResponseError, client.refresh(REFRESH), match="larger than")
    assert consumed <= MAX_RESPONSE_BYTES // 65536 + 2


# --- HttpClients ---------------------------------------------------------------------------------


def echo(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, text=request.url.path)


async def test_concurrent_requests_get_clients_of_their_own_and_idle_ones_are_reused():
    clients = HttpClients(transport=httpx.MockTransport(echo), timeout=3.0)
    release, all_lent = asyncio.Event(), asyncio.Event()
    lent: list[httpx.AsyncClient] = []

    async def call() -> None:
        async with clients.lease() as client:
            lent.append(client)
            if len(lent) == 5:
                all_lent.set()
            await release.wait()
            assert (await client.get("http://provider.test/x")).text == "/x"

    tasks = [asyncio.create_task(call()) for _ in range(5)]
    await asyncio.wait_for(all_lent.wait(), 5)
    assert len({id(c) for c in lent}) == 5  # no two concurrent requests share a client
    release.set()
    await asyncio.gather(*tasks)
    assert clients.idle == 5
    async with clients.lease() as again:
        assert again in lent  # an idle client (and its kept-alive connection) is used again
        assert again.timeout == httpx.Timeout(3.0)
        assert again.follow_redirects is False
    await clients.aclose()
    assert clients.idle == 0
    assert all(c.is_closed for c in lent)


async def test_at_most_max_idle_are_kept_and_closing_reaches_lent_clients():
    clients = HttpClients(transport=httpx.MockTransport(echo), timeout=3.0, max_idle=2)
    async with clients.lease() as a, clients.lease() as b, clients.lease() as c:
        pass
    assert clients.idle == 2
    assert sum(x.is_closed for x in (a, b, c)) == 1
    async with clients.lease() as lent:
        await clients.aclose()  # while one is lent out
        assert not lent.is_closed
    assert lent.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        async with clients.lease():
            pass
