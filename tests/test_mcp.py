"""consent_flow.mcp with the real MCP Python SDK client, the real local provider and real Redis.

The same module runs on mcp 2.x (``MCPServer``, the main virtualenv) and on mcp 1.x (``FastMCP``,
``.venv-mcp1``). The server under test is examples/mcp_server.py: its bearer tokens come from
the local provider (authorization code + PKCE, ``resource=<the MCP endpoint>``) and are checked
by introspection; its ``get_my_profile`` tool calls the provider's userinfo endpoint with the
user's delegated token, and ``get_my_email`` does so with one scope more (step-up). Two-provider
tests add a second real provider with a client of its own.

In memory, the SDK's in-process transport carries no HTTP, so a test puts the verified token
where the SDK's bearer middleware would (its auth context) for the length of one session.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    claimed_port,
    free_port,
    provider_clients,
    provision,
    stored_tokens,
)
from local_provider import LocalProvider, approve, callback_params, pkce_pair
from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken

import consent_flow.mcp
from consent_flow import ConsentClient, State
from consent_flow.mcp import ConsentResult, NeedsConsent, register_consent_tools

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import mcp_server as example

pytestmark = pytest.mark.integration

SDK_MAJOR = int(importlib.metadata.version("mcp").split(".")[0])
MCP_CLIENT_ID = "mcp-test-client"
MCP_CLIENT_SECRET = "mcp-client-secret"
MCP_CLIENT_REDIRECT = "http://127.0.0.1:9/mcp-client/callback"  # never requested
CONSENT_TOOLS = ("provision_access", "check_access", "revoke_access", "list_connections")
STEP_UP_SCOPE = "email"  # not among the test provider's base scopes; userinfo shows it when granted

if SDK_MAJOR >= 2:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server.mcpserver import Context as SdkContext
    from mcp.server.mcpserver import MCPServer as SdkServer
    from mcp.types import ElicitResult

    # in-process: "auto" speaks 2026-07-28 (InputRequiredResult); "legacy" the 2025-11-25
    # handshake (a mid-call elicitation/create).
    MEMORY_MODES = ["auto", "legacy"]
    # over HTTP, "auto" discovers that the server speaks 2026-07-28; "legacy" is what a client
    # of an older SDK does: a stateful session with a stream for the server's own requests.
    HTTP_MODES = ["auto", "legacy"]
else:
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.server.fastmcp import Context as SdkContext
    from mcp.server.fastmcp import FastMCP as SdkServer
    from mcp.shared.memory import create_connected_server_and_client_session
    from mcp.types import ElicitResult

    MEMORY_MODES = ["legacy"]
    HTTP_MODES = ["legacy"]


# --- the provider, the MCP endpoint, bearer tokens -----------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def callback(self) -> str:
        return f"http://127.0.0.1:{self.port}/oauth/callback"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    with claimed_port() as port:  # bound by each test's server: held for the module meanwhile
        yield Endpoint(port)


@pytest.fixture(scope="module")
def op(redirect_uri: str, endpoint: Endpoint) -> Iterator[LocalProvider]:
    """The provider for this module: consent-flow's client may come back to the stack's callback
    server or to the MCP server's own route; an MCP client gets tokens for the MCP endpoint."""
    consent_client = provider_clients(redirect_uri)[0]
    consent_client["redirect_uris"] = [redirect_uri, endpoint.callback]
    mcp_client = {
        "client_id": MCP_CLIENT_ID,
        "client_secret": MCP_CLIENT_SECRET,
        "redirect_uris": [MCP_CLIENT_REDIRECT],
    }
    with LocalProvider.start(clients=[consent_client, mcp_client], resource=endpoint.url) as p:
        yield p


async def bearer(op: LocalProvider, endpoint: Endpoint, login: str) -> str:
    """An access token for the MCP endpoint, as an MCP client gets one for ``login``."""
    verifier, challenge = pkce_pair()
    url = op.authorization_url(
        code_challenge=challenge,
        state="s",
        scope="openid notes:read",
        client_id=MCP_CLIENT_ID,
        resource=endpoint.url,
    )
    code = callback_params(await approve(url, login))["code"]
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            op.metadata["token_endpoint"],
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": MCP_CLIENT_REDIRECT,
                "code_verifier": verifier,
                "resource": endpoint.url,
            },
            auth=(MCP_CLIENT_ID, MCP_CLIENT_SECRET),
        )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


@pytest.fixture
async def verifier(op: LocalProvider, endpoint: Endpoint) -> AsyncIterator[Any]:
    meta = op.metadata
    provider = example.Provider(
        meta["issuer"], meta["introspection_endpoint"], meta["userinfo_endpoint"]
    )
    v = example.IntrospectionVerifier(
        provider, client_id=CLIENT_ID, client_secret=CLIENT_SECRET, resource=endpoint.url
    )
    yield v
    await v.aclose()


