"""The OpenID Connect relying party: a confidential client, async on httpx.

Protocol core of flow 2 (progressive consent): discovery, the authorization URL (PKCE S256, nonce,
``resource``), the authorization-response issuer check, code exchange, refresh, revocation, ID-token
validation and userinfo.

What it is held to:

* OAuth 2.0 Security BCP (RFC 9700) for confidential clients: PKCE S256 always, exact redirect URI,
  RFC 9207 issuer identification, no redirects followed on any request, https everywhere except
  loopback (or an http issuer a developer configured on purpose).
* OpenID Connect Core 1.0 section 3.1.3.7, as a certified RP checks it: a provider that misbehaves,
  or a token that was tampered with, never gets a user provisioned.
* Design invariant 7: no token, code, verifier, client secret or key appears in an exception
  message, a repr or a log line. This module logs nothing itself; messages carry an OAuth ``error``
  code and a sanitized, truncated ``error_description`` with every secret of the request redacted.

Decisions worth knowing:

* Discovery is cached for :data:`METADATA_TTL`; when a refetch fails transiently the cached document
  is kept and retried after :data:`METADATA_RETRY_INTERVAL`.
* ``code_challenge_methods_supported``: a provider that lists methods without ``S256`` is refused
  (RFC 9700 2.1.1); one that omits the field (OpenID Discovery does not define it) is treated as
  unknown and S256 is sent anyway.
* ``expires_in`` missing: :attr:`TokenSet.expires_at` is ``None`` ("unknown"); callers refresh on
  their keep-alive schedule. ``expires_at`` is computed from the moment the request was sent, so it
  errs early, never late.
* ``refresh_expires_in`` (Keycloak, Nextcloud's oidc app: how long the refresh token itself lives)
  gives :attr:`TokenSet.refresh_expires_at` the same way. ``0`` means the refresh token does not
  lapse (Keycloak's offline tokens): stated, with no expiry. Missing or malformed means "not said"
  (:attr:`TokenSet.refresh_expiry_stated` false): a malformed value never fails the response,
  because the provider may already have rotated the refresh token it carries.
* Client-level errors (:data:`CLIENT_ERRORS`: ``invalid_client``, ``unauthorized_client``,
  ``expired_client``...) raise :class:`ClientRejected` whatever the 4xx status: they are faults of
  the deployment, never of one user's grant.
* Timeouts: the shared ``httpx.AsyncClient``'s timeouts are used; any phase that client leaves
  unbounded (``None``) gets :data:`DEFAULT_TIMEOUT_SECONDS`, so no request can hang forever.
* Clock skew leeway :data:`CLOCK_SKEW_LEEWAY` (30 s); ID tokens older than
  :data:`ID_TOKEN_MAX_AGE` (5 min, plus the leeway) are refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import ipaddress
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

import httpx
from joserfc import jwk, jws
from joserfc.errors import JoseError

from ._errors import (
    CallbackRejected,
    ClientRejected,
    GrantRejected,
    IDTokenError,
    ProviderError,
    ProviderResponseError,
    ProviderUnavailable,
    SettingsError,
)
from ._http import HttpClients
from ._settings import Settings

__all__ = [
    "CLIENT_ERRORS",
    "CLOCK_SKEW_LEEWAY",
    "ID_TOKEN_MAX_AGE",
    "IDTokenClaims",
    "IDTokenSubjectMismatch",
    "OAuthClient",
    "ProviderMetadata",
    "TokenSet",
    "code_challenge_s256",
    "new_code_verifier",
    "new_nonce",
    "new_state",
]

# --- named margins and limits -------------------------------------------------------------------

METADATA_TTL: Final = 3600.0
"""Seconds a discovery document is used before it is fetched again."""
METADATA_RETRY_INTERVAL: Final = 60.0
"""After a failed (transient) refetch, keep the old document and try again this much later."""
JWKS_TTL: Final = 3600.0
"""Seconds the provider's key set is used before it is fetched again."""
JWKS_MIN_REFETCH_INTERVAL: Final = 30.0
"""An unknown ``kid`` refetches the key set at most once per this many seconds, so a hostile or
broken token cannot make us hammer the provider."""
CLOCK_SKEW_LEEWAY: Final = 30.0
"""Seconds of clock difference tolerated between us and the provider (exp, iat, nbf)."""
ID_TOKEN_MAX_AGE: Final = 300.0
"""An ID token fresh from the token endpoint is seconds old; older (plus leeway) is refused."""
MAX_RESPONSE_BYTES: Final = 256 * 1024
"""Provider responses above this size are refused without being read in full."""
MAX_ID_TOKEN_CHARS: Final = 64 * 1024
MAX_RETRY_AFTER: Final = 3600.0
"""A Retry-After beyond this is clamped: the provider does not get to park our retries for days."""
MAX_EXPIRES_IN: Final = 10 * 365 * 24 * 3600
DEFAULT_TIMEOUT_SECONDS: Final = 10.0
MAX_DESCRIPTION_CHARS: Final = 200
CLIENT_ERRORS: Final = frozenset(
    {
        # RFC 6749 5.2: the client is unknown, failed authentication, or may not use this grant.
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        # Providers that register clients dynamically (RFC 7591) refuse a client whose secret
        # passed its client_secret_expires_at, or whose registration they no longer accept.
        "expired_client",
        "invalid_client_metadata",
        "invalid_software_statement",
        "unapproved_software_statement",
    }
)
"""Error codes that blame the deployment's client, not a user's grant."""
MAX_ERROR_CODE_CHARS: Final = 64
MAX_SUBJECT_CHARS: Final = 255  # OpenID Connect Core 1.0 section 2, "sub"

