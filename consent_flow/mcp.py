"""Progressive consent as MCP tools, on the official MCP Python SDK (``consent-flow[mcp]``).

One call registers ``provision_access``, ``check_access`` and ``revoke_access`` on a server::

    from mcp.server.mcpserver import MCPServer   # mcp 2.x (mcp 1.x: FastMCP)
    from consent_flow.mcp import register_consent_tools

    server = MCPServer("notes", token_verifier=..., auth=AuthSettings(...))
    consent_tools = register_consent_tools(server, consent)   # an open ConsentClient
    consent_tools.mount_callback()        # GET /oauth/callback in the server's own Starlette app

    @server.tool()
    async def list_notes(ctx: Context) -> dict[str, Any]:
        token = await consent_tools.downstream_token(ctx)
        if isinstance(token, NeedsConsent):
            return token.model_dump()      # the authorization URL, for the user to open
        ...                                 # call the downstream API with the user's token

No tool takes a user id (the caller is the user). The user is whoever the MCP request authenticated:
by default the ``sub`` of the bearer token the SDK's token verifier accepted (its auth context,
``get_access_token()``). A request without one is refused; there is no default user. Pass
``resolve_user=`` to map the verified token to your own user ids.

URL-mode elicitation (MCP 2025-11-25): when the client declares ``elicitation.url``,
``provision_access`` offers the authorization URL through it instead of returning it to the
model. On a handshake-era connection (2025-11-25 and before) that is an ``elicitation/create``
request in the middle of the call; on a 2026-07-28 connection (mcp 2.x), where servers send no
requests of their own, it is an ``InputRequiredResult`` and the client's retry carries the answer.
Clients without the capability get the URL in the result. The SDK is found at import time:
``MCPServer`` in mcp 2.x, ``FastMCP`` in mcp 1.x.
"""

from __future__ import annotations

import importlib
import inspect
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import structlog
from pydantic import BaseModel, ConfigDict, Field

from consent_flow.client import ConsentClient, ConsentStatus
from consent_flow.core.records import iso
from consent_flow.core.table import State
from consent_flow.errors import ConsentError, NotProvisioned
from consent_flow.web.callback import consent_routes

__all__ = [
    "ConsentResult",
    "ConsentTools",
    "NeedsConsent",
    "UserResolver",
    "default_resolver",
    "register_consent_tools",
]

log = structlog.get_logger("consent_flow.mcp")

StateName = Literal["unprovisioned", "pending", "provisioned", "revoked"]
ElicitationAction = Literal["accept", "decline", "cancel"]

#: Turns the MCP request into the consent-flow user id, or ``None`` when nobody is signed in.
#: It gets the SDK's ``Context`` of the tool call and may be sync or async.
UserResolver = Callable[[Any], "str | Awaitable[str | None] | None"]

# How long provision_access waits for the client to answer a mid-call URL elicitation: the user
# only has to say whether to open the page, but a transport that cannot carry the request
# (a JSON-response-only HTTP server) must not hold the call forever. On timeout the URL goes
# into the result instead.
ELICITATION_TIMEOUT = 300.0  # seconds
# The first protocol revision where servers ask for input with InputRequiredResult rather than
# with a request of their own in the middle of a call (SEP-2322).
INPUT_REQUIRED_PROTOCOL = "2026-07-28"
_ELICITATION_KEY = "consent_flow.authorize"

_UNAUTHENTICATED = (
    "this tool acts for the signed-in user, and the request carries no verified access token: "
    "sign in to this MCP server first"
)


# --- results -------------------------------------------------------------------------------------


