"""Several providers per deployment: connections keyed (user, provider), against two real
providers (two issuers, two clients) and a real Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Stack, make_settings, providers_env
from local_provider import LocalProvider, approve

from consent_flow import ConsentRevoked, State, UnknownProvider, VaultError
from consent_flow.store.vault import open_tokens

pytestmark = pytest.mark.integration


@pytest.fixture
async def two(
    make_stack: Any, env: dict[str, str], two_providers: dict[str, LocalProvider], tmp_path: Path
) -> Stack:
    """A worker and callback server serving nextcloud and github from one providers file."""
    settings = make_settings(providers_env(env, two_providers, tmp_path))
    stack: Stack = await make_stack(base=settings)
    return stack


async def provision_at(stack: Stack, provider: str, user: str = "alice") -> None:
    status = await stack.client.request_provisioning(user, provider)
    assert status.provider == provider and status.authorization_url
    response = await stack.callback(await approve(status.authorization_url, user))
    assert response.status_code == 200, response.text


async def snapshot(stack: Stack) -> dict[str, Any]:
    """Every key of the deployment with its value (a change anywhere shows)."""
    redis = stack.client.pool
    out: dict[str, Any] = {}
    async for key in redis.scan_iter(match=f"{stack.settings.redis_prefix}:*"):
        kind = (await redis.type(key)).decode()
        if kind == "string":
            out[key] = await redis.get(key)
        elif kind == "hash":
            out[key] = await redis.hgetall(key)
        elif kind == "zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            out[key] = await redis.lrange(key, 0, -1)
        else:
            out[key] = kind
    return out


async def test_alice_at_both_providers_then_revoked_at_one_keeps_the_other(
    two: Stack, two_providers: dict[str, LocalProvider]
) -> None:
    client = two.client
    assert client.providers == ("nextcloud", "github")
    await provision_at(two, "nextcloud")
    await provision_at(two, "github")
    statuses = await client.connections("alice")
    assert [(s.provider, s.state) for s in statuses] == [
        ("nextcloud", State.PROVISIONED),
        ("github", State.PROVISIONED),
    ]
    tokens = {p: await client.access_token("alice", p) for p in client.providers}
    assert tokens["nextcloud"] != tokens["github"]
    for name, op in two_providers.items():
        # Each connection's token was issued by its own provider, to its own client.
        assert op.introspect(tokens[name])["active"] is True
        assert op.introspect(tokens["github" if name == "nextcloud" else "nextcloud"]) == {
            "active": False
        }

    nextcloud = client.store_for("nextcloud")
    kept = {
        key: await nextcloud.redis.get(key)
        for key in (nextcloud.keys.sealed("alice", "tok"), nextcloud.keys.rec("alice"))
        if await nextcloud.redis.type(key) == b"string"
    }
    kept_record = await nextcloud.redis.hgetall(nextcloud.keys.rec("alice"))
    status = await client.revoke("alice", "github", reason="done with github")
    assert (status.provider, status.state) == ("github", State.REVOKED)
    assert (await client.status("alice", "github")).state is State.REVOKED
    with pytest.raises(ConsentRevoked):
        await client.access_token("alice", "github")
    assert two_providers["github"].introspect(tokens["github"])["active"] is False

    # The nextcloud connection: untouched keys, its token still served and live.
    assert (await client.status("alice", "nextcloud")).state is State.PROVISIONED
    assert await nextcloud.redis.hgetall(nextcloud.keys.rec("alice")) == kept_record
    for key, value in kept.items():
        assert await nextcloud.redis.get(key) == value
    assert await client.access_token("alice", "nextcloud") == tokens["nextcloud"]
    assert two_providers["nextcloud"].introspect(tokens["nextcloud"])["active"] is True
    assert [e["to"] for e in await client.history("alice", "nextcloud")] == [
        "pending",
        "provisioned",
    ]
    assert [e["to"] for e in await client.history("alice", "github")][-1] == "revoked"


async def test_each_connection_has_its_own_keys_and_seal(two: Stack) -> None:
    await provision_at(two, "nextcloud")
    await provision_at(two, "github")
    prefix = two.settings.redis_prefix
    redis = two.client.pool
    for provider in ("nextcloud", "github"):
        assert await redis.exists(f"{prefix}:{{alice}}:{provider}:rec")
        assert await redis.exists(f"{prefix}:{{alice}}:{provider}:tok")
        assert await redis.zscore(f"{prefix}:{provider}:idx:provisioned", "alice") is not None
        assert await redis.zscore(f"{prefix}:{provider}:sched", "alice") is not None
    # A ciphertext is bound to its provider: github's tokens do not open as nextcloud's.
    sealed = await redis.get(f"{prefix}:{{alice}}:github:tok")
    assert open_tokens(two.client.ring_for("github"), "alice", sealed)["access_token"]
    with pytest.raises(VaultError):
        open_tokens(two.client.ring_for("nextcloud"), "alice", sealed)


async def test_an_unknown_provider_or_none_among_two_changes_nothing(two: Stack) -> None:
    client = two.client
    await provision_at(two, "nextcloud")
    before = await snapshot(two)
    for call in (
        lambda p: client.request_provisioning("alice", p),
        lambda p: client.status("alice", p),
        lambda p: client.revoke("alice", p),
        lambda p: client.history("alice", p),
        lambda p: client.access_token("alice", p),
    ):
        with pytest.raises(UnknownProvider, match="configured: nextcloud, github"):
            await call("gitlab")
        with pytest.raises(UnknownProvider, match="name one of nextcloud, github"):
            await call(None)
    assert await snapshot(two) == before
