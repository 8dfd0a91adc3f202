"""The HTTP API: ``/v1`` JSON routes for services in any language, described at ``/openapi.json``.

A service-to-service API: the calling service authenticates with ``Authorization: Bearer <key>``
(a key from ``CONSENT_API_KEYS``) and vouches for the user named in the path. No cookies, no CORS:
browsers are not its callers. Without keys configured every route answers 404, as if absent.

Every error is an RFC 9457 problem (``application/problem+json``) whose ``code`` is the stable
code of the Python error behind it (``ConsentError.code``) or one of the request codes below. A
request that is rejected is rejected before anything is emitted or written.

The actor recorded for a change is ``api:<key id>``, the key id being the first 8 hex digits of
the SHA-256 of the key: never the key itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from http import HTTPStatus
from typing import Any

import structlog
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, SimpleUser
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consent_flow.client import DEFAULT_MIN_TTL, MAX_MIN_TTL, ConsentClient, ConsentStatus
from consent_flow.core.connections import DEFAULT_PROVIDER
from consent_flow.core.records import (
    MAX_REASON_LENGTH,
    MAX_SCOPE_LENGTH,
    MAX_SCOPES_ASKED,
    MAX_USER_LENGTH,
    check_scopes,
    check_user,
)
from consent_flow.core.table import State
from consent_flow.errors import (
    ConsentError,
    GrantRejected,
    InvalidScope,
    InvalidTransition,
    NotProvisioned,
    ProviderError,
    ProviderUnavailable,
    UnknownProvider,
    WorkerUnavailable,
)
from consent_flow.settings import Secret, Settings

__all__ = ["api_key_id", "api_routes", "openapi_document", "provider_names"]

log = structlog.get_logger("consent_flow.api")

API_PREFIX = "/v1"
OPENAPI_PATH = "/openapi.json"
MAX_BODY_BYTES = 16 * 1024  # a request body beyond this is refused (413) unread
PROBLEM_JSON = "application/problem+json"
# RFC 9457 3.1.1: a type URI need not resolve; tag URIs (RFC 4151) name it without pretending to.
PROBLEM_TYPE = "tag:consent-flow,2026:problem:"
REALM = "consent-flow"
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

_USER_PATTERN = r"^[^\s/]+$"  # check_user also refuses the non-printable ones it lets through
_RFC3339 = {"type": "string", "format": "date-time"}

# Request problems, beside the codes of the Python errors.
UNAUTHORIZED = "unauthorized"
NOT_FOUND = "not_found"
UNKNOWN_PROVIDER = "unknown_provider"
METHOD_NOT_ALLOWED = "method_not_allowed"
TOO_LARGE = "payload_too_large"
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
INVALID_REQUEST = "invalid_request"
INVALID_USER = "invalid_user"
INVALID_SCOPE = "invalid_scope"
STORE_UNAVAILABLE = "store_unavailable"
INTERNAL_ERROR = "internal_error"

# The state of a connection in these answers, beside the core fields, when the status has them.
_STATUS_DETAILS = (
    "access_token_expires_at",
    "refresh_token_expires_at",
    "next_refresh_at",
    "last_refresh_at",
    "refresh_failures",
    "last_refresh_error",
    "failing_since",
    "session_expires_at",
    "provider_revocation",
    "provider_revocation_note",
)


def provider_names(settings: Settings) -> tuple[str, ...]:
    """The providers this deployment serves, by the names the API's paths use."""
    return settings.provider_names


def api_key_id(key: str) -> str:
    """The id an API key is known by in the history and the logs."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class Problem(Exception):
    """A request this API refuses, answered as an RFC 9457 problem."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE + self.code,
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        body.update((k, v) for k, v in self.extra.items() if v is not None)
        return JSONResponse(
            body,
            status_code=self.status,
            media_type=PROBLEM_JSON,
            headers={**API_HEADERS, **self.headers},
        )