class ConsentResult(BaseModel):
    """Where the calling user's consent stands: what the three tools return."""

    model_config = ConfigDict(frozen=True)

    state: StateName = Field(description="unprovisioned, pending, provisioned or revoked")
    since: str | None = Field(None, description="when the state was entered (RFC 3339, UTC)")
    authorization_url: str | None = Field(
        None,
        description="the page where the user signs in and approves, while pending (unless it "
        "was offered to the user through URL elicitation)",
    )
    scopes: list[str] = Field(default_factory=list, description="the scopes granted")
    reason: str | None = Field(
        None, description="why the last attempt failed or the grant ended, if it did"
    )
    elicitation: ElicitationAction | None = Field(
        None,
        description="the user's answer when the authorization URL was offered by URL elicitation",
    )
    message: str = Field(description="what this means, and what to do next")

    @classmethod
    def from_status(
        cls,
        status: ConsentStatus,
        *,
        elicitation: ElicitationAction | None = None,
        with_url: bool = True,
    ) -> ConsentResult:
        url = status.authorization_url if with_url else None
        message = _message(status.state, url is not None, elicitation)
        note = status.details.get("provider_revocation_note")
        if status.state is State.REVOKED and note:
            # The user must hear it when the provider keeps the grant (no revocation endpoint).
            message += f" At the provider: {note}."
        return cls(
            state=status.state.value,
            since=_iso(status.since),
            authorization_url=url if status.state is State.PENDING else None,
            scopes=list(status.scopes),
            reason=status.reason,
            elicitation=elicitation,
            message=message,
        )


class NeedsConsent(ConsentResult):
    """What :meth:`ConsentTools.downstream_token` answers when the user has not granted access.

    Return it from a tool as it is (``return token``) or as a dict (``token.model_dump()``):
    the model sees the state, and the authorization URL the user must open.
    """

    needs_consent: Literal[True] = True


def _iso(at: datetime | None) -> str | None:
    return iso(at.timestamp()) if at else None  # the one RFC 3339 form the CLI and /ops use


def _message(state: State, with_url: bool, elicitation: ElicitationAction | None) -> str:
    if state is State.PROVISIONED:
        return "Delegated access is granted."
    if state is State.PENDING:
        if elicitation == "accept":
            return (
                "The user was offered the authorization page; access is granted once they sign "
                "in and approve there. check_access tells when."
            )
        if elicitation is not None:
            return "The user did not open the authorization page; provision_access offers it again."
        if with_url:
            return (
                "Waiting for the user: they must open authorization_url in a browser, sign in "
                "and approve. check_access tells when it is done."
            )
        return "Waiting for the user to approve; provision_access offers the page again."
    if state is State.REVOKED:
        return "Delegated access was revoked; provision_access asks the user for it again."
    return "No delegated access has been granted; provision_access asks the user for it."


# --- the SDK -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sdk:
    """The parts of the installed MCP SDK this module uses (looked up, so both majors load)."""

    major: int
    server_class: Any  # MCPServer (2.x) or FastMCP (1.x)
    context_class: Any
    tool_error: type[Exception]
    types: Any  # mcp.types
    get_access_token: Callable[[], Any]


def _load_sdk() -> _Sdk:
    try:
        auth_context = importlib.import_module("mcp.server.auth.middleware.auth_context")
        types = importlib.import_module("mcp.types")
    except ImportError as exc:
        raise ImportError(
            "consent_flow.mcp needs the MCP Python SDK: pip install 'consent-flow[mcp]'"
        ) from exc
    try:
        server = importlib.import_module("mcp.server.mcpserver")
        errors = importlib.import_module("mcp.server.mcpserver.exceptions")
        major, server_class = 2, server.MCPServer
    except ImportError:  # mcp 1.x: FastMCP
        server = importlib.import_module("mcp.server.fastmcp")
        errors = importlib.import_module("mcp.server.fastmcp.exceptions")
        major, server_class = 1, server.FastMCP
    return _Sdk(
        major=major,
        server_class=server_class,
        context_class=server.Context,
        tool_error=errors.ToolError,
        types=types,
        get_access_token=auth_context.get_access_token,
    )


_SDK = _load_sdk()


def _mcp_error_class() -> type[Exception]:
    module = importlib.import_module("mcp.shared.exceptions")
    cls: type[Exception] = getattr(module, "MCPError", None) or module.McpError  # 2.x, 1.x
    return cls


