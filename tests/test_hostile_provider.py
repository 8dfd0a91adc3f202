"""A misbehaving or hostile provider never gets a user provisioned (OpenID RP certification style).

Each case arms the local provider to tamper with the next ID token it issues; the round trip
must end in ``unprovisioned`` with a reason, and the tokens obtained must be revoked at once.
"""

from __future__ import annotations

import pytest
from local_provider import approve

from consent_flow import State

pytestmark = pytest.mark.integration

TAMPERING = [
    ("bad_signature", "signature"),
    ("alg_none", "alg"),
    ("other_key", ""),
    ("wrong_issuer", "issuer"),
    ("wrong_audience", "audience"),
    ("wrong_azp", ""),
    ("wrong_nonce", "nonce"),
    ("no_nonce", "nonce"),
    ("expired", ""),
    ("iat_future", ""),
    ("no_sub", "sub"),
]


@pytest.mark.parametrize(("mode", "mentions"), TAMPERING)
async def test_tampered_id_token_is_refused(stack, mode, mentions):
    status = await stack.client.request_provisioning("alice")
    callback = await approve(status.authorization_url, "alice")
    stack.provider.fault(id_token=mode, count=1)
    revoked_before = stack.provider.stats()["grants_revoked"]
    try:
        response = await stack.callback(callback)
    finally:
        stack.provider.clear_faults()
    assert response.status_code == 403
    status = await stack.client.status("alice")
    assert status.state is State.UNPROVISIONED
    assert status.reason
    assert mentions.lower() in status.reason.lower()
    assert (await stack.client.store.load("alice")).tokens is None
    # The grant the provider issued alongside the bad ID token is revoked at once.
    assert stack.provider.stats()["grants_revoked"] > revoked_before


async def test_signed_in_as_someone_else_does_not_complete_alices_consent(stack):
    status = await stack.client.request_provisioning("alice")
    callback = await approve(status.authorization_url, "mallory")
    revoked_before = stack.provider.stats()["grants_revoked"]
    response = await stack.callback(callback)
    assert response.status_code == 403
    status = await stack.client.status("alice")
    assert status.state is State.UNPROVISIONED
    assert "subject" in status.reason
    assert "mallory" not in status.reason
    assert stack.provider.stats()["grants_revoked"] > revoked_before
    assert (await stack.client.status("mallory")).state is State.UNPROVISIONED


async def test_subject_match_off_lets_deployment_user_ids_differ(make_stack):
    stack = await make_stack(subject_match=False)
    status = await stack.client.request_provisioning("user-42")
    callback = await approve(status.authorization_url, "alice")
    response = await stack.callback(callback)
    assert response.status_code == 200
    status = await stack.client.status("user-42")
    assert status.state is State.PROVISIONED
    assert status.details["subject"] == "alice"


async def test_provider_down_during_code_exchange_fails_cleanly(stack):
    status = await stack.client.request_provisioning("alice")
    callback = await approve(status.authorization_url, "alice")
    stack.provider.fault(token_status=503, count=1)
    try:
        response = await stack.callback(callback)
    finally:
        stack.provider.clear_faults()
    assert response.status_code == 403
    status = await stack.client.status("alice")
    assert status.state is State.UNPROVISIONED
    assert "unavailable" in status.reason