def problem_for(exc: ConsentError, *, provider: str) -> Problem:
    """The HTTP answer to an error of the Python API, with its stable code."""
    extra: dict[str, Any] = {"user": exc.user, "provider": provider if exc.user else None}
    headers: dict[str, str] = {}
    if isinstance(exc, NotProvisioned):  # and ConsentRevoked
        status = 409
        extra.update(state=exc.state, reason=exc.reason)
    elif isinstance(exc, GrantRejected | InvalidTransition):
        status = 409
    elif isinstance(exc, UnknownProvider):
        status = 404
    elif isinstance(exc, WorkerUnavailable):
        status = 503
    elif isinstance(exc, ProviderUnavailable):
        status = 503
        if exc.retry_after is not None:
            retry = max(1, round(exc.retry_after))
            headers["Retry-After"] = str(retry)
            extra["retry_after"] = retry
    elif isinstance(exc, ProviderError):
        status = 502
    else:
        status = 500
    return Problem(status, exc.code, exc.message, headers=headers, **extra)


# --- access -----------------------------------------------------------------------------------


class ApiGuard:
    """Authenticates every ``/v1`` request by its bearer key, and logs each request once.

    Modelled on the MCP SDK's bearer-auth middleware: the key is compared in constant time with
    every configured key (no early exit), and the caller becomes ``request.user`` by key id.
    The log line names method, path, status, key id and client address: never a body, a query
    or a header.
    """

    def __init__(self, app: ASGIApp, current: Callable[[], ConsentClient]) -> None:
        self.app = app
        self.current = current

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status: list[int] = []

        async def send_logged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        keys = self.current().settings.api_keys
        key_id = None
        try:
            if not keys:
                await Problem(404, NOT_FOUND, "no such resource").response()(
                    scope, receive, send_logged
                )
                return
            key_id = self.authenticate(Headers(scope=scope), keys)
            if key_id is None:
                await self.unauthorized(scope).response()(scope, receive, send_logged)
                return
            # A scope of its own: a host app that mounts these routes keeps its own user.
            inner = {**scope, "auth": AuthCredentials(["consent:api"]), "user": SimpleUser(key_id)}
            await self.app(inner, receive, send_logged)
        finally:
            log.info(
                "api_request",
                method=scope["method"],
                path=scope["path"],
                status=status[0] if status else None,
                key=key_id,
                client=scope["client"][0] if scope.get("client") else None,
                elapsed_ms=round((time.monotonic() - started) * 1000, 1),
            )

    @staticmethod
    def authenticate(headers: Headers, keys: tuple[Secret, ...]) -> str | None:
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = hashlib.sha256(presented.strip().encode("utf-8", "replace")).digest()
        found = None
        for key in keys:  # every key compared, whichever matches: no timing tells which
            secret = key.reveal()
            if hmac.compare_digest(digest, hashlib.sha256(secret.encode()).digest()):
                found = api_key_id(secret)
        return found

    @staticmethod
    def unauthorized(scope: Scope) -> Problem:
        presented = "authorization" in Headers(scope=scope)
        # RFC 6750 3: the challenge names the realm, and the error when a credential was sent.
        challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if presented else "")
        detail = (
            "the bearer key is not one of CONSENT_API_KEYS"
            if presented
            else "send Authorization: Bearer <key> with a key from CONSENT_API_KEYS"
        )
        return Problem(401, UNAUTHORIZED, detail, headers={"WWW-Authenticate": challenge})


