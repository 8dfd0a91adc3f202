"""State, nonce and PKCE (RFC 7636), the authorization URL (RFC 6749 4.1.1, OIDC Core 3.1.2.1,
RFC 8707) and the authorization response's issuer (RFC 9207).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest

from consent_flow.errors import (
    CallbackRejected,
)
from consent_flow.oidc import (
    OAuthClient,
    ProviderMetadata,
    code_challenge_s256,
    new_code_verifier,
    new_nonce,
    new_state,
)

from .fakes import (
    CLIENT_ID,
    ISSUER,
    REDIRECT_URI,
    VERIFIER,
    FakeProvider,
    discovery_doc,
)


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
