"""The token endpoint: code exchange, refresh and revocation (RFC 6749, RFC 7009), client
authentication (RFC 6749 2.3.1), and how its answers map onto the exception tree.
"""

from __future__ import annotations

import base64
import email.utils
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus, unquote_plus

import httpx
import pytest

from consent_flow.errors import (
    ClientRejected,
    GrantRejected,
    ProviderError,
    ProviderResponseError,
    ProviderUnavailable,
)
from consent_flow.oidc import (
    OAuthClient,
)
from consent_flow.oidc.transport import MAX_RESPONSE_BYTES

from .fakes import (
    ACCESS,
    CLIENT_ID,
    CLIENT_SECRET,
    CODE,
    NEW_REFRESH,
    NOW,
    REDIRECT_URI,
    REFRESH,
    SCOPES,
    VERIFIER,
    FakeProvider,
    Responder,
    discovery_doc,
    expect,
    json_response,
    raising,
    token_body,
)


async def test_exchange_code_with_client_secret_basic(
    client: OAuthClient, provider: FakeProvider
) -> None:
    tokens = await client.exchange_code(CODE, code_verifier=VERIFIER)
    request = provider.requests["/token"][0]
    scheme, _, encoded = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    raw = base64.b64decode(encoded).decode("ascii")
    user, _, password = raw.partition(":")
    assert password == quote_plus(CLIENT_SECRET)  # form-urlencoded first: ' ' -> '+', '%' -> '%25'
    for encoded in ("%25", "%2B", "%3A", "+"):
        assert encoded in password
    assert (unquote_plus(user), unquote_plus(password)) == (CLIENT_ID, CLIENT_SECRET)
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert provider.form("/token") == {
        "grant_type": "authorization_code",
        "code": CODE,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": VERIFIER,
    }
    assert tokens.access_token == ACCESS
    assert tokens.refresh_token == REFRESH
    assert tokens.token_type == "Bearer"
    assert tokens.expires_at == NOW + 3600
    assert tokens.scopes == ("openid", "offline_access", "files")
    assert request.extensions["timeout"] == {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}


async def test_exchange_code_with_client_secret_post_and_resource(
    make_client: Callable[..., OAuthClient], provider: FakeProvider
) -> None:
    client = make_client(
        token_auth_method="client_secret_post", resource="https://api.example.com/dav"
    )
    await client.exchange_code(CODE, code_verifier=VERIFIER)
    request = provider.requests["/token"][0]
    assert "authorization" not in request.headers
    form = provider.form("/token")
    assert form["client_id"] == CLIENT_ID
    assert form["client_secret"] == CLIENT_SECRET
    assert form["resource"] == "https://api.example.com/dav"


async def test_scope_defaults_to_the_requested_scopes(
    client: OAuthClient, provider: FakeProvider
) -> None:
    provider.token = lambda r: json_response(200, token_body(scope=None))
    tokens = await client.exchange_code(CODE, code_verifier=VERIFIER)
    assert tokens.scopes == SCOPES
    refreshed = await client.refresh(REFRESH, scopes=("openid", "files"))
    assert refreshed.scopes == ("openid", "files")
    assert (await client.refresh(REFRESH)).scopes == SCOPES


async def test_refresh_without_a_new_refresh_token(
    client: OAuthClient, provider: FakeProvider
) -> None:
    provider.token = lambda r: json_response(200, token_body(refresh_token=None))
    tokens = await client.refresh(REFRESH)
    assert tokens.refresh_token is None  # the caller keeps the old one
    assert provider.form("/token") == {"grant_type": "refresh_token", "refresh_token": REFRESH}
    provider.token = lambda r: json_response(200, token_body(refresh_token=NEW_REFRESH))
    assert (await client.refresh(REFRESH)).refresh_token == NEW_REFRESH


