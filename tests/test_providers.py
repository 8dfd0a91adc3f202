"""Several providers per deployment: connections keyed (user, provider), against two real
providers (two issuers, two clients) and a real Redis."""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Stack, make_settings, providers_env
from local_provider import LocalProvider, approve

from consent_flow import ConsentRevoked, State, UnknownProvider, VaultError
from consent_flow.settings import Secret
from consent_flow.store.vault import open_tokens

pytestmark = pytest.mark.integration

API_KEY = "p" * 8 + "0123456789abcdef0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
async def two(
    make_stack: Any, env: dict[str, str], two_providers: dict[str, LocalProvider], tmp_path: Path
) -> Stack:
    """A worker and callback server serving nextcloud and github from one providers file."""
    settings = make_settings(providers_env(env, two_providers, tmp_path))
    stack: Stack = await make_stack(base=settings, api_keys=(Secret(API_KEY),))
    return stack


async def provision_at(stack: Stack, provider: str, user: str = "alice") -> None:
    status = await stack.client.request_provisioning(user, provider)
    assert status.provider == provider and status.authorization_url
    response = await stack.callback(await approve(status.authorization_url, user))
    assert response.status_code == 200, response.text


async def snapshot(stack: Stack) -> dict[str, Any]:
    """Every key of the deployment with its value (a change anywhere shows), but the queue and
    the workers' heartbeats: the worker's cron jobs and beats come and go on their own."""
    redis = stack.client.pool
    out: dict[str, Any] = {}
    prefix = stack.settings.redis_prefix
    async for key in redis.scan_iter(match=f"{prefix}:*"):
        if key.decode().startswith((stack.settings.queue_name, f"{prefix}:workers")):
            continue
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
    n = two.client.keys.shard_of("alice")  # every provider's connection of alice's
    for provider in ("nextcloud", "github"):
        assert await redis.exists(f"{prefix}:{{s{n}}}:{provider}:u:alice:rec")
        assert await redis.exists(f"{prefix}:{{s{n}}}:{provider}:u:alice:tok")
        idx = f"{prefix}:{{s{n}}}:{provider}:idx:provisioned"
        assert await redis.zscore(idx, "alice") is not None
        assert await redis.zscore(f"{prefix}:{{s{n}}}:{provider}:sched", "alice") is not None
    # A ciphertext is bound to its provider: github's tokens do not open as nextcloud's.
    sealed = await redis.get(f"{prefix}:{{s{n}}}:github:u:alice:tok")
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


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "consent_flow", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def acli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, env, *args)


@pytest.fixture
def two_env(
    two: Stack, env: dict[str, str], two_providers: dict[str, LocalProvider], tmp_path: Path
) -> dict[str, str]:
    """The two-provider stack's environment for the command line (same queue and prefix)."""
    return {
        **os.environ,
        **providers_env(env, two_providers, tmp_path),
        "CONSENT_QUEUE_NAME": two.settings.queue_name,
    }


