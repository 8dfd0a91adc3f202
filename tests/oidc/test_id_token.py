"""ID-token validation as a certified relying party does it (OpenID Connect Core 3.1.3.7): a
provider that misbehaves, or a token that was tampered with, never gets a user provisioned.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from consent_flow.errors import (
    IDTokenError,
)
from consent_flow.oidc import (
    CLOCK_SKEW_LEEWAY,
    ID_TOKEN_MAX_AGE,
    IDTokenSubjectMismatch,
    OAuthClient,
)

from .fakes import (
    ACCESS,
    ATTACKER_KEY,
    CLIENT_ID,
    CLIENT_SECRET,
    EC_KEY,
    ISSUER,
    NO_KID,
    NO_KID_A,
    NO_KID_B,
    NONCE,
    NOW,
    RSA_KEY,
    SECRETS,
    SUBJECT,
    FakeProvider,
    at_hash,
    b64url,
    claims,
    discovery_doc,
    expect,
    sign,
    unsigned,
    validate,
)


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
        # Shapes the claims registry would take for another JWT use but an ID token must not have.
        ({"iss": [ISSUER]}, "issuer does not match"),
        ({"aud": 5}, "no valid audience"),
        ({"nonce": [NONCE]}, "has no nonce"),
        ({"sub": [SUBJECT]}, "has no subject"),
        ({"exp": 10**400}, "no valid exp"),
        ({"exp": True}, "no valid exp"),
        ({"iat": 10**400}, "no valid iat"),
        ({"nbf": "soon"}, "invalid nbf"),
        ({"jti": 5}, "claim 'jti' is invalid"),  # RFC 7519 4.1.7: a string
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


async def test_kid_absent_with_a_single_key(client: OAuthClient, provider: FakeProvider) -> None:
    provider.keys = [NO_KID_A]
    assert (await validate(client, sign(claims(), NO_KID_A, kid=NO_KID))).subject == SUBJECT


async def test_kid_absent_with_several_keys(client: OAuthClient, provider: FakeProvider) -> None:
    provider.keys = [EC_KEY, NO_KID_A, NO_KID_B]
    assert (await validate(client, sign(claims(), NO_KID_B, kid=NO_KID))).subject == SUBJECT
    await expect(
        IDTokenError,
        validate(client, sign(claims(), ATTACKER_KEY, kid=NO_KID)),
        match="signature does not verify",
    )


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