@pytest.fixture
async def stack(make_stack: Callable[..., Awaitable[Any]], op: LocalProvider) -> Any:
    """Worker and callback server (at the session's redirect URI) on this module's provider."""
    return await make_stack(op=op)


# --- a client for either SDK ---------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    is_error: bool
    data: dict[str, Any]
    text: str


class Session:
    """The calls the tests make, on ``mcp.Client`` (2.x) or ``ClientSession`` (1.x)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def call(self, name: str, arguments: dict[str, Any] | None = None) -> Answer:
        result = await self._client.call_tool(name, arguments or {})
        if SDK_MAJOR >= 2:
            is_error, data = result.is_error, result.structured_content
        else:
            is_error, data = result.isError, result.structuredContent
        text = " ".join(getattr(block, "text", "") for block in result.content)
        return Answer(bool(is_error), data or {}, text)

    async def ok(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        answer = await self.call(name, arguments)
        assert not answer.is_error, answer.text
        return answer.data

    async def tools(self) -> dict[str, dict[str, Any]]:
        listed = await self._client.list_tools()
        return {t.name: t.model_dump(mode="json", by_alias=True) for t in listed.tools}


Elicit = Callable[[Any, Any], Awaitable[Any]]


@contextlib.asynccontextmanager
async def in_memory(
    server: Any, *, mode: str = "auto", elicit: Elicit | None = None
) -> AsyncIterator[Session]:
    if SDK_MAJOR >= 2:
        async with Client(server, mode=mode, elicitation_callback=elicit) as client:
            yield Session(client)
    else:
        async with create_connected_server_and_client_session(
            server, elicitation_callback=elicit
        ) as session:
            yield Session(session)


@contextlib.asynccontextmanager
async def over_http(
    url: str, token: str | None, *, mode: str = "auto", elicit: Elicit | None = None
) -> AsyncIterator[Session]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if SDK_MAJOR >= 2:
        import httpx2

        http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300))
        async with (
            http,
            Client(
                streamable_http_client(url, http_client=http),
                mode=mode,
                elicitation_callback=elicit,
            ) as client,
        ):
            yield Session(client)
    else:
        http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(30, read=300))
        async with (
            http,
            streamable_http_client(url, http_client=http) as (read, write, _),
            ClientSession(read, write, elicitation_callback=elicit) as session,
        ):
            await session.initialize()
            yield Session(session)


async def as_user(access: AccessToken | None, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``work`` in a task of its own whose MCP auth context holds ``access``, as the SDK's
    bearer middleware sets it for a request (in-process sessions inherit it)."""

    async def run() -> Any:
        auth_context_var.set(AuthenticatedUser(access) if access is not None else None)
        return await work()

    return await asyncio.create_task(run())


def browser(stack: Any, login: str, seen: list[Any], *, action: str = "accept") -> Elicit:
    """An elicitation callback that plays the user: opens the URL, signs in as ``login``,
    approves, and lets the browser follow the redirect to the callback."""

    async def elicit(context: Any, params: Any) -> Any:
        seen.append(params)
        if action == "accept":
            response = await stack.callback(await approve(params.url, login))
            assert response.status_code == 200, response.text
        return ElicitResult(action=action)

    return elicit


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


# --- the public surface and the tool schemas -----------------------------------------------------


def test_public_surface_is_pinned():
    assert consent_flow.mcp.__all__ == [
        "ConnectionList",
        "ConsentResult",
        "ConsentTools",
        "NeedsConsent",
        "UserResolver",
        "default_resolver",
        "register_consent_tools",
    ]
    assert set(ConsentResult.model_fields["state"].annotation.__args__) == {s.value for s in State}


