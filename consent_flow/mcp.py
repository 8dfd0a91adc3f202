"""Progressive consent as MCP tools, on the official MCP Python SDK (``consent-flow[mcp]``).

One call registers ``provision_access``, ``check_access``, ``revoke_access`` and
``list_connections`` on a server::

    from mcp.server.mcpserver import MCPServer   # mcp 2.x (mcp 1.x: FastMCP)
    from consent_flow.mcp import register_consent_tools

    server = MCPServer("notes", token_verifier=..., auth=AuthSettings(...))
    consent_tools = register_consent_tools(server, consent)   # an open ConsentClient
    consent_tools.mount_callback()        # GET /oauth/callback in the server's own Starlette app

    @server.tool()
    @consent_tools.requires("nextcloud", scopes=["files.write"])
    async def upload(path: str, token: str) -> dict[str, Any]:
        ...                                 # call the downstream API with the user's token

A tool that needs a connection declares it with :meth:`ConsentTools.requires` (the token is
passed in as ``token``), or asks for it with :meth:`ConsentTools.downstream_token`. A user who has
not granted it, or granted fewer scopes than the tool needs, is asked to approve (an upgrade of
the grant in the second case, which keeps working meanwhile); once they have, the tool runs.

With several providers configured, the consent tools take a ``provider`` argument whose JSON
schema is an enum of their names; with one, they take none. No tool takes a user id (the caller is
the user). The user is whoever the MCP request authenticated: by default the ``sub`` of the bearer
token the SDK's token verifier accepted (its auth context, ``get_access_token()``). A request
without one is refused; there is no default user. Pass ``resolve_user=`` to map the verified token
to your own user ids.

URL-mode elicitation (MCP 2025-11-25): when the client declares ``elicitation.url``, the
authorization URL is offered through it instead of being returned to the model. On a
handshake-era connection (2025-11-25 and before) that is an ``elicitation/create`` request in the
middle of the call; on a 2026-07-28 connection (mcp 2.x), where servers send no requests of their
own, it is an ``InputRequiredResult`` and the client's retry carries the answer. Clients without
the capability get the URL in the result. The SDK is found at import time: ``MCPServer`` in
mcp 2.x, ``FastMCP`` in mcp 1.x.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import secrets
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import structlog
from pydantic import BaseModel, ConfigDict, Field

from consent_flow.client import DEFAULT_MIN_TTL, ConsentClient, ConsentStatus
from consent_flow.core.records import MAX_SCOPE_LENGTH, MAX_SCOPES_ASKED, check_scopes, iso
from consent_flow.core.table import State
from consent_flow.errors import ConsentError, NotProvisioned, UnknownProvider
from consent_flow.web.callback import consent_routes

__all__ = [
    "ConnectionList",
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

_Fn = TypeVar("_Fn", bound=Callable[..., Any])

# How long a tool waits for the client to answer a mid-call URL elicitation: the user only has
# to say whether to open the page, but a transport that cannot carry the request (a
# JSON-response-only HTTP server) must not hold the call forever. On timeout the URL goes into
# the result instead.
ELICITATION_TIMEOUT = 300.0  # seconds
# The first protocol revision where servers ask for input with InputRequiredResult rather than
# with a request of their own in the middle of a call (SEP-2322).
INPUT_REQUIRED_PROTOCOL = "2026-07-28"
_ELICITATION_KEY = "consent_flow.authorize"

_UNAUTHENTICATED = (
    "this tool acts for the signed-in user, and the request carries no verified access token: "
    "sign in to this MCP server first"
)
# RFC 6749 3.3 scope-token, for clients that check arguments against the schema; the tools
# check it themselves too (check_scopes), with the same rule and a clearer message.
_SCOPE_TOKEN_PATTERN = r"^[\x21\x23-\x5B\x5D-\x7E]+$"


# --- results -------------------------------------------------------------------------------------


class ConsentResult(BaseModel):
    """Where the calling user's connection at one provider stands: what the tools return."""

    model_config = ConfigDict(frozen=True)

    provider: str | None = Field(None, description="the provider this connection is at")
    state: StateName = Field(description="unprovisioned, pending, provisioned or revoked")
    since: str | None = Field(None, description="when the state was entered (RFC 3339, UTC)")
    authorization_url: str | None = Field(
        None,
        description="the page where the user signs in and approves, while a session is open "
        "(unless it was offered to the user through URL elicitation)",
    )
    scopes: list[str] = Field(default_factory=list, description="the scopes granted")
    requested_scopes: list[str] = Field(
        default_factory=list,
        description="what the open authorization session asks for, while one is open",
    )
    upgrade: bool = Field(
        False,
        description="an upgrade for more scopes waits for the user's approval; the current "
        "grant keeps working meanwhile",
    )
    scopes_missing: list[str] = Field(
        default_factory=list,
        description="scopes the last authorization asked for and the provider did not grant",
    )
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
        session_open = status.state is State.PENDING or (
            status.state is State.PROVISIONED and status.upgrade
        )
        url = status.authorization_url if with_url and session_open else None
        message = _message(status, url is not None, elicitation)
        note = status.details.get("provider_revocation_note")
        if status.state is State.REVOKED and note:
            # The user must hear it when the provider keeps the grant (no revocation endpoint).
            message += f" At the provider: {note}."
        return cls(
            provider=status.provider,
            state=status.state.value,
            since=_iso(status.since),
            authorization_url=url,
            scopes=list(status.scopes),
            requested_scopes=list(status.requested_scopes) if session_open else [],
            upgrade=status.state is State.PROVISIONED and status.upgrade,
            scopes_missing=list(status.scopes_missing),
            reason=status.reason,
            elicitation=elicitation,
            message=message,
        )


