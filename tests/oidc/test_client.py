"""OAuthClient as a whole: userinfo, and no secret in any error or repr."""

from __future__ import annotations

import httpx

from consent_flow.errors import (
    IDTokenError,
    ProviderError,
    ProviderResponseError,
    ProviderUnavailable,
)
from consent_flow.oidc import (
    OAuthClient,
    TokenSet,
)

from .fakes import (
    ACCESS,
    ATTACKER_KEY,
    CODE,
    REFRESH,
    SEEN,
    SETTINGS,
    SUBJECT,
    VERIFIER,
    FakeProvider,
    assert_clean,
    claims,
    expect,
    json_response,
    raising,
    sign,
    token_body,
    validate,
)


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


async def test_no_secret_in_any_error_or_repr(client: OAuthClient, provider: FakeProvider) -> None:
    """Provoke one of each failure here (so this test stands alone), then check everything seen."""
    before = len(SEEN)  # what other tests in this process provoked is checked too, not counted
    provider.token = lambda r: json_response(
        400, {"error": f"invalid_grant {REFRESH}", "error_description": f"{CODE} {ACCESS}"}
    )
    await expect(ProviderError, client.refresh(REFRESH))
    await expect(ProviderError, client.exchange_code(CODE, code_verifier=VERIFIER))
    provider.token = raising(httpx.ConnectError)
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
    assert len(SEEN) - before == 6