async def test_missing_expires_in_means_unknown_expiry(
    client: OAuthClient, provider: FakeProvider
) -> None:
    provider.token = lambda r: json_response(200, token_body(expires_in=None))
    assert (await client.exchange_code(CODE, code_verifier=VERIFIER)).expires_at is None
    provider.token = lambda r: json_response(200, token_body(expires_in="600", token_type="bearer"))
    tokens = await client.exchange_code(CODE, code_verifier=VERIFIER)
    assert tokens.expires_at == NOW + 600
    assert tokens.token_type == "Bearer"


@pytest.mark.parametrize("expires_in", [-5, 0, "soon", True, 1e30])
async def test_a_rotated_refresh_token_survives_a_malformed_expires_in_or_scope(
    client: OAuthClient, provider: FakeProvider, expires_in: Any
) -> None:
    provider.token = lambda r: json_response(
        200, token_body(refresh_token=NEW_REFRESH, expires_in=expires_in, scope=["files", 5])
    )
    tokens = await client.refresh(REFRESH)
    assert tokens.refresh_token == NEW_REFRESH  # the only copy of the grant is kept
    assert tokens.expires_at is None  # unknown: refreshed on the keep-alive schedule
    assert tokens.scopes == SCOPES  # as requested
    # Without a new refresh token the old one still works: the answer fails as before.
    provider.token = lambda r: json_response(
        200, token_body(refresh_token=None, expires_in=expires_in)
    )
    await expect(ProviderResponseError, client.refresh(REFRESH))
    # And a code exchange stays strict.
    provider.token = lambda r: json_response(200, token_body(expires_in=expires_in))
    await expect(ProviderResponseError, client.exchange_code(CODE, code_verifier=VERIFIER))


@pytest.mark.parametrize(
    ("value", "stated", "expires_at"),
    [
        (900, True, NOW + 900),
        ("900", True, NOW + 900),
        (0, True, None),  # Keycloak's offline tokens: the refresh token does not lapse
        (None, False, None),  # not said
        (-5, False, None),  # malformed: ignored, never fails a response that may have rotated
        ("soon", False, None),
        (True, False, None),
        (1e30, False, None),
    ],
)
async def test_refresh_expires_in(
    client: OAuthClient, provider: FakeProvider, value: Any, stated: bool, expires_at: Any
) -> None:
    provider.token = lambda r: json_response(200, token_body(refresh_expires_in=value))
    for call in (client.exchange_code(CODE, code_verifier=VERIFIER), client.refresh(REFRESH)):
        tokens = await call
        assert tokens.refresh_expiry_stated is stated
        assert tokens.refresh_expires_at == expires_at
        assert tokens.expires_at == NOW + 3600


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, "invalid_client"),
        (401, "invalid_client"),
        (400, "unauthorized_client"),
        (400, "unsupported_grant_type"),
        (400, "expired_client"),
        (401, "expired_client"),
        (403, "expired_client"),
    ],
)
async def test_client_level_errors_blame_the_client(
    client: OAuthClient, provider: FakeProvider, status: int, error: str
) -> None:
    provider.token = lambda r: json_response(status, {"error": error})
    exc = await expect(ClientRejected, client.refresh(REFRESH))
    assert exc.code == "invalid_client"
    assert exc.error == error


async def test_invalid_grant_keeps_a_sanitised_description(
    client: OAuthClient, provider: FakeProvider
) -> None:
    description = f"consent withdrawn\x1b[31m for {REFRESH} " + "y" * 500
    provider.token = lambda r: json_response(
        400, {"error": "invalid_grant", "error_description": description}
    )
    exc = await expect(GrantRejected, client.refresh(REFRESH))
    assert exc.description is not None
    assert exc.description.startswith("consent withdrawn?[31m for [redacted] yyy")
    assert "\x1b" not in exc.description
    assert REFRESH not in exc.description
    assert len(exc.description) <= 200
    provider.token = lambda r: json_response(400, {"error": "invalid_grant"})
    assert (await expect(GrantRejected, client.refresh(REFRESH))).description is None