class NeedsConsent(ConsentResult):
    """What :meth:`ConsentTools.downstream_token` answers when the user has not granted the
    access a tool needs (none yet, revoked, or fewer scopes than it needs).

    Return it from a tool as it is (``return token``) or as a dict (``token.model_dump()``):
    the model sees the state, and the authorization URL the user must open.
    """

    needs_consent: Literal[True] = True


class ConnectionList(BaseModel):
    """What ``list_connections`` returns: the user's connection at every configured provider."""

    model_config = ConfigDict(frozen=True)

    connections: list[ConsentResult] = Field(
        description="one entry per configured provider, in configuration order"
    )


def _iso(at: datetime | None) -> str | None:
    return iso(at.timestamp()) if at else None  # the one RFC 3339 form the CLI and /ops use


def _message(status: ConsentStatus, with_url: bool, elicitation: ElicitationAction | None) -> str:
    state = status.state
    if state is State.PROVISIONED:
        message = "Delegated access is granted."
        if status.scopes_missing:
            message += (
                " The provider granted fewer scopes than asked; not granted: "
                + ", ".join(status.scopes_missing)
                + "."
            )
        if status.upgrade:
            more = ", ".join(s for s in status.requested_scopes if s not in status.scopes)
            message += f" More scopes ({more or 'an upgrade'}) wait for the user's approval"
            if with_url:
                message += ": they must open authorization_url, sign in and approve"
            message += "; the current grant keeps working meanwhile."
        return message
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
    """What :func:`register_consent_tools` returns: the consent source, the user resolver, the
    configured provider names, and helpers for the server author's own tools and routes."""

    def __init__(
        self,
        server: Any,
        consent: ConsentClient | Callable[[], ConsentClient],
        resolve_user: UserResolver,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.server = server
        self._consent = consent
        self._resolve_user = resolve_user
        if providers is None and isinstance(consent, ConsentClient):
            providers = consent.settings.provider_names
        #: The configured provider names, in configuration order; None when not known (a
        #: ConsentClient opened later and no ``providers=``): the tools then name none.
        self.providers: tuple[str, ...] | None = tuple(providers) if providers else None

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

    def check_provider(self, provider: str | None) -> str | None:
        """``provider`` if it is configured (None: the only one). Raises
        :class:`UnknownProvider`, naming the configured providers, before anything is asked."""
        names = self.providers
        if names is None:
            return provider
        if provider is None:
            if len(names) == 1:
                return None
            raise UnknownProvider(None, names)
        if provider not in names:
            raise UnknownProvider(provider, names)
        return provider

    # --- tokens for the author's tools -------------------------------------------------------

    async def downstream_token(
        self,
        ctx: Any,
        *,
        provider: str | None = None,
        scopes: Sequence[str] = (),
        min_ttl: float = DEFAULT_MIN_TTL,
    ) -> str | NeedsConsent:
        """The current user's access token at ``provider`` (None: the only one configured),
        valid for ``min_ttl`` seconds at least and granted with ``scopes`` (besides the
        provider's base scopes); or, when the user has not granted that, a
        :class:`NeedsConsent` with the authorization URL to open.

        Asking starts the consent if needed: a first authorization, or an upgrade of a grant
        that lacks some of ``scopes`` (the grant keeps working meanwhile). So any tool becomes a
        progressive-consent trigger. A client that supports URL elicitation on a handshake-era
        connection is offered the page in the middle of the call, and when the user approved
        there meanwhile, the token is returned at once.

        Other failures (unknown provider, bad scopes, provider unavailable, no worker
        answering) end the tool call with a clear error.
        """
        outcome = await self._token_or_consent(ctx, provider, scopes, min_ttl, input_required=False)
        assert not isinstance(outcome, _InputRequired)  # not asked for
        return outcome

    def requires(
        self,
        provider: str | None = None,
        *,
        scopes: Sequence[str] = (),
        min_ttl: float = DEFAULT_MIN_TTL,
        parameter: str = "token",
    ) -> Callable[[_Fn], _Fn]:
        """Declare that a tool needs the user's grant at ``provider`` (None: the only one) with
        ``scopes``; the access token is passed to the tool as ``parameter``, which the
        tool's input schema does not show. Put it under the SDK's ``@server.tool()``::

            @server.tool()
            @consent_tools.requires("nextcloud", scopes=["files.write"])
            async def upload(path: str, token: str) -> Receipt: ...

        When the user has not granted it (or granted fewer scopes), the tool does not run: the
        user is asked to approve, by URL elicitation where the client supports it (then the
        tool runs in the same call, or on the client's retry, once they have), else by a
        result that carries the authorization URL and asks to call the tool again after
        approving. That result is flagged as a tool error, since it is not the tool's output.

        The provider and scopes are checked here, when the server is built: an unknown
        provider raises :class:`UnknownProvider`, a bad scope :class:`InvalidScope`.
        """
        provider = self.check_provider(provider)
        needed = check_scopes(list(scopes))

        def decorate(fn: _Fn) -> _Fn:
            return typing.cast(_Fn, self._wrap(fn, provider, needed, min_ttl, parameter))

        return decorate

    def _wrap(
        self,
        fn: Callable[..., Any],
        provider: str | None,
        scopes: tuple[str, ...],
        min_ttl: float,
        parameter: str,
    ) -> Callable[..., Awaitable[Any]]:
        signature = inspect.signature(fn)
        # The SDK reads the wrapper's annotations in this module: give it evaluated ones.
        hints = typing.get_type_hints(fn, include_extras=True)
        params = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in signature.parameters.values()
        ]
        if parameter not in {p.name for p in params}:
            raise TypeError(
                f"{fn.__name__} is declared to need a token, but has no parameter "
                f"{parameter!r} to receive it"
            )
        params = [p for p in params if p.name != parameter]
        context_name = next((p.name for p in params if _is_context(p.annotation)), None)
        added_context = context_name is None
        if context_name is None:
            taken = {p.name for p in params}
            context_name = next(n for n in ("ctx", "context", "mcp_context") if n not in taken)
            params.append(
                inspect.Parameter(
                    context_name, inspect.Parameter.KEYWORD_ONLY, annotation=_SDK.context_class
                )
            )
        returns = hints.get("return", signature.return_annotation)
        is_async = inspect.iscoroutinefunction(fn)

        @functools.wraps(fn)
        async def tool(*args: Any, **kwargs: Any) -> Any:
            bound = wrapper_signature.bind(*args, **kwargs)
            arguments = dict(bound.arguments)
            ctx = arguments.pop(context_name) if added_context else arguments[context_name]
            outcome = await self._token_or_consent(
                ctx, provider, scopes, min_ttl, input_required=True
            )
            if isinstance(outcome, _InputRequired):
                return outcome.result
            if isinstance(outcome, NeedsConsent):
                return _consent_prompt(outcome)
            arguments[parameter] = outcome
            if is_async:
                return await fn(**arguments)
            return await anyio.to_thread.run_sync(functools.partial(fn, **arguments))

        wrapper_signature = inspect.Signature(params, return_annotation=returns)
        del tool.__wrapped__  # the SDK must see the wrapper's signature, not the tool's
        tool.__signature__ = wrapper_signature  # type: ignore[attr-defined]
        tool.__annotations__ = {
            **{p.name: p.annotation for p in params if p.annotation is not p.empty},
            "return": returns,
        }
        return tool

    async def _token_or_consent(
        self,
        ctx: Any,
        provider: str | None,
        scopes: Sequence[str],
        min_ttl: float,
        *,
        input_required: bool,
    ) -> str | NeedsConsent | _InputRequired:
        """The token, or what to answer instead: the consent prompt, or (``input_required``,
        on a 2026-07-28 connection) the request to offer the URL and retry."""
        user = await self.user(ctx)
        client = self.client
        try:
            provider = self.check_provider(provider)
            needed = check_scopes(list(scopes))
            earlier_reason: str | None = None
            try:
                token = await _ready_token(client, user, provider, needed, min_ttl)
            except NotProvisioned as exc:  # also ConsentRevoked, with why the grant ended
                token, earlier_reason = None, exc.reason
            if token is not None:
                return token
            answer = _input_response(ctx) if _uses_input_required(ctx) else None
            status = await client.request_provisioning(user, provider=provider, scopes=needed)
            if status.provisioned and not status.upgrade:  # approved between the two calls
                token = await _ready_token(client, user, provider, needed, min_ttl, quiet=True)
                if token is not None:
                    return token
            url = status.authorization_url
            elicitation: ElicitationAction | None = answer
            if url and answer is None and _client_supports_url_elicitation(ctx):
                if _uses_input_required(ctx):
                    if input_required:
                        return _InputRequired(_input_required(url))
                else:
                    elicitation = await _elicit_url(ctx, url)
                    if elicitation == "accept":  # the user may have approved meanwhile
                        token = await _ready_token(
                            client, user, provider, needed, min_ttl, quiet=True
                        )
                        if token is not None:
                            return token
                        status = await client.status(user, provider=provider)
        except ConsentError as exc:
            raise _tool_error(exc) from exc
        return _needs_consent(status, needed, elicitation, earlier_reason)

    def mount_callback(self, *, path: str | None = None) -> None:
        """Serve the authorization callback (and ``/healthz``) from the MCP server's own
        Starlette app, so one process serves both: the redirect URI then points at it.

        The routes are public on purpose (the browser that comes back from the provider holds
        no MCP token); they change nothing unless the callback passes every check.
        """
        for route in consent_routes(self._consent, callback_path=path):
            self.server.custom_route(route.path, methods=["GET"], name=route.name)(route.endpoint)

    # --- the consent tools -----------------------------------------------------------------

    async def _provision_access(
        self, ctx: Any, provider: str | None = None, scopes: Sequence[str] | None = None
    ) -> Any:
        user = await self.user(ctx)
        client = self.client
        try:
            provider = self.check_provider(provider)
            asked = check_scopes(list(scopes or ()))
            if _uses_input_required(ctx):
                answer = _input_response(ctx)
                if answer is not None:  # the client's retry, with the user's answer
                    status = await client.status(user, provider=provider)
                    return ConsentResult.from_status(status, elicitation=answer, with_url=False)
            status = await client.request_provisioning(user, provider=provider, scopes=asked)
            url = status.authorization_url
            if not _session_open(status) or not url:
                return ConsentResult.from_status(status)
            if not _client_supports_url_elicitation(ctx):
                return ConsentResult.from_status(status)
            if _uses_input_required(ctx):
                return _input_required(url)
            action = await _elicit_url(ctx, url)
            if action is None:  # the transport could not carry it
                return ConsentResult.from_status(status)
            # The user may have approved while the elicitation was open.
            status = await client.status(user, provider=provider)
            return ConsentResult.from_status(status, elicitation=action, with_url=False)
        except ConsentError as exc:
            raise _tool_error(exc) from exc

    async def _check_access(self, ctx: Any, provider: str | None = None) -> ConsentResult:
        user = await self.user(ctx)
        try:
            provider = self.check_provider(provider)
            return ConsentResult.from_status(await self.client.status(user, provider=provider))
        except ConsentError as exc:
            raise _tool_error(exc) from exc

    async def _revoke_access(self, ctx: Any, provider: str | None = None) -> ConsentResult:
        user = await self.user(ctx)
        try:
            provider = self.check_provider(provider)
            return ConsentResult.from_status(await self.client.revoke(user, provider=provider))
        except ConsentError as exc:
            raise _tool_error(exc) from exc

    async def _list_connections(self, ctx: Any) -> ConnectionList:
        user = await self.user(ctx)
        try:
            connections = await self.client.connections(user)
        except ConsentError as exc:
            raise _tool_error(exc) from exc
        return ConnectionList(connections=[ConsentResult.from_status(s) for s in connections])