async def test_the_command_line_per_provider(two: Stack, two_env: dict[str, str]) -> None:
    await provision_at(two, "nextcloud")
    await provision_at(two, "github")
    await provision_at(two, "github", "bob")
    out = await acli(two_env, "revoke", "bob", "--provider", "github", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["provider"] == "github"

    status = json.loads(
        (await acli(two_env, "status", "alice", "--provider", "github", "--json")).stdout
    )
    assert (status["provider"], status["state"]) == ("github", "provisioned")
    rows = json.loads((await acli(two_env, "list", "--json")).stdout)
    assert [(r["user"], r["provider"], r["state"]) for r in rows] == [
        ("alice", "nextcloud", "provisioned"),
        ("alice", "github", "provisioned"),
        ("bob", "github", "revoked"),
    ]
    only = json.loads((await acli(two_env, "list", "--provider", "github", "--json")).stdout)
    assert {r["provider"] for r in only} == {"github"} and len(only) == 2
    stats = json.loads((await acli(two_env, "stats", "--json")).stdout)
    assert stats["states"] == {"unprovisioned": 0, "pending": 0, "provisioned": 2, "revoked": 1}
    assert stats["providers"]["nextcloud"]["states"]["provisioned"] == 1
    assert stats["providers"]["github"]["states"] == {
        "unprovisioned": 0,
        "pending": 0,
        "provisioned": 1,
        "revoked": 1,
    }
    text = (await acli(two_env, "stats")).stdout.splitlines()
    header = next(line.split() for line in text if line.startswith("PROVIDER") and "PAUSED" in line)
    by_name = {
        line.split()[0]: line.split()
        for line in text
        if line.split()[:1] in (["nextcloud"], ["github"])
    }
    provisioned, revoked = header.index("PROVISIONED"), header.index("REVOKED")
    assert (by_name["nextcloud"][provisioned], by_name["nextcloud"][revoked]) == ("1", "0")
    assert (by_name["github"][provisioned], by_name["github"][revoked]) == ("1", "1")
    described = json.loads((await acli(two_env, "providers", "--json")).stdout)
    assert [p["name"] for p in described] == ["nextcloud", "github"]
    for entry in described:
        assert entry["can_revoke"] is True
        assert entry["endpoints"]["token"].startswith(entry["issuer"])
        assert "secret" not in json.dumps(entry).lower().replace("client_secret_basic", "")
    token = json.loads(
        (await acli(two_env, "token", "alice", "--provider", "nextcloud", "--json")).stdout
    )
    assert token["access_token"] == await two.client.access_token("alice", "nextcloud")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("status", "alice", "--provider", "gitlab"), "no provider is configured as 'gitlab'"),
        (("revoke", "alice", "--provider", "gitlab"), "configured: nextcloud, github"),
        (("provision", "alice", "--provider", "gitlab"), "configured: nextcloud, github"),
        (("revoke", "alice"), "name one of nextcloud, github"),
        (("token", "alice"), "name one of nextcloud, github"),
        (("list", "--provider", "gitlab"), "configured: nextcloud, github"),
        (("status", "alice", "--provider", "Not:A:Name"), "a provider name matches"),
        (("provision", "alice", "--provider", "github", "--scope", "a b"), "not an RFC 6749 scope"),
    ],
)
async def test_a_bad_provider_on_the_command_line_is_a_usage_error_that_changes_nothing(
    two: Stack, two_env: dict[str, str], args: tuple[str, ...], message: str
) -> None:
    await provision_at(two, "nextcloud")
    before = await snapshot(two)
    out = await acli(two_env, *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert await snapshot(two) == before


async def test_a_bad_providers_file_is_exit_2_naming_every_problem(
    two_env: dict[str, str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[providers.github]\nissuer = "https://gh.example.com"\nclient_id = "x"\n'
        'client_secret_env = "UNSET_FOR_THIS_TEST"\n[providers.x\n'
    )
    out = await acli({**two_env, "CONSENT_PROVIDERS_FILE": str(bad)}, "status", "alice")
    assert out.returncode == 2
    assert "CONSENT_PROVIDERS_FILE: is not valid TOML" in out.stderr
    bad.write_text(
        '[providers.github]\nissuer = "https://gh.example.com"\nclient_id = "x"\n'
        'client_secret_env = "UNSET_FOR_THIS_TEST"\n'
    )
    out = await acli({**two_env, "CONSENT_PROVIDERS_FILE": str(bad)}, "status", "alice")
    assert out.returncode == 2
    assert "client_secret_env names UNSET_FOR_THIS_TEST, which is not set" in out.stderr


async def test_the_http_api_per_provider(
    two: Stack, two_providers: dict[str, LocalProvider]
) -> None:
    await provision_at(two, "nextcloud")
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{two.settings.http_port}", timeout=30
    ) as http:
        listed = (await http.get("/v1/providers", headers=AUTH)).json()
        assert [(p["name"], p["issuer"], p["can_revoke"]) for p in listed] == [
            (name, op.issuer, True) for name, op in two_providers.items()
        ]
        created = await http.post("/v1/connections/github/alice", json={}, headers=AUTH)
        assert created.status_code == 200, created.text
        assert (created.json()["provider"], created.json()["state"]) == ("github", "pending")
        here = (await http.get("/v1/connections/nextcloud/alice", headers=AUTH)).json()
        assert (here["provider"], here["state"]) == ("nextcloud", "provisioned")
        token = await http.post("/v1/connections/nextcloud/alice/token", json={}, headers=AUTH)
        assert token.json()["access_token"] == await two.client.access_token("alice", "nextcloud")
        before = await snapshot(two)
        for method in ("GET", "POST", "DELETE"):
            missing = await http.request(
                method, "/v1/connections/gitlab/alice", json={}, headers=AUTH
            )
            assert missing.status_code == 404
            assert missing.json()["code"] == "unknown_provider"
        assert await snapshot(two) == before


async def test_ops_and_metrics_per_provider(two: Stack, two_env: dict[str, str]) -> None:
    await provision_at(two, "nextcloud")
    await provision_at(two, "github", "bob")
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{two.settings.http_port}", timeout=30
    ) as http:
        metrics = (await http.get("/metrics")).text
        assert 'consent_flow_connections{provider="nextcloud",state="provisioned"} 1.0' in metrics
        assert 'consent_flow_connections{provider="github",state="provisioned"} 1.0' in metrics
        assert 'consent_flow_consents{state="provisioned"} 2.0' in metrics
        page = await http.get("/ops", params={"provider": "github", "state": "provisioned"})
        assert page.status_code == 200 and 'data-user="bob"' in page.text
        assert 'data-user="alice"' not in page.text
        user = await http.get("/ops/users/bob", params={"provider": "github"})
        assert user.status_code == 200
        assert (await http.get("/ops", params={"provider": "gitlab"})).status_code == 404
        # Every link of github's pages stays at github: the user, the states, the way back.
        links = [html.unescape(link) for link in re.findall(r'href="([^"]*)"', page.text)]
        assert "ops/users/bob?provider=github" in links
        assert "?state=pending&provider=github" in links
        back = [html.unescape(link) for link in re.findall(r'href="([^"]*)"', user.text)]
        assert any(link.endswith("?state=provisioned&provider=github") for link in back), back


