"""Quick checks of the local OpenID provider (examples/provider) and its Python driver."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "provider"))

from local_provider import (
    LocalProvider,
    approve,
    approve_sync,
    callback_params,
    npm_ci,
    pkce_pair,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def provider() -> Iterator[LocalProvider]:
    npm_ci()
    op = LocalProvider.start()
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def jwk(provider: LocalProvider) -> dict[str, Any]:
    """The provider's one signing key, from its JWKS."""
    [key] = httpx.get(provider.metadata["jwks_uri"]).json()["keys"]
    assert isinstance(key, dict)
    return key


@pytest.fixture
def op(provider: LocalProvider) -> Iterator[LocalProvider]:
    """The module's provider, with no fault left armed by another test."""
    provider.clear_faults()
    yield provider
    provider.clear_faults()


# ---------------------------------------------------------------------------------------------
# helpers


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header, claims, _ = token.split(".")
    return json.loads(_b64decode(header)), json.loads(_b64decode(claims))


def _verifies_with(token: str, jwk: dict[str, Any]) -> bool:
    """Whether an RS256 JWS verifies with an RSA public JWK."""
    header, claims, signature = token.split(".")
    public_key = rsa.RSAPublicNumbers(
        int.from_bytes(_b64decode(jwk["e"]), "big"), int.from_bytes(_b64decode(jwk["n"]), "big")
    ).public_key()
    try:
        public_key.verify(
            _b64decode(signature),
            f"{header}.{claims}".encode("ascii"),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature:
        return False
    return True


async def _authorize(
    op: LocalProvider, login: str, *, scope: str = "openid offline_access", deny: bool = False
) -> tuple[str, str, dict[str, str]]:
    """Runs login + consent; returns (code_verifier, nonce, callback parameters)."""
    verifier, challenge = pkce_pair()
    nonce = secrets.token_urlsafe(16)
    url = op.authorization_url(
        state=f"state-{login}", nonce=nonce, code_challenge=challenge, scope=scope
    )
    callback = await approve(url, login, deny=deny)
    assert callback.startswith(op.clients[0]["redirect_uris"][0] + "?")
    return verifier, nonce, callback_params(callback)


async def _token_request(op: LocalProvider, **form: str) -> httpx.Response:
    client = op.clients[0]
    async with httpx.AsyncClient(timeout=10.0) as http:
        return await http.post(
            op.metadata["token_endpoint"],
            data=form,
            auth=(client["client_id"], client["client_secret"]),  # client_secret_basic
        )


async def _exchange(op: LocalProvider, code: str, verifier: str) -> httpx.Response:
    return await _token_request(
        op,
        grant_type="authorization_code",
        code=code,
        redirect_uri=op.clients[0]["redirect_uris"][0],
        code_verifier=verifier,
    )


async def _refresh(op: LocalProvider, refresh_token: str) -> httpx.Response:
    return await _token_request(op, grant_type="refresh_token", refresh_token=refresh_token)


async def _tokens(op: LocalProvider, login: str) -> dict[str, Any]:
    verifier, _, params = await _authorize(op, login)
    response = await _exchange(op, params["code"], verifier)
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


# ---------------------------------------------------------------------------------------------
# tests


def test_discovery(op: LocalProvider) -> None:
    metadata = httpx.get(op.discovery_url).json()
    assert metadata["issuer"] == op.issuer == f"http://127.0.0.1:{op.port}"
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["authorization_response_iss_parameter_supported"] is True
    assert metadata["response_types_supported"] == ["code"]
    assert {"openid", "offline_access", "notes:read", "notes:write"} <= set(
        metadata["scopes_supported"]
    )
    assert metadata["introspection_endpoint"].startswith(op.issuer)
    assert metadata["revocation_endpoint"].startswith(op.issuer)


async def test_code_flow_gives_access_refresh_and_id_token(
    op: LocalProvider, jwk: dict[str, Any]
) -> None:
    verifier, nonce, params = await _authorize(op, "alice")
    assert params["state"] == "state-alice"
    assert params["iss"] == op.issuer  # RFC 9207

    response = await _exchange(op, params["code"], verifier)
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["token_type"] == "Bearer"
    assert tokens["access_token"] and tokens["refresh_token"] and tokens["id_token"]

    header, claims = _jwt_parts(tokens["id_token"])
    assert claims["sub"] == "alice"
    assert claims["nonce"] == nonce
    assert claims["aud"] == op.clients[0]["client_id"]
    assert claims["iss"] == op.issuer
    assert header == {"alg": "RS256", "kid": jwk["kid"]}
    assert _verifies_with(tokens["id_token"], jwk)

    assert op.introspect(tokens["refresh_token"])["active"] is True
    refreshed = await _refresh(op, tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    assert refreshed.json()["refresh_token"] != tokens["refresh_token"]  # rotated


async def test_deny_gives_access_denied(op: LocalProvider) -> None:
    _, _, params = await _authorize(op, "dora", deny=True)
    assert params["error"] == "access_denied"
    assert params["state"] == "state-dora"
    assert "code" not in params


def test_approve_sync(op: LocalProvider) -> None:
    _, challenge = pkce_pair()
    url = op.authorization_url(state="s", code_challenge=challenge)
    assert "code" in callback_params(approve_sync(url, "sam"))


async def test_token_fault_answers_503(op: LocalProvider) -> None:
    verifier, _, params = await _authorize(op, "fay")
    before = op.stats()["faults_injected"]
    op.fault(token_status=503, retry_after=1, count=1)

    faulted = await _exchange(op, params["code"], verifier)
    assert faulted.status_code == 503
    assert faulted.headers["retry-after"] == "1"
    assert faulted.json() == {"error": "temporarily_unavailable"}
    assert op.stats()["faults_injected"] == before + 1

    # The fault never reached the provider: the code is still good.
    response = await _exchange(op, params["code"], verifier)
    assert response.status_code == 200, response.text


async def test_other_key_tampering(op: LocalProvider, jwk: dict[str, Any]) -> None:
    op.fault(id_token="other_key")
    tokens = await _tokens(op, "olga")

    header, claims = _jwt_parts(tokens["id_token"])
    assert header["alg"] == "RS256"
    assert header["kid"] != jwk["kid"]
    assert not _verifies_with(tokens["id_token"], jwk)
    assert claims["sub"] == "olga"  # only the key is wrong
    assert op.stats()["id_tokens_tampered"] >= 1

    # One response only (count defaults to 1).
    untouched = await _tokens(op, "olga")
    assert _verifies_with(untouched["id_token"], jwk)


async def test_revoke_grants_ends_refresh(op: LocalProvider) -> None:
    tokens = await _tokens(op, "rita")
    assert op.revoke_grants("rita") == 1
    assert op.introspect(tokens["refresh_token"])["active"] is False
    response = await _refresh(op, tokens["refresh_token"])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


async def test_refresh_token_reuse_revokes_grant(op: LocalProvider) -> None:
    tokens = await _tokens(op, "reuben")
    before = op.stats()
    rotated = (await _refresh(op, tokens["refresh_token"])).json()["refresh_token"]

    reused = await _refresh(op, tokens["refresh_token"])
    assert reused.json()["error"] == "invalid_grant"
    # The whole grant is gone, the token from the rotation included.
    assert (await _refresh(op, rotated)).json()["error"] == "invalid_grant"

    after = op.stats()
    assert after["refresh_reuse_detected"] == before["refresh_reuse_detected"] + 1
    assert after["grants_revoked"] == before["grants_revoked"] + 1


def test_starts_fast_and_controls_are_off_by_default() -> None:
    started = time.monotonic()
    with LocalProvider.start(test_controls=False) as op:
        elapsed = time.monotonic() - started
        assert httpx.get(f"{op.issuer}/__test/stats").status_code == 404
    assert not op.running
    assert elapsed < 5.0  # about 0.3 s here; generous for a loaded CI machine


async def test_fault_carries_an_error_description(op: LocalProvider) -> None:
    tokens = await _tokens(op, "dora")
    op.fault(token_status=400, token_error="invalid_grant", token_error_description="consent gone")
    faulted = await _refresh(op, tokens["refresh_token"])
    assert faulted.status_code == 400
    assert faulted.json() == {"error": "invalid_grant", "error_description": "consent gone"}
    op.fault(token_status=401, token_error="expired_client")
    assert (await _refresh(op, tokens["refresh_token"])).json() == {"error": "expired_client"}


async def test_refresh_expires_in_says_what_the_refresh_token_has_left() -> None:
    with LocalProvider.start(refresh_expires_in=True, refresh_token_ttl=120) as op:
        tokens = await _tokens(op, "kim")
        assert 115 <= tokens["refresh_expires_in"] <= 120
        assert tokens["expires_in"] == 3600
        # Rotated: the new refresh token's own lifetime.
        rotated = (await _refresh(op, tokens["refresh_token"])).json()
        assert 115 <= rotated["refresh_expires_in"] <= 120
        # Faulted answers carry no refresh token and are left alone.
        op.fault(token_status=503)
        assert (await _refresh(op, rotated["refresh_token"])).json() == {
            "error": "temporarily_unavailable"
        }
    with LocalProvider.start(refresh_expires_in=True, rotate_refresh_token=False) as op:
        tokens = await _tokens(op, "kim")
        await asyncio.sleep(1.1)
        again = (await _refresh(op, tokens["refresh_token"])).json()
        # Not rotated: the same token, with less left than at first.
        assert again["refresh_token"] == tokens["refresh_token"]
        assert again["refresh_expires_in"] < tokens["refresh_expires_in"]


async def test_off_by_default_refresh_expires_in_and_revocation(op: LocalProvider) -> None:
    tokens = await _tokens(op, "lou")
    assert "refresh_expires_in" not in tokens
    assert op.metadata["revocation_endpoint"].endswith("/token/revocation")


async def test_no_revocation_endpoint() -> None:
    with LocalProvider.start(no_revocation=True) as op:
        assert "revocation_endpoint" not in op.metadata
        tokens = await _tokens(op, "nina")
        client = op.clients[0]
        async with httpx.AsyncClient(timeout=10.0) as http:
            response = await http.post(
                f"{op.issuer}/token/revocation",
                data={"token": tokens["refresh_token"]},
                auth=(client["client_id"], client["client_secret"]),
            )
        assert response.status_code == 404
        assert op.introspect(tokens["refresh_token"])["active"] is True
