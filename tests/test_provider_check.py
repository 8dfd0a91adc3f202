"""The provider checked at start: `up`, `worker` and `serve` fail fast on settings that can never
work (naming the URL), start anyway and keep trying when the provider is merely down (health red
with the reason, green once it answers, no restart), and a worker checks the client's
credentials at the token endpoint at once, lifting a pause for `invalid_client` without waiting
for a refresh."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import CLIENT_SECRET, Stack, free_port, provider_clients, provision
from local_provider import LocalProvider

from consent_flow.core.table import Event
from consent_flow.engine.provider_watch import ProviderWatch
from consent_flow.oidc import OAuthClient
from consent_flow.oidc.check import (
    ClientAuth,
    Reach,
    check_discovery,
    probe_client_authentication,
)
from consent_flow.settings import PROVIDER_VARIABLES, Secret

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "consent_flow"]


def _discovery(port: int) -> str:
    return f"http://127.0.0.1:{port}/.well-known/openid-configuration"


def _cli_env(env: dict[str, str], **changes: str) -> dict[str, str]:
    return {**os.environ, **env, **changes}


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _health(port: int) -> httpx.Response | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    except httpx.HTTPError:
        return None


def _wait(condition: Any, what: str, process: subprocess.Popen[str], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert process.poll() is None, f"exited {process.returncode} while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.2)


# -- fail fast: settings that can never work ---------------------------------------------------


@pytest.mark.parametrize("command", ["up", "worker", "serve"])
def test_a_wrong_issuer_exits_2_naming_the_discovery_url(env, provider, command):
    """The document at the URL names another issuer: no retry can fix that."""
    wrong = f"http://localhost:{provider.port}"  # the same provider, another name for it
    cli_env = _cli_env(
        env,
        CONSENT_ISSUER=wrong,
        CONSENT_DISCOVERY_URL=provider.discovery_url,
        CONSENT_HTTP_PORT=str(free_port()),
    )
    started = time.monotonic()
    out = subprocess.run(
        [*CLI, command], env=cli_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2, out.stderr
    assert time.monotonic() - started < 20
    assert out.stderr.startswith("consent-flow: CONSENT_ISSUER: ")
    assert provider.discovery_url in out.stderr
    assert wrong in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_discovery_url_that_answers_404_exits_2_naming_it(env, provider):
    url = f"{provider.issuer}/no/such/document"
    cli_env = _cli_env(env, CONSENT_DISCOVERY_URL=url)
    out = subprocess.run(
        [*CLI, "worker"], env=cli_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("consent-flow: CONSENT_DISCOVERY_URL: ")
    assert url in out.stderr and "404" in out.stderr


# -- a provider that is merely down: start, keep trying, turn healthy ---------------------------


def test_provider_down_at_start_then_started_turns_up_healthy_without_restart(
    env, redirect_uri, spawned
):
    port = free_port()
    http_port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    cli_env = _cli_env(
        env,
        CONSENT_ISSUER=issuer,
        CONSENT_HTTP_PORT=str(http_port),
        CONSENT_REDIRECT_URI=f"http://127.0.0.1:{http_port}/oauth/callback",
    )
    process = subprocess.Popen(
        [*CLI, "up"], env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    spawned.append(process)
    assert process.stderr is not None
    first = process.stderr.readline()
    assert first.startswith("consent-flow: the provider's discovery document at "), first
    assert _discovery(port) in first
    assert "unreachable" in first and "trying again in the background" in first

    # Red for the provider's reason: health can be red for a moment before that (the worker's
    # first heartbeat), while the provider check has not written its first answer yet.
    red = _wait(
        lambda: (
            (h := _health(http_port)) is not None
            and h.status_code == 503
            and h.json()["checks"].get("provider", "ok") != "ok"
            and h
        ),
        "red health",
        process,
        30,
    )
    checks = red.json()["checks"]
    assert checks["provider"].startswith("unreachable since 20")
    assert _discovery(port) in checks["provider"]
    assert checks["redis"] == "ok"

    clients = provider_clients(f"http://127.0.0.1:{http_port}/oauth/callback")
    with LocalProvider.start(port=port, clients=clients):
        green = _wait(
            lambda: (h := _health(http_port)) is not None and h.status_code == 200 and h,
            "green health",
            process,
            45,
        )
        assert green.json()["checks"]["provider"] == "ok"
        assert process.poll() is None


def test_worker_json_says_in_one_line_that_it_keeps_trying(env, spawned):
    port = free_port()
    cli_env = _cli_env(env, CONSENT_ISSUER=f"http://127.0.0.1:{port}")
    process = subprocess.Popen(
        [*CLI, "worker", "--json"],
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    spawned.append(process)
    assert process.stderr is not None

    line = json.loads(process.stderr.readline())
    assert line["event"] == "provider_unreachable"
    assert line["url"] == _discovery(port)
    assert line["retrying"] is True
    time.sleep(2)
    assert process.poll() is None, "a provider that is down must not stop the worker"


# -- the watch, in process ----------------------------------------------------------------------


async def test_the_watch_keeps_the_reason_in_redis_until_the_provider_answers(
    settings, redis_server, redirect_uri
):
    from redis.asyncio import Redis

    from consent_flow.engine.provider_watch import read_provider_check
    from consent_flow.store.redis_store import Keys

    port = free_port()
    down = settings.with_changes(issuer=f"http://127.0.0.1:{port}", discovery_url=_discovery(port))
    keys = Keys(settings.redis_prefix, "default")
    async with httpx.AsyncClient() as http, Redis.from_url(redis_server.url) as redis:
        watch = ProviderWatch(
            OAuthClient(down, http), redis, keys, clock=time.time, retry_first=0.2, retry_cap=0.5
        )
        task = asyncio.create_task(watch.until_discovered())
        try:
            deadline = time.monotonic() + 10
            while (reason := await read_provider_check(redis, keys)) is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert _discovery(port) in reason and "unreachable" in reason
            assert 0 < await redis.ttl(keys.provider_check) <= 90
            with LocalProvider.start(port=port, clients=provider_clients(redirect_uri)):
                check = await asyncio.wait_for(task, 20)
                assert check.reach is Reach.OK
                assert await read_provider_check(redis, keys) is None
        finally:
            task.cancel()


# -- the client's credentials, probed at the token endpoint ------------------------------------


async def test_the_probe_tells_accepted_from_refused_credentials(settings, provider):
    async with httpx.AsyncClient() as http:
        good = await probe_client_authentication(OAuthClient(settings, http))
        wrong = settings.with_changes(client_secret=Secret("not-the-secret"))
        bad = await probe_client_authentication(OAuthClient(wrong, http))
        down = settings.with_changes(
            issuer=f"http://127.0.0.1:{free_port()}", discovery_url=_discovery(free_port())
        )
        unknown = await probe_client_authentication(OAuthClient(down, http))
    assert good.outcome is ClientAuth.ACCEPTED
    assert bad.outcome is ClientAuth.REFUSED
    assert bad.rejection is not None and bad.rejection.error == "invalid_client"
    assert "not-the-secret" not in str(bad.problem)
    assert unknown.outcome is ClientAuth.UNKNOWN


async def test_a_fixed_secret_lifts_the_pause_at_worker_start_without_a_refresh(make_stack):
    """Pause set by invalid_client, secret fixed, worker started: the pause is lifted and
    health turns green at once, though no refresh is due for an hour."""
    stack = await make_stack(workers=1)
    await provision(stack, "alice")
    before = await stack.client.history("alice")
    await stack.stop_workers()

    wrong = stack.settings.with_changes(client_secret=Secret("mistyped"))
    bad = Stack(wrong, stack.provider)
    await bad.client.__aenter__()
    try:
        await bad.start_worker()
        # The worker's start-up probe pauses refreshes: no refresh had to fall due for it.
        await _until(lambda: _paused(stack), 20)
        health = await _healthz(stack)
        assert health.status_code == 503
        assert "invalid_client" in health.json()["checks"]["refresh"]
    finally:
        await bad.stop()
        await bad.client.__aexit__(None, None, None)
    assert await _paused(stack)

    assert stack.settings.client_secret.reveal() == CLIENT_SECRET
    await stack.start_worker()
    await _until(lambda: _not_paused(stack), 20)
    health = await _until(lambda: _green(stack), 20)
    assert health.json()["checks"]["refresh"] == "ok"
    after = await stack.client.history("alice")
    assert after == before  # no refresh ran
    assert all(h["event"] != Event.TOKEN_REFRESHED.value for h in after)


async def _paused(stack: Stack) -> bool:
    return bool(await stack.client.store.redis.exists(stack.client.store.keys.halt))


async def _not_paused(stack: Stack) -> bool:
    return not await _paused(stack)


async def _healthz(stack: Stack) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"http://127.0.0.1:{stack.settings.http_port}/healthz")


async def _green(stack: Stack) -> httpx.Response | None:
    health = await _healthz(stack)
    return health if health.status_code == 200 else None


async def _until(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.1)


# -- what sorts a discovery failure (the provider's answers, without a provider) ----------------


def _doc(issuer: str, **changes: Any) -> dict[str, Any]:
    doc = {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/auth",
        "token_endpoint": f"{issuer}/token",
        "jwks_uri": f"{issuer}/jwks",
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


@pytest.mark.parametrize(
    ("answer", "reach", "mentions"),
    [
        pytest.param(httpx.Response(503), Reach.DOWN, "HTTP 503", id="5xx"),
        pytest.param(httpx.Response(429), Reach.DOWN, "HTTP 429", id="429"),
        pytest.param(httpx.ConnectError("refused"), Reach.DOWN, "ConnectError", id="refused"),
        pytest.param(httpx.ReadTimeout("slow"), Reach.DOWN, "timed out", id="timeout"),
        pytest.param(httpx.Response(404), Reach.MISCONFIGURED, "HTTP 404", id="404"),
        pytest.param(
            httpx.Response(200, json=_doc("https://other.example.com")),
            Reach.MISCONFIGURED,
            "'https://other.example.com'",
            id="issuer-mismatch",
        ),
        pytest.param(
            httpx.Response(200, json=_doc("https://id.example.com", token_endpoint=None)),
            Reach.MISCONFIGURED,
            "token_endpoint",
            id="no-token-endpoint",
        ),
        pytest.param(
            httpx.Response(
                200, json=_doc("https://id.example.com", token_endpoint="http://id.example.com/t")
            ),
            Reach.MISCONFIGURED,
            "is not https",
            id="http-endpoint",
        ),
        pytest.param(
            httpx.Response(200, json=_doc("https://id.example.com")), Reach.OK, None, id="ok"
        ),
    ],
)
async def test_discovery_failures_are_sorted_into_down_and_misconfigured(
    settings, answer, reach, mentions
):
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    https = settings.with_changes(
        issuer="https://id.example.com",
        discovery_url="https://id.example.com/.well-known/openid-configuration",
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        check = await check_discovery(OAuthClient(https, http))
    assert check.reach is reach
    assert check.url == https.discovery_url
    if mentions:
        assert mentions in str(check)


async def test_a_pause_that_outlived_its_cause_is_lifted_by_the_periodic_probe(make_stack):
    """The provider accepts the same credentials again (the client was re-enabled there): while
    the pause holds, a running worker probes every halt_probe seconds and lifts it."""
    import hashlib

    from consent_flow.engine.refresh import RetryPolicy

    stack = await make_stack(worker_options={"retry": RetryPolicy(halt_probe=0.5)})
    await provision(stack, "alice")
    before = await stack.client.history("alice")
    s = stack.settings
    fingerprint = hashlib.sha256(
        f"{s.client_id}\x00{s.client_secret.reveal()}".encode()
    ).hexdigest()[:16]
    await stack.client.store.redis.hset(
        stack.client.store.keys.halt,
        mapping={"reason": "invalid_client, earlier", "since": "0", "fingerprint": fingerprint},
    )
    assert (await _healthz(stack)).status_code == 503
    await _until(lambda: _not_paused(stack), 20)
    await _until(lambda: _green(stack), 20)
    assert await stack.client.history("alice") == before  # lifted by the probe, not a refresh


# -- several providers: the same check, per provider -------------------------------------------


def _providers_file(tmp_path, entries: dict[str, tuple[str, str]]) -> str:
    text = ""
    for name, (issuer, discovery) in entries.items():
        text += (
            f'[providers.{name}]\nissuer = "{issuer}"\ndiscovery_url = "{discovery}"\n'
            f'client_id = "consent-flow-test"\nclient_secret_env = "TEST_SECRET"\n\n'
        )
    path = tmp_path / "providers.toml"
    path.write_text(text)
    return str(path)


def test_each_configured_provider_is_checked_and_named(env, provider, tmp_path, spawned):
    down = free_port()
    wrong = f"http://localhost:{provider.port}"
    entries = {
        "good": (provider.issuer, provider.discovery_url),
        "renamed": (wrong, provider.discovery_url),
    }
    base = {k: v for k, v in env.items() if k not in PROVIDER_VARIABLES}
    cli_env = _cli_env(
        base,
        CONSENT_PROVIDERS_FILE=_providers_file(tmp_path, entries),
        TEST_SECRET=CLIENT_SECRET,
    )
    out = subprocess.run(
        [*CLI, "worker"], env=cli_env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2, out.stderr
    assert "CONSENT_PROVIDERS_FILE [providers.renamed]: " in out.stderr
    assert wrong in out.stderr and provider.discovery_url in out.stderr
    assert "[providers.good]" not in out.stderr

    entries["renamed"] = (f"http://127.0.0.1:{down}", _discovery(down))
    cli_env["CONSENT_PROVIDERS_FILE"] = _providers_file(tmp_path, entries)
    process = subprocess.Popen(
        [*CLI, "worker"], env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    spawned.append(process)
    assert process.stderr is not None
    line = process.stderr.readline()
    assert line.startswith("consent-flow: provider renamed: the provider's discovery document")
    assert _discovery(down) in line and "trying again in the background" in line
