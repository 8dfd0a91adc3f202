"""The in-process fake provider, keys, and helpers shared by the OIDC unit tests.

httpx.MockTransport is the provider here: this is the pure protocol core. Integration tests
against the real provider live elsewhere. ID tokens are signed with keys generated per session.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote_plus

import httpx
import pytest
from joserfc import jws
from joserfc.jwk import ECKey, Key, RSAKey

from consent_flow.oidc import (
    IDTokenClaims,
    OAuthClient,
    new_code_verifier,
    new_nonce,
)
from consent_flow.settings import Secret, Settings

NOW = 1_700_000_000.0
ISSUER = "https://op.example.com"
DISCOVERY = f"{ISSUER}/.well-known/openid-configuration"
CLIENT_ID = "consent-client"
CLIENT_SECRET = "s3cr%et+with: colon&=/"  # '%', '+', ':', ' ' must survive client_secret_basic
REDIRECT_URI = "https://rp.example.com/oauth/callback"
SCOPES = ("openid", "offline_access", "files")
SUBJECT = "user-42"
NONCE = new_nonce()
CODE = "authcode-SECRET-7d1f0a"
VERIFIER = new_code_verifier()
ACCESS = "access-SECRET-9a8b7c"
REFRESH = "refresh-SECRET-1c2d3e"
NEW_REFRESH = "refresh-SECRET-rotated-4f5a"

SETTINGS = Settings(
    issuer=ISSUER,
    discovery_url=DISCOVERY,
    client_id=CLIENT_ID,
    client_secret=Secret(CLIENT_SECRET),
    redirect_uri=REDIRECT_URI,
    scopes=SCOPES,
)

RSA_KEY = RSAKey.generate_key(2048, {"kid": "rsa-1", "use": "sig"})
RSA_KEY_ROTATED = RSAKey.generate_key(2048, {"kid": "rsa-2", "use": "sig"})
ATTACKER_KEY = RSAKey.generate_key(2048, {"kid": "rsa-1"})  # same kid as the real one
EC_KEY = ECKey.generate_key("P-256", {"kid": "ec-1"})
NO_KID_A = RSAKey.generate_key(2048)
NO_KID_B = RSAKey.generate_key(2048)

# Every value that must never show up in an exception message, a repr or an attribute.
SECRETS: set[str] = {
    CLIENT_SECRET,
    quote_plus(CLIENT_SECRET),
    CODE,
    VERIFIER,
    ACCESS,
    REFRESH,
    NEW_REFRESH,
}
for _key in (RSA_KEY, RSA_KEY_ROTATED, ATTACKER_KEY, EC_KEY, NO_KID_A, NO_KID_B):
    SECRETS.add(str(_key.as_dict(private=True)["d"]))
SEEN: list[object] = []  # every exception the tests provoked, checked again at the end


# --- the fake provider --------------------------------------------------------------------------

Responder = Callable[[httpx.Request], httpx.Response]


def json_response(status: int, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.Response(status, json=body, **kwargs)


def token_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": ACCESS,
        "token_type": "Bearer",
        "expires_in": 3600,
        "refresh_token": REFRESH,
        "scope": "openid offline_access files",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def discovery_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "issuer": ISSUER,
        "authorization_endpoint": f"{ISSUER}/authorize",
        "token_endpoint": f"{ISSUER}/token",
        "jwks_uri": f"{ISSUER}/jwks",
        "revocation_endpoint": f"{ISSUER}/revoke",
        "userinfo_endpoint": f"{ISSUER}/userinfo",
        "code_challenge_methods_supported": ["plain", "S256"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "authorization_response_iss_parameter_supported": True,
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


class FakeProvider:
    def __init__(self) -> None:
        self.doc = discovery_doc()
        self.keys: list[Key] = [RSA_KEY, EC_KEY]
        self.discovery: Responder = lambda r: json_response(200, self.doc)
        self.token: Responder = lambda r: json_response(200, token_body())
        self.revoke: Responder = lambda r: httpx.Response(200)
        self.userinfo: Responder = lambda r: json_response(200, {"sub": SUBJECT, "name": "A"})
        self.jwks: Responder = lambda r: json_response(
            200, {"keys": [k.as_dict(private=False) for k in self.keys]}
        )
        self.hits: Counter[str] = Counter()
        self.requests: defaultdict[str, list[httpx.Request]] = defaultdict(list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.hits[path] += 1
        self.requests[path].append(request)
        routes: dict[tuple[str, str], Responder] = {
            ("GET", "/.well-known/openid-configuration"): self.discovery,
            ("GET", "/jwks"): self.jwks,
            ("POST", "/token"): self.token,
            ("POST", "/revoke"): self.revoke,
            ("GET", "/userinfo"): self.userinfo,
        }
        if request.method == "GET" and path.endswith("/openid-configuration"):
            path = "/.well-known/openid-configuration"
        responder = routes.get((request.method, path))
        if responder is None:
            return httpx.Response(404)
        return responder(request)

    def form(self, path: str, index: int = -1) -> dict[str, str]:
        return dict(parse_qsl(self.requests[path][index].content.decode()))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- helpers ------------------------------------------------------------------------------------


def texts_of(obj: object) -> Iterator[str]:
    yield str(obj)
    yield repr(obj)
    if isinstance(obj, BaseException):
        yield from (repr(a) for a in obj.args)
        yield from (repr(v) for v in vars(obj).values())
        for linked in (obj.__cause__, obj.__context__):
            if linked is not None:
                yield from texts_of(linked)


def assert_clean(obj: object) -> None:
    for text in texts_of(obj):
        for secret in SECRETS:
            assert secret not in text, f"a secret leaked into {type(obj).__name__}"


E = TypeVar("E", bound=BaseException)


async def expect(exc_type: type[E], awaitable: Awaitable[object], match: str | None = None) -> E:
    with pytest.raises(exc_type, match=match) as info:
        await awaitable
    SEEN.append(info.value)
    assert_clean(info.value)
    return info.value


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": CLIENT_ID,
        "sub": SUBJECT,
        "exp": int(NOW) + 300,
        "iat": int(NOW),
        "nonce": NONCE,
        "auth_time": int(NOW) - 10,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


NO_KID = object()
"""Pass as ``kid`` to :func:`sign` for a token without a kid header."""


def sign(
    payload: dict[str, Any],
    key: Key = RSA_KEY,
    alg: str = "RS256",
    *,
    kid: Any = None,
    **header: Any,
) -> str:
    protected: dict[str, Any] = {"alg": alg, **header}
    kid = key.kid if kid is None else kid
    if kid is not None and kid is not NO_KID:
        protected["kid"] = kid
    registry = jws.JWSRegistry(algorithms=[alg], strict_check_header=False)
    token = jws.serialize_compact(protected, json.dumps(payload), key, registry=registry)
    SECRETS.add(token)
    return token


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    token = ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(payload).encode()),
            b64url(signature),
        ]
    )
    SECRETS.add(token)
    return token


def at_hash(value: str) -> str:
    return b64url(hashlib.sha256(value.encode()).digest()[:16])


async def validate(client: OAuthClient, token: str | None, **kwargs: Any) -> IDTokenClaims:
    kwargs.setdefault("nonce", NONCE)
    kwargs.setdefault("expected_subject", SUBJECT)
    return await client.validate_id_token(token, **kwargs)


# --- random values and PKCE ---------------------------------------------------------------------


def raising(exc: type[httpx.HTTPError]) -> Responder:
    """A responder whose request fails in transport with ``exc``."""

    def responder(request: httpx.Request) -> httpx.Response:
        raise exc("simulated", request=request)  # type: ignore[call-arg]

    return responder
