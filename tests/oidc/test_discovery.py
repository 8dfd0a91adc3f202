"""The discovery document (OpenID Connect Discovery, RFC 8414): validated and cached; the JWKS:
parsed, cached, refetched once for an unknown kid.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from consent_flow.errors import (
    IDTokenError,
    ProviderResponseError,
    ProviderUnavailable,
)
from consent_flow.oidc import (
    HttpClients,
    OAuthClient,
    ProviderMetadata,
)
from consent_flow.oidc.discovery import JWKS_MIN_REFETCH_INTERVAL, METADATA_TTL

from .fakes import (
    ATTACKER_KEY,
    CLIENT_SECRET,
    ISSUER,
    RSA_KEY,
    RSA_KEY_ROTATED,
    SETTINGS,
    SUBJECT,
    Clock,
    FakeProvider,
    b64url,
    claims,
    discovery_doc,
    expect,
    json_response,
    sign,
    validate,
)


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