async def test_tool_schemas_take_no_user_and_say_what_they_do(settings):
    server = SdkServer("schemas")
    register_consent_tools(server, ConsentClient(settings))
    async with in_memory(server) as session:
        tools = await session.tools()
    assert set(tools) == set(CONSENT_TOOLS)
    for name in CONSENT_TOOLS:
        schema = tools[name]["inputSchema"]
        # Pinned: one provider configured, so no provider argument; and no user id anywhere
        # (the caller is the user). Only provision_access takes an argument: the scopes.
        assert schema["type"] == "object"
        expected = {"scopes"} if name == "provision_access" else set()
        assert set(schema.get("properties") or {}) == expected
        assert not schema.get("required")
        assert "user" not in json.dumps(schema).lower()
    for name in ("provision_access", "check_access", "revoke_access"):
        output = tools[name]["outputSchema"]
        assert {
            "provider",
            "state",
            "since",
            "authorization_url",
            "scopes",
            "requested_scopes",
            "upgrade",
            "reason",
            "message",
        } <= set(output["properties"])
    assert "connections" in tools["list_connections"]["outputSchema"]["properties"]
    scopes = tools["provision_access"]["inputSchema"]["properties"]["scopes"]
    assert scopes["type"] == "array"
    assert scopes["maxItems"] == 32
    assert scopes["items"]["maxLength"] == 128
    hints = {name: tools[name]["annotations"] for name in CONSENT_TOOLS}
    assert hints["check_access"]["readOnlyHint"] is True
    assert hints["list_connections"]["readOnlyHint"] is True
    assert hints["provision_access"]["readOnlyHint"] is False
    assert hints["provision_access"]["destructiveHint"] is False
    assert hints["revoke_access"]["readOnlyHint"] is False
    assert hints["revoke_access"]["destructiveHint"] is True
    assert hints["revoke_access"]["idempotentHint"] is True


def two_provider_settings(settings: Any, *names: str) -> Any:
    """``settings`` with a provider table of ``names``, all at the settings' own provider."""
    from consent_flow.settings import ProviderConfig

    table = tuple(
        ProviderConfig(
            name=name,
            issuer=settings.issuer,
            discovery_url=settings.discovery_url,
            client_id=settings.client_id,
            client_secret=settings.client_secret,
            scopes=settings.scopes,
        )
        for name in names
    )
    return settings.with_changes(provider_table=table)


async def test_with_two_providers_the_tools_take_one_of_their_names(settings):
    server = SdkServer("two")
    consent = ConsentClient(two_provider_settings(settings, "nextcloud", "github"))
    tools_ = register_consent_tools(server, consent)
    assert tools_.providers == ("nextcloud", "github")

    @server.tool()
    @tools_.requires("github", scopes=[STEP_UP_SCOPE])
    async def starred(limit: int, token: str) -> dict[str, Any]:
        return {}

    async with in_memory(server) as session:
        tools = await session.tools()
    for name in ("provision_access", "check_access", "revoke_access"):
        schema = tools[name]["inputSchema"]
        provider = schema["properties"]["provider"]
        assert provider["type"] == "string"
        assert provider["enum"] == ["nextcloud", "github"]  # configuration order
        assert schema["required"] == ["provider"]
        assert "user" not in json.dumps(schema).lower()
    assert tools["list_connections"]["inputSchema"].get("properties") == {}
    # A tool that declares its connection takes neither the provider nor the token.
    assert set(tools["starred"]["inputSchema"]["properties"]) == {"limit"}


def test_a_tool_cannot_require_an_unknown_provider_or_a_bad_scope(settings):
    from consent_flow.errors import InvalidScope, UnknownProvider

    server = SdkServer("bad")
    tools = register_consent_tools(
        server, ConsentClient(two_provider_settings(settings, "nextcloud", "github"))
    )
    with pytest.raises(UnknownProvider, match="nextcloud, github"):
        tools.requires("gitlab")
    with pytest.raises(UnknownProvider, match="name one of nextcloud, github"):
        tools.requires()  # several configured: the tool must say which
    with pytest.raises(InvalidScope):
        tools.requires("github", scopes=["files write"])
    with pytest.raises(TypeError, match="no parameter 'token'"):
        tools.requires("github")(lambda path: path)


def test_only_the_sdk_server_is_accepted(settings):
    with pytest.raises(TypeError, match="needs an"):
        register_consent_tools(object(), ConsentClient(settings))


# --- who the user is -----------------------------------------------------------------------------


async def test_an_unauthenticated_call_is_refused(stack, verifier):
    server, _ = example.build_server(stack.client, verifier)

    async def calls() -> list[Answer]:
        async with in_memory(server) as session:
            return [await session.call(n) for n in (*CONSENT_TOOLS, "get_my_profile")]

    # No token at all, and a verified token that names no user (a client's own token).
    no_subject = AccessToken(token="t", client_id=MCP_CLIENT_ID, scopes=[], subject=None)
    for access in (None, no_subject):
        for answer in await as_user(access, calls):
            assert answer.is_error
            assert "no verified access token" in answer.text
            assert "sign in" in answer.text


async def test_a_user_argument_is_ignored_the_token_decides(stack, op, endpoint, verifier):
    server, _ = example.build_server(stack.client, verifier)
    alice = await verifier.verify_token(await bearer(op, endpoint, "alice"))

    async def calls() -> Answer:
        async with in_memory(server) as session:
            return await session.call("provision_access", {"user": "bob"})

    answer = await as_user(alice, calls)
    # The SDK drops arguments the schema does not have: the tool never sees "bob".
    assert not answer.is_error, answer.text
    assert answer.data["state"] == "pending"
    assert (await stack.client.status("alice")).state is State.PENDING
    assert (await stack.client.status("bob")).state is State.UNPROVISIONED