@dataclass(frozen=True, slots=True)
class _InputRequired:
    """An ``InputRequiredResult`` for the decorated tool to return as it is."""

    result: Any


def _session_open(status: ConsentStatus) -> bool:
    return status.state is State.PENDING or (status.provisioned and status.upgrade)


async def _ready_token(
    client: ConsentClient,
    user: str,
    provider: str | None,
    scopes: tuple[str, ...],
    min_ttl: float,
    *,
    quiet: bool = False,
) -> str | None:
    """The user's token when the connection is provisioned with every scope in ``scopes``;
    None when it lacks some. When it is not provisioned (yet, or any more): None if ``quiet``,
    else :class:`NotProvisioned` (:class:`ConsentRevoked` with the reason)."""
    if scopes:
        status = await client.status(user, provider=provider)
        if status.provisioned and not set(scopes) <= set(status.scopes):
            return None
    try:
        return await client.access_token(user, provider=provider, min_ttl=min_ttl)
    except NotProvisioned:
        if quiet:
            return None
        raise


def _needs_consent(
    status: ConsentStatus,
    needed: tuple[str, ...],
    elicitation: ElicitationAction | None,
    earlier_reason: str | None = None,
) -> NeedsConsent:
    result = ConsentResult.from_status(status, elicitation=elicitation)
    if result.reason is None and earlier_reason:  # why the grant ended, say
        result = result.model_copy(update={"reason": earlier_reason})
    missing = [s for s in needed if s not in status.scopes]
    if not _session_open(status):
        # Nothing could be asked: the provider withheld the scopes even though the user
        # approved (asking again would only loop), or no session could be opened.
        message = (
            "The user's grant lacks scopes this tool needs"
            + (f" ({', '.join(missing)})" if missing else "")
            + ", and the provider did not grant them when asked."
        )
    elif elicitation == "accept":
        message = (
            "The user was offered the authorization page and has not approved there yet; call "
            "this tool again once they have."
        )
    elif elicitation is not None:
        message = (
            "This tool needs the user's permission to act for them, and they did not open the "
            "authorization page; calling the tool again offers it again."
        )
    elif status.provisioned:
        message = (
            f"This tool needs more access than the user granted ({', '.join(missing)}): they "
            "must open authorization_url, sign in and approve, then call this tool again. "
            "Their current grant keeps working meanwhile."
        )
    else:
        message = (
            "This tool needs the user's permission to act for them: they must open "
            "authorization_url, sign in and approve, then call this tool again."
        )
    return NeedsConsent(**result.model_dump(exclude={"message"}), message=message)


