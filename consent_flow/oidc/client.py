"""The OpenID Connect relying party the engine talks to: a confidential client, async on httpx
or aiohttp.

:class:`OAuthClient` composes the parts of this package (discovery, the authorization request,
the token endpoint, ID-token validation) for one provider and one client, and adds userinfo.

What it is held to:

* OAuth 2.0 Security BCP (RFC 9700) for confidential clients: PKCE S256 always, exact redirect URI,
  RFC 9207 issuer identification, no redirects followed on any request, https everywhere except
  loopback (or an http issuer a developer configured on purpose).
* OpenID Connect Core 1.0 section 3.1.3.7, as a certified RP checks it: a provider that misbehaves,
  or a token that was tampered with, never gets a user provisioned.
* No token, code, verifier, client secret or key appears in an exception message, a repr or a log
  line. This package logs nothing itself.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import httpx

from consent_flow.errors import ProviderResponseError
from consent_flow.oidc import authorize
from consent_flow.oidc.discovery import Discovery, ProviderMetadata
from consent_flow.oidc.id_token import IDTokenClaims, IDTokenValidator
from consent_flow.oidc.tokens import (
    MAX_ERROR_CODE_CHARS,
    TokenEndpoint,
    TokenSet,
    error_for,
    sanitize,
)
from consent_flow.oidc.transport import HttpClients, ProviderSession, Transport, json_object
from consent_flow.settings import Settings

__all__ = ["OAuthClient"]


class OAuthClient:
    """OpenID Connect relying party for one provider and one confidential client.

    Share one instance per process: discovery and the key set are cached on it, and concurrent
    callers share a single fetch. ``http`` is one ``httpx.AsyncClient`` for every request,
    :class:`HttpClients` that lend each request a client of its own, or one
    :class:`ProviderSession` (aiohttp) for all (workers: many provider calls at once, for the
    least CPU).
    """

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient | HttpClients | ProviderSession,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._transport = Transport(http)
        self._discovery = Discovery(settings, self._transport, clock=clock)
        self._tokens = TokenEndpoint(settings, self._transport, clock=clock)
        self._id_tokens = IDTokenValidator(
            self._discovery, client_id=settings.client_id, clock=clock
        )

    def __repr__(self) -> str:
        s = self._settings
        return f"OAuthClient(issuer={s.issuer!r}, client_id={s.client_id!r})"

    # discovery -----------------------------------------------------------------------------------

    @property
    def discovery_url(self) -> str:
        return self._discovery.url

    async def metadata(self) -> ProviderMetadata:
        """The validated discovery document, cached for :data:`~.discovery.METADATA_TTL`."""
        return await self._discovery.metadata()

    # authorization request -----------------------------------------------------------------------

    async def authorization_url(
        self,
        *,
        state: str,
        nonce: str,
        code_challenge: str,
        scopes: Sequence[str] | None = None,
    ) -> str:
        """The URL to send the user's browser to (RFC 6749 4.1.1, RFC 7636 4.3, OIDC Core 3.1.2.1).

        Any query the authorization endpoint already carries is kept (RFC 6749 3.1).
        ``prompt=consent`` is added when ``offline_access`` is requested (OIDC Core 11), and
        ``resource`` when ``CONSENT_RESOURCE`` is set (RFC 8707).
        """
        if not state or not nonce or not code_challenge:
            raise ValueError("state, nonce and code_challenge are required")
        meta = await self.metadata()
        return authorize.authorization_url(
            meta,
            self._settings,
            state=state,
            nonce=nonce,
            code_challenge=code_challenge,
            scopes=scopes,
        )

    def check_authorization_response_issuer(self, meta: ProviderMetadata, iss: str | None) -> None:
        """RFC 9207 section 2.4: the callback's ``iss`` must name our provider (mix-up defence)."""
        authorize.check_authorization_response_issuer(meta, iss)

    # token endpoint ------------------------------------------------------------------------------

    async def exchange_code(
        self, code: str, *, code_verifier: str, scopes: Sequence[str] | None = None
    ) -> TokenSet:
        """Redeem an authorization code (RFC 6749 4.1.3, RFC 7636 4.5). ``scopes``: what the
        session asked for, which the result reports when the response omits ``scope``.

        The returned ``id_token`` is not validated here: call :meth:`validate_id_token` with it
        (it refuses a missing one) and revoke the tokens if that fails.
        """
        meta = await self.metadata()
        return await self._tokens.exchange_code(
            meta.token_endpoint, code, code_verifier=code_verifier, scopes=scopes
        )

    async def refresh(self, refresh_token: str, *, scopes: Sequence[str] | None = None) -> TokenSet:
        """Use a refresh token (RFC 6749 6).

        ``refresh_token`` of the result is ``None`` when the provider did not rotate it: keep the
        old one. ``scopes`` (the previous grant's) is what the result reports when the response
        omits ``scope``; without it, the configured scopes.
        """
        meta = await self.metadata()
        return await self._tokens.refresh(meta.token_endpoint, refresh_token, scopes=scopes)

    async def revoke(
        self,
        token: str,
        *,
        token_type_hint: str | None = "refresh_token",  # noqa: S107
    ) -> None:
        """Revoke a token at the provider (RFC 7009 2.1), client authenticated.

        Returns on 200, which the provider also answers for a token it does not know (2.2).
        """
        meta = await self.metadata()
        if not meta.revocation_endpoint:
            raise ProviderResponseError(
                "provider advertises no revocation_endpoint; the token cannot be revoked there"
            )
        await self._tokens.revoke(meta.revocation_endpoint, token, token_type_hint=token_type_hint)

    # userinfo ------------------------------------------------------------------------------------

    async def userinfo(
        self, access_token: str, *, expected_subject: str | None = None
    ) -> Mapping[str, Any]:
        """The userinfo claims (OIDC Core 5.3). Only plain JSON responses are supported.

        With ``expected_subject``, the answer's ``sub`` must equal it (OIDC Core 5.3.2).
        """
        meta = await self.metadata()
        what = "userinfo endpoint"
        if not meta.userinfo_endpoint:
            raise ProviderResponseError("provider advertises no userinfo_endpoint")
        reply = await self._transport.request(
            "GET",
            meta.userinfo_endpoint,
            what=what,
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )
        if reply.status in (401, 403):
            # RFC 6750 3: the reason is the WWW-Authenticate challenge's error attribute.
            challenge = reply.headers.get("www-authenticate", "")
            found = re.search(r'error="([^"]*)"', challenge)
            code = (
                sanitize(found.group(1), (access_token,), MAX_ERROR_CODE_CHARS) if found else None
            )
            raise ProviderResponseError(
                f"userinfo endpoint refused the access token (HTTP {reply.status}"
                + (f", {code})" if code else ")"),
                error=code or "invalid_token",
            )
        if reply.status != 200:
            raise error_for(reply, what, now=self._clock(), oauth=False, secrets_=(access_token,))
        ctype = reply.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/jwt":
            raise ProviderResponseError("signed or encrypted userinfo responses are not supported")
        doc = json_object(reply.body, what)
        sub = doc.get("sub")
        if not isinstance(sub, str) or not sub:
            raise ProviderResponseError("userinfo response has no subject")
        if expected_subject is not None and sub != expected_subject:
            raise ProviderResponseError("userinfo subject does not match the user")
        return MappingProxyType(doc)

    # ID token ------------------------------------------------------------------------------------

    async def validate_id_token(
        self,
        id_token: str | None,
        *,
        nonce: str,
        expected_subject: str | None,
        access_token: str | None = None,
    ) -> IDTokenClaims:
        """Check an ID token from the token endpoint (OpenID Connect Core 1.0 3.1.3.7).

        JWS only, signed with an asymmetric algorithm the provider advertises, by a key of the
        provider's JWKS; ``iss``, ``aud``/``azp``, ``exp``, ``iat``, ``nbf``, ``nonce`` and ``sub``
        checked; ``at_hash`` checked when present and ``access_token`` is given (3.2.2.9); ``sub``
        must equal ``expected_subject`` unless that is ``None``. Any failure raises
        :class:`IDTokenError` (:class:`IDTokenSubjectMismatch` for the last check).
        """
        return await self._id_tokens.validate(
            id_token,
            nonce=nonce,
            expected_subject=expected_subject,
            access_token=access_token,
        )