async def test_a_custom_resolver_replaces_the_default(stack):
    server = SdkServer("resolver")
    tools = register_consent_tools(
        server, lambda: stack.client, resolve_user=lambda ctx: "tenant-7.carol"
    )
    assert tools.client is stack.client

    async def calls() -> dict[str, Any]:
        async with in_memory(server) as session:
            return await session.ok("provision_access")

    result = await as_user(None, calls)
    assert result["state"] == "pending"
    assert (await stack.client.status("tenant-7.carol")).state is State.PENDING


# --- two users, in memory ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MEMORY_MODES)
async def test_two_users_in_memory_never_see_each_other(mode, stack, op, endpoint, verifier):
    server, _ = example.build_server(stack.client, verifier)
    alice = await verifier.verify_token(await bearer(op, endpoint, "alice"))
    bob = await verifier.verify_token(await bearer(op, endpoint, "bob"))
    assert (alice.subject, bob.subject) == ("alice", "bob")
    offered: list[Any] = []

    async def session_of(
        access: AccessToken, work: Callable[[Session], Awaitable[Any]], **kw: Any
    ) -> Any:
        async def run() -> Any:
            async with in_memory(server, mode=mode, **kw) as session:
                return await work(session)

        return await as_user(access, run)

    # Nobody has granted anything; the downstream call asks alice for consent (one line in the
    # tool) and leaves bob alone.
    async def before(s: Session) -> tuple[dict[str, Any], dict[str, Any]]:
        return await s.ok("check_access"), await s.ok("get_my_profile")

    check, profile = await session_of(alice, before)
    assert check["state"] == "unprovisioned"
    assert profile["needs_consent"] is True
    assert profile["state"] == "pending"
    assert "profile" not in profile
    url = profile["authorization_url"]
    assert query(url)["redirect_uri"] == stack.settings.redirect_uri
    assert (await session_of(bob, lambda s: s.ok("check_access")))["state"] == "unprovisioned"

    # Alice's client cannot elicit: provision_access hands back the same session's URL.
    result = await session_of(alice, lambda s: s.ok("provision_access"))
    assert result["state"] == "pending"
    assert result["authorization_url"] == url
    assert result["elicitation"] is None
    response = await stack.callback(await approve(url, "alice"))
    assert "Access granted" in response.text

    # Bob's client supports URL elicitation: the URL goes to the user, not into the result.
    result = await session_of(
        bob, lambda s: s.ok("provision_access"), elicit=browser(stack, "bob", offered)
    )
    assert [p.mode for p in offered] == ["url"]
    assert query(offered[0].url)["client_id"] == CLIENT_ID
    assert result["elicitation"] == "accept"
    assert result["authorization_url"] is None
    assert result["state"] == "provisioned"  # approved while the elicitation was open
    assert "notes:read" in result["scopes"]

    async def after(s: Session) -> tuple[dict[str, Any], dict[str, Any]]:
        return await s.ok("check_access"), await s.ok("get_my_profile")

    for access, login in ((alice, "alice"), (bob, "bob")):
        check, profile = await session_of(access, after)
        assert check["state"] == "provisioned"
        assert set(check["scopes"]) == {"openid", "offline_access", "profile", "notes:read"}
        assert profile["profile"]["sub"] == login  # the downstream saw this user's own token
    tokens = {u: await stored_tokens(stack, u) for u in ("alice", "bob")}
    assert tokens["alice"]["access_token"] != tokens["bob"]["access_token"]

    # Alice revokes: her grant ends at the provider, bob's does not.
    result = await session_of(alice, lambda s: s.ok("revoke_access"))
    assert result["state"] == "revoked"
    assert op.introspect(tokens["alice"]["refresh_token"])["active"] is False
    assert op.introspect(tokens["bob"]["refresh_token"])["active"] is True
    check, profile = await session_of(bob, after)
    assert check["state"] == "provisioned"
    assert profile["profile"]["sub"] == "bob"

    # Alice's downstream call now fails cleanly: a fresh consent request, no token.
    profile = await session_of(alice, lambda s: s.ok("get_my_profile"))
    assert profile["needs_consent"] is True
    assert profile["state"] == "pending"
    assert profile["authorization_url"] not in (None, url)

    # Revoking is idempotent.
    for _ in range(2):
        assert (await session_of(bob, lambda s: s.ok("revoke_access")))["state"] == "revoked"
    assert (await session_of(alice, lambda s: s.ok("check_access")))["state"] == "pending"


