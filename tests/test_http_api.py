"""The HTTP API (`/v1`, `/openapi.json`) served by the real app, with a real worker and provider."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import structlog
from conftest import Stack, stored_tokens
from local_provider import approve

from consent_flow.settings import Secret
from consent_flow.web.api import MAX_BODY_BYTES, PROBLEM_JSON, api_key_id

pytestmark = pytest.mark.integration

KEY = "k" * 8 + "0123456789abcdef0123456789abcdef"
OTHER_KEY = "o" * 8 + "fedcba9876543210fedcba9876543210"
AUTH = {"Authorization": f"Bearer {KEY}"}
PERIODIC_JOBS = (b"{s0}:sweep:", b"{s0}:cleanup:")


def test_key_ids_are_a_prefix_of_the_keys_sha256():
    assert api_key_id(KEY) == hashlib.sha256(KEY.encode()).hexdigest()[:8]
    assert KEY not in api_key_id(KEY)


@pytest.fixture
async def api(make_stack: Callable[..., Awaitable[Stack]]) -> AsyncIterator[ApiStack]:
    stack = await make_stack(api_keys=(Secret(KEY), Secret(OTHER_KEY)))
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.settings.http_port}", timeout=30
    ) as http:
        yield ApiStack(stack, http)


class ApiStack:
    def __init__(self, stack: Stack, http: httpx.AsyncClient) -> None:
        self.stack = stack
        self.http = http

    def url(self, user: str, tail: str = "", provider: str = "default") -> str:
        return f"/v1/connections/{provider}/{user}{tail}"

    async def snapshot(self) -> dict[str, Any]:
        """Every key that holds consent state (records, tokens, history, indexes, the stream,
        transition counts, queued events), with its value; heartbeats and clocks left out."""
        redis = self.stack.client.store.redis
        prefix = self.stack.settings.redis_prefix
        # Every shard's keys: records, tokens, histories, indexes, schedules, streams, counts.
        names = {k.decode() async for k in redis.scan_iter(match=f"{prefix}:{{*")}
        state: dict[str, Any] = {name: await redis.dump(name) for name in sorted(names)}
        # Queued jobs (every shard's queue) but the worker's own periodic ones (sweep, cleanup).
        queued = []
        async for queue in redis.scan_iter(match=self.stack.settings.queue_name + ":{*"):
            queued += await redis.zrange(queue, 0, -1)
        state["queue"] = sorted(j for j in queued if not j.startswith(PERIODIC_JOBS))
        return state


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(":" + code)
    assert body["title"] and body["detail"]
    return body


async def test_provision_approve_token_history_and_revoke_over_http(api: ApiStack):
    http = api.http
    providers = await http.get("/v1/providers", headers=AUTH)
    assert providers.status_code == 200
    assert providers.json() == [
        {
            "name": "default",
            "issuer": api.stack.settings.issuer,
            "scopes": list(api.stack.settings.scopes),
            "can_revoke": True,
        }
    ]

    created = await http.post(api.url("alice"), json={"scopes": ["notes:read"]}, headers=AUTH)
    assert created.status_code == 200, created.text
    body = created.json()
    assert body["user"] == "alice"
    assert body["provider"] == "default"
    assert body["state"] == "pending"
    assert body["scopes"] == []
    assert sorted(body["requested_scopes"]) == sorted(api.stack.settings.scopes)
    assert body["authorization_url"].startswith(api.stack.provider.issuer)
    assert created.headers["cache-control"] == "no-store"

    pending = (await http.get(api.url("alice"), headers=AUTH)).json()
    assert pending["authorization_url"] == body["authorization_url"]

    callback = await api.stack.callback(await approve(body["authorization_url"], "alice"))
    assert callback.status_code == 200

    status = (await http.get(api.url("alice"), headers=AUTH)).json()
    assert status["state"] == "provisioned"
    assert "notes:read" in status["scopes"]
    assert "authorization_url" not in status and "requested_scopes" not in status
    assert status["access_token_expires_at"].endswith("Z")

    token = await http.post(api.url("alice", "/token"), json={"min_ttl": 10}, headers=AUTH)
    assert token.status_code == 200
    assert token.headers["cache-control"] == "no-store"
    assert token.json() == {
        "user": "alice",
        "provider": "default",
        "access_token": (await stored_tokens(api.stack, "alice"))["access_token"],
        "token_type": "Bearer",
    }

    revoked = await http.request(
        "DELETE", api.url("alice"), json={"reason": "left the team"}, headers=AUTH
    )
    assert revoked.status_code == 200
    assert revoked.json()["state"] == "revoked"
    assert revoked.json()["reason"] == "left the team"
    assert revoked.json()["provider_revocation"] == "done"

    refused = await http.post(api.url("alice", "/token"), headers=AUTH)
    problem = assert_problem(refused, 409, "consent_revoked")
    assert problem["state"] == "revoked"
    assert problem["reason"] == "left the team"

    history = (await http.get(api.url("alice", "/history"), headers=AUTH)).json()
    assert [(h["event"], h["from"], h["to"]) for h in history] == [
        ("provision_requested", "unprovisioned", "pending"),
        ("authorization_completed", "pending", "provisioned"),
        ("revoke_requested", "provisioned", "revoked"),
    ]
    actor = f"api:{api_key_id(KEY)}"
    assert [h["actor"] for h in history] == [actor, "browser", actor]
    assert all(set(h) == {"event", "from", "to", "at", "actor", "reason"} for h in history)


async def test_a_scope_beyond_the_base_ones_opens_an_upgrade_over_http(api: ApiStack):
    http = api.http
    created = (await http.post(api.url("bea"), headers=AUTH)).json()
    assert (await api.stack.callback(await approve(created["authorization_url"], "bea"))).is_success
    held = (await stored_tokens(api.stack, "bea"))["access_token"]

    asked = await http.post(api.url("bea"), json={"scopes": ["email"]}, headers=AUTH)
    assert asked.status_code == 200, asked.text
    body = asked.json()
    assert body["state"] == "provisioned" and body["upgrade"] is True
    assert "email" in body["requested_scopes"] and "email" not in body["scopes"]
    assert body["authorization_url"].startswith(api.stack.provider.issuer)
    token = await http.post(api.url("bea", "/token"), json={"min_ttl": 10}, headers=AUTH)
    assert token.json()["access_token"] == held  # the grant keeps working meanwhile

    assert (await api.stack.callback(await approve(body["authorization_url"], "bea"))).is_success
    after = (await http.get(api.url("bea"), headers=AUTH)).json()
    assert after["state"] == "provisioned" and "email" in after["scopes"]
    assert "authorization_url" not in after


async def test_the_recorded_actor_is_the_key_id_of_the_key_used(api: ApiStack):
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    assert (await api.http.post(api.url("bob"), headers=other)).status_code == 200
    assert (
        await api.http.delete(api.url("bob") + "?reason=test", headers=other)
    ).status_code == 200
    history = (await api.http.get(api.url("bob", "/history"), headers=AUTH)).json()
    assert {h["actor"] for h in history} == {f"api:{api_key_id(OTHER_KEY)}"}
    assert history[-1]["reason"] == "test"
    dumped = json.dumps(history) + json.dumps((await api.stack.client.status("bob")).to_dict())
    assert OTHER_KEY not in dumped


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": ("Bearer " + "é" * 40).encode()},
    ],
)
async def test_requests_without_a_configured_key_get_401_and_change_nothing(api: ApiStack, headers):
    before = await api.snapshot()
    for method, path in [
        ("GET", "/v1/providers"),
        ("POST", api.url("carol")),
        ("DELETE", api.url("carol")),
        ("POST", api.url("carol", "/token")),
        ("GET", api.url("carol", "/history")),
        ("GET", "/v1/no-such-route"),
    ]:
        response = await api.http.request(method, path, headers=headers)
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith('Bearer realm="consent-flow"')
        assert ("invalid_token" in response.headers["www-authenticate"]) == bool(headers)
    assert await api.snapshot() == before


async def test_without_api_keys_the_api_is_absent(make_stack):
    stack = await make_stack()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.settings.http_port}") as http:
        for path in ("/v1/providers", "/v1/connections/default/alice", "/openapi.json"):
            assert_problem(await http.get(path, headers=AUTH), 404, "not_found")
        assert_problem(await http.post("/v1/connections/default/alice"), 404, "not_found")
    assert (await stack.client.status("alice")).state.value == "unprovisioned"


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("POST", "/v1/connections/github/dave", {}, 404, "unknown_provider"),
        ("GET", "/v1/connections/default/dave/nothing", {}, 404, "not_found"),
        ("GET", "/v1/connections/default", {}, 404, "not_found"),
        ("PUT", "/v1/connections/default/dave", {}, 405, "method_not_allowed"),
        ("GET", "/v1/connections/default/dave/token", {}, 405, "method_not_allowed"),
        (
            "POST",
            "/v1/connections/default/dave",
            {"content": b"{" + b" " * MAX_BODY_BYTES + b"}"},
            413,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/connections/default/dave",
            {"content": b"scopes=openid", "headers": {"Content-Type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/connections/default/dave",
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/connections/default/dave",
            {"content": b'{"scopes": NaN}', "headers": {"Content-Type": "application/json"}},
            422,
            "invalid_request",
        ),
        ("POST", "/v1/connections/default/dave", {"json": []}, 422, "invalid_request"),
        ("POST", "/v1/connections/default/dave", {"json": {"scope": []}}, 422, "invalid_request"),
        (
            "POST",
            "/v1/connections/default/dave",
            {"json": {"scopes": "openid"}},
            422,
            "invalid_scope",
        ),
        (
            "POST",
            "/v1/connections/default/dave",
            {"json": {"scopes": ["a b"]}},
            422,
            "invalid_scope",
        ),
        (
            "POST",
            "/v1/connections/default/dave",
            {"json": {"scopes": ['a"']}},
            422,
            "invalid_scope",
        ),
        ("POST", "/v1/connections/default/dave", {"json": {"scopes": [""]}}, 422, "invalid_scope"),
        (
            "POST",
            "/v1/connections/default/dave",
            {"json": {"scopes": ["openid"] * 51}},
            422,
            "invalid_scope",
        ),
        (
            "POST",
            "/v1/connections/default/dave",
            {"json": {"scopes": ["s"] * 33}},
            422,
            "invalid_scope",
        ),
        ("POST", "/v1/connections/default/" + "d" * 256, {}, 422, "invalid_user"),
        ("POST", "/v1/connections/default/da%01ve", {}, 422, "invalid_user"),
        ("POST", "/v1/connections/default/da%E2%80%8Bve", {}, 422, "invalid_user"),
        ("GET", "/v1/connections/default/da%0Ave/history", {}, 422, "invalid_user"),
        (
            "POST",
            "/v1/connections/default/dave/token",
            {"json": {"min_ttl": -1}},
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/connections/default/dave/token",
            {"json": {"min_ttl": "9"}},
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/v1/connections/default/dave/token",
            {"json": {"min_ttl": True}},
            422,
            "invalid_request",
        ),
        ("DELETE", "/v1/connections/default/dave", {"json": {"reason": 7}}, 422, "invalid_request"),
        ("DELETE", "/v1/connections/default/dave?reason=a&reason=b", {}, 422, "invalid_request"),
        ("DELETE", "/v1/connections/default/dave?why=a", {}, 422, "invalid_request"),
        ("POST", "/v1/connections/default/dave?scopes=openid", {}, 422, "invalid_request"),
        ("GET", "/v1/connections/default/dave/history?limit=1", {}, 422, "invalid_request"),
        (
            "DELETE",
            "/v1/connections/default/dave?reason=a",
            {"json": {"reason": "b"}},
            422,
            "invalid_request",
        ),
        (
            "DELETE",
            "/v1/connections/default/dave",
            {"json": {"reason": "r" * 501}},
            422,
            "invalid_request",
        ),
    ],
)
async def test_rejected_requests_are_problems_and_change_nothing(
    api: ApiStack, method, path, kwargs, status, code
):
    # dave has a pending session: a request that slipped through would change or renew it.
    assert (await api.http.post(api.url("dave"), headers=AUTH)).status_code == 200
    before = await api.snapshot()
    headers = {**AUTH, **kwargs.pop("headers", {})}
    response = await api.http.request(method, path, headers=headers, **kwargs)
    problem = assert_problem(response, status, code)
    if status == 405:
        assert response.headers["allow"]
        assert method not in response.headers["allow"]
    assert "Traceback" not in problem["detail"]
    assert await api.snapshot() == before


async def test_an_unprovisioned_user_has_no_token(api: ApiStack):
    problem = assert_problem(
        await api.http.post(api.url("erin", "/token"), headers=AUTH), 409, "not_provisioned"
    )
    assert problem["state"] == "unprovisioned"
    assert problem["user"] == "erin"


async def test_no_worker_is_503_worker_unavailable(make_stack):
    stack = await make_stack(workers=0, event_timeout=0.5, api_keys=(Secret(KEY),))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.settings.http_port}") as http:
        response = await http.post("/v1/connections/default/frank", headers=AUTH)
    assert_problem(response, 503, "worker_unavailable")
    assert (await stack.client.status("frank")).state.value == "unprovisioned"


async def test_the_token_and_the_key_never_reach_a_log_line(api: ApiStack):
    created = (await api.http.post(api.url("gina"), headers=AUTH)).json()
    await api.stack.callback(await approve(created["authorization_url"], "gina"))
    with structlog.testing.capture_logs() as logs:
        token = await api.http.post(api.url("gina", "/token"), headers=AUTH)
        await api.http.get("/v1/providers", headers={"Authorization": "Bearer wrong-key"})
    access_token = token.json()["access_token"]
    lines = [json.dumps(entry, default=str) for entry in logs]
    requests = [entry for entry in logs if entry["event"] == "api_request"]
    assert [(r["method"], r["status"], r["key"]) for r in requests] == [
        ("POST", 200, api_key_id(KEY)),
        ("GET", 401, None),
    ]
    assert requests[0]["path"] == "/v1/connections/default/gina/token"
    assert requests[0]["client"] == "127.0.0.1"
    for line in lines:
        assert access_token not in line
        assert KEY not in line
        assert "wrong-key" not in line


async def test_the_openapi_document_describes_the_served_routes(api: ApiStack):
    response = await api.http.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert document["servers"] == [{"url": "/"}]
    assert set(document["paths"]) == {
        "/v1/providers",
        "/v1/connections/{provider}/{user}",
        "/v1/connections/{provider}/{user}/history",
        "/v1/connections/{provider}/{user}/token",
    }
    provider = document["paths"]["/v1/connections/{provider}/{user}"]["parameters"][0]
    assert provider["schema"]["enum"] == ["default"]


async def test_the_snapshot_sees_what_an_accepted_request_changes(api: ApiStack):
    before = await api.snapshot()
    assert (await api.http.post(api.url("hank"), headers=AUTH)).status_code == 200
    assert await api.snapshot() != before


async def test_the_routes_mount_into_an_existing_starlette_app(api: ApiStack):
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    from consent_flow import api_routes

    async def own(request):
        return PlainTextResponse("the host's own route")

    host = Starlette(
        routes=[Route("/", own), Mount("/consent", routes=api_routes(api.stack.client))]
    )
    transport = httpx.ASGITransport(app=host)
    async with httpx.AsyncClient(transport=transport, base_url="http://host") as http:
        assert (await http.get("/")).text == "the host's own route"
        created = await http.post("/consent/v1/connections/default/ivan", headers=AUTH)
        assert created.status_code == 200
        assert created.json()["state"] == "pending"
        assert_problem(await http.get("/consent/v1/providers"), 401, "unauthorized")
        assert_problem(await http.get("/consent/v1/nothing", headers=AUTH), 404, "not_found")
        document = (await http.get("/consent/openapi.json")).json()
        assert document["servers"] == [{"url": "/consent"}]
    history = (await api.http.get(api.url("ivan", "/history"), headers=AUTH)).json()
    assert history[0]["actor"] == f"api:{api_key_id(KEY)}"


async def test_redis_down_is_503_store_unavailable(make_stack, tmp_path):
    from conftest import start_redis, stop_redis

    own = start_redis(tmp_path / "redis")
    try:
        stack = await make_stack(
            redis_url=own.url, api_keys=(Secret(KEY),), event_timeout=2, workers=0
        )
        base = f"http://127.0.0.1:{stack.settings.http_port}"
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            assert (await http.get("/v1/connections/default/ken", headers=AUTH)).status_code == 200
            stop_redis(own)
            response = await http.get("/v1/connections/default/ken", headers=AUTH)
        assert_problem(response, 503, "store_unavailable")
    finally:
        if own.process.poll() is None:
            stop_redis(own)