# --- request parsing --------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _body(request: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    """The JSON object in the request body ({} for none), with only the ``allowed`` members."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise Problem(413, TOO_LARGE, f"the body is limited to {MAX_BODY_BYTES} bytes")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise Problem(413, TOO_LARGE, f"the body is limited to {MAX_BODY_BYTES} bytes")
    if not raw:
        return {}
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        raise Problem(415, UNSUPPORTED_MEDIA_TYPE, "the body must be application/json")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Problem(422, INVALID_REQUEST, "the body is not well-formed UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise Problem(422, INVALID_REQUEST, "the body must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        names = ", ".join(repr(n[:40]) for n in unknown[:5])
        raise Problem(422, INVALID_REQUEST, f"unknown members: {names}")
    return data


def _connection_of(request: Request) -> tuple[str, str]:
    provider = request.path_params["provider"]
    settings: Settings = request.app.state.current().settings
    if provider not in provider_names(settings):
        raise Problem(404, UNKNOWN_PROVIDER, f"no provider named {provider[:40]!r}")
    try:
        user = check_user(request.path_params["user"])
    except ConsentError as exc:
        raise Problem(422, INVALID_USER, exc.message) from None
    return provider, user


def _requested_scopes(data: dict[str, Any]) -> tuple[str, ...]:
    """The scopes a caller asks for beside the provider's base scopes (the engine asks for
    both; a provisioned connection gets an upgrade session for those not granted)."""
    scopes = data.get("scopes", [])
    if not isinstance(scopes, list):
        raise Problem(422, INVALID_SCOPE, "scopes must be an array of strings")
    try:
        return check_scopes(scopes)
    except InvalidScope as exc:
        raise Problem(422, INVALID_SCOPE, exc.message) from None


# --- answers ----------------------------------------------------------------------------------


def _session_open(status: ConsentStatus, now: float) -> bool:
    # A session is open while pending, or beside the grant (an upgrade) while provisioned.
    if status.state not in (State.PENDING, State.PROVISIONED) or not status.authorization_url:
        return False
    expires = status.details.get("session_expires_at")
    if not isinstance(expires, str):
        return True
    return datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp() > now


def connection_body(status: ConsentStatus, provider: str, now: float) -> dict[str, Any]:
    """One connection as ``provision``, ``revoke`` and ``status`` answer it."""
    out: dict[str, Any] = {
        "user": status.user,
        "provider": provider,
        "state": status.state.value,
        "since": status.to_dict()["since"],
        "reason": status.reason,
        "scopes": list(status.scopes) if status.state is State.PROVISIONED else [],
    }
    if status.authorization_url and _session_open(status, now):
        out["authorization_url"] = status.authorization_url
        out["requested_scopes"] = list(status.requested_scopes)
        if status.upgrade:
            out["upgrade"] = True
    if status.scopes_missing:
        out["scopes_missing"] = list(status.scopes_missing)
    for name in _STATUS_DETAILS:
        value = status.details.get(name)
        if value is not None:
            out[name] = value
    return out


def _json(body: Any) -> JSONResponse:
    return JSONResponse(body, headers=API_HEADERS)


def _actor(request: Request) -> str:
    return f"api:{request.user.display_name}"


# --- routes -----------------------------------------------------------------------------------

Handler = Callable[[ConsentClient, Request], Awaitable[Response]]


def _endpoint(
    handler: Handler, *, query: tuple[str, ...] = ()
) -> Callable[[Request], Awaitable[Response]]:
    """The route's handler with its errors answered as problems; ``query`` names the query
    parameters it takes (any other is refused, as unknown body members are)."""

    async def endpoint(request: Request) -> Response:
        client: ConsentClient = request.app.state.current()
        try:
            unknown = sorted(set(request.query_params) - set(query))
            if unknown:
                names = ", ".join(repr(n[:40]) for n in unknown[:5])
                raise Problem(422, INVALID_REQUEST, f"unknown query parameters: {names}")
            return await handler(client, request)
        except Problem as exc:
            return exc.response()
        except ConsentError as exc:
            provider = request.path_params.get("provider", DEFAULT_PROVIDER)
            answer = problem_for(exc, provider=provider)
            if answer.status >= 500:
                log.error("api_failed", error=exc.code, path=request.url.path)
            return answer.response()
        except (RedisError, OSError) as exc:
            log.error("api_unavailable", error=type(exc).__name__, path=request.url.path)
            return Problem(503, STORE_UNAVAILABLE, "Redis did not answer; try again").response()

    return endpoint


async def _providers(client: ConsentClient, request: Request) -> Response:
    # can_revoke is None while a provider's discovery does not answer: unknown, not "no".
    return _json(
        [
            {
                "name": described["name"],
                "issuer": described["issuer"],
                "scopes": described["scopes"],
                "can_revoke": described["can_revoke"],
            }
            for described in await client.describe_providers()
        ]
    )


async def _provision(client: ConsentClient, request: Request) -> Response:
    provider, user = _connection_of(request)
    scopes = _requested_scopes(await _body(request, ("scopes",)))
    status = await client.request_provisioning(user, provider, scopes, actor=_actor(request))
    return _json(connection_body(status, provider, client.clock()))


async def _status(client: ConsentClient, request: Request) -> Response:
    provider, user = _connection_of(request)
    return _json(connection_body(await client.status(user, provider), provider, client.clock()))


async def _revoke(client: ConsentClient, request: Request) -> Response:
    provider, user = _connection_of(request)
    data = await _body(request, ("reason",))
    reasons = request.query_params.getlist("reason")
    if ("reason" in data and reasons) or len(reasons) > 1:
        raise Problem(422, INVALID_REQUEST, "give the reason once, in the body or the query")
    reason = data.get("reason", reasons[0] if reasons else None)
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_LENGTH):
        raise Problem(
            422, INVALID_REQUEST, f"the reason is a string of at most {MAX_REASON_LENGTH} chars"
        )
    status = await client.revoke(user, provider, actor=_actor(request), reason=reason or None)
    return _json(connection_body(status, provider, client.clock()))