_McpError = _mcp_error_class()


def default_resolver(ctx: Any) -> str | None:
    """The ``sub`` of the access token the SDK's token verifier accepted for this request.

    ``AccessToken.subject`` first, then a ``sub`` claim; ``None`` (the call is refused) when the
    request was not authenticated or the verifier did not say whose token it is. A client id is
    never taken for a user.

    A subject is unique per issuer only: a server that accepts tokens of several issuers passes
    a resolver that qualifies it. With ``CONSENT_SUBJECT_MATCH=on`` (the default) the user id
    must also be the user's subject at the downstream provider, as it is when one provider
    signs users in to the MCP server and grants the delegated access.
    """
    token = _SDK.get_access_token()
    if token is None:
        return None
    subject = getattr(token, "subject", None) or (getattr(token, "claims", None) or {}).get("sub")
    return subject if isinstance(subject, str) and subject else None


def _client_supports_url_elicitation(ctx: Any) -> bool:
    capabilities = getattr(ctx, "client_capabilities", None)  # mcp 2.x
    if capabilities is None:  # mcp 1.x: what the client declared in initialize
        params = getattr(ctx.session, "client_params", None)
        capabilities = getattr(params, "capabilities", None)
    elicitation = getattr(capabilities, "elicitation", None)
    return getattr(elicitation, "url", None) is not None


def _uses_input_required(ctx: Any) -> bool:
    version = getattr(ctx, "protocol_version", None)
    # Protocol versions are dates: they compare as strings.
    return _SDK.major >= 2 and isinstance(version, str) and version >= INPUT_REQUIRED_PROTOCOL


# --- the tools -----------------------------------------------------------------------------------


class ConsentTools:
    """What :func:`register_consent_tools` returns: the consent source, the user resolver, and
    helpers for the server author's own tools and routes."""

    def __init__(
        self,
        server: Any,
        consent: ConsentClient | Callable[[], ConsentClient],
        resolve_user: UserResolver,
    ) -> None:
        self.server = server
        self._consent = consent
        self._resolve_user = resolve_user

    @property
    def client(self) -> ConsentClient:
        """The ConsentClient every tool emits through."""
        return self._consent if isinstance(self._consent, ConsentClient) else self._consent()

    async def user(self, ctx: Any) -> str:
        """The user the MCP request authenticated; refuses the call when there is none."""
        user = self._resolve_user(ctx)
        if inspect.isawaitable(user):
            user = await user
        if not user:
            log.warning("mcp_call_refused", reason="unauthenticated")
            raise _SDK.tool_error(_UNAUTHENTICATED)
        return user

    async def downstream_token(self, ctx: Any, *, min_ttl: float = 30.0) -> str | NeedsConsent:
        """The current user's downstream access token, valid for ``min_ttl`` seconds at least;
        or, when they have not granted access (or it was revoked), a :class:`NeedsConsent`
        with the authorization URL to open. Asking for it starts the consent if needed, so
        any tool becomes a progressive-consent trigger.

        Other failures (provider unavailable, no worker answering) end the tool call with a
        clear error.
        """
        user = await self.user(ctx)
        client = self.client
        try:
            try:
                return await client.access_token(user, min_ttl=min_ttl)
            except NotProvisioned as exc:
                earlier_reason = exc.reason  # why a revoked grant ended, say
            status = await client.request_provisioning(user)
            if status.provisioned:  # approved between the two calls
                return await client.access_token(user, min_ttl=min_ttl)
        except ConsentError as exc:
            raise _tool_error(exc) from exc
        result = ConsentResult.from_status(status)
        return NeedsConsent(
            **result.model_dump(exclude={"message", "reason"}),
            reason=status.reason or earlier_reason,
            message=(
                "This needs the user's permission to act for them: they must open "
                "authorization_url, sign in and approve, then try again."
            ),
        )

    def mount_callback(self, *, path: str | None = None) -> None:
        """Serve the authorization callback (and ``/healthz``) from the MCP server's own
        Starlette app, so one process serves both: the redirect URI then points at it.

        The routes are public on purpose (the browser that comes back from the provider holds
        no MCP token); they change nothing unless the callback passes every check.
        """
        for route in consent_routes(self._consent, callback_path=path):
            self.server.custom_route(route.path, methods=["GET"], name=route.name)(route.endpoint)

    # --- the three tools -------------------------------------------------------------------

    async def _provision_access(self, ctx: Any) -> Any:
        user = await self.user(ctx)
        client = self.client
        try:
            if _uses_input_required(ctx):
                answer = _input_response(ctx)
                if answer is not None:  # the client's retry, with the user's answer
                    status = await client.status(user)
                    return ConsentResult.from_status(status, elicitation=answer, with_url=False)
            status = await client.request_provisioning(user)
            url = status.authorization_url
            if status.state is not State.PENDING or not url:
                return ConsentResult.from_status(status)
            if not _client_supports_url_elicitation(ctx):
                return ConsentResult.from_status(status)
            if _uses_input_required(ctx):
                return _input_required(url)
            action = await _elicit_url(ctx, url)
            if action is None:  # the transport could not carry it
                return ConsentResult.from_status(status)
            # The user may have approved while the elicitation was open.
            status = await client.status(user)
            return ConsentResult.from_status(status, elicitation=action, with_url=False)
        except ConsentError as exc:
            raise _tool_error(exc) from exc

    async def _check_access(self, ctx: Any) -> ConsentResult:
        user = await self.user(ctx)
        try:
            return ConsentResult.from_status(await self.client.status(user))
        except ConsentError as exc:
            raise _tool_error(exc) from exc

    async def _revoke_access(self, ctx: Any) -> ConsentResult:
        user = await self.user(ctx)
        try:
            return ConsentResult.from_status(await self.client.revoke(user))
        except ConsentError as exc:
            raise _tool_error(exc) from exc