PKCE_METHOD: Final = "S256"
_VERIFIER_RE: Final = re.compile(r"[A-Za-z0-9\-._~]{43,128}")  # RFC 7636 section 4.1
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")
_TOKENISH_RE: Final = re.compile(r"[A-Za-z0-9._~+/=-]{20,}")

# Asymmetric JWS algorithms we accept for ID tokens, and the hash at_hash uses with each
# (OpenID Connect Core 3.1.3.6; EdDSA per the OpenID errata: SHA-512 for Ed25519). Never "none",
# never HS*: we do not support client-secret MACs.
_ID_TOKEN_ALGS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "RS256": "sha256",
        "RS384": "sha384",
        "RS512": "sha512",
        "PS256": "sha256",
        "PS384": "sha384",
        "PS512": "sha512",
        "ES256": "sha256",
        "ES384": "sha384",
        "ES512": "sha512",
        "EdDSA": "eddsa",
        "Ed25519": "sha512",
    }
)
_EC_CURVES: Final[Mapping[str, str]] = MappingProxyType(
    {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
)
_MIN_RSA_BITS: Final = 2048  # RFC 7518 section 3.3
_LOOPBACK_NAMES: Final = frozenset({"localhost"})
_TRANSIENT_STATUSES: Final = frozenset({408, 429})
# Headers that change how a JWS is processed; an ID token has no business using them.
_FORBIDDEN_JOSE_HEADERS: Final = frozenset({"crit", "b64", "enc", "zip"})
# JWTs of the same provider that are not ID tokens (RFC 9068 access tokens, logout tokens).
_FOREIGN_JWT_TYPES: Final = frozenset(
    {"at+jwt", "application/at+jwt", "logout+jwt", "application/logout+jwt"}
)
# Claims lifted into IDTokenClaims' own fields.
_LIFTED_CLAIMS: Final = frozenset({"sub", "iss", "aud", "exp", "iat", "nonce"})


# --- PKCE and random values ---------------------------------------------------------------------


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
    return _b64url(digest)


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderMetadata:
    """The parts of the provider's discovery document this client relies on (validated)."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    revocation_endpoint: str | None = None
    introspection_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    end_session_endpoint: str | None = None
    code_challenge_methods_supported: tuple[str, ...] = ()
    """Empty when the provider does not say; S256 is sent regardless."""
    authorization_response_iss_parameter_supported: bool = False
    id_token_signing_alg_values_supported: tuple[str, ...] = ("RS256",)
    token_endpoint_auth_methods_supported: tuple[str, ...] = ("client_secret_basic",)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @classmethod
    def parse(cls, doc: object, expected_issuer: str) -> ProviderMetadata:
        """Validate a discovery document; :class:`ProviderResponseError` names what is wrong.

        * ``issuer`` must equal ``expected_issuer`` (``CONSENT_ISSUER``) exactly, also when the
          document came from an explicit ``CONSENT_DISCOVERY_URL`` (OpenID Discovery 4.3).
        * Endpoints must be absolute https URLs without a fragment; http only for loopback hosts
          or when the configured issuer itself is http (a developer's local provider).
        * ``code_challenge_methods_supported``, when present, must list S256 (RFC 9700 2.1.1).
        """
        if not isinstance(doc, Mapping):
            raise ProviderResponseError("discovery document is not a JSON object")
        issuer = doc.get("issuer")
        if not isinstance(issuer, str) or not issuer:
            raise ProviderResponseError("discovery document has no issuer")
        if issuer != expected_issuer:
            raise ProviderResponseError(
                f"discovery document issuer {_clip(issuer)!r} does not equal the configured "
                f"issuer {expected_issuer!r} (CONSENT_ISSUER must match it exactly)"
            )
        insecure_ok = urlsplit(issuer).scheme == "http"

        def endpoint(name: str, *, required: bool) -> str | None:
            value = doc.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise ProviderResponseError(f"discovery document has no valid {name}")
            _check_url(name, value, insecure_ok=insecure_ok)
            return value

        def strings(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
            value = doc.get(name)
            if value is None:
                return default
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProviderResponseError(
                    f"discovery document field {name} is not a list of strings"
                )
            return tuple(value)

        pkce = strings("code_challenge_methods_supported", ())
        if "code_challenge_methods_supported" in doc and PKCE_METHOD not in pkce:
            raise ProviderResponseError(
                "provider does not support PKCE with S256 (code_challenge_methods_supported); "
                "refusing to run without it (RFC 9700 2.1.1)"
            )
        iss_param = doc.get("authorization_response_iss_parameter_supported", False)
        if not isinstance(iss_param, bool):
            raise ProviderResponseError(
                "discovery document field authorization_response_iss_parameter_supported "
                "is not a boolean"
            )
        return cls(
            issuer=issuer,
            authorization_endpoint=endpoint("authorization_endpoint", required=True) or "",
            token_endpoint=endpoint("token_endpoint", required=True) or "",
            jwks_uri=endpoint("jwks_uri", required=True) or "",
            revocation_endpoint=endpoint("revocation_endpoint", required=False),
            introspection_endpoint=endpoint("introspection_endpoint", required=False),
            userinfo_endpoint=endpoint("userinfo_endpoint", required=False),
            end_session_endpoint=endpoint("end_session_endpoint", required=False),
            code_challenge_methods_supported=pkce,
            authorization_response_iss_parameter_supported=iss_param,
            id_token_signing_alg_values_supported=strings(
                "id_token_signing_alg_values_supported", ("RS256",)
            ),
            token_endpoint_auth_methods_supported=strings(
                "token_endpoint_auth_methods_supported", ("client_secret_basic",)
            ),
            raw=MappingProxyType(dict(doc)),
        )


@dataclass(frozen=True)
class TokenSet:
    """A token endpoint's answer (RFC 6749 5.1). Its repr shows no token value."""

    access_token: str
    refresh_token: str | None
    id_token: str | None
    token_type: str
    expires_at: float | None
    """Absolute epoch seconds; ``None`` when the provider sent no ``expires_in`` (unknown)."""
    scopes: tuple[str, ...]
    """Granted scopes: the response's ``scope``, or the requested ones when it is omitted."""
    refresh_expires_at: float | None = None
    """When the refresh token lapses (absolute epoch seconds, from ``refresh_expires_in``);
    ``None`` when it does not lapse or the provider did not say (see ``refresh_expiry_stated``)."""
    refresh_expiry_stated: bool = False
    """Whether the response carried a valid ``refresh_expires_in`` (``0``: does not lapse)."""

    def __repr__(self) -> str:
        return (
            f"TokenSet(access_token=<redacted>, "
            f"refresh_token={'<present>' if self.refresh_token else None}, "
            f"id_token={'<present>' if self.id_token else None}, "
            f"token_type={self.token_type!r}, expires_at={self.expires_at!r}, "
            f"refresh_expires_at={self.refresh_expires_at!r}, scopes={self.scopes!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class IDTokenClaims:
    """The claims of an ID token that passed every check of OpenID Connect Core 3.1.3.7."""

    subject: str
    issuer: str
    audience: tuple[str, ...]
    expires_at: float
    issued_at: float
    nonce: str = field(repr=False)
    claims: Mapping[str, Any] = field(repr=False, compare=False, hash=False)
    """Every other claim (``azp``, ``auth_time``, ``at_hash``, profile claims, ...)."""


class IDTokenSubjectMismatch(IDTokenError):
    """The ID token is valid but for another account than the user whose consent this is.

    ``user`` is the expected subject, ``subject`` the one the token carries; the message names
    neither.
    """

    def __init__(self, message: str, *, expected_subject: str, subject: str) -> None:
        super().__init__(message, user=expected_subject)
        self.expected_subject = expected_subject
        self.subject = subject


# --- the client ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    status: int
    headers: httpx.Headers
    body: bytes


class OAuthClient:
    """OpenID Connect relying party for one provider and one confidential client.

    Share one instance per process: discovery and the key set are cached on it, and concurrent
    callers share a single fetch. ``http`` is one ``httpx.AsyncClient`` for every request, or
    :class:`HttpClients` that lend each request a client of its own (workers: many provider
    calls at once).
    """

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient | HttpClients,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._http = http
        self._clock = clock
        self._meta: ProviderMetadata | None = None
        self._meta_expires_at = 0.0
        self._meta_lock = asyncio.Lock()
        self._jwks_uri: str | None = None
        self._jwks: tuple[jwk.Key, ...] = ()
        self._jwks_expires_at = 0.0
        self._jwks_last_fetch = -math.inf
        self._jwks_lock = asyncio.Lock()

    def __repr__(self) -> str:
        s = self._settings
        return f"OAuthClient(issuer={s.issuer!r}, client_id={s.client_id!r})"

    # discovery -----------------------------------------------------------------------------------

    @property
    def discovery_url(self) -> str:
        s = self._settings
        if s.discovery_url:
            return s.discovery_url
        if not s.issuer:
            raise SettingsError("CONSENT_ISSUER", "is required (the provider's issuer URL)")
        return s.issuer.rstrip("/") + "/.well-known/openid-configuration"

    async def metadata(self) -> ProviderMetadata:
        """The validated discovery document, cached for :data:`METADATA_TTL`."""
        meta = self._meta
        if meta is not None and self._clock() < self._meta_expires_at:
            return meta
        async with self._meta_lock:
            now = self._clock()
            meta = self._meta
            if meta is not None and now < self._meta_expires_at:
                return meta  # another caller fetched it while we waited
            try:
                fresh = await self._fetch_metadata()
            except ProviderUnavailable:
                if meta is None:
                    raise
                # Keep serving the last good document; a blip at discovery must not stop refreshes.
                self._meta_expires_at = now + METADATA_RETRY_INTERVAL
                return meta
            self._meta = fresh
            self._meta_expires_at = now + METADATA_TTL
            return fresh

    async def _fetch_metadata(self) -> ProviderMetadata:
        what = "discovery"
        reply = await self._request(
            "GET", self.discovery_url, what=what, headers={"Accept": "application/json"}
        )
        if reply.status != 200:
            hint = ""
            if 300 <= reply.status < 400:
                hint = "; set CONSENT_DISCOVERY_URL to the document's final URL"
            raise _error_for(reply, what, now=self._clock(), oauth=False, suffix=hint)
        return ProviderMetadata.parse(_json_object(reply.body, what), self._settings.issuer)

    # authorization request -----------------------------------------------------------------------

    async def authorization_url(self, *, state: str, nonce: str, code_challenge: str) -> str:
        """The URL to send the user's browser to (RFC 6749 4.1.1, RFC 7636 4.3, OIDC Core 3.1.2.1).

        Any query the authorization endpoint already carries is kept (RFC 6749 3.1).
        ``prompt=consent`` is added when ``offline_access`` is requested (OIDC Core 11), and
        ``resource`` when ``CONSENT_RESOURCE`` is set (RFC 8707).
        """
        if not state or not nonce or not code_challenge:
            raise ValueError("state, nonce and code_challenge are required")
        meta = await self.metadata()
        s = self._settings
        params: dict[str, str] = {
            "response_type": "code",
            "client_id": s.client_id,
            "redirect_uri": s.redirect_uri,
            "scope": " ".join(s.scopes),
            "state": state,
            "nonce": nonce,
            "code_challenge": code_challenge,
            "code_challenge_method": PKCE_METHOD,
        }
        if "offline_access" in s.scopes:
            params["prompt"] = "consent"
        if s.resource:
            params["resource"] = s.resource
        parts = urlsplit(meta.authorization_endpoint)
        kept = [
            (k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params
        ]
        query = urlencode([*kept, *params.items()], quote_via=quote)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))

    def check_authorization_response_issuer(self, meta: ProviderMetadata, iss: str | None) -> None:
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

    # token endpoint ------------------------------------------------------------------------------

    async def exchange_code(self, code: str, *, code_verifier: str) -> TokenSet:
        """Redeem an authorization code (RFC 6749 4.1.3, RFC 7636 4.5).

        The returned ``id_token`` is not validated here: call :meth:`validate_id_token` with it
        (it refuses a missing one) and revoke the tokens if that fails.
        """
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._settings.redirect_uri,
            "code_verifier": code_verifier,
        }
        if self._settings.resource:
            data["resource"] = self._settings.resource
        return await self._token_request(
            data, secrets_=(code, code_verifier), requested=self._settings.scopes
        )

    async def refresh(self, refresh_token: str, *, scopes: Sequence[str] | None = None) -> TokenSet:
        """Use a refresh token (RFC 6749 6).

        ``refresh_token`` of the result is ``None`` when the provider did not rotate it: keep the
        old one. ``scopes`` (the previous grant's) is what the result reports when the response
        omits ``scope``; without it, the configured scopes.
        """
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if self._settings.resource:
            data["resource"] = self._settings.resource
        requested = tuple(scopes) if scopes is not None else self._settings.scopes
        return await self._token_request(data, secrets_=(refresh_token,), requested=requested)

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
        what = "revocation endpoint"
        if not meta.revocation_endpoint:
            raise ProviderResponseError(
                "provider advertises no revocation_endpoint; the token cannot be revoked there"
            )
        data = {"token": token}
        if token_type_hint:
            data["token_type_hint"] = token_type_hint
        data, headers = self._authenticate(data)
        reply = await self._request(
            "POST", meta.revocation_endpoint, what=what, data=data, headers=headers
        )
        if reply.status == 200:
            return
        err = _error_for(
            reply,
            what,
            now=self._clock(),
            oauth=True,
            secrets_=(token, self._settings.client_secret.reveal()),
        )
        if isinstance(err, ProviderResponseError) and err.error == "unsupported_token_type":
            raise ProviderResponseError(
                f"revocation endpoint does not revoke {_clip(token_type_hint or 'this')} tokens "
                "(unsupported_token_type)",
                error="unsupported_token_type",
            )
        raise err

    async def _token_request(
        self, data: dict[str, str], *, secrets_: Sequence[str], requested: tuple[str, ...]
    ) -> TokenSet:
        meta = await self.metadata()
        what = "token endpoint"
        data, headers = self._authenticate(data)
        sent_at = self._clock()
        reply = await self._request(
            "POST", meta.token_endpoint, what=what, data=data, headers=headers
        )
        all_secrets = (*secrets_, self._settings.client_secret.reveal())
        if reply.status != 200:
            raise _error_for(reply, what, now=self._clock(), oauth=True, secrets_=all_secrets)
        return _parse_token_response(
            reply.body, sent_at=sent_at, requested=requested, secrets_=all_secrets
        )

    def _authenticate(self, data: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """Client authentication per ``CONSENT_TOKEN_AUTH_METHOD`` (RFC 6749 2.3.1)."""
        s = self._settings
        headers = {"Accept": "application/json"}
        if s.token_auth_method == "client_secret_post":
            body = {**data, "client_id": s.client_id, "client_secret": s.client_secret.reveal()}
            return body, headers
        # client_secret_basic: id and secret are form-urlencoded *before* base64, so a secret with
        # ':' '%' '+' or a space survives the trip (RFC 6749 2.3.1, Appendix B).
        raw = f"{quote_plus(s.client_id)}:{quote_plus(s.client_secret.reveal())}"
        headers["Authorization"] = "Basic " + base64.b64encode(raw.encode("ascii")).decode("ascii")
        return data, headers

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
        reply = await self._request(
            "GET",
            meta.userinfo_endpoint,
            what=what,
            headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"},
        )
        if reply.status in (401, 403):
            challenge = reply.headers.get("www-authenticate", "")
            found = re.search(r'error="([^"]*)"', challenge)
            code = (
                _sanitize(found.group(1), (access_token,), MAX_ERROR_CODE_CHARS) if found else None
            )
            raise ProviderResponseError(
                f"userinfo endpoint refused the access token (HTTP {reply.status}"
                + (f", {code})" if code else ")"),
                error=code or "invalid_token",
            )
        if reply.status != 200:
            raise _error_for(reply, what, now=self._clock(), oauth=False, secrets_=(access_token,))
        ctype = reply.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/jwt":
            raise ProviderResponseError("signed or encrypted userinfo responses are not supported")
        doc = _json_object(reply.body, what)
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
        if not id_token:
            raise IDTokenError("token response carries no ID token")
        if not nonce:
            raise IDTokenError("no nonce to check the ID token against")
        header = _jose_header(id_token)
        alg = header.get("alg")
        meta = await self.metadata()
        allowed = [a for a in meta.id_token_signing_alg_values_supported if a in _ID_TOKEN_ALGS]
        if not isinstance(alg, str) or alg not in _ID_TOKEN_ALGS:
            raise IDTokenError(f"ID token algorithm {_clip(str(alg), 20)!r} is not accepted")
        if alg not in allowed:
            raise IDTokenError(
                f"ID token algorithm {alg!r} is not among the provider's advertised algorithms"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise IDTokenError("ID token kid is not a string")
        payload, key = await self._verify_signature(id_token, meta, alg, kid)
        return self._check_claims(
            payload,
            key=key,
            alg=alg,
            nonce=nonce,
            expected_subject=expected_subject,
            access_token=access_token,
            issuer=meta.issuer,
        )

    async def _verify_signature(
        self, token: str, meta: ProviderMetadata, alg: str, kid: str | None
    ) -> tuple[bytes, jwk.Key]:
        keys = await self._keys(meta, force=False)
        candidates = _candidates(keys, alg, kid)
        if not candidates:
            # A key rotated in at the provider: fetch the set again, at most once per interval.
            keys = await self._keys(meta, force=True)
            candidates = _candidates(keys, alg, kid)
        if not candidates:
            raise IDTokenError("ID token signing key is not in the provider's JWKS")
        registry = jws.JWSRegistry(algorithms=[alg], strict_check_header=False)
        # Room for x5c chains and 8192-bit RSA signatures; the overall size is capped before this.
        registry.max_header_length = 8 * 1024
        registry.max_signature_length = 2 * 1024
        registry.max_payload_length = MAX_ID_TOKEN_CHARS
        for key in candidates:
            try:
                obj = jws.deserialize_compact(token, key, registry=registry)
            except (JoseError, ValueError, TypeError):
                continue
            return obj.payload, key
        raise IDTokenError("ID token signature does not verify")

    async def _keys(self, meta: ProviderMetadata, *, force: bool) -> tuple[jwk.Key, ...]:
        """The provider's signing keys, cached for :data:`JWKS_TTL`.

        ``force`` refetches unless the last fetch is younger than :data:`JWKS_MIN_REFETCH_INTERVAL`.
        """
        same_set = self._jwks_uri == meta.jwks_uri
        if same_set and not force and self._clock() < self._jwks_expires_at:
            return self._jwks
        async with self._jwks_lock:
            now = self._clock()
            same_set = self._jwks_uri == meta.jwks_uri
            if same_set:
                if not force and now < self._jwks_expires_at:
                    return self._jwks
                if force and now - self._jwks_last_fetch < JWKS_MIN_REFETCH_INTERVAL:
                    return self._jwks
            self._jwks_last_fetch = now
            try:
                keys = await self._fetch_jwks(meta.jwks_uri)
            except ProviderUnavailable:
                if not same_set or force:
                    raise
                # Scheduled refresh failed: the keys we hold are still the provider's.
                self._jwks_expires_at = now + JWKS_MIN_REFETCH_INTERVAL
                return self._jwks
            self._jwks_uri = meta.jwks_uri
            self._jwks = keys
            self._jwks_expires_at = now + JWKS_TTL
            return keys

    async def _fetch_jwks(self, uri: str) -> tuple[jwk.Key, ...]:
        what = "JWKS"
        reply = await self._request(
            "GET",
            uri,
            what=what,
            headers={"Accept": "application/jwk-set+json, application/json"},
        )
        if reply.status != 200:
            raise _error_for(reply, what, now=self._clock(), oauth=False)
        doc = _json_object(reply.body, what)
        entries = doc.get("keys")
        if not isinstance(entries, list):
            raise ProviderResponseError("JWKS has no keys array")
        keys = tuple(k for k in (_import_public_key(e) for e in entries) if k is not None)
        if not keys:
            raise ProviderResponseError("JWKS holds no usable signing key")
        return keys

    def _check_claims(
        self,
        payload: bytes,
        *,
        key: jwk.Key,
        alg: str,
        nonce: str,
        expected_subject: str | None,
        access_token: str | None,
        issuer: str,
    ) -> IDTokenClaims:
        try:
            claims = json.loads(payload, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise IDTokenError("ID token payload is not JSON") from None
        if not isinstance(claims, dict):
            raise IDTokenError("ID token payload is not a JSON object")

        if claims.get("iss") != issuer:
            raise IDTokenError("ID token issuer does not match the provider")

        client_id = self._settings.client_id
        aud_claim = claims.get("aud")
        if isinstance(aud_claim, str):
            audience: tuple[str, ...] = (aud_claim,)
        elif isinstance(aud_claim, list) and all(isinstance(a, str) for a in aud_claim):
            audience = tuple(aud_claim)
        else:
            raise IDTokenError("ID token has no valid audience")
        if client_id not in audience:
            raise IDTokenError("ID token audience does not include this client")
        azp = claims.get("azp")
        if len(set(audience)) > 1 and azp is None:
            raise IDTokenError("ID token has several audiences but no azp")
        if azp is not None and azp != client_id:
            raise IDTokenError("ID token azp is not this client")

        now = self._clock()
        exp = _number(claims.get("exp"))
        if exp is None:
            raise IDTokenError("ID token has no valid exp")
        if exp <= now - CLOCK_SKEW_LEEWAY:
            raise IDTokenError("ID token has expired")
        iat = _number(claims.get("iat"))
        if iat is None:
            raise IDTokenError("ID token has no valid iat")
        if iat > now + CLOCK_SKEW_LEEWAY:
            raise IDTokenError("ID token is issued in the future")
        if now - iat > ID_TOKEN_MAX_AGE + CLOCK_SKEW_LEEWAY:
            raise IDTokenError("ID token is too old")
        if "nbf" in claims:
            nbf = _number(claims.get("nbf"))
            if nbf is None:
                raise IDTokenError("ID token has an invalid nbf")
            if nbf > now + CLOCK_SKEW_LEEWAY:
                raise IDTokenError("ID token is not valid yet")

        token_nonce = claims.get("nonce")
        if not isinstance(token_nonce, str) or not token_nonce:
            raise IDTokenError("ID token has no nonce")
        if not hmac.compare_digest(token_nonce.encode("utf-8"), nonce.encode("utf-8")):
            raise IDTokenError("ID token nonce does not match")

        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise IDTokenError("ID token has no subject")
        if len(sub) > MAX_SUBJECT_CHARS or not all(0x20 <= ord(c) <= 0x7E for c in sub):
            raise IDTokenError("ID token subject is not 1-255 printable ASCII characters")

        at_hash = claims.get("at_hash")
        if at_hash is not None and access_token is not None:
            if not isinstance(at_hash, str):
                raise IDTokenError("ID token at_hash is not a string")
            expected = _token_hash(access_token, alg, key)
            if not hmac.compare_digest(at_hash.encode("utf-8"), expected.encode("ascii")):
                raise IDTokenError("ID token at_hash does not match the access token")

        if expected_subject is not None and sub != expected_subject:
            raise IDTokenSubjectMismatch(
                "ID token subject does not match the user",
                expected_subject=expected_subject,
                subject=sub,
            )

        rest = {k: v for k, v in claims.items() if k not in _LIFTED_CLAIMS}
        return IDTokenClaims(
            subject=sub,
            issuer=issuer,
            audience=audience,
            expires_at=exp,
            issued_at=iat,
            nonce=token_nonce,
            claims=MappingProxyType(rest),
        )

    # HTTP ----------------------------------------------------------------------------------------

    def _client(self) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        if isinstance(self._http, HttpClients):
            return self._http.lease()
        return contextlib.nullcontext(self._http)

    def _timeout(self) -> httpx.Timeout:
        t = self._http.timeout
        d = DEFAULT_TIMEOUT_SECONDS

        def pick(value: float | None) -> float:
            return d if value is None else value

        return httpx.Timeout(
            connect=pick(t.connect), read=pick(t.read), write=pick(t.write), pool=pick(t.pool)
        )

    async def _request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        headers: Mapping[str, str],
        data: Mapping[str, str] | None = None,
    ) -> _Reply:
        """Send one request; the body is read only for statuses that need it, and never past
        :data:`MAX_RESPONSE_BYTES`. Transport failures become :class:`ProviderUnavailable`; the
        httpx exception is not chained (its request holds the credentials)."""
        try:
            async with (
                self._client() as http,
                http.stream(
                    method,
                    url,
                    data=data,
                    headers=headers,
                    timeout=self._timeout(),
                    follow_redirects=False,
                ) as response,
            ):
                status = response.status_code
                if status >= 500 or status in _TRANSIENT_STATUSES:
                    return _Reply(status, response.headers, b"")
                return _Reply(status, response.headers, await _read_limited(response, what))
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(f"{what} timed out ({type(exc).__name__})") from None
        except httpx.DecodingError:
            raise ProviderResponseError(f"{what} sent a body that cannot be decoded") from None
        except httpx.RequestError as exc:
            raise ProviderUnavailable(f"{what} unreachable ({type(exc).__name__})") from None


# --- helpers ------------------------------------------------------------------------------------


async def _read_limited(response: httpx.Response, what: str) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise ProviderResponseError(f"{what} response is larger than {MAX_RESPONSE_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ProviderResponseError(
                f"{what} response is larger than {MAX_RESPONSE_BYTES} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ProviderResponseError(f"{what} response is not JSON") from None
    if not isinstance(doc, dict):
        raise ProviderResponseError(f"{what} response is not a JSON object")
    return doc


def _parse_token_response(
    body: bytes, *, sent_at: float, requested: tuple[str, ...], secrets_: Sequence[str]
) -> TokenSet:
    what = "token endpoint"
    doc = _json_object(body, what)
    access = doc.get("access_token")
    if not isinstance(access, str) or not access:
        code = doc.get("error")
        if isinstance(code, str):
            # Some providers answer errors with 200; no standard status, so nothing ends here.
            clean = _sanitize(code, secrets_, MAX_ERROR_CODE_CHARS)
            raise ProviderResponseError(f"{what} answered 200 with error {clean}", error=clean)
        raise ProviderResponseError(f"{what} response has no access_token")
    token_type = doc.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        # RFC 6749 7.1: we only know how to use bearer tokens (RFC 6750).
        shown = _sanitize(token_type, secrets_, 20) if isinstance(token_type, str) else None
        raise ProviderResponseError(f"{what} issued a token_type other than Bearer ({shown})")
    refresh = doc.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise ProviderResponseError(f"{what} response has an invalid refresh_token")
    id_token = doc.get("id_token")
    if id_token is not None and (not isinstance(id_token, str) or not id_token):
        raise ProviderResponseError(f"{what} response has an invalid id_token")
    expires_in = _expires_in(doc.get("expires_in"))
    refresh_stated, refresh_expires_in = _refresh_expires_in(doc.get("refresh_expires_in"))
    scope = doc.get("scope")
    if scope is None:
        scopes = requested  # RFC 6749 5.1: omitted means identical to the requested scope
    elif isinstance(scope, str):
        scopes = tuple(dict.fromkeys(scope.split()))
    elif isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        scopes = tuple(dict.fromkeys(scope))  # non-standard, but unambiguous
    else:
        raise ProviderResponseError(f"{what} response has an invalid scope")
    return TokenSet(
        access_token=access,
        refresh_token=refresh,
        id_token=id_token,
        token_type="Bearer",
        expires_at=None if expires_in is None else sent_at + expires_in,
        scopes=scopes,
        refresh_expires_at=None if refresh_expires_in is None else sent_at + refresh_expires_in,
        refresh_expiry_stated=refresh_stated,
    )


def _expires_in(value: object) -> float | None:
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        seconds = float(int(value))  # some providers send a string; the meaning is clear
    if seconds is None or not math.isfinite(seconds) or not 0 < seconds <= MAX_EXPIRES_IN:
        raise ProviderResponseError("token endpoint response has an invalid expires_in")
    return seconds


def _refresh_expires_in(value: object) -> tuple[bool, float | None]:
    """``(stated, seconds)`` from ``refresh_expires_in``: ``(True, None)`` for ``0`` (does not
    lapse), ``(False, None)`` when missing or malformed (not said)."""
    seconds: float | None = None
    if isinstance(value, bool) or value is None:
        seconds = None
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 12:
        seconds = float(int(value))
    if seconds is None or not math.isfinite(seconds) or not 0 <= seconds <= MAX_EXPIRES_IN:
        return False, None
    return True, (seconds or None)


def _error_for(
    reply: _Reply,
    what: str,
    *,
    now: float,
    oauth: bool,
    secrets_: Iterable[str] = (),
    suffix: str = "",
) -> ProviderError:
    """Map a non-200 answer to the exception tree (design invariant 5).

    Only ``invalid_grant`` on 400/401 ends a grant; ``invalid_client`` (or a bare 401) blames our
    own credentials; 5xx, 408 and 429 are transient.
    """
    status = reply.status
    if status >= 500 or status in _TRANSIENT_STATUSES:
        return ProviderUnavailable(
            f"{what} unavailable (HTTP {status})",
            retry_after=_retry_after(reply.headers.get("retry-after"), now),
            status=status,
        )
    secrets_ = tuple(secrets_)
    code: str | None = None
    description: str | None = None
    try:
        doc = json.loads(reply.body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        code = _sanitize(doc.get("error"), secrets_, MAX_ERROR_CODE_CHARS)
        description = _sanitize(doc.get("error_description"), secrets_, MAX_DESCRIPTION_CHARS)
    detail = f": {code}" if code else ""
    if description:
        detail += f" ({description})"
    message = f"{what} answered HTTP {status}{detail}{suffix}"
    if oauth and code in CLIENT_ERRORS and 400 <= status < 500:
        return ClientRejected(message, error=code)
    if oauth and status in (400, 401):
        if code == "invalid_grant":
            return GrantRejected(message, description=description)
        if status == 401 and not code:
            return ClientRejected(message)
    return ProviderResponseError(message, error=code)


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as delay-seconds or an HTTP-date (RFC 9110 10.2.3), clamped."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(int(value[:12]))
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _sanitize(value: object, secrets_: Iterable[str], limit: int) -> str | None:
    """Printable ASCII only, secrets redacted, truncated.

    Every secret of the request (and its encoded forms) is redacted, and so is anything shaped like
    a token (a long run of token characters with a digit in it): a provider may echo a value we
    never sent in this request.
    """
    if not isinstance(value, str) or not value:
        return None
    for secret in secrets_:
        if not secret:
            continue
        for form in {secret, quote_plus(secret), quote(secret, safe="")}:
            value = value.replace(form, "[redacted]")
    value = _TOKENISH_RE.sub(
        lambda m: "[redacted]" if any(c.isdigit() for c in m.group()) else m.group(), value
    )
    cleaned = "".join(c if 0x20 <= ord(c) <= 0x7E else "?" for c in value)
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 3] + "..."
    return cleaned


def _clip(value: str, limit: int = 100) -> str:
    cleaned = "".join(c if 0x20 <= ord(c) <= 0x7E else "?" for c in value)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def _check_url(name: str, value: str, *, insecure_ok: bool) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ProviderResponseError(f"discovery document {name} is not an absolute URL")
    if parts.fragment:
        raise ProviderResponseError(f"discovery document {name} has a fragment")
    if parts.scheme == "http" and not insecure_ok and not _is_loopback(parts.hostname):
        raise ProviderResponseError(f"discovery document {name} is not https")


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(segment: str) -> bytes:
    if not _B64URL_RE.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _jose_header(token: str) -> dict[str, Any]:
    """Decode (without trusting) the protected header of a compact JWS; refuse anything else."""
    if not isinstance(token, str) or len(token) > MAX_ID_TOKEN_CHARS:
        raise IDTokenError("ID token is not a compact JWS")
    parts = token.split(".")
    if len(parts) == 5:
        raise IDTokenError("ID token is encrypted (JWE); only signed ID tokens are accepted")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise IDTokenError("ID token is not a compact JWS")
    try:
        header = json.loads(_b64url_decode(parts[0]), parse_constant=_reject_constant)
    except (ValueError, RecursionError, binascii.Error):
        raise IDTokenError("ID token header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise IDTokenError("ID token header is not a JSON object")
    if "enc" in header:
        raise IDTokenError("ID token is encrypted (JWE); only signed ID tokens are accepted")
    if _FORBIDDEN_JOSE_HEADERS & header.keys():
        raise IDTokenError("ID token uses JOSE header extensions (crit/b64) we do not accept")
    typ = header.get("typ")
    if isinstance(typ, str) and typ.lower() in _FOREIGN_JWT_TYPES:
        raise IDTokenError("token is not an ID token (typ)")
    if header.get("alg") == "none":
        raise IDTokenError("ID token is unsigned (alg none)")
    return header


def _import_public_key(entry: object) -> jwk.Key | None:
    """One JWKS entry as a verification key, or None when it is not one we would use.

    Symmetric keys are never taken from a JWKS, encryption keys and short RSA keys are skipped, and
    a single malformed entry does not spoil the set (RFC 7517 5: ignore what is not understood).
    """
    if not isinstance(entry, dict):
        return None
    if entry.get("kty") not in ("RSA", "EC", "OKP") or entry.get("use", "sig") != "sig":
        return None
    public = {k: v for k, v in entry.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth")}
    try:
        key = jwk.import_key(public)
    except (JoseError, ValueError, TypeError):
        return None
    if isinstance(key, jwk.RSAKey) and key.raw_value.key_size < _MIN_RSA_BITS:
        return None
    return key


def _key_fits(key: jwk.Key, alg: str) -> bool:
    ops = key.get("key_ops")
    if isinstance(ops, list) and "verify" not in ops:
        return False
    if key.alg is not None and key.alg != alg:
        return False
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, jwk.RSAKey)
    if alg in _EC_CURVES:
        return isinstance(key, jwk.ECKey) and key.curve_name == _EC_CURVES[alg]
    if alg == "EdDSA":
        return isinstance(key, jwk.OKPKey) and key.curve_name in ("Ed25519", "Ed448")
    if alg == "Ed25519":
        return isinstance(key, jwk.OKPKey) and key.curve_name == "Ed25519"
    return False


def _candidates(keys: Iterable[jwk.Key], alg: str, kid: str | None) -> list[jwk.Key]:
    fitting = [k for k in keys if _key_fits(k, alg)]
    if kid is None:
        # No kid (OIDC Core 10.1 allows it with one key): try every key of the right type.
        return fitting
    matching = [k for k in fitting if k.kid == kid]
    # A key published without a kid does not contradict the token's kid.
    return matching or [k for k in fitting if k.kid is None]


def _token_hash(value: str, alg: str, key: jwk.Key) -> str:
    """at_hash / c_hash: left half of the hash of the ASCII value, base64url (OIDC Core 3.1.3.6)."""
    data = value.encode("ascii", errors="replace")
    name = _ID_TOKEN_ALGS[alg]
    if name == "eddsa":
        if isinstance(key, jwk.OKPKey) and key.curve_name == "Ed448":
            digest = hashlib.shake_256(data).digest(114)
        else:
            digest = hashlib.sha512(data).digest()
    else:
        digest = hashlib.new(name, data).digest()
    return _b64url(digest[: len(digest) // 2])


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