async def _history(client: ConsentClient, request: Request) -> Response:
    provider, user = _connection_of(request)
    rows = []
    for entry in await client.history(user, provider):
        row = {k: entry[k] for k in ("event", "from", "to", "at", "actor", "reason")}
        if entry.get("count", 1) > 1:  # refreshes in a row share one entry
            row.update(count=entry["count"], first_at=entry["first_at"])
        rows.append(row)
    return _json(rows)


async def _token(client: ConsentClient, request: Request) -> Response:
    provider, user = _connection_of(request)
    data = await _body(request, ("min_ttl",))
    min_ttl = data.get("min_ttl", DEFAULT_MIN_TTL)
    if (
        isinstance(min_ttl, bool)
        or not isinstance(min_ttl, int | float)
        or not 0 <= min_ttl <= MAX_MIN_TTL
    ):
        raise Problem(
            422, INVALID_REQUEST, f"min_ttl is a number of seconds from 0 to {MAX_MIN_TTL:g}"
        )
    token = await client.access_token(user, provider, min_ttl=float(min_ttl))
    return _json(
        {"user": user, "provider": provider, "access_token": token, "token_type": "Bearer"}
    )


async def _http_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return Problem(
            405, METHOD_NOT_ALLOWED, f"allowed here: {allow}", headers={"Allow": allow}
        ).response()
    if exc.status_code == 404:
        return Problem(404, NOT_FOUND, "no such resource").response()
    return Problem(exc.status_code, INVALID_REQUEST, str(exc.detail)).response()


async def _server_problem(request: Request, exc: Exception) -> Response:
    log.error("api_crashed", error=type(exc).__name__, path=request.url.path)
    return Problem(500, INTERNAL_ERROR, "the server failed; see its log").response()