async def test_every_providers_backlog_shows_in_stats_metrics_and_ops(
    two: Stack, two_env: dict[str, str]
) -> None:
    """Each provider's due backlog is its own, and every one of them shows: not only the first
    provider's (the deployment's figures are read provider by provider)."""
    await provision_at(two, "nextcloud")
    await provision_at(two, "github")
    await provision_at(two, "github", "bob")
    await two.stop_workers()  # from here on nothing takes the due refreshes
    redis = two.client.pool
    due = int((time.time() - 5) * 1000)
    for provider, users in (("nextcloud", ["alice"]), ("github", ["alice", "bob"])):
        keys = two.client.store_for(provider).keys
        for user in users:
            await redis.zadd(keys.of(user).sched, {user: due})

    stats = json.loads((await acli(two_env, "stats", "--json")).stdout)
    assert {name: b["due"] for name, b in stats["backlog"].items()} == {
        "nextcloud": 1,
        "github": 2,
    }
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{two.settings.http_port}", timeout=30
    ) as http:
        metrics = (await http.get("/metrics")).text
        # /ops shows one provider at a time (the first when none is asked for).
        pages = {
            name: (await http.get("/ops", params={"provider": name})).text
            for name in ("nextcloud", "github")
        }
    assert 'consent_flow_refresh_backlog{provider="nextcloud"} 1.0' in metrics
    assert 'consent_flow_refresh_backlog{provider="github"} 2.0' in metrics
    assert '<dd id="fig-backlog-nextcloud">1</dd>' in pages["nextcloud"]
    assert '<dd id="fig-backlog-github">2</dd>' in pages["github"]


async def test_upgrades_at_two_providers_one_approved_with_less_one_denied(
    two: Stack, two_providers: dict[str, LocalProvider]
) -> None:
    """Step-up at each provider on its own: nextcloud's upgrade is approved but grants only part
    of what was asked (and says which part is missing); github's is denied and its grant goes on
    untouched."""
    client = two.client
    await provision_at(two, "nextcloud")
    await provision_at(two, "github")
    held = {p: await client.access_token("alice", p) for p in client.providers}
    base = ["openid", "offline_access", "profile"]

    asked = {
        p: await client.request_provisioning("alice", p, scopes=["email", "notes:write"])
        for p in client.providers
    }
    for provider, status in asked.items():
        assert (status.provider, status.state, status.upgrade) == (
            provider,
            State.PROVISIONED,
            True,
        )
        assert status.authorization_url and status.authorization_url.startswith(
            two_providers[provider].issuer
        )
        assert await client.access_token("alice", provider) == held[provider]

    approved = await approve(
        asked["nextcloud"].authorization_url, "alice", grant_only=[*base, "email"]
    )
    assert (await two.callback(approved)).status_code == 200
    denied = await approve(asked["github"].authorization_url, "alice", deny=True)
    assert (await two.callback(denied)).status_code == 403

    nextcloud = await client.status("alice", "nextcloud")
    assert nextcloud.state is State.PROVISIONED and not nextcloud.upgrade
    assert "email" in nextcloud.scopes and "notes:write" not in nextcloud.scopes
    assert nextcloud.scopes_missing == ("notes:write",)
    token = await client.access_token("alice", "nextcloud")
    assert token != held["nextcloud"]
    assert two_providers["nextcloud"].introspect(token)["active"] is True

    github = await client.status("alice", "github")
    assert github.state is State.PROVISIONED and not github.upgrade
    assert "email" not in github.scopes and github.authorization_url is None
    assert "upgrade dropped: access_denied" in (github.reason or "")
    assert await client.access_token("alice", "github") == held["github"]
    assert two_providers["github"].introspect(held["github"])["active"] is True
    assert [(e["event"], e["to"]) for e in await client.history("alice", "github")][-2:] == [
        ("provision_requested", "provisioned"),
        ("authorization_failed", "provisioned"),
    ]