def _consent_prompt(needs: NeedsConsent) -> Any:
    """A decorated tool's answer when it cannot run yet: the prompt as text (the URL in it, for
    the user to open) and as structured content. It is flagged as an error because it is not
    the tool's output, so a client does not check it against the tool's output schema."""
    text = needs.message
    if needs.authorization_url:
        text += f" Authorization page: {needs.authorization_url}"
    return _SDK.types.CallToolResult.model_validate(
        {
            "content": [{"type": "text", "text": text}],
            "structuredContent": needs.model_dump(mode="json"),
            "isError": True,
        }
    )


def _is_context(annotation: Any) -> bool:
    candidates = [annotation, *typing.get_args(annotation)]
    return any(inspect.isclass(c) and issubclass(c, _SDK.context_class) for c in candidates)


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
        "Ask the signed-in user to let this server act for them at a downstream service "
        "while they are away, or to grant more scopes there. Starts (or resumes) the "
        "authorization: the user opens the authorization page, signs in and approves. Does "
        "nothing if that access is already granted; an existing grant keeps working while "
        "more scopes wait for approval."
    ),
    "check_access": (
        "Tell whether the signed-in user has granted this server delegated access to a "
        "downstream service: the state, since when, the scopes granted, and why the last "
        "attempt failed, if it did."
    ),
    "revoke_access": (
        "Withdraw the signed-in user's delegated access at a downstream service: the grant is "
        "revoked at the provider (where the provider can; the answer says when it cannot) and "
        "the stored tokens are deleted. Asking again later needs a new approval. Other "
        "services' grants are not touched."
    ),
    "list_connections": (
        "List every downstream service this server can act at, with the signed-in user's "
        "state and granted scopes at each."
    ),
}
_TITLES = {
    "provision_access": "Grant delegated access",
    "check_access": "Check delegated access",
    "revoke_access": "Revoke delegated access",
    "list_connections": "List delegated access",
}
_PROVIDER_DESCRIPTION = "the downstream service (configured provider) this is about"
_SCOPES_DESCRIPTION = (
    "scopes to ask for besides the service's base scopes (OAuth scope tokens: no spaces or "
    "quotes); asking for more than is granted opens an upgrade of the grant to approve"
)