def _retry_date(seconds: int) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(NOW + seconds, UTC), usegmt=True)


ERROR_TABLE: list[tuple[str, Responder, type[ProviderError], dict[str, Any]]] = [
    ("timeout", raising(httpx.ReadTimeout), ProviderUnavailable, {"retry_after": None}),
    ("connect timeout", raising(httpx.ConnectTimeout), ProviderUnavailable, {}),
    ("connect error", raising(httpx.ConnectError), ProviderUnavailable, {}),
    ("read error", raising(httpx.ReadError), ProviderUnavailable, {}),
    ("500", lambda r: httpx.Response(500, text="boom"), ProviderUnavailable, {"status": 500}),
    (
        "503 retry-after seconds",
        lambda r: httpx.Response(503, headers={"Retry-After": "120"}),
        ProviderUnavailable,
        {"retry_after": 120.0, "status": 503},
    ),
    (
        "503 retry-after date",
        lambda r: httpx.Response(503, headers={"Retry-After": _retry_date(90)}),
        ProviderUnavailable,
        {"retry_after": 90.0},
    ),
    (
        "503 retry-after garbage",
        lambda r: httpx.Response(503, headers={"Retry-After": "soon"}),
        ProviderUnavailable,
        {"retry_after": None},
    ),
    (
        "429",
        lambda r: httpx.Response(429, headers={"Retry-After": "7"}),
        ProviderUnavailable,
        {"retry_after": 7.0, "status": 429},
    ),
    (
        "invalid_grant",
        lambda r: json_response(
            400, {"error": "invalid_grant", "error_description": "grant request is invalid"}
        ),
        GrantRejected,
        {},
    ),
    (
        "invalid_client 401",
        lambda r: json_response(401, {"error": "invalid_client"}),
        ClientRejected,
        {},
    ),
    (
        "invalid_client 400",
        lambda r: json_response(400, {"error": "invalid_client"}),
        ClientRejected,
        {},
    ),
    ("401 bare", lambda r: httpx.Response(401), ClientRejected, {}),
    ("401 html", lambda r: httpx.Response(401, text="<html>no</html>"), ClientRejected, {}),
    (
        "invalid_request",
        lambda r: json_response(400, {"error": "invalid_request"}),
        ProviderResponseError,
        {"error": "invalid_request"},
    ),
    (
        "invalid_grant on 403 ends nothing",
        lambda r: json_response(403, {"error": "invalid_grant"}),
        ProviderResponseError,
        {"error": "invalid_grant"},
    ),
    (
        "redirect",
        lambda r: httpx.Response(307, headers={"Location": "https://x.example/"}),
        ProviderResponseError,
        {"error": None},
    ),
    (
        "200 not JSON",
        lambda r: httpx.Response(200, text="<html>ok</html>"),
        ProviderResponseError,
        {},
    ),
    ("200 JSON array", lambda r: json_response(200, [ACCESS]), ProviderResponseError, {}),
    (
        "200 NaN",
        lambda r: httpx.Response(200, text='{"access_token": "a", "expires_in": NaN}'),
        ProviderResponseError,
        {},
    ),
    (
        "missing access_token",
        lambda r: json_response(200, token_body(access_token=None)),
        ProviderResponseError,
        {},
    ),
    (
        "200 with error",
        lambda r: json_response(200, {"error": "invalid_grant"}),
        ProviderResponseError,
        {"error": "invalid_grant"},
    ),
    (
        "token_type mac",
        lambda r: json_response(200, token_body(token_type="mac")),
        ProviderResponseError,
        {},
    ),
    (
        "token_type missing",
        lambda r: json_response(200, token_body(token_type=None)),
        ProviderResponseError,
        {},
    ),
    (
        "token_type DPoP",
        lambda r: json_response(200, token_body(token_type="DPoP")),
        ProviderResponseError,
        {},
    ),
    (
        "expires_in negative",
        lambda r: json_response(200, token_body(expires_in=-5, refresh_token=None)),
        ProviderResponseError,
        {},
    ),
    (
        "expires_in zero",
        lambda r: json_response(200, token_body(expires_in=0, refresh_token=None)),
        ProviderResponseError,
        {},
    ),
    (
        "expires_in text",
        lambda r: json_response(200, token_body(expires_in="soon", refresh_token=None)),
        ProviderResponseError,
        {},
    ),
    (
        "expires_in bool",
        lambda r: json_response(200, token_body(expires_in=True, refresh_token=None)),
        ProviderResponseError,
        {},
    ),
    (
        "refresh_token not a string",
        lambda r: json_response(200, token_body(refresh_token=5)),
        ProviderResponseError,
        {},
    ),
    (
        "oversize declared",
        lambda r: httpx.Response(200, content=b"{" + b" " * (MAX_RESPONSE_BYTES + 10) + b"}"),
        ProviderResponseError,
        {},
    ),
]