def _tool_error(exc: ConsentError) -> Exception:
    # ConsentError messages carry no secrets (no secret in the clear): safe to show to the client.
    return _SDK.tool_error(f"{exc.code}: {exc}")


def _elicitation_message(url: str) -> str:
    return (
        f"Sign in at {urlsplit(url).netloc} and approve, so that this server can act for you "
        "there while you are away."
    )


async def _elicit_url(ctx: Any, url: str) -> ElicitationAction | None:
    """A mid-call ``elicitation/create`` in URL mode; ``None`` when it cannot be delivered."""
    if getattr(ctx.session, "can_send_request", True) is False:
        return None
    try:
        with anyio.fail_after(ELICITATION_TIMEOUT):
            result = await ctx.elicit_url(_elicitation_message(url), url, secrets.token_urlsafe(16))
    except (TimeoutError, _McpError) as exc:
        log.warning("mcp_elicitation_failed", error=type(exc).__name__)
        return None
    action: ElicitationAction = result.action
    return action


def _input_required(url: str) -> Any:
    """Round one on a 2026-07-28 connection: ask the client to offer the URL, then retry.

    ``request_state`` carries the elicitation id; the SDK seals it and binds it to this request
    and principal, so a retry's answer is taken only for the question this server asked.
    """
    types = _SDK.types
    elicitation_id = secrets.token_urlsafe(16)
    params = types.ElicitRequestURLParams.model_validate(
        {"message": _elicitation_message(url), "url": url, "elicitationId": elicitation_id}
    )
    return types.InputRequiredResult(
        input_requests={_ELICITATION_KEY: types.ElicitRequest(params=params)},
        request_state=elicitation_id,
    )


def _input_response(ctx: Any) -> ElicitationAction | None:
    responses = getattr(ctx, "input_responses", None) or {}
    answer = responses.get(_ELICITATION_KEY)
    if answer is None or not getattr(ctx, "request_state", None):
        return None
    action = getattr(answer, "action", None)
    return action if action in ("accept", "decline", "cancel") else None


