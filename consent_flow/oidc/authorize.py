"""The authorization request and response: state, nonce, PKCE and the issuer check.

PKCE with S256 always (RFC 7636, RFC 9700 2.1.1); ``state`` and ``nonce`` are 256 random bits;
the authorization response's ``iss`` is checked against the provider (RFC 9207).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from consent_flow.errors import CallbackRejected
from consent_flow.settings import Settings

if TYPE_CHECKING:
    from consent_flow.oidc.discovery import ProviderMetadata

__all__ = [
    "PKCE_METHOD",
    "authorization_url",
    "b64url",
    "check_authorization_response_issuer",
    "code_challenge_s256",
    "new_code_verifier",
    "new_nonce",
    "new_state",
]

PKCE_METHOD: Final = "S256"
_VERIFIER_RE: Final = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 section 4.1


def new_state() -> str:
    """A fresh ``state`` value: 32 random bytes (256 bits), base64url (RFC 9700 4.7.1)."""
    return secrets.token_urlsafe(32)


def new_nonce() -> str:
    """A fresh ID-token ``nonce``: 32 random bytes, base64url (OpenID Connect Core 3.1.2.1)."""
    return secrets.token_urlsafe(32)


def new_code_verifier() -> str:
    """A PKCE code verifier: 48 random bytes as 64 unreserved characters (RFC 7636 4.1)."""
    return secrets.token_urlsafe(48)


def code_challenge_s256(verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(code_verifier)))`` without padding (RFC 7636 4.2).

    Raises ``ValueError`` for a verifier RFC 7636 4.1 does not allow (the value is not echoed).
    """
    if not isinstance(verifier, str) or not _VERIFIER_RE.fullmatch(verifier):
        raise ValueError("code verifier must be 43-128 unreserved characters (RFC 7636 4.1)")
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return b64url(digest)


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7636 Appendix A, RFC 7515 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def authorization_url(
    meta: ProviderMetadata,
    settings: Settings,
    *,
    state: str,
    nonce: str,
    code_challenge: str,
    scopes: Sequence[str] | None = None,
) -> str:
    """The URL to send the user's browser to (RFC 6749 4.1.1, RFC 7636 4.3, OIDC Core 3.1.2.1).

    Any query the authorization endpoint already carries is kept (RFC 6749 3.1).
    ``prompt=consent`` is added when ``offline_access`` is requested (OIDC Core 11), and
    ``resource`` when ``CONSENT_RESOURCE`` is set (RFC 8707). ``scopes``: what to ask for,
    the configured scopes when None.
    """
    if not state or not nonce or not code_challenge:
        raise ValueError("state, nonce and code_challenge are required")
    s = settings
    asked = tuple(scopes) if scopes is not None else s.scopes
    params: dict[str, str] = {
        "response_type": "code",
        "client_id": s.client_id,
        "redirect_uri": s.redirect_uri,
        "scope": " ".join(asked),
        "state": state,
        "nonce": nonce,
        "code_challenge": code_challenge,
        "code_challenge_method": PKCE_METHOD,
    }
    if "offline_access" in asked:
        params["prompt"] = "consent"
    if s.resource:
        params["resource"] = s.resource
    parts = urlsplit(meta.authorization_endpoint)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query = urlencode([*kept, *params.items()], quote_via=quote)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def check_authorization_response_issuer(meta: ProviderMetadata, iss: str | None) -> None:
    """RFC 9207 section 2.4: the callback's ``iss`` must name our provider (mix-up defence)."""
    if iss is not None:
        if iss != meta.issuer:
            raise CallbackRejected(
                "authorization response comes from another issuer",
                status=400,
                reason_code="issuer_mismatch",
            )
    elif meta.authorization_response_iss_parameter_supported:
        raise CallbackRejected(
            "authorization response lacks the iss parameter the provider promises",
            status=400,
            reason_code="issuer_missing",
        )
