"""An MCP server that acts for its users at a downstream API, with progressive consent.

One process serves the MCP endpoint (streamable HTTP, ``/mcp``), consent-flow's authorization
callback (``/oauth/callback``) and an in-process consent-flow worker. Its tools:

- ``provision_access``, ``check_access``, ``revoke_access``, ``list_connections``, from
  ``consent_flow.mcp`` (with several providers configured they take a ``provider`` argument);
- ``get_my_profile``: calls the downstream API, here the provider's OpenID Connect userinfo
  endpoint, with the signed-in user's *delegated* access token. Before the user has granted
  access it answers with the authorization URL instead (progressive consent);
- ``get_my_email``: needs one scope more than the base ones (``email``), declared with
  ``@consent_tools.requires``: a user who granted only the base scopes is asked to approve an
  upgrade (step-up), by URL elicitation where the client supports it, and the tool runs once they
  have. With a providers file (``CONSENT_PROVIDERS_FILE``) it reads the e-mail address at the
  provider named by ``MCP_EMAIL_PROVIDER`` (default: the last one configured), so one server acts
  at two services.

Who the user is comes from the bearer token of the MCP request (the MCP client signed the user in
at the same provider, with ``resource=<this server's /mcp URL>``). The token is checked by
**token introspection** (RFC 7662) at the provider, authenticated with this server's own client
credentials. Why introspection rather than local JWT validation: the local provider issues opaque
access tokens, introspection also sees revocation at once, and it tells the audience (``aud``),
so the server accepts only tokens issued for itself (RFC 8707; the MCP authorization spec
requires it) and never a token meant for another resource. A provider that issues JWT access
tokens (RFC 9068) could be checked locally against its JWKS instead, trading instant revocation
for one network round trip less per request; a cache keyed by the token's hash is the usual
middle ground.

Run it (see examples/README.md)::

    CONSENT_ISSUER=... CONSENT_CLIENT_ID=... CONSENT_CLIENT_SECRET=... \\
    CONSENT_REDIRECT_URI=http://127.0.0.1:8080/oauth/callback CONSENT_ENCRYPTION_KEYS=... \\
    python examples/mcp_server.py

With a providers file, users sign in to this server at the provider named by
``MCP_SIGN_IN_PROVIDER`` (default: the first one configured); ``get_my_profile`` reads their profile
there.

``MCP_LOG_LEVEL=DEBUG`` also logs the routine work (arq's lines per job, the HTTP requests).

Works with mcp 2.x (``MCPServer``) and mcp 1.x (``FastMCP``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import httpx
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

try:  # mcp 2.x
    from mcp.server.mcpserver import Context
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import Context
    from mcp.server.fastmcp import FastMCP as Server

from consent_flow import ConsentClient, Settings, SettingsError
from consent_flow.mcp import ConsentTools, NeedsConsent, register_consent_tools

log = logging.getLogger("mcp_server_example")

# Loggers that write a line per routine step at INFO (arq: two per job, the schedule sweep's
# every few seconds; httpx: every request): they speak at DEBUG only, failures still show.
ROUTINE_LOGGERS = ("arq.worker", "httpx", "httpcore")


def setup_logging(level_name: str | None = None) -> None:
    """INFO by default (MCP_LOG_LEVEL=DEBUG shows the routine work too)."""
    level = logging.getLevelName((level_name or "INFO").upper())
    if not isinstance(level, int):
        raise SettingsError(
            "MCP_LOG_LEVEL", f"must be DEBUG, INFO, WARNING or ERROR, not {level_name!r}"
        )
    logging.basicConfig(level=level, force=True)
    for name in ROUTINE_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.DEBUG if level <= logging.DEBUG else logging.WARNING
        )


INTROSPECTION_TIMEOUT = 10.0  # seconds
STEP_UP_SCOPE = "email"  # what get_my_email needs beyond the provider's base scopes
DOWNSTREAM_TIMEOUT = 10.0  # seconds


@dataclass(frozen=True)
class Provider:
    """The provider endpoints this example uses, from its discovery document."""

    issuer: str
    introspection_endpoint: str
    userinfo_endpoint: str

    @classmethod
    async def discover(cls, settings: Settings) -> Provider:
        url = settings.discovery_url or (
            settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
        )
        async with httpx.AsyncClient(timeout=INTROSPECTION_TIMEOUT) as http:
            response = await http.get(url)
            response.raise_for_status()
            meta = response.json()
        return cls(meta["issuer"], meta["introspection_endpoint"], meta["userinfo_endpoint"])


class IntrospectionVerifier:
    """The SDK's ``TokenVerifier``: accepts an MCP bearer token when the provider says it is
    active, was issued by the expected issuer, and is meant for this server (``aud``)."""

    def __init__(
        self, provider: Provider, *, client_id: str, client_secret: str, resource: str
    ) -> None:
        self.provider = provider
        self.resource = resource
        # client_secret_basic: form-encoded before base64 (RFC 6749 section 2.3.1).
        self._auth = httpx.BasicAuth(quote_plus(client_id), quote_plus(client_secret))
        self._http = httpx.AsyncClient(timeout=INTROSPECTION_TIMEOUT)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            response = await self._http.post(
                self.provider.introspection_endpoint,
                data={"token": token, "token_type_hint": "access_token"},
                auth=self._auth,
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            log.warning("introspection failed: %s", type(exc).__name__)
            return None
        if response.status_code != 200:
            log.warning("introspection answered HTTP %s", response.status_code)
            return None
        claims: dict[str, Any] = response.json()
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else list(audience or [])
        expires_at = claims.get("exp")
        if (
            claims.get("active") is not True
            or claims.get("iss", self.provider.issuer) != self.provider.issuer
            or self.resource not in audiences
            or (isinstance(expires_at, int) and expires_at <= time.time())
        ):
            return None
        subject = claims.get("sub")
        return AccessToken(
            token=token,
            client_id=str(claims.get("client_id") or ""),
            scopes=str(claims.get("scope") or "").split(),
            expires_at=expires_at if isinstance(expires_at, int) else None,
            resource=self.resource,
            subject=subject if isinstance(subject, str) else None,
            claims={"iss": self.provider.issuer, "sub": subject},
        )

    async def aclose(self) -> None:
        await self._http.aclose()


def build_server(
    consent: ConsentClient,
    verifier: IntrospectionVerifier,
    *,
    sign_in_provider: str | None = None,
    email_provider: str | None = None,
    userinfo: Mapping[str, str] | None = None,
) -> tuple[Any, ConsentTools]:
    """The MCP server: consent tools, the downstream tools and the callback route.

    Its bearer tokens must be issued for ``verifier.resource``, this server's MCP endpoint URL.
    ``sign_in_provider`` is the configured provider users sign in at (None: the only one);
    ``email_provider`` the one ``get_my_email`` reads at (None: the only one); ``userinfo``
    maps provider names to their userinfo endpoints (by default, the sign-in provider's).
    """
    provider = verifier.provider
    endpoints = dict(userinfo or {})
    server = Server(
        "consent-flow example",
        instructions="Reads the signed-in user's profile at the provider, with their consent.",
        token_verifier=verifier,
        auth=AuthSettings(
            issuer_url=provider.issuer,
            resource_server_url=verifier.resource,
            # The verifier puts the checked audience into AccessToken.resource; have the SDK
            # compare it with this server's URL as well (RFC 8707).
            validate_token_resource=True,
        ),
    )
    tools = register_consent_tools(server, consent)
    tools.mount_callback()  # GET /oauth/callback and /healthz, beside /mcp

    @server.tool(
        title="My profile at the provider",
        description="The signed-in user's profile, read at the provider with their delegated "
        "access. If they have not granted it yet, answers with the page where they can.",
    )
    async def get_my_profile(ctx: Context) -> dict[str, Any]:
        token = await tools.downstream_token(ctx, provider=sign_in_provider)
        if isinstance(token, NeedsConsent):
            return token.model_dump()
        return await _userinfo(provider.userinfo_endpoint, token)

    email_userinfo = endpoints.get(email_provider or "", provider.userinfo_endpoint)

    @server.tool(
        title="My e-mail address",
        description="The signed-in user's e-mail address at the provider. Needs the `email` "
        "scope: a user who has not granted it is asked to, and the tool runs once they have.",
    )
    @tools.requires(email_provider, scopes=[STEP_UP_SCOPE])
    async def get_my_email(token: str) -> dict[str, Any]:
        answer = await _userinfo(email_userinfo, token)
        if "profile" not in answer:
            return answer  # the downstream refused
        return {"email": answer["profile"].get("email")}

    return server, tools


async def _userinfo(endpoint: str, token: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=DOWNSTREAM_TIMEOUT) as http:
        response = await http.get(endpoint, headers={"Authorization": f"Bearer {token}"})
    if response.status_code != 200:
        # For instance a grant the provider ended a moment ago: the next refresh notices.
        return {"error": "downstream_refused", "status": response.status_code}
    return {"profile": response.json()}


async def serve(settings: Settings) -> None:
    """Worker, callback and MCP endpoint in one process, until Ctrl-C."""
    import uvicorn

    from workers import ConsentWorker, worker_settings

    if not settings.redis_url:
        raise SettingsError("CONSENT_REDIS_URL", "is required here (the in-process worker uses it)")
    resource = os.environ.get("MCP_RESOURCE_URL") or (
        f"http://{settings.http_host}:{settings.http_port}/mcp"
    )
    names = settings.provider_names
    several = len(names) > 1
    sign_in = os.environ.get("MCP_SIGN_IN_PROVIDER") or names[0]
    email = os.environ.get("MCP_EMAIL_PROVIDER") or names[-1]
    for variable, name in (("MCP_SIGN_IN_PROVIDER", sign_in), ("MCP_EMAIL_PROVIDER", email)):
        if name not in names:
            raise SettingsError(variable, f"must name a configured provider: {', '.join(names)}")
    discovered = {name: await Provider.discover(settings.for_provider(name)) for name in names}
    sign_in_settings = settings.for_provider(sign_in)
    verifier = IntrospectionVerifier(
        discovered[sign_in],
        client_id=sign_in_settings.client_id,
        client_secret=sign_in_settings.client_secret.reveal(),
        resource=resource,
    )
    options = worker_settings(settings, settings.redis_url)
    options["handle_signals"] = False  # uvicorn owns Ctrl-C; the worker stops with it
    worker = ConsentWorker(**options)
    async with ConsentClient(settings) as consent, contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(verifier.aclose)
        server, _ = build_server(
            consent,
            verifier,
            sign_in_provider=sign_in if several else None,
            email_provider=email if several else None,
            userinfo={name: p.userinfo_endpoint for name, p in discovered.items()},
        )
        task = asyncio.create_task(worker.main())
        stack.push_async_callback(_stop_worker, worker, task)
        config = uvicorn.Config(
            server.streamable_http_app(), host=settings.http_host, port=settings.http_port
        )
        print(f"MCP endpoint: {resource}  callback: {settings.redirect_uri}", flush=True)
        await uvicorn.Server(config).serve()


async def _stop_worker(worker: Any, task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await worker.close()


def main() -> int:
    try:
        setup_logging(os.environ.get("MCP_LOG_LEVEL"))
        settings = Settings.from_env(require_provider=True, require_keys=True)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(settings))
    except SettingsError as exc:
        print(f"mcp_server: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