def api_routes(client: ConsentClient | Callable[[], ConsentClient]) -> list[BaseRoute]:
    """``/v1`` and ``/openapi.json``, for mounting into an existing Starlette app."""

    def current() -> ConsentClient:
        return client if isinstance(client, ConsentClient) else client()

    connection = "/connections/{provider}/{user}"
    api = Starlette(
        routes=[
            Route("/providers", _endpoint(_providers), methods=["GET"]),
            Route(connection, _endpoint(_provision), methods=["POST"]),
            Route(connection, _endpoint(_status), methods=["GET"]),
            Route(connection, _endpoint(_revoke, query=("reason",)), methods=["DELETE"]),
            Route(connection + "/history", _endpoint(_history), methods=["GET"]),
            Route(connection + "/token", _endpoint(_token), methods=["POST"]),
        ],
        middleware=[Middleware(ApiGuard, current=current)],
        exception_handlers={HTTPException: _http_problem, Exception: _server_problem},
    )
    api.state.current = current

    async def openapi(request: Request) -> Response:
        settings = current().settings
        if not settings.api_keys:
            return Problem(404, NOT_FOUND, "no such resource").response()
        return JSONResponse(
            openapi_document(settings, root_path=request.scope.get("root_path", ""))
        )

    mount = Mount(API_PREFIX, app=api, name="consent_api")
    # Starlette's prefix pattern stops at a line break: a path carrying an encoded one must still
    # reach the API and get its problem answer, not the host app's plain 404.
    mount.path_regex = re.compile(mount.path_regex.pattern, re.DOTALL)
    return [
        mount,
        Route(OPENAPI_PATH, openapi, methods=["GET"], name="consent_openapi"),
    ]


# --- the OpenAPI document ---------------------------------------------------------------------


def _problems(*statuses: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": HTTPStatus(status).phrase,
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        if status == 401:
            response["headers"] = {
                "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}
            }
        out[str(status)] = response
    return out


def _ok(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "200": {"description": description, "content": {"application/json": {"schema": schema}}}
    }


def _body_schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "required": False,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": properties,
                    "additionalProperties": False,
                }
            }
        },
    }