@pytest.mark.parametrize("mode", MEMORY_MODES)
async def test_a_declined_elicitation_leaves_the_user_pending(mode, stack, op, endpoint, verifier):
    server, _ = example.build_server(stack.client, verifier)
    carol = await verifier.verify_token(await bearer(op, endpoint, "carol"))
    offered: list[Any] = []

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        elicit = browser(stack, "carol", offered, action="decline")
        async with in_memory(server, mode=mode, elicit=elicit) as s:
            return await s.ok("provision_access"), await s.ok("check_access")

    provisioned, check = await as_user(carol, run)
    assert len(offered) == 1
    assert provisioned["state"] == "pending"
    assert provisioned["elicitation"] == "decline"
    assert provisioned["authorization_url"] is None
    # The status tool is read-only and shows the live session's URL, the one that was offered.
    assert check["state"] == "pending"
    assert check["authorization_url"] == offered[0].url


# --- over streamable HTTP, one process serving MCP and the callback ------------------------------


@contextlib.asynccontextmanager
async def serving(app: Any, port: int) -> AsyncIterator[None]:
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert not task.done(), "the MCP server did not start"
        assert time.monotonic() < deadline, "the MCP server did not start in time"
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def http_stack(make_stack, op, endpoint) -> Any:
    """consent-flow's redirect URI points at the MCP server's own callback route."""
    return await make_stack(op=op, redirect_uri=endpoint.callback, http_port=free_port())


@pytest.mark.parametrize("mode", HTTP_MODES)
async def test_two_users_over_streamable_http(mode, http_stack, op, endpoint, verifier):
    stack = http_stack
    server, _ = example.build_server(stack.client, verifier)
    tokens = {u: await bearer(op, endpoint, u) for u in ("alice", "bob")}
    offered: list[Any] = []
    async with serving(server.streamable_http_app(), endpoint.port):
        async with over_http(endpoint.url, tokens["alice"], mode=mode) as alice:
            profile = await alice.ok("get_my_profile")
            assert profile["needs_consent"] is True
            url = profile["authorization_url"]
            assert query(url)["redirect_uri"] == endpoint.callback
            # The browser comes back to the MCP server's own process, not to a separate one.
            callback = await approve(url, "alice")
            assert callback.startswith(endpoint.callback)
            response = await stack.callback(callback)
            assert response.status_code == 200
            assert "Access granted" in response.text
            assert (await alice.ok("get_my_profile"))["profile"]["sub"] == "alice"

        elicit = browser(stack, "bob", offered)
        async with over_http(endpoint.url, tokens["bob"], mode=mode, elicit=elicit) as bob:
            assert (await bob.ok("check_access"))["state"] == "unprovisioned"
            result = await bob.ok("provision_access")
            assert result["elicitation"] == "accept"
            assert result["authorization_url"] is None
            assert result["state"] == "provisioned"
            assert (await bob.ok("get_my_profile"))["profile"]["sub"] == "bob"
            # Step-up: the e-mail tool needs one scope more; bob is offered the upgrade, approves,
            # and the tool runs with the new grant.
            assert len(offered) == 1
            assert (await bob.ok("get_my_email")) == {"email": "bob@example.test"}
            assert len(offered) == 2
            assert "email" in query(offered[1].url)["scope"].split()
            assert "email" in (await bob.ok("check_access"))["scopes"]

        async with over_http(endpoint.url, tokens["alice"], mode=mode) as alice:
            assert (await alice.ok("revoke_access"))["state"] == "revoked"
            after = await alice.ok("get_my_profile")
            assert after["needs_consent"] is True
            assert "profile" not in after
        async with over_http(endpoint.url, tokens["bob"], mode=mode) as bob:
            assert (await bob.ok("check_access"))["state"] == "provisioned"
            assert (await bob.ok("get_my_profile"))["profile"]["sub"] == "bob"

        # A server answer, not a tool result: missing or foreign bearer tokens never reach a tool.
        downstream = (await stored_tokens(stack, "bob"))["access_token"]  # not for /mcp
        async with httpx.AsyncClient(timeout=10) as http:
            for headers in ({}, {"Authorization": f"Bearer {downstream}"}):
                response = await http.post(
                    endpoint.url,
                    json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                    headers={"Accept": "application/json, text/event-stream", **headers},
                )
                assert response.status_code == 401
                assert response.headers["www-authenticate"].startswith("Bearer ")
            health = await http.get(f"http://127.0.0.1:{endpoint.port}/healthz")
            assert health.status_code == 200


async def test_needs_consent_is_a_consent_result():
    needs = NeedsConsent(state="pending", authorization_url="https://op/authorize", message="m")
    assert isinstance(needs, ConsentResult)
    assert needs.model_dump()["needs_consent"] is True


