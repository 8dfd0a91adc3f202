"""Bad callbacks get a 4xx page, a log line without secrets, and change nothing for anyone."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from local_provider import approve
from structlog.testing import capture_logs

from consent_flow import State

pytestmark = pytest.mark.integration


def with_params(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    for name, value in changes.items():
        if value is None:
            query.pop(name, None)
        else:
            query[name] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


async def snapshot(stack, *users: str):
    out = []
    for user in users:
        rec = await stack.client.store.load(user)
        out.append((rec.state, rec.version, rec.session_id, len(await stack.client.history(user))))
    return out


@pytest.fixture
async def pending(stack):
    """alice pending, with an approved callback URL in hand; bob provisioned beside her."""
    from conftest import provision

    await provision(stack, "bob")
    status = await stack.client.request_provisioning("alice")
    callback = await approve(status.authorization_url, "alice")
    return callback


async def expect_rejected(stack, url: str, status: int, text: str) -> httpx.Response:
    before = await snapshot(stack, "alice", "bob")
    exchanges = stack.provider.stats()["code_exchanges"]
    with capture_logs() as logs:
        response = await stack.callback(url)
    assert response.status_code == status, response.text
    assert text in response.text
    assert await snapshot(stack, "alice", "bob") == before
    assert stack.provider.stats()["code_exchanges"] == exchanges
    rejected = [entry for entry in logs if entry["event"] == "callback_rejected"]
    assert rejected, logs
    code = parse_qs(urlsplit(url).query).get("code", [""])[0]
    state = parse_qs(urlsplit(url).query).get("state", [""])[0]
    for entry in logs:
        flat = repr(entry)
        assert not code or code not in flat
        assert not state or state not in flat
    return response


async def test_missing_state(stack, pending):
    await expect_rejected(stack, with_params(pending, state=None), 400, "no state")


async def test_unknown_state(stack, pending):
    await expect_rejected(stack, with_params(pending, state="x" * 43), 400, "unknown or expired")


async def test_foreign_issuer(stack, pending):
    await expect_rejected(
        stack, with_params(pending, iss="https://evil.example.com"), 400, "issuer"
    )


async def test_missing_issuer_when_the_provider_sends_one(stack, pending):
    assert stack.provider.metadata["authorization_response_iss_parameter_supported"] is True
    await expect_rejected(stack, with_params(pending, iss=None), 400, "iss parameter")


async def test_missing_code(stack, pending):
    await expect_rejected(stack, with_params(pending, code=None), 400, "no code")


async def test_absurdly_long_parameter(stack, pending):
    await expect_rejected(stack, with_params(pending, code="c" * 5000), 414, "too long")
    await expect_rejected(stack, with_params(pending, junk="j" * 9000), 414, "too large")


async def test_duplicated_parameter(stack, pending):
    await expect_rejected(stack, pending + "&code=another", 400, "more than once")


async def test_malformed_error_code(stack, pending):
    await expect_rejected(
        stack, with_params(pending, code=None, error='bad"quote'), 400, "malformed"
    )


async def test_expired_session(stack, pending):
    # The session's expiry passes while the user is still at the provider.
    user_key = stack.client.store.keys.rec("alice")
    await stack.client.pool.hset(user_key, "sexp", "1")
    await expect_rejected(stack, pending, 400, "expired")


async def test_replayed_callback_gets_409_and_no_second_code_exchange(stack, pending):
    first = await stack.callback(pending)
    assert first.status_code == 200
    assert (await stack.client.status("alice")).state is State.PROVISIONED
    await expect_rejected(stack, pending, 400, "unknown or expired")


async def test_replay_racing_the_first_callback_is_refused(stack, pending):
    import asyncio

    exchanges = stack.provider.stats()["code_exchanges"]
    first, second = await asyncio.gather(stack.callback(pending), stack.callback(pending))
    codes = sorted([first.status_code, second.status_code])
    assert codes == [200, 409]
    assert stack.provider.stats()["code_exchanges"] == exchanges + 1
    assert (await stack.client.status("alice")).state is State.PROVISIONED


async def test_pages_do_not_echo_the_code_or_state(stack, pending):
    query = parse_qs(urlsplit(pending).query)
    response = await stack.callback(pending)
    assert query["code"][0] not in response.text
    assert query["state"][0] not in response.text
    assert response.headers["content-security-policy"].startswith("default-src 'none'")