@pytest.mark.parametrize(
    ("responder", "exc_type", "attrs"),
    [pytest.param(r, e, a, id=name) for name, r, e, a in ERROR_TABLE],
)
async def test_token_endpoint_error_classification(
    client: OAuthClient,
    provider: FakeProvider,
    responder: Responder,
    exc_type: type[ProviderError],
    attrs: dict[str, Any],
) -> None:
    provider.token = responder
    for call in (client.exchange_code(CODE, code_verifier=VERIFIER), client.refresh(REFRESH)):
        exc = await expect(exc_type, call)
        assert type(exc) is exc_type
        for name, value in attrs.items():
            assert getattr(exc, name) == value


async def test_error_description_is_sanitized_and_secrets_redacted(
    client: OAuthClient, provider: FakeProvider
) -> None:
    description = (
        f"code {CODE} with verifier {VERIFIER} for {quote_plus(CLIENT_SECRET)}\x1b[31m" + "z" * 500
    )
    provider.token = lambda r: json_response(
        400, {"error": "invalid_request", "error_description": description}
    )
    exc = await expect(ProviderResponseError, client.exchange_code(CODE, code_verifier=VERIFIER))
    message = str(exc)
    assert "invalid_request" in message
    assert "[redacted]" in message
    assert "\x1b" not in message
    assert len(message) < 400


async def test_revoke_authenticates_and_sends_the_hint(
    client: OAuthClient, provider: FakeProvider
) -> None:
    await client.revoke(REFRESH)
    request = provider.requests["/revoke"][0]
    assert request.headers["authorization"].startswith("Basic ")
    assert provider.form("/revoke") == {"token": REFRESH, "token_type_hint": "refresh_token"}
    await client.revoke(ACCESS, token_type_hint="access_token")
    assert provider.form("/revoke")["token_type_hint"] == "access_token"


@pytest.mark.parametrize(
    ("responder", "exc_type", "match"),
    [
        (
            lambda r: json_response(400, {"error": "unsupported_token_type"}),
            ProviderResponseError,
            "unsupported_token_type",
        ),
        (lambda r: httpx.Response(503, headers={"Retry-After": "30"}), ProviderUnavailable, "503"),
        (lambda r: httpx.Response(429), ProviderUnavailable, "429"),
        (raising(httpx.ReadTimeout), ProviderUnavailable, "timed out"),
        (
            lambda r: json_response(401, {"error": "invalid_client"}),
            ClientRejected,
            "invalid_client",
        ),
    ],
)
async def test_revoke_errors(
    client: OAuthClient,
    provider: FakeProvider,
    responder: Responder,
    exc_type: type[ProviderError],
    match: str,
) -> None:
    provider.revoke = responder
    await expect(exc_type, client.revoke(REFRESH), match=match)


async def test_revoke_without_revocation_endpoint(
    client: OAuthClient, provider: FakeProvider
) -> None:
    provider.doc = discovery_doc(revocation_endpoint=None)
    await expect(ProviderResponseError, client.revoke(REFRESH), match="no revocation_endpoint")
