"""The OpenID Connect relying party (consent_flow._oauth), against an in-process fake provider.

httpx.MockTransport is the provider here: this is the pure protocol core. Integration tests
against the real provider live elsewhere. ID tokens are signed with keys generated per session.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import hmac
import json
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qs, parse_qsl, quote_plus, unquote_plus, urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jws
from joserfc.jwk import ECKey, Key, RSAKey

from consent_flow._errors import (
    CallbackRejected,
    ClientRejected,
    GrantRejected,
    IDTokenError,
    ProviderError,
    ProviderResponseError,
    ProviderUnavailable,
)
from consent_flow._http import HttpClients
from consent_flow._oauth import (
    CLOCK_SKEW_LEEWAY,
    ID_TOKEN_MAX_AGE,
    JWKS_MIN_REFETCH_INTERVAL,
    MAX_RESPONSE_BYTES,
    METADATA_TTL,
    IDTokenClaims,
    IDTokenSubjectMismatch,
    OAuthClient,
    ProviderMetadata,
    TokenSet,
    code_challenge_s256,
    new_code_verifier,
    new_nonce,
    new_state,
)
from consent_flow._settings import Secret, Settings

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


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture(params=["shared", "lent"])
async def http(
    request: pytest.FixtureRequest, provider: FakeProvider
) -> AsyncIterator[httpx.AsyncClient | HttpClients]:
    """Every test twice: one shared client (callers, the server) and clients lent per request
    (workers)."""
    transport = httpx.MockTransport(provider)
    if request.param == "shared":
        async with httpx.AsyncClient(transport=transport, timeout=5.0) as client:
            yield client
    else:
        clients = HttpClients(transport=transport, timeout=5.0)
        try:
            yield clients
        finally:
            await clients.aclose()


@pytest.fixture
def make_client(http: httpx.AsyncClient | HttpClients, clock: Clock) -> Callable[..., OAuthClient]:
    def make(**changes: Any) -> OAuthClient:
        return OAuthClient(SETTINGS.with_changes(**changes), http, clock=clock)

    return make


@pytest.fixture
def client(make_client: Callable[..., OAuthClient]) -> OAuthClient:
    return make_client()


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


_NO_KID = object()


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
    if kid is not None and kid is not _NO_KID:
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


def test_random_values_are_long_and_fresh() -> None:
    for make in (new_state, new_nonce):
        values = {make() for _ in range(50)}
        assert len(values) == 50
        assert all(len(v) >= 43 for v in values)  # 32 bytes base64url: 256 bits
    verifier = new_code_verifier()
    assert 43 <= len(verifier) <= 128
    assert set(verifier) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    )


def test_code_challenge_matches_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert code_challenge_s256(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


@pytest.mark.parametrize("verifier", ["short", "x" * 129, "a" * 42 + "!", ""])
def test_code_challenge_refuses_invalid_verifier(verifier: str) -> None:
    with pytest.raises(ValueError, match="43-128"):
        code_challenge_s256(verifier)


# --- discovery ----------------------------------------------------------------------------------


async def test_discovery_is_validated_and_cached(
    client: OAuthClient, provider: FakeProvider, clock: Clock
) -> None:
    metas = await asyncio.gather(*(client.metadata() for _ in range(5)))
    assert provider.hits["/.well-known/openid-configuration"] == 1  # concurrent callers share
    meta = metas[0]
    assert meta.issuer == ISSUER
    assert meta.token_endpoint == f"{ISSUER}/token"
    assert meta.code_challenge_methods_supported == ("plain", "S256")
    assert meta.authorization_response_iss_parameter_supported is True
    assert meta.raw["jwks_uri"] == f"{ISSUER}/jwks"
    clock.now += METADATA_TTL - 1
    await client.metadata()
    assert provider.hits["/.well-known/openid-configuration"] == 1
    clock.now += 2
    await client.metadata()
    assert provider.hits["/.well-known/openid-configuration"] == 2


@pytest.mark.parametrize(
    "issuer", ["https://evil.example.com", f"{ISSUER}/", "https://OP.example.com"]
)
async def test_discovery_issuer_mismatch_is_refused(
    client: OAuthClient, provider: FakeProvider, issuer: str
) -> None:
    provider.doc = discovery_doc(issuer=issuer)
    await expect(ProviderResponseError, client.metadata(), match="does not equal the configured")


async def test_explicit_discovery_url_still_requires_the_configured_issuer(
    make_client: Callable[..., OAuthClient], provider: FakeProvider
) -> None:
    explicit = f"{ISSUER}/index.php/apps/oidc/openid-configuration"
    provider.doc = discovery_doc(issuer="https://other.example.com")
    await expect(
        ProviderResponseError, make_client(discovery_url=explicit).metadata(), match="issuer"
    )
    provider.doc = discovery_doc()
    assert (await make_client(discovery_url=explicit).metadata()).issuer == ISSUER
    assert provider.hits["/index.php/apps/oidc/openid-configuration"] == 2


def test_metadata_endpoints_must_be_https() -> None:
    with pytest.raises(ProviderResponseError, match="token_endpoint is not https"):
        ProviderMetadata.parse(discovery_doc(token_endpoint="http://op.example.com/token"), ISSUER)
    with pytest.raises(ProviderResponseError, match="revocation_endpoint is not https"):
        ProviderMetadata.parse(discovery_doc(revocation_endpoint="http://op.example.com/r"), ISSUER)
    with pytest.raises(ProviderResponseError, match="jwks_uri"):
        ProviderMetadata.parse(discovery_doc(jwks_uri="/jwks"), ISSUER)
    with pytest.raises(ProviderResponseError, match="token_endpoint"):
        ProviderMetadata.parse(discovery_doc(token_endpoint=None), ISSUER)
    loopback = ProviderMetadata.parse(discovery_doc(token_endpoint="http://127.0.0.1:9/t"), ISSUER)
    assert loopback.token_endpoint == "http://127.0.0.1:9/t"
    http_issuer = "http://op.test:8080"
    meta = ProviderMetadata.parse(
        discovery_doc(issuer=http_issuer, token_endpoint="http://op.test:8080/token"), http_issuer
    )
    assert meta.token_endpoint.startswith("http://")


def test_metadata_requires_s256_when_methods_are_listed() -> None:
    with pytest.raises(ProviderResponseError, match="S256"):
        ProviderMetadata.parse(discovery_doc(code_challenge_methods_supported=["plain"]), ISSUER)
    unknown = ProviderMetadata.parse(discovery_doc(code_challenge_methods_supported=None), ISSUER)
    assert unknown.code_challenge_methods_supported == ()
    defaults = ProviderMetadata.parse(
        discovery_doc(
            id_token_signing_alg_values_supported=None,
            token_endpoint_auth_methods_supported=None,
            authorization_response_iss_parameter_supported=None,
        ),
        ISSUER,
    )
    assert defaults.id_token_signing_alg_values_supported == ("RS256",)
    assert defaults.token_endpoint_auth_methods_supported == ("client_secret_basic",)
    assert defaults.authorization_response_iss_parameter_supported is False


async def test_discovery_redirect_is_not_followed(
    client: OAuthClient, provider: FakeProvider
) -> None:
    provider.discovery = lambda r: httpx.Response(302, headers={"Location": f"{ISSUER}/x"})
    await expect(ProviderResponseError, client.metadata(), match="CONSENT_DISCOVERY_URL")


async def test_stale_discovery_is_kept_while_the_provider_is_down(
    client: OAuthClient, provider: FakeProvider, clock: Clock, http: httpx.AsyncClient | HttpClients
) -> None:
    await client.metadata()
    provider.discovery = lambda r: httpx.Response(503)
    clock.now += METADATA_TTL + 1
    assert (await client.metadata()).issuer == ISSUER
    assert provider.hits["/.well-known/openid-configuration"] == 2
    await client.metadata()  # retried only after METADATA_RETRY_INTERVAL
    assert provider.hits["/.well-known/openid-configuration"] == 2
    # A client with nothing cached has nothing to fall back on.
    await expect(ProviderUnavailable, OAuthClient(SETTINGS, http, clock=clock).metadata())


# --- authorization request ----------------------------------------------------------------------


async def test_authorization_url_carries_every_parameter(
    client: OAuthClient, provider: FakeProvider
) -> None:
    provider.doc = discovery_doc(authorization_endpoint=f"{ISSUER}/authorize?tenant=acme&x=")
    state, nonce = new_state(), new_nonce()
    challenge = code_challenge_s256(VERIFIER)
    url = await client.authorization_url(state=state, nonce=nonce, code_challenge=challenge)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{ISSUER}/authorize"
    query = parse_qs(parts.query, keep_blank_values=True)
    assert query == {
        "tenant": ["acme"],
        "x": [""],
        "response_type": ["code"],
        "client_id": [CLIENT_ID],
        "redirect_uri": [REDIRECT_URI],
        "scope": ["openid offline_access files"],
        "state": [state],
        "nonce": [nonce],
        "code_challenge": [challenge],
        "code_challenge_method": ["S256"],
        "prompt": ["consent"],
    }
    assert VERIFIER not in url


async def test_authorization_url_prompt_only_with_offline_access_and_resource(
    make_client: Callable[..., OAuthClient],
) -> None:
    client = make_client(scopes=("openid", "files"), resource="https://api.example.com/dav")
    url = await client.authorization_url(state="s" * 43, nonce="n" * 43, code_challenge="c" * 43)
    query = parse_qs(urlsplit(url).query)
    assert "prompt" not in query
    assert query["scope"] == ["openid files"]
    assert query["resource"] == ["https://api.example.com/dav"]
    plain = await make_client().authorization_url(state="s", nonce="n", code_challenge="c")
    assert "resource" not in parse_qs(urlsplit(plain).query)


async def test_authorization_response_issuer(client: OAuthClient, provider: FakeProvider) -> None:
    meta = await client.metadata()
    client.check_authorization_response_issuer(meta, ISSUER)
    with pytest.raises(CallbackRejected) as info:
        client.check_authorization_response_issuer(meta, "https://evil.example.com")
    assert (info.value.status, info.value.reason_code) == (400, "issuer_mismatch")
    with pytest.raises(CallbackRejected) as info:
        client.check_authorization_response_issuer(meta, None)
    assert (info.value.status, info.value.reason_code) == (400, "issuer_missing")
    quiet = ProviderMetadata.parse(
        discovery_doc(authorization_response_iss_parameter_supported=False), ISSUER
    )
    client.check_authorization_response_issuer(quiet, None)
    with pytest.raises(CallbackRejected, match="another issuer"):
        client.check_authorization_response_issuer(quiet, f"{ISSUER}/")


# --- token endpoint -----------------------------------------------------------------------------


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


async def test_unbounded_client_timeouts_get_a_default(
    provider: FakeProvider, clock: Clock
) -> None:
    unbounded = httpx.Timeout(None)
    transport = httpx.MockTransport(provider)
    async with httpx.AsyncClient(transport=transport, timeout=unbounded) as http:
        await OAuthClient(SETTINGS, http, clock=clock).exchange_code(CODE, code_verifier=VERIFIER)
    timeout = provider.requests["/token"][0].extensions["timeout"]
    assert all(isinstance(v, float) and v > 0 for v in timeout.values())


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


def _raise(exc: type[httpx.HTTPError]) -> Responder:
    def responder(request: httpx.Request) -> httpx.Response:
        raise exc("simulated", request=request)  # type: ignore[call-arg]

    return responder


def _retry_date(seconds: int) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(NOW + seconds, UTC), usegmt=True)


ERROR_TABLE: list[tuple[str, Responder, type[ProviderError], dict[str, Any]]] = [
    ("timeout", _raise(httpx.ReadTimeout), ProviderUnavailable, {"retry_after": None}),
    ("connect timeout", _raise(httpx.ConnectTimeout), ProviderUnavailable, {}),
    ("connect error", _raise(httpx.ConnectError), ProviderUnavailable, {}),
    ("read error", _raise(httpx.ReadError), ProviderUnavailable, {}),
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
        lambda r: json_response(200, token_body(expires_in=-5)),
        ProviderResponseError,
        {},
    ),
    (
        "expires_in zero",
        lambda r: json_response(200, token_body(expires_in=0)),
        ProviderResponseError,
        {},
    ),
    (
        "expires_in text",
        lambda r: json_response(200, token_body(expires_in="soon")),
        ProviderResponseError,
        {},
    ),
    (
        "expires_in bool",
        lambda r: json_response(200, token_body(expires_in=True)),
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


async def test_oversize_body_is_not_read_in_full(
    client: OAuthClient, provider: FakeProvider
) -> None:
    consumed = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal consumed
        for _ in range(1000):
            consumed += 1
            yield b"x" * 65536

    provider.token = lambda r: httpx.Response(200, content=body())
    await expect(ProviderResponseError, client.refresh(REFRESH), match="larger than")
    assert consumed <= MAX_RESPONSE_BYTES // 65536 + 2


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


# --- revocation ---------------------------------------------------------------------------------


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
        (_raise(httpx.ReadTimeout), ProviderUnavailable, "timed out"),
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


# --- userinfo -----------------------------------------------------------------------------------


async def test_userinfo(client: OAuthClient, provider: FakeProvider) -> None:
    info = await client.userinfo(ACCESS, expected_subject=SUBJECT)
    assert info["sub"] == SUBJECT
    assert provider.requests["/userinfo"][0].headers["authorization"] == f"Bearer {ACCESS}"
    await expect(ProviderResponseError, client.userinfo(ACCESS, expected_subject="other"))
    provider.userinfo = lambda r: httpx.Response(
        401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
    )
    exc = await expect(ProviderResponseError, client.userinfo(ACCESS))
    assert exc.error == "invalid_token"


# --- ID token validation (OpenID RP certification style) ----------------------------------------


async def test_valid_id_token_passes(client: OAuthClient) -> None:
    token = sign(claims(at_hash=at_hash(ACCESS)))
    result = await validate(client, token, access_token=ACCESS)
    assert result.subject == SUBJECT
    assert result.issuer == ISSUER
    assert result.audience == (CLIENT_ID,)
    assert result.expires_at == int(NOW) + 300
    assert result.issued_at == int(NOW)
    assert result.nonce == NONCE
    assert result.claims["auth_time"] == int(NOW) - 10
    assert "sub" not in result.claims
    assert NONCE not in repr(result)


async def test_valid_es256_id_token_passes(client: OAuthClient) -> None:
    assert (await validate(client, sign(claims(), EC_KEY, "ES256"))).subject == SUBJECT


async def test_expected_subject_none_skips_the_subject_match(client: OAuthClient) -> None:
    result = await validate(client, sign(claims(sub="someone-else")), expected_subject=None)
    assert result.subject == "someone-else"


async def test_bad_signature(client: OAuthClient) -> None:
    await expect(
        IDTokenError,
        validate(client, sign(claims(), ATTACKER_KEY)),
        match="signature does not verify",
    )
    header, _, signature = sign(claims()).split(".")
    forged = b64url(json.dumps(claims(sub="admin")).encode())
    await expect(
        IDTokenError,
        validate(client, f"{header}.{forged}.{signature}"),
        match="signature does not verify",
    )
    await expect(
        IDTokenError,
        validate(client, sign(claims(), EC_KEY, "ES256", kid="ec-1")[:-4] + "AAAA"),
        match="signature does not verify",
    )


async def test_alg_none_is_refused(client: OAuthClient) -> None:
    await expect(
        IDTokenError, validate(client, unsigned({"alg": "none"}, claims())), match="alg none"
    )
    await expect(
        IDTokenError,
        validate(client, unsigned({"alg": "None"}, claims(), b"x")),
        match="not accepted",
    )


async def test_hs256_signed_with_the_client_secret_is_refused(
    client: OAuthClient, provider: FakeProvider
) -> None:
    provider.doc = discovery_doc(id_token_signing_alg_values_supported=["RS256", "HS256"])
    header = {"alg": "HS256"}
    signing_input = ".".join(
        [b64url(json.dumps(header).encode()), b64url(json.dumps(claims()).encode())]
    )
    mac = hmac.new(CLIENT_SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(mac)}"
    SECRETS.add(token)
    await expect(IDTokenError, validate(client, token), match="'HS256' is not accepted")


async def test_alg_the_provider_does_not_advertise_is_refused(
    client: OAuthClient, provider: FakeProvider
) -> None:
    provider.doc = discovery_doc(id_token_signing_alg_values_supported=None)  # default RS256
    await expect(
        IDTokenError,
        validate(client, sign(claims(), EC_KEY, "ES256")),
        match="not among the provider's advertised",
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"iss": "https://evil.example.com"}, "issuer does not match"),
        ({"iss": f"{ISSUER}/"}, "issuer does not match"),
        ({"iss": None}, "issuer does not match"),
        ({"aud": "another-client"}, "audience does not include this client"),
        ({"aud": ["another-client"]}, "audience does not include this client"),
        ({"aud": None}, "no valid audience"),
        ({"aud": [CLIENT_ID, "another-client"]}, "several audiences but no azp"),
        ({"aud": [CLIENT_ID, "another-client"], "azp": "another-client"}, "azp is not this client"),
        ({"azp": "another-client"}, "azp is not this client"),
        ({"nonce": "not-the-nonce"}, "nonce does not match"),
        ({"nonce": None}, "has no nonce"),
        ({"exp": int(NOW) - 31}, "has expired"),
        ({"exp": None}, "no valid exp"),
        ({"exp": "tomorrow"}, "no valid exp"),
        ({"iat": int(NOW) + 31}, "issued in the future"),
        ({"iat": int(NOW - ID_TOKEN_MAX_AGE - CLOCK_SKEW_LEEWAY - 1)}, "too old"),
        ({"iat": None}, "no valid iat"),
        ({"nbf": int(NOW) + 120}, "not valid yet"),
        ({"sub": None}, "has no subject"),
        ({"sub": ""}, "has no subject"),
        ({"sub": 42}, "has no subject"),
        ({"sub": "x" * 256}, "subject is not 1-255"),
        ({"sub": "usér"}, "subject is not 1-255"),
    ],
)
async def test_claim_checks(client: OAuthClient, overrides: dict[str, Any], match: str) -> None:
    payload = claims(**overrides)
    for name, value in overrides.items():
        if value is None:
            payload.pop(name, None)
    await expect(IDTokenError, validate(client, sign(payload), expected_subject=None), match=match)


async def test_claims_inside_the_leeway_pass(client: OAuthClient) -> None:
    token = sign(claims(exp=int(NOW) - 29, iat=int(NOW) + 29, nbf=int(NOW) + 29))
    assert (await validate(client, token)).subject == SUBJECT
    multi = sign(claims(aud=[CLIENT_ID, "another"], azp=CLIENT_ID))
    assert (await validate(client, multi)).audience == (CLIENT_ID, "another")


async def test_subject_mismatch(client: OAuthClient) -> None:
    exc = await expect(
        IDTokenSubjectMismatch,
        validate(client, sign(claims(sub="intruder")), expected_subject=SUBJECT),
    )
    assert str(exc) == "ID token subject does not match the user"
    assert isinstance(exc, IDTokenError)
    assert (exc.expected_subject, exc.subject, exc.user) == (SUBJECT, "intruder", SUBJECT)
    assert "intruder" not in str(exc)


async def test_unknown_kid_refetches_the_jwks_once(
    client: OAuthClient, provider: FakeProvider, clock: Clock
) -> None:
    await validate(client, sign(claims()))
    assert provider.hits["/jwks"] == 1
    # The provider rotates in a new key; a token signed with it triggers exactly one refetch.
    provider.keys = [RSA_KEY, RSA_KEY_ROTATED]
    clock.now += JWKS_MIN_REFETCH_INTERVAL + 1
    rotated = sign(claims(iat=int(clock.now), exp=int(clock.now) + 300), RSA_KEY_ROTATED)
    assert (await validate(client, rotated)).subject == SUBJECT
    assert provider.hits["/jwks"] == 2
    # A kid the provider does not know: one refetch, then the token is refused ...
    clock.now += JWKS_MIN_REFETCH_INTERVAL + 1
    unknown = sign(claims(iat=int(clock.now), exp=int(clock.now) + 300), ATTACKER_KEY, kid="nope")
    await expect(IDTokenError, validate(client, unknown), match="not in the provider's JWKS")
    assert provider.hits["/jwks"] == 3
    # ... and a flood of such tokens does not hammer the provider.
    for _ in range(5):
        await expect(IDTokenError, validate(client, unknown), match="not in the provider's JWKS")
    assert provider.hits["/jwks"] == 3


async def test_first_fetch_with_unknown_kid_does_not_refetch(
    client: OAuthClient, provider: FakeProvider
) -> None:
    await expect(IDTokenError, validate(client, sign(claims(), ATTACKER_KEY, kid="nope")))
    assert provider.hits["/jwks"] == 1


async def test_kid_absent_with_a_single_key(client: OAuthClient, provider: FakeProvider) -> None:
    provider.keys = [NO_KID_A]
    assert (await validate(client, sign(claims(), NO_KID_A, kid=_NO_KID))).subject == SUBJECT


async def test_kid_absent_with_several_keys(client: OAuthClient, provider: FakeProvider) -> None:
    provider.keys = [EC_KEY, NO_KID_A, NO_KID_B]
    assert (await validate(client, sign(claims(), NO_KID_B, kid=_NO_KID))).subject == SUBJECT
    await expect(
        IDTokenError,
        validate(client, sign(claims(), ATTACKER_KEY, kid=_NO_KID)),
        match="signature does not verify",
    )


async def test_symmetric_and_encryption_keys_in_the_jwks_are_ignored(
    client: OAuthClient, provider: FakeProvider
) -> None:
    provider.jwks = lambda r: json_response(
        200,
        {
            "keys": [
                {"kty": "oct", "k": b64url(CLIENT_SECRET.encode()), "kid": "rsa-1"},
                {**RSA_KEY_ROTATED.as_dict(private=False), "use": "enc", "kid": "rsa-1"},
                {"kty": "RSA", "kid": "broken", "n": "AQAB"},
                RSA_KEY.as_dict(private=False),
            ]
        },
    )
    assert (await validate(client, sign(claims()))).subject == SUBJECT
    await expect(IDTokenError, validate(client, sign(claims(), RSA_KEY_ROTATED)))


async def test_jwks_unavailable(client: OAuthClient, provider: FakeProvider) -> None:
    provider.jwks = lambda r: httpx.Response(503)
    await expect(ProviderUnavailable, validate(client, sign(claims())))
    provider.jwks = lambda r: json_response(200, {"keys": []})
    await expect(ProviderResponseError, validate(client, sign(claims())), match="no usable")


@pytest.mark.parametrize(
    ("token", "match"),
    [
        (
            ".".join([b64url(b'{"alg":"RSA-OAEP","enc":"A256GCM"}'), "a", "b", "c", "d"]),
            "encrypted",
        ),
        (b64url(b'{"alg":"dir","enc":"A256GCM"}') + ".e30.x", "encrypted"),
        ("not-a-token", "not a compact JWS"),
        ("a.b", "not a compact JWS"),
        ("a.b.c.d", "not a compact JWS"),
        (b64url(b'{"alg":"RS256"}') + "..sig", "not a compact JWS"),
        ("%%%.e30.x", "not base64url JSON"),
        (b64url(b"[1]") + ".e30.x", "not a JSON object"),
        (None, "carries no ID token"),
        ("", "carries no ID token"),
    ],
)
async def test_malformed_and_encrypted_tokens_are_refused(
    client: OAuthClient, token: str | None, match: str
) -> None:
    await expect(IDTokenError, validate(client, token), match=match)


async def test_jose_header_extensions_and_foreign_types_are_refused(client: OAuthClient) -> None:
    protected = {"alg": "RS256", "kid": "rsa-1", "crit": ["exp"], "exp": 1}
    header = b64url(json.dumps(protected).encode())
    signing_input = f"{header}.{b64url(json.dumps(claims()).encode())}"
    private = RSA_KEY.get_op_key("sign")
    assert isinstance(private, rsa.RSAPrivateKey)
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    critical = f"{signing_input}.{b64url(signature)}"
    SECRETS.add(critical)
    await expect(IDTokenError, validate(client, critical), match="crit")
    await expect(IDTokenError, validate(client, sign(claims(), typ="at+jwt")), match="typ")
    assert (await validate(client, sign(claims(), typ="JWT"))).subject == SUBJECT


async def test_at_hash(client: OAuthClient) -> None:
    token = sign(claims(at_hash=at_hash("some-other-token")))
    await expect(
        IDTokenError, validate(client, token, access_token=ACCESS), match="at_hash does not match"
    )
    # Without the access token at hand there is nothing to compare.
    assert (await validate(client, token)).subject == SUBJECT
    es = sign(claims(at_hash=at_hash(ACCESS)), EC_KEY, "ES256")
    assert (await validate(client, es, access_token=ACCESS)).subject == SUBJECT


async def test_missing_nonce_argument_is_refused(client: OAuthClient) -> None:
    await expect(IDTokenError, validate(client, sign(claims(nonce="")), nonce=""))


# --- no secret anywhere -------------------------------------------------------------------------


async def test_no_secret_in_any_error_or_repr(client: OAuthClient, provider: FakeProvider) -> None:
    """Provoke one of each failure here (so this test stands alone), then check everything seen."""
    provider.token = lambda r: json_response(
        400, {"error": f"invalid_grant {REFRESH}", "error_description": f"{CODE} {ACCESS}"}
    )
    await expect(ProviderError, client.refresh(REFRESH))
    await expect(ProviderError, client.exchange_code(CODE, code_verifier=VERIFIER))
    provider.token = _raise(httpx.ConnectError)
    await expect(ProviderUnavailable, client.exchange_code(CODE, code_verifier=VERIFIER))
    provider.revoke = lambda r: json_response(
        400, {"error": "unsupported_token_type", "error_description": REFRESH}
    )
    await expect(ProviderResponseError, client.revoke(REFRESH))
    await expect(IDTokenError, validate(client, sign(claims(), ATTACKER_KEY)))
    await expect(IDTokenError, validate(client, sign(claims(nonce="x"))))

    provider.token = lambda r: json_response(200, token_body(id_token=sign(claims())))
    tokens = await client.exchange_code(CODE, code_verifier=VERIFIER)
    id_claims = await validate(client, tokens.id_token, access_token=tokens.access_token)
    assert isinstance(tokens, TokenSet)
    assert repr(tokens).startswith("TokenSet(access_token=<redacted>, refresh_token=<present>")
    for obj in (tokens, id_claims, client, SETTINGS, await client.metadata(), *SEEN):
        assert_clean(obj)
    assert len(SEEN) >= 7