@pytest.mark.parametrize("microsecond", [0, 123456])
def test_result_times_are_the_one_rfc3339_form_the_cli_prints(microsecond):
    """A whole second must not drop the fraction: scripts parse one form everywhere."""
    from datetime import UTC, datetime

    from consent_flow import ConsentStatus
    from consent_flow.core.records import iso

    since = datetime(2026, 12, 1, 3, 27, 42, microsecond, tzinfo=UTC)
    result = ConsentResult.from_status(ConsentStatus("alice", State.REVOKED, since))
    assert result.since == iso(since.timestamp())
    assert result.since == f"2026-12-01T03:27:42.{microsecond // 1000:03d}Z"


@pytest.fixture
def restored_logging() -> Iterator[None]:
    import logging

    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    levels = {name: logging.getLogger(name).level for name in example.ROUTINE_LOGGERS}
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.usefixtures("restored_logging")
def test_the_examples_routine_work_logs_at_debug_only():
    """arq's two lines per job (the sweep's every few seconds) stay out of INFO."""
    import logging

    example.setup_logging(None)
    arq = logging.getLogger("arq.worker")
    assert logging.getLogger("mcp_server_example").isEnabledFor(logging.INFO)
    assert not arq.isEnabledFor(logging.INFO)
    assert arq.isEnabledFor(logging.WARNING)
    example.setup_logging("debug")
    assert arq.isEnabledFor(logging.DEBUG)


# --- a tool that declares the connection and scopes it needs -------------------------------------


def alice_token() -> AccessToken:
    """What the SDK's verifier hands over for alice (the subject is all the tools read)."""
    return AccessToken(token="t", client_id=MCP_CLIENT_ID, scopes=[], subject="alice")


