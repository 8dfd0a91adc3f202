"""The provisioning round trip on the real Redis, the real worker and the real provider."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from local_provider import approve

from consent_flow import State

pytestmark = pytest.mark.integration


async def test_provision_approve_revoke(stack):
    client = stack.client
    status = await client.request_provisioning("alice")
    assert status.state is State.PENDING
    url = status.authorization_url
    assert url
    query = parse_qs(urlsplit(url).query)
    assert query["response_type"] == ["code"]
    assert query["code_challenge_method"] == ["S256"]
    assert query["prompt"] == ["consent"]

    callback = await approve(url, "alice")
    response = await stack.callback(callback)
    assert response.status_code == 200, response.text
    assert "Access granted" in response.text

    status = await client.status("alice")
    assert status.state is State.PROVISIONED
    token = await client.access_token("alice")
    assert token

    status = await client.revoke("alice")
    assert status.state is State.REVOKED
    history = await client.history("alice")
    assert [h["event"] for h in history] == [
        "provision_requested", "authorization_completed", "revoke_requested",
    ]
