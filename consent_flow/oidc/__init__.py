"""The OpenID Connect relying party, split by concern as the specifications are.

* :mod:`.transport`: a shared aiohttp session or httpx clients, one bounded request, strict JSON,
  URL checks.
* :mod:`.discovery`: the discovery document (OpenID Connect Discovery, RFC 8414) and the JWKS.
* :mod:`.authorize`: state, nonce, PKCE (RFC 7636) and the authorization URL; RFC 9207 ``iss``.
* :mod:`.tokens`: the token endpoint (RFC 6749), revocation (RFC 7009), client authentication
  and the mapping of its errors onto the exception tree.
* :mod:`.id_token`: ID-token validation (OpenID Connect Core 3.1.3.7) with joserfc's claims
  registry.
* :mod:`.client`: :class:`OAuthClient`, the one object the engine talks to.

The package imports only the exception tree and the settings of ``consent_flow``: it knows
nothing of the engine, the store or the queue.
"""

from consent_flow.oidc.authorize import code_challenge_s256, new_code_verifier, new_nonce, new_state
from consent_flow.oidc.client import OAuthClient
from consent_flow.oidc.discovery import ProviderMetadata
from consent_flow.oidc.id_token import (
    CLOCK_SKEW_LEEWAY,
    ID_TOKEN_MAX_AGE,
    IDTokenClaims,
    IDTokenSubjectMismatch,
)
from consent_flow.oidc.tokens import CLIENT_ERRORS, TokenSet
from consent_flow.oidc.transport import HttpClients, ProviderSession

__all__ = [
    "CLIENT_ERRORS",
    "CLOCK_SKEW_LEEWAY",
    "ID_TOKEN_MAX_AGE",
    "HttpClients",
    "IDTokenClaims",
    "IDTokenSubjectMismatch",
    "OAuthClient",
    "ProviderMetadata",
    "ProviderSession",
    "TokenSet",
    "code_challenge_s256",
    "new_code_verifier",
    "new_nonce",
    "new_state",
]
