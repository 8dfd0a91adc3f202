"""Providers that do not behave like the local default: against the real local provider, started
with the knob each case needs, a real Redis and a real worker.

A refresh token that lapses long before its access token (``refresh_expires_in``), no revocation
endpoint, an outbox whose provider never answers, ``error_description`` on a dead grant, an outage
met by a tool calling in a loop, and client-level errors other than ``invalid_client``.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from conftest import provider_clients, provision, stored_tokens
from local_provider import LocalProvider
from structlog.testing import capture_logs

from consent_flow import ProviderUnavailable, State
from consent_flow.engine.refresh import RetryPolicy
from consent_flow.mcp import ConsentResult
from consent_flow.store.metrics import read_snapshot

pytestmark = pytest.mark.integration

TOKEN_TTL = 4  # seconds an access token lives at the short-lived provider
# Seconds a refresh token lives where it lapses first: refreshed half-way, so every 5 s or so;
# the test watches for two and a half lives (several refresh tokens, each used before it lapses).
REFRESH_TTL = 10
FAST = {
    "retry": RetryPolicy(base=0.2, cap=2.0, halt_retry=1.0, halt_probe=1.0),
    "sweep_every": 1,
    "cleanup_every": 1,
}


@pytest.fixture(scope="module")
def short_lived(redirect_uri):
    """Access tokens that live seconds; refresh tokens that do not rotate."""
    with LocalProvider.start(
        clients=provider_clients(redirect_uri),
        access_token_ttl=TOKEN_TTL,
        rotate_refresh_token=False,
    ) as op:
        yield op


@pytest.fixture
def quirky(short_lived):
    short_lived.clear_faults()
    yield short_lived
    short_lived.clear_faults()


async def wait_for(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def _at(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# --- refresh_expires_in --------------------------------------------------------------------


async def test_a_refresh_token_that_lapses_first_is_refreshed_before_it_lapses(
    make_stack, redirect_uri
):
    """Refresh tokens live 10 s, access tokens an hour: the grant outlives many refresh tokens."""
    with LocalProvider.start(
        clients=provider_clients(redirect_uri),
        access_token_ttl=3600,
        refresh_token_ttl=REFRESH_TTL,
        refresh_expires_in=True,
        rotate_refresh_token=True,
    ) as op:
        stack = await make_stack(op=op, worker_options=FAST)
        await provision(stack, "alice")
        deadline = time.monotonic() + 2.5 * REFRESH_TTL
        while time.monotonic() < deadline:
            assert (await stack.client.status("alice")).state is State.PROVISIONED
            await asyncio.sleep(1.0)
        # Well past the first refresh token's life: the stored one is alive at the provider,
        # and it is a rotated one, not the first.
        tokens = await stored_tokens(stack, "alice")
        assert op.introspect(tokens["refresh_token"])["active"] is True
        stats = op.stats()
        assert stats["refresh_success"] >= 3
        # One refresh error only: the worker's start-up check of the client's credentials,
        # which presents a made-up refresh token on purpose.
        assert stats["refresh_errors"] == 1
        status = await stack.client.status("alice")
        assert status.state is State.PROVISIONED
        # Both lapses in the status; scheduled by the sooner, with the usual margin (half the
        # refresh token's life here).
        now = time.time()
        assert now < _at(status.details["refresh_token_expires_at"]) <= now + REFRESH_TTL
        assert now + 3500 < _at(status.details["access_token_expires_at"])
        assert _at(status.details["next_refresh_at"]) <= _at(
            status.details["refresh_token_expires_at"]
        )
        # The operator's page shows both lapses.
        async with httpx.AsyncClient() as http:
            page = await http.get(f"http://127.0.0.1:{stack.settings.http_port}/ops/users/alice")
        assert page.status_code == 200
        assert 'id="status-refresh_token_expires_at"' in page.text
        assert 'id="status-access_token_expires_at"' in page.text


# --- no revocation endpoint ----------------------------------------------------------------


async def test_a_provider_without_revocation_endpoint_revokes_locally_and_says_so(
    make_stack, redirect_uri
):
    with LocalProvider.start(clients=provider_clients(redirect_uri), no_revocation=True) as op:
        stack = await make_stack(op=op, worker_options=FAST)
        await provision(stack, "alice")
        tokens = await stored_tokens(stack, "alice")
        with capture_logs() as logs:
            answer = await stack.client.revoke("alice", reason="user asked")
        assert answer.state is State.REVOKED
        assert answer.details["provider_revocation"] == "unsupported"
        note = answer.details["provider_revocation_note"]
        assert "cannot revoke" in note
        assert "stays valid there until it lapses" in note
        assert "withdraw it in the provider's account settings" in note
        assert any(e["event"] == "provider_revocation_unsupported" for e in logs)
        # The MCP tool's answer tells the user too.
        assert note in ConsentResult.from_status(answer).message
        store = stack.client.store
        rec = await store.load("alice")
        assert rec.tokens is None and rec.revocation_pending is None
        assert await store.redis.zscore(store.keys.of("alice").outbox, "alice") is None
        assert await store.redis.zscore(store.keys.of("alice").sched, "alice") is None
        # Honest: the grant is still valid at the provider.
        assert op.introspect(tokens["refresh_token"])["active"] is True
        status = await stack.client.status("alice")
        assert status.details["provider_revocation"] == "unsupported"
        assert status.details["provider_revocation_note"] == note
        await asyncio.sleep(2.5)  # cleanup runs every second: nothing is retried
        assert await store.redis.zscore(store.keys.of("alice").outbox, "alice") is None
        snapshot = await read_snapshot(store.redis, store.keys, stack.settings.queue_name)
        assert snapshot.revocation_outcomes == {"unsupported": 1}


async def test_the_outbox_gives_up_after_a_bounded_number_of_attempts(
    make_stack, redirect_uri, monkeypatch
):
    import consent_flow.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "OUTBOX_MAX_ATTEMPTS", 3, raising=False)
    monkeypatch.setattr(engine_module, "OUTBOX_RETRY_BASE", 0.2)
    op = LocalProvider.start(clients=provider_clients(redirect_uri))
    try:
        stack = await make_stack(op=op, worker_options=FAST)
        await provision(stack, "alice")
    finally:
        op.stop()  # the provider is gone for good: every revocation attempt fails
    store = stack.client.store
    with capture_logs() as logs:
        answer = await stack.client.revoke("alice")
        assert answer.details["provider_revocation"] == "deferred"
        assert (await stack.client.status("alice")).details["provider_revocation"] == "deferred"

        async def abandoned():
            status = await stack.client.status("alice")
            return status if status.details.get("provider_revocation") == "abandoned" else None

        status = await wait_for(abandoned, timeout=15)
    assert (
        "withdraw it in the provider's account settings"
        in (status.details["provider_revocation_note"])
    )
    assert [e["attempts"] for e in logs if e["event"] == "provider_revocation_abandoned"] == [3]
    rec = await store.load("alice")
    assert rec.revocation_pending is None
    assert await store.redis.zscore(store.keys.of("alice").outbox, "alice") is None
    assert await store.redis.hget(store.keys.rec("alice"), "rvktries") is None
    snapshot = await read_snapshot(store.redis, store.keys, stack.settings.queue_name)
    assert snapshot.revocations_abandoned == 1
    assert snapshot.public()["revocations_abandoned"] == 1
    async with httpx.AsyncClient() as http:
        metrics = await http.get(f"http://127.0.0.1:{stack.settings.http_port}/metrics")
    assert 'consent_flow_provider_revocations_total{outcome="abandoned"} 1.0' in metrics.text


# --- error_description in refresh_rejected -------------------------------------------------


async def test_a_rejected_refresh_keeps_the_providers_description(make_stack, quirky):
    stack = await make_stack(op=quirky, refresh_margin=2, worker_options=FAST)
    reasons = {}
    for user, description in (
        ("alice", "consent withdrawn by the user"),
        ("bob", "refresh token expired; see abcdef0123456789abcdef0123456789"),
    ):
        await provision(stack, user)
        quirky.fault(
            token_status=400, token_error="invalid_grant", token_error_description=description
        )

        async def revoked(user=user):
            status = await stack.client.status(user)
            return status if status.state is State.REVOKED else None

        status = await wait_for(revoked, timeout=4 * TOKEN_TTL)
        reasons[user] = status.reason
        [last] = (await stack.client.history(user))[-1:]
        assert last["event"] == "refresh_rejected"
        assert last["reason"] == status.reason
    assert reasons["alice"] == (
        "refresh token rejected by provider: invalid_grant (consent withdrawn by the user)"
    )
    assert reasons["bob"].startswith(
        "refresh token rejected by provider: invalid_grant (refresh token expired; see "
    )
    assert "abcdef0123456789" not in reasons["bob"]  # token-shaped: redacted
    assert "[redacted]" in reasons["bob"]


# --- a tool calling in a loop during an outage ---------------------------------------------


async def test_on_demand_refreshes_after_a_failure_wait_for_the_retry(make_stack, quirky):
    # Scheduled retries back off from 1.5-3 s: during the loop below, at most a couple of them.
    slow_retry = RetryPolicy(base=3.0, cap=10.0, halt_retry=1.0, halt_probe=1.0)
    stack = await make_stack(
        op=quirky, refresh_margin=2, worker_options={**FAST, "retry": slow_retry}
    )
    await provision(stack, "alice")
    quirky.fault(token_status=503, count=1000)
    await stack.client.access_token("alice", min_ttl=0)
    # Wait until the stored token is too short for the tool, and a refresh has failed.

    async def failing():
        rec = await stack.client.store.load("alice")
        return rec.refresh_failures >= 1 and rec.expires_at - time.time() < TOKEN_TTL - 1

    await wait_for(failing, timeout=3 * TOKEN_TTL)
    before = quirky.stats()["token_requests"]
    errors = []
    started = time.monotonic()
    while time.monotonic() - started < 3.0:
        with pytest.raises(ProviderUnavailable) as info:
            await stack.client.access_token("alice", min_ttl=TOKEN_TTL - 0.5)
        errors.append(str(info.value))
        await asyncio.sleep(0.05)
    calls = quirky.stats()["token_requests"] - before
    assert len(errors) >= 20
    # The scheduled retries only (one or two in 3 s), never one per call.
    assert calls <= 3, f"{calls} token requests for {len(errors)} on-demand calls"
    assert any("the provider is tried again at" in e for e in errors)
    assert all("503" in e or "unavailable" in e for e in errors)
    assert (await stack.client.status("alice")).state is State.PROVISIONED


# --- failing_since -------------------------------------------------------------------------


async def test_status_shows_since_when_refreshes_have_been_failing(make_stack, quirky):
    stack = await make_stack(op=quirky, refresh_margin=2, worker_options=FAST)
    await provision(stack, "alice")
    armed_at = time.time()
    quirky.fault(token_status=503, count=4)

    async def failed_twice():
        status = await stack.client.status("alice")
        return status if (status.details.get("refresh_failures") or 0) >= 2 else None

    status = await wait_for(failed_twice, timeout=4 * TOKEN_TTL)
    first = _at(status.details["failing_since"])
    assert armed_at <= first < time.time()
    # Later failures of the same run leave it where the run began.
    later = await wait_for(
        lambda: _status_if(stack, lambda s: (s.details.get("refresh_failures") or 0) >= 3),
        timeout=4 * TOKEN_TTL,
    )
    assert _at(later.details["failing_since"]) == pytest.approx(first, abs=0.002)
    recovered = await wait_for(
        lambda: _status_if(stack, lambda s: s.details.get("refresh_failures") == 0),
        timeout=4 * TOKEN_TTL,
    )
    assert recovered.details["failing_since"] is None
    assert recovered.state is State.PROVISIONED


async def _status_if(stack, predicate):
    status = await stack.client.status("alice")
    return status if predicate(status) else None


# --- client-level errors -------------------------------------------------------------------


@pytest.mark.parametrize("error", ["expired_client", "unauthorized_client"])
async def test_client_level_errors_pause_everyone_and_revoke_no_one(make_stack, quirky, error):
    stack = await make_stack(op=quirky, refresh_margin=2, worker_options=FAST)
    await provision(stack, "alice")
    await provision(stack, "bob")
    quirky.fault(token_status=400, token_error=error, count=1000)
    store = stack.client.store
    await wait_for(lambda: store.redis.exists(store.keys.halt), timeout=3 * TOKEN_TTL)
    async with httpx.AsyncClient() as http:
        health = await http.get(f"http://127.0.0.1:{stack.settings.http_port}/healthz")
    assert health.status_code == 503
    assert error in health.text and "invalid_client" in health.text
    await asyncio.sleep(TOKEN_TTL)
    for user in ("alice", "bob"):
        status = await stack.client.status(user)
        assert status.state is State.PROVISIONED
        assert all(h["event"] != "refresh_rejected" for h in await stack.client.history(user))
    snapshot = await read_snapshot(store.redis, store.keys, stack.settings.queue_name)
    assert snapshot.refresh_outcomes.get("client_rejected", 0) >= 1
    assert snapshot.refresh_outcomes.get("transient_failure", 0) == 0
    # The provider takes the client again: a probe lifts the pause.
    quirky.clear_faults()
    await wait_for(
        lambda: _not(store.redis.exists(store.keys.halt)),
        timeout=4 * TOKEN_TTL,
    )


async def _not(awaitable):
    return not await awaitable
