"""The provider's discovery document and signing keys, fetched, validated and cached.

* Discovery (OpenID Connect Discovery 1.0 4, RFC 8414 3) is cached for :data:`METADATA_TTL`; when
  a refetch fails transiently the cached document is kept and retried after
  :data:`METADATA_RETRY_INTERVAL`.
* ``code_challenge_methods_supported``: a provider that lists methods without ``S256`` is refused
  (RFC 9700 2.1.1); one that omits the field (OpenID Discovery does not define it) is treated as
  unknown and S256 is sent anyway.
* The JWKS (RFC 7517) is cached for :data:`JWKS_TTL`; a token signed by a key we do not hold
  refetches it, at most once per :data:`JWKS_MIN_REFETCH_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import urlsplit

from joserfc import jwk
from joserfc.errors import JoseError

from consent_flow.errors import ProviderResponseError, ProviderUnavailable, SettingsError
from consent_flow.oidc.authorize import PKCE_METHOD
from consent_flow.oidc.tokens import error_for
from consent_flow.oidc.transport import Transport, check_url, clip, json_object
from consent_flow.settings import Settings

__all__ = [
    "JWKS_MIN_REFETCH_INTERVAL",
    "JWKS_TTL",
    "METADATA_RETRY_INTERVAL",
    "METADATA_TTL",
    "Discovery",
    "ProviderMetadata",
]

METADATA_TTL: Final = 3600.0
"""Seconds a discovery document is used before it is fetched again."""
METADATA_RETRY_INTERVAL: Final = 60.0
"""After a failed (transient) refetch, keep the old document and try again this much later."""
JWKS_TTL: Final = 3600.0
"""Seconds the provider's key set is used before it is fetched again."""
JWKS_MIN_REFETCH_INTERVAL: Final = 30.0
"""An unknown ``kid`` refetches the key set at most once per this many seconds, so a hostile or
broken token cannot make us hammer the provider."""
_MIN_RSA_BITS: Final = 2048  # RFC 7518 section 3.3


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
                f"discovery document issuer {clip(issuer)!r} does not equal the configured "
                f"issuer {expected_issuer!r} (CONSENT_ISSUER must match it exactly)"
            )
        insecure_ok = urlsplit(issuer).scheme == "http"

        def endpoint(name: str, *, required: bool) -> str | None:
            value = doc.get(name)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value:
                raise ProviderResponseError(f"discovery document has no valid {name}")
            check_url(name, value, insecure_ok=insecure_ok)
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


class Discovery:
    """The provider's metadata and key set for one issuer; concurrent callers share one fetch."""

    def __init__(
        self, settings: Settings, transport: Transport, *, clock: Callable[[], float]
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._clock = clock
        self._meta: ProviderMetadata | None = None
        self._meta_expires_at = 0.0
        self._meta_lock = asyncio.Lock()
        self._jwks_uri: str | None = None
        self._jwks: tuple[jwk.Key, ...] = ()
        self._jwks_expires_at = 0.0
        self._jwks_last_fetch = -math.inf
        self._jwks_lock = asyncio.Lock()

    @property
    def url(self) -> str:
        """``CONSENT_DISCOVERY_URL``, or the issuer's well-known document (OIDC Discovery 4)."""
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
        reply = await self._transport.request(
            "GET", self.url, what=what, headers={"Accept": "application/json"}
        )
        if reply.status != 200:
            hint = ""
            if 300 <= reply.status < 400:
                hint = "; set CONSENT_DISCOVERY_URL to the document's final URL"
            raise error_for(reply, what, now=self._clock(), oauth=False, suffix=hint)
        return ProviderMetadata.parse(json_object(reply.body, what), self._settings.issuer)

    async def keys(self, meta: ProviderMetadata, *, force: bool) -> tuple[jwk.Key, ...]:
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
        reply = await self._transport.request(
            "GET",
            uri,
            what=what,
            headers={"Accept": "application/jwk-set+json, application/json"},
        )
        if reply.status != 200:
            raise error_for(reply, what, now=self._clock(), oauth=False)
        doc = json_object(reply.body, what)
        entries = doc.get("keys")
        if not isinstance(entries, list):
            raise ProviderResponseError("JWKS has no keys array")
        keys = tuple(k for k in (_import_public_key(e) for e in entries) if k is not None)
        if not keys:
            raise ProviderResponseError("JWKS holds no usable signing key")
        return keys


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
