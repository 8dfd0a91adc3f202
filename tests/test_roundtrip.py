"""The provisioning round trip on the real Redis, the real worker and the real provider."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import CLIENT_ID, provision, stored_tokens
from local_provider import approve

from consent_flow import State

pytestmark = pytest.mark.integration


async def test_provision_request_builds_the_authorization_url_from_discovery(stack):
    status = await stack.client.request_provisioning("alice")
    assert status.state is State.PENDING
    assert status.since is not None
    url = urlsplit(status.authorization_url)
    endpoint = urlsplit(stack.provider.metadata["authorization_endpoint"])
    assert (url.scheme, url.netloc, url.path) == (endpoint.scheme, endpoint.netloc, endpoint.path)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert query["response_type"] == "code"
    assert query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == stack.settings.redirect_uri
    assert query["scope"] == "openid offline_access profile notes:read"
    assert query["code_challenge_method"] == "S256"
    assert len(query["code_challenge"]) == 43
    assert len(query["state"]) >= 22  # >= 128 bits of base64url
    assert query["nonce"]
    assert query["prompt"] == "consent"
    assert "resource" not in query


async def test_a_second_request_while_pending_returns_the_same_session(stack):
    first = await stack.client.request_provisioning("alice")
    second = await stack.client.request_provisioning("alice")
    assert second.state is State.PENDING
    assert second.authorization_url == first.authorization_url
    assert len(await stack.client.history("alice")) == 1


async def test_each_new_session_has_a_fresh_state(stack):
    states = set()
    for user in ("u1", "u2", "u3"):
        status = await stack.client.request_provisioning(user)
        states.add(parse_qs(urlsplit(status.authorization_url).query)["state"][0])
    assert len(states) == 3


async def test_approval_provisions_with_subject_and_scopes(stack):
    response = await provision(stack, "alice")
    assert response.status_code == 200
    assert "Access granted" in response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    status = await stack.client.status("alice")
    assert status.state is State.PROVISIONED
    assert status.details["subject"] == "alice"
    assert set(status.scopes) == {"openid", "offline_access", "profile", "notes:read"}
    tokens = await stored_tokens(stack, "alice")
    assert stack.provider.introspect(tokens["refresh_token"])["active"] is True


async def test_a_provisioned_user_asking_again_is_told_so(stack):
    await provision(stack, "alice")
    status = await stack.client.request_provisioning("alice")
    assert status.state is State.PROVISIONED
    assert status.details.get("already") is True
    assert status.authorization_url is None


async def test_denial_goes_back_to_unprovisioned_with_the_reason(stack):
    status = await stack.client.request_provisioning("alice")
    callback = await approve(status.authorization_url, "alice", deny=True)
    response = await stack.callback(callback)
    assert response.status_code == 403
    assert "denied" in response.text.lower()
    status = await stack.client.status("alice")
    assert status.state is State.UNPROVISIONED
    assert status.reason.startswith("access_denied")
    [_, failed] = await stack.client.history("alice")
    assert (failed["event"], failed["from"], failed["to"]) == (
        "authorization_failed",
        "pending",
        "unprovisioned",
    )


async def test_revoke_revokes_at_the_provider_and_wipes_tokens(stack):
    await provision(stack, "alice")
    tokens = await stored_tokens(stack, "alice")
    status = await stack.client.revoke("alice", reason="user asked")
    assert status.state is State.REVOKED
    assert status.reason == "user asked"
    assert stack.provider.introspect(tokens["refresh_token"])["active"] is False
    assert stack.provider.introspect(tokens["access_token"])["active"] is False
    rec = await stack.client.store.load("alice")
    assert rec.tokens is None and rec.revocation_pending is None
    assert (
        await stack.client.pool.zscore(stack.client.store.keys.of("alice").sched, "alice") is None
    )
    history = await stack.client.history("alice")
    assert [(h["event"], h["from"], h["to"]) for h in history] == [
        ("provision_requested", "unprovisioned", "pending"),
        ("authorization_completed", "pending", "provisioned"),
        ("revoke_requested", "provisioned", "revoked"),
    ]
    assert all(h["at"] and h["actor"] for h in history)


async def test_after_revoke_a_new_provision_starts_over(stack):
    await provision(stack, "alice")
    await stack.client.revoke("alice")
    response = await provision(stack, "alice")
    assert response.status_code == 200
    assert (await stack.client.status("alice")).state is State.PROVISIONED


async def test_revoking_a_pending_session_ends_it(stack):
    status = await stack.client.request_provisioning("alice")
    revoked = await stack.client.revoke("alice")
    assert revoked.state is State.REVOKED
    callback = await approve(status.authorization_url, "alice")
    response = await stack.callback(callback)
    assert response.status_code == 400
    assert (await stack.client.status("alice")).state is State.REVOKED


async def test_revoke_is_idempotent_for_unprovisioned_and_revoked(stack):
    status = await stack.client.revoke("nobody")
    assert status.state is State.UNPROVISIONED
    assert await stack.client.history("nobody") == []
    await provision(stack, "alice")
    await stack.client.revoke("alice")
    again = await stack.client.revoke("alice")
    assert again.state is State.REVOKED
    assert len(await stack.client.history("alice")) == 3


async def test_no_offline_access_is_not_provisioned_and_tokens_are_revoked(make_stack):
    stack = await make_stack(scopes=("openid", "profile"))
    before = stack.provider.stats()
    status = await stack.client.request_provisioning("alice")
    assert "prompt" not in parse_qs(urlsplit(status.authorization_url).query)
    callback = await approve(status.authorization_url, "alice")
    response = await stack.callback(callback)
    assert response.status_code == 403
    status = await stack.client.status("alice")
    assert status.state is State.UNPROVISIONED
    assert status.reason == "provider granted no offline access"
    assert stack.provider.stats()["revocations"] > before["revocations"]


async def test_two_users_provision_concurrently_and_independently(stack):
    responses = await asyncio.gather(*(provision(stack, f"user{i}") for i in range(6)))
    assert all(r.status_code == 200 for r in responses)
    for i in range(6):
        status = await stack.client.status(f"user{i}")
        assert status.state is State.PROVISIONED
        assert status.details["subject"] == f"user{i}"
    listed = await stack.client.store.users(State.PROVISIONED)
    assert {u for u, _ in listed} == {f"user{i}" for i in range(6)}


async def test_resource_indicator_travels_on_every_request(make_stack, provider):
    """RFC 8707: the resource is asked for at the authorization and the token endpoint."""
    stack = await make_stack(resource=provider.resource)
    status = await stack.client.request_provisioning("alice")
    query = parse_qs(urlsplit(status.authorization_url).query)
    assert query["resource"] == [provider.resource]
    callback = await approve(status.authorization_url, "alice")
    response = await stack.callback(callback)
    assert response.status_code == 200, response.text
    tokens = await stored_tokens(stack, "alice")
    introspection = provider.introspect(tokens["access_token"])
    assert introspection["active"] is True
    assert provider.resource in str(introspection.get("aud", ""))