# --- registration --------------------------------------------------------------------------------

_READ_ONLY = {"readOnlyHint": True, "openWorldHint": False}
_PROVISION = {
    "readOnlyHint": False,
    "destructiveHint": False,
    "idempotentHint": True,  # while pending, asking again offers the same session
    "openWorldHint": True,
}
_REVOKE = {
    "readOnlyHint": False,
    "destructiveHint": True,
    "idempotentHint": True,  # revoking twice is a no-op
    "openWorldHint": True,
}

_DESCRIPTIONS = {
    "provision_access": (
        "Ask the signed-in user to let this server act for them at the downstream service "
        "while they are away. Starts (or resumes) the authorization: the user opens the "
        "authorization page, signs in and approves. Does nothing if access is already granted."
    ),
    "check_access": (
        "Tell whether the signed-in user has granted this server delegated access to the "
        "downstream service: the state, since when, the scopes granted, and why the last "
        "attempt failed, if it did."
    ),
    "revoke_access": (
        "Withdraw the signed-in user's delegated access: the grant is revoked at the provider "
        "(where the provider can; the answer says when it cannot) and the stored tokens are "
        "deleted. Asking again later needs a new approval."
    ),
}
_TITLES = {
    "provision_access": "Grant delegated access",
    "check_access": "Check delegated access",
    "revoke_access": "Revoke delegated access",
}


def register_consent_tools(
    server: Any,
    consent: ConsentClient | Callable[[], ConsentClient],
    *,
    resolve_user: UserResolver = default_resolver,
) -> ConsentTools:
    """Register ``provision_access``, ``check_access`` and ``revoke_access`` on ``server``.

    ``server`` is the SDK's server (``MCPServer`` in mcp 2.x, ``FastMCP`` in mcp 1.x).
    ``consent`` is an open :class:`ConsentClient`, or a callable returning one when the server
    opens it later (in its lifespan, say). ``resolve_user`` turns the tool call's ``Context``
    into a user id; the default is the verified bearer token's subject.

    Returns a :class:`ConsentTools` for the author's own tools
    (:meth:`~ConsentTools.downstream_token`) and routes (:meth:`~ConsentTools.mount_callback`).
    """
    if not isinstance(server, _SDK.server_class):
        name = "MCPServer" if _SDK.major >= 2 else "FastMCP"
        raise TypeError(
            f"register_consent_tools needs an {name} (mcp {_SDK.major}.x), got {type(server)!r}"
        )
    tools = ConsentTools(server, consent, resolve_user)
    result_type: Any = ConsentResult
    provision_result: Any = ConsentResult
    if _SDK.major >= 2:
        provision_result = ConsentResult | _SDK.types.InputRequiredResult
    annotations_for = {
        "provision_access": (tools._provision_access, provision_result, _PROVISION),
        "check_access": (tools._check_access, result_type, _READ_ONLY),
        "revoke_access": (tools._revoke_access, result_type, _REVOKE),
    }
    for name, (method, returns, hints) in annotations_for.items():
        fn = _tool_function(name, method, returns)
        server.add_tool(
            fn,
            name=name,
            title=_TITLES[name],
            description=_DESCRIPTIONS[name],
            annotations=_SDK.types.ToolAnnotations.model_validate(
                {"title": _TITLES[name], **hints}
            ),
            structured_output=True,
        )
    return tools


def _tool_function(
    name: str, method: Callable[[Any], Awaitable[Any]], returns: Any
) -> Callable[..., Awaitable[Any]]:
    """A plain ``async def (ctx)`` the SDK can introspect: its only parameter is the SDK's
    Context, so the input schema has no properties at all (no user id can be passed)."""

    async def tool(ctx: Any) -> Any:
        return await method(ctx)

    tool.__name__ = tool.__qualname__ = name
    tool.__annotations__ = {"ctx": _SDK.context_class, "return": returns}
    return tool