def openapi_document(settings: Settings, *, root_path: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 description of the routes as this deployment serves them, under
    ``root_path`` where a host app mounted them."""
    ref = "#/components/schemas/"
    path_params = [
        {
            "name": "provider",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "enum": list(provider_names(settings))},
        },
        {
            "name": "user",
            "in": "path",
            "required": True,
            "description": "The user the calling service vouches for: 1 to 255 printable "
            "characters, no whitespace and no '/'.",
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_USER_LENGTH,
                "pattern": _USER_PATTERN,
            },
        },
    ]
    connection = _ok({"$ref": ref + "Connection"}, "the connection after the call")
    common = (401, 404, 413, 415, 422, 500, 503)
    scope_token = {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_SCOPE_LENGTH,
        "pattern": "^[\\x21\\x23-\\x5b\\x5d-\\x7e]+$",
    }
    schemas: dict[str, Any] = {
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details; code is the stable error code.",
            "required": ["type", "title", "status", "detail", "code"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "code": {"type": "string"},
                "user": {"type": "string"},
                "provider": {"type": "string"},
                "state": {"type": "string", "enum": [s.value for s in State]},
                "reason": {"type": ["string", "null"]},
                "retry_after": {"type": "integer"},
            },
        },
        "Connection": {
            "type": "object",
            "required": ["user", "provider", "state", "since", "reason", "scopes"],
            "properties": {
                "user": {"type": "string"},
                "provider": {"type": "string"},
                "state": {"type": "string", "enum": [s.value for s in State]},
                "since": {"oneOf": [_RFC3339, {"type": "null"}]},
                "reason": {"type": ["string", "null"]},
                "scopes": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "granted scopes (while provisioned)",
                },
                "authorization_url": {
                    "type": "string",
                    "format": "uri",
                    "description": "while a session is open: where the user approves",
                },
                "requested_scopes": {"type": "array", "items": {"type": "string"}},
                "upgrade": {
                    "type": "boolean",
                    "description": "the open session is an upgrade: the grant keeps working",
                },
                "scopes_missing": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "asked for at the last authorization, not granted",
                },
                "access_token_expires_at": _RFC3339,
                "refresh_token_expires_at": _RFC3339,
                "next_refresh_at": _RFC3339,
                "last_refresh_at": _RFC3339,
                "refresh_failures": {"type": "integer", "minimum": 0},
                "last_refresh_error": {"type": "string"},
                "failing_since": _RFC3339,
                "session_expires_at": _RFC3339,
                "provider_revocation": {
                    "type": "string",
                    "enum": ["done", "deferred", "unsupported", "abandoned"],
                },
                "provider_revocation_note": {"type": "string"},
            },
        },
        "HistoryEntry": {
            "type": "object",
            "required": ["event", "from", "to", "at", "actor", "reason"],
            "properties": {
                "event": {"type": "string"},
                "from": {"type": "string"},
                "to": {"type": "string"},
                "at": _RFC3339,
                "actor": {"type": "string"},
                "reason": {"type": ["string", "null"]},
                "count": {"type": "integer", "minimum": 2},
                "first_at": _RFC3339,
            },
        },
        "Provider": {
            "type": "object",
            "required": ["name", "issuer", "scopes", "can_revoke"],
            "properties": {
                "name": {"type": "string"},
                "issuer": {"type": "string"},
                "scopes": {"type": "array", "items": {"type": "string"}},
                "can_revoke": {"type": ["boolean", "null"]},
            },
        },
        "Token": {
            "type": "object",
            "required": ["user", "provider", "access_token", "token_type"],
            "properties": {
                "user": {"type": "string"},
                "provider": {"type": "string"},
                "access_token": {"type": "string"},
                "token_type": {"const": "Bearer"},
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "consent-flow",
            "version": "1",
            "description": "Service-to-service API: the caller vouches for the user in the path.",
        },
        "servers": [{"url": root_path or "/"}],
        "security": [{"apiKey": []}],
        "paths": {
            API_PREFIX + "/providers": {
                "get": {
                    "operationId": "listProviders",
                    "responses": {
                        **_ok({"type": "array", "items": {"$ref": ref + "Provider"}}, "providers"),
                        **_problems(401, 404, 500, 503),
                    },
                }
            },
            API_PREFIX + "/connections/{provider}/{user}": {
                "parameters": path_params,
                "post": {
                    "operationId": "provision",
                    "requestBody": _body_schema(
                        {
                            "scopes": {
                                "type": "array",
                                "maxItems": MAX_SCOPES_ASKED,
                                "items": scope_token,
                            }
                        }
                    ),
                    "responses": {**connection, **_problems(*common, 409, 502)},
                },
                "get": {
                    "operationId": "status",
                    "responses": {**connection, **_problems(401, 404, 422, 500, 503)},
                },
                "delete": {
                    "operationId": "revoke",
                    "parameters": [
                        {
                            "name": "reason",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "maxLength": MAX_REASON_LENGTH},
                        }
                    ],
                    "requestBody": _body_schema(
                        {"reason": {"type": "string", "maxLength": MAX_REASON_LENGTH}}
                    ),
                    "responses": {**connection, **_problems(*common, 409, 502)},
                },
            },
            API_PREFIX + "/connections/{provider}/{user}/history": {
                "parameters": path_params,
                "get": {
                    "operationId": "history",
                    "responses": {
                        **_ok(
                            {"type": "array", "items": {"$ref": ref + "HistoryEntry"}},
                            "oldest first",
                        ),
                        **_problems(401, 404, 422, 500, 503),
                    },
                },
            },
            API_PREFIX + "/connections/{provider}/{user}/token": {
                "parameters": path_params,
                "post": {
                    "operationId": "accessToken",
                    "requestBody": _body_schema(
                        {"min_ttl": {"type": "number", "minimum": 0, "maximum": MAX_MIN_TTL}}
                    ),
                    "responses": {
                        **_ok({"$ref": ref + "Token"}, "a token valid at least min_ttl seconds"),
                        **_problems(*common, 409, 502),
                    },
                },
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a key from CONSENT_API_KEYS",
                }
            },
        },
    }