def step_up_server(stack: Any, op: LocalProvider, provider: str | None = None) -> Any:
    """A server whose ``my_email`` tool needs ``provider`` with the step-up scope: it reads the
    user's e-mail address at the provider's userinfo endpoint, which shows it only then."""
    server = SdkServer("step-up")
    tools = register_consent_tools(server, stack.client)
    userinfo = op.metadata["userinfo_endpoint"]

    @server.tool()
    @tools.requires(provider, scopes=[STEP_UP_SCOPE])
    async def my_email(token: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(userinfo, headers={"Authorization": f"Bearer {token}"})
        response.raise_for_status()
        claims = response.json()
        return {"sub": claims["sub"], "email": claims.get("email")}

    # The same as a function, with the scope chosen at run time.
    @server.tool()
    async def token_for(ctx: SdkContext, scope: str) -> dict[str, Any]:
        token = await tools.downstream_token(ctx, provider=provider, scopes=[scope])
        return {"token": True} if isinstance(token, str) else token.model_dump()

    # A plain function that takes the SDK's Context itself: it gets both.
    @server.tool()
    @tools.requires(provider)
    def has_token(ctx: SdkContext, token: str) -> dict[str, bool]:
        return {"token": bool(token), "context": isinstance(ctx, SdkContext)}

    return server


@pytest.mark.parametrize("mode", MEMORY_MODES)
async def test_a_step_up_tool_asks_by_elicitation_and_runs_once_approved(mode, stack, op):
    server = step_up_server(stack, op)
    offered: list[Any] = []

    async def run() -> Answer:
        async with in_memory(server, mode=mode, elicit=browser(stack, "alice", offered)) as s:
            return await s.call("my_email")

    answer = await as_user(alice_token(), run)
    # One tool call: the user was offered the page, approved there, and the tool ran.
    assert [p.mode for p in offered] == ["url"]
    assert STEP_UP_SCOPE in query(offered[0].url)["scope"].split()
    assert not answer.is_error, answer.text
    assert answer.data == {"sub": "alice", "email": "alice@example.test"}
    status = await stack.client.status("alice")
    assert status.provisioned
    assert STEP_UP_SCOPE in status.scopes


async def test_a_step_up_tool_without_elicitation_answers_the_url_then_runs(stack, op):
    server = step_up_server(stack, op)

    async def call() -> Answer:
        async with in_memory(server) as s:
            return await s.call("my_email")

    prompt = await as_user(alice_token(), call)
    # Not the tool's output: flagged, so a client does not check it against the output schema.
    assert prompt.is_error
    assert prompt.data["needs_consent"] is True
    assert prompt.data["state"] == "pending"
    url = prompt.data["authorization_url"]
    assert url in prompt.text
    assert "call this tool again" in prompt.text
    assert STEP_UP_SCOPE in query(url)["scope"].split()
    # Asking again before the user approved offers the same session.
    again = await as_user(alice_token(), call)
    assert again.data["authorization_url"] == url

    response = await stack.callback(await approve(url, "alice"))
    assert response.status_code == 200, response.text
    answer = await as_user(alice_token(), call)
    assert not answer.is_error, answer.text
    assert answer.data == {"sub": "alice", "email": "alice@example.test"}

    async def other() -> tuple[dict[str, Any], dict[str, Any]]:
        async with in_memory(server) as s:
            return (await s.tools())["has_token"]["inputSchema"], await s.ok("has_token")

    schema, result = await as_user(alice_token(), other)
    assert not schema.get("properties")  # neither the Context nor the token is an argument
    assert result == {"token": True, "context": True}


@pytest.mark.parametrize("elicits", [False, True], ids=["url-in-result", "elicitation"])
async def test_a_grant_without_the_scope_is_upgraded_and_keeps_working(elicits, stack, op):
    """Provisioned with the base scopes only: the tool asks for an upgrade; the grant keeps
    working until the user approves, then the tool runs with the new one."""
    response = await provision(stack, "alice")
    assert response.status_code == 200, response.text
    before = await stored_tokens(stack, "alice")
    server = step_up_server(stack, op)
    offered: list[Any] = []

    async def call() -> Answer:
        elicit = browser(stack, "alice", offered) if elicits else None
        async with in_memory(server, mode="legacy", elicit=elicit) as s:
            return await s.call("my_email")

    answer = await as_user(alice_token(), call)
    if elicits:
        assert len(offered) == 1
        url = offered[0].url
    else:
        assert answer.is_error
        assert answer.data["needs_consent"] is True
        assert answer.data["state"] == "provisioned"
        assert answer.data["upgrade"] is True
        assert STEP_UP_SCOPE not in answer.data["scopes"]
        assert STEP_UP_SCOPE in answer.data["requested_scopes"]
        assert "current grant keeps working" in answer.text
        url = answer.data["authorization_url"]
        # Meanwhile the old grant serves other tools.
        assert await stack.client.access_token("alice") == before["access_token"]
        response = await stack.callback(await approve(url, "alice"))
        assert response.status_code == 200, response.text
        answer = await as_user(alice_token(), call)
    assert STEP_UP_SCOPE in query(url)["scope"].split()
    assert not answer.is_error, answer.text
    assert answer.data == {"sub": "alice", "email": "alice@example.test"}
    status = await stack.client.status("alice")
    assert status.provisioned and not status.upgrade
    assert STEP_UP_SCOPE in status.scopes
    assert (await stored_tokens(stack, "alice"))["access_token"] != before["access_token"]


async def test_provision_access_asks_for_more_scopes(stack, op):
    """The model can ask for scopes itself: an upgrade beside the grant; bad scopes change
    nothing."""
    await provision(stack, "alice")
    server = SdkServer("scopes")
    register_consent_tools(server, stack.client)

    async def calls() -> tuple[Answer, Answer, dict[str, Any]]:
        async with in_memory(server) as s:
            bad = await s.call("provision_access", {"scopes": ["files write"]})
            many = await s.call("provision_access", {"scopes": [f"s{i}" for i in range(33)]})
            assert (await s.ok("check_access"))["upgrade"] is False
            return bad, many, await s.ok("provision_access", {"scopes": [STEP_UP_SCOPE]})

    bad, many, upgrade = await as_user(alice_token(), calls)
    for answer in (bad, many):
        assert answer.is_error
        assert "invalid_scope" in answer.text
    assert upgrade["state"] == "provisioned"
    assert upgrade["upgrade"] is True
    assert STEP_UP_SCOPE in query(upgrade["authorization_url"])["scope"].split()


# --- two providers -------------------------------------------------------------------------------

SECOND_CLIENT_ID = "second-client"
SECOND_CLIENT_SECRET = "second-secret"


@pytest.fixture(scope="module")
def op2(redirect_uri: str) -> Iterator[LocalProvider]:
    """A second provider (its own issuer and client), for the ``files`` connection."""
    client = {
        "client_id": SECOND_CLIENT_ID,
        "client_secret": SECOND_CLIENT_SECRET,
        "redirect_uris": [redirect_uri],
    }
    with LocalProvider.start(clients=[client]) as p:
        yield p


@pytest.fixture
async def two_stack(make_stack, settings, op, op2) -> Any:
    """One deployment, two providers: ``notes`` (this module's provider) and ``files``."""
    from consent_flow.settings import ProviderConfig, Secret

    table = (
        ProviderConfig(
            name="notes",
            issuer=op.issuer,
            discovery_url=op.discovery_url,
            client_id=CLIENT_ID,
            client_secret=Secret(CLIENT_SECRET),
            scopes=settings.scopes,
        ),
        ProviderConfig(
            name="files",
            issuer=op2.issuer,
            discovery_url=op2.discovery_url,
            client_id=SECOND_CLIENT_ID,
            client_secret=Secret(SECOND_CLIENT_SECRET),
            scopes=("openid", "offline_access", "profile"),
        ),
    )
    return await make_stack(op=op, provider_table=table)


def as_(login: str) -> AccessToken:
    return AccessToken(token="t", client_id=MCP_CLIENT_ID, scopes=[], subject=login)


@pytest.mark.parametrize("mode", MEMORY_MODES)
async def test_two_providers_connections_step_up_at_one_and_bad_names(mode, two_stack, op, op2):
    stack = two_stack
    server = step_up_server(stack, op2, provider="files")
    offered: list[Any] = []

    async def session(login: str, work: Callable[[Session], Awaitable[Any]], **kw: Any) -> Any:
        async def run() -> Any:
            async with in_memory(server, mode=mode, **kw) as s:
                return await work(s)

        return await as_user(as_(login), run)

    listed = await session("alice", lambda s: s.ok("list_connections"))
    assert [(c["provider"], c["state"]) for c in listed["connections"]] == [
        ("notes", "unprovisioned"),
        ("files", "unprovisioned"),
    ]

    # Bob has no grant anywhere: the tool that needs `files` with the extra scope asks him (by
    # elicitation, the page at the second provider) and runs once he approved.
    answer = await session(
        "bob", lambda s: s.call("my_email"), elicit=browser(stack, "bob", offered)
    )
    assert [urlsplit(p.url).netloc for p in offered] == [urlsplit(op2.issuer).netloc]
    assert not answer.is_error, answer.text
    assert answer.data == {"sub": "bob", "email": "bob@example.test"}
    assert (await stack.client.status("bob", "notes")).state is State.UNPROVISIONED

    # Alice grants both with their base scopes, through provision_access.
    for name, provider in (("notes", op), ("files", op2)):
        result = await session("alice", lambda s, n=name: s.ok("provision_access", {"provider": n}))
        assert result["provider"] == name
        assert result["state"] == "pending"
        assert urlsplit(result["authorization_url"]).netloc == urlsplit(provider.issuer).netloc
        response = await stack.callback(await approve(result["authorization_url"], "alice"))
        assert response.status_code == 200, response.text
    notes_token = await stack.client.access_token("alice", "notes")

    # What she granted serves at once; one scope more opens an upgrade (the function form).
    assert await session("alice", lambda s: s.ok("token_for", {"scope": "profile"})) == {
        "token": True
    }
    needs = await session("alice", lambda s: s.ok("token_for", {"scope": STEP_UP_SCOPE}))
    assert needs["needs_consent"] is True
    assert (needs["provider"], needs["state"], needs["upgrade"]) == ("files", "provisioned", True)

    # The tool needs more than alice granted at `files`: an upgrade there, approved, then it runs.
    prompt = await session("alice", lambda s: s.call("my_email"))
    assert prompt.data["authorization_url"] == needs["authorization_url"]  # the same session
    assert prompt.is_error
    assert prompt.data["provider"] == "files"
    assert prompt.data["state"] == "provisioned"
    assert prompt.data["upgrade"] is True
    assert STEP_UP_SCOPE in query(prompt.data["authorization_url"])["scope"].split()
    response = await stack.callback(await approve(prompt.data["authorization_url"], "alice"))
    assert response.status_code == 200, response.text
    answer = await session("alice", lambda s: s.call("my_email"))
    assert not answer.is_error, answer.text
    assert answer.data == {"sub": "alice", "email": "alice@example.test"}

    listed = await session("alice", lambda s: s.ok("list_connections"))
    by_name = {c["provider"]: c for c in listed["connections"]}
    assert by_name["notes"]["state"] == by_name["files"]["state"] == "provisioned"
    assert STEP_UP_SCOPE in by_name["files"]["scopes"]
    assert STEP_UP_SCOPE not in by_name["notes"]["scopes"]

    # A name that is not configured: an error naming the configured ones; nothing changes.
    history = {n: await stack.client.history("alice", n) for n in ("notes", "files")}
    for tool in ("provision_access", "check_access", "revoke_access"):
        bad = await session("alice", lambda s, t=tool: s.call(t, {"provider": "gitlab"}))
        assert bad.is_error
        assert "unknown_provider" in bad.text
        assert "notes, files" in bad.text
    assert {n: await stack.client.history("alice", n) for n in ("notes", "files")} == history

    # Revoking one connection leaves the other alone.
    revoked = await session("alice", lambda s: s.ok("revoke_access", {"provider": "files"}))
    assert (revoked["provider"], revoked["state"]) == ("files", "revoked")
    assert (await session("alice", lambda s: s.ok("check_access", {"provider": "notes"})))[
        "state"
    ] == "provisioned"
    assert await stack.client.access_token("alice", "notes") == notes_token