def register_consent_tools(
    server: Any,
    consent: ConsentClient | Callable[[], ConsentClient],
    *,
    resolve_user: UserResolver = default_resolver,
    providers: Sequence[str] | None = None,
) -> ConsentTools:
    """Register ``provision_access``, ``check_access``, ``revoke_access`` and
    ``list_connections`` on ``server``.

    ``server`` is the SDK's server (``MCPServer`` in mcp 2.x, ``FastMCP`` in mcp 1.x).
    ``consent`` is an open :class:`ConsentClient`, or a callable returning one when the server
    opens it later (in its lifespan, say). ``resolve_user`` turns the tool call's ``Context``
    into a user id; the default is the verified bearer token's subject.

    ``providers`` are the configured provider names; by default ``consent.settings``'s. With
    several, the tools take a ``provider`` argument that must be one of them (an enum in the
    schema); with one, they take none. A callable ``consent`` with several providers needs
    ``providers=`` (``settings.provider_names``): the schemas are built here.

    Returns a :class:`ConsentTools` for the author's own tools (:meth:`~ConsentTools.requires`,
    :meth:`~ConsentTools.downstream_token`) and routes (:meth:`~ConsentTools.mount_callback`).
    """
    if not isinstance(server, _SDK.server_class):
        name = "MCPServer" if _SDK.major >= 2 else "FastMCP"
        raise TypeError(
            f"register_consent_tools needs an {name} (mcp {_SDK.major}.x), got {type(server)!r}"
        )
    tools = ConsentTools(server, consent, resolve_user, providers)
    provision_result: Any = ConsentResult
    if _SDK.major >= 2:
        provision_result = ConsentResult | _SDK.types.InputRequiredResult
    names = tools.providers or ()
    by_provider = [_provider_parameter(names)] if len(names) > 1 else []
    scopes = inspect.Parameter(
        "scopes",
        inspect.Parameter.KEYWORD_ONLY,
        default=(),
        annotation=Annotated[
            list[str],
            Field(
                description=_SCOPES_DESCRIPTION,
                json_schema_extra={
                    "maxItems": MAX_SCOPES_ASKED,
                    "items": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_SCOPE_LENGTH,
                        "pattern": _SCOPE_TOKEN_PATTERN,
                    },
                },
            ),
        ],
    )
    specs: dict[str, tuple[Callable[..., Awaitable[Any]], Any, dict[str, Any], list[Any]]] = {
        "provision_access": (
            tools._provision_access,
            provision_result,
            _PROVISION,
            [*by_provider, scopes],
        ),
        "check_access": (tools._check_access, ConsentResult, _READ_ONLY, by_provider),
        "revoke_access": (tools._revoke_access, ConsentResult, _REVOKE, by_provider),
        "list_connections": (tools._list_connections, ConnectionList, _READ_ONLY, []),
    }
    for name, (method, returns, hints, parameters) in specs.items():
        fn = _tool_function(name, method, returns, parameters)
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


def _provider_parameter(names: Sequence[str]) -> inspect.Parameter:
    """A required ``provider`` argument, an enum of the configured names in the schema.

    The value is checked by the tool (against the same names) rather than by the schema's
    validator, so an unknown name gets the library's ``unknown_provider`` error listing them.
    """
    return inspect.Parameter(
        "provider",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[
            str,
            Field(
                description=_PROVIDER_DESCRIPTION,
                json_schema_extra={"enum": list(names)},
            ),
        ],
    )


def _tool_function(
    name: str,
    method: Callable[..., Awaitable[Any]],
    returns: Any,
    parameters: Sequence[inspect.Parameter],
) -> Callable[..., Awaitable[Any]]:
    """A plain ``async def (ctx, ...)`` the SDK can introspect: the SDK's Context and only the
    ``parameters`` given, so no user id can be passed."""

    async def tool(ctx: Any, **arguments: Any) -> Any:
        return await method(ctx, **arguments)

    context = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_SDK.context_class
    )
    tool.__name__ = tool.__qualname__ = name
    tool.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [context, *parameters], return_annotation=returns
    )
    tool.__annotations__ = {
        "ctx": _SDK.context_class,
        **{p.name: p.annotation for p in parameters},
        "return": returns,
    }
    return tool
