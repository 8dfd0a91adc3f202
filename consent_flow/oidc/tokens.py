"""The token endpoint: code exchange, refresh and revocation, with client authentication.

What a caller can rely on:

* ``expires_in`` missing: :attr:`TokenSet.expires_at` is ``None`` ("unknown"); callers refresh on
  their keep-alive schedule. ``expires_at`` is computed from the moment the request was sent, so it
  errs early, never late.
* ``refresh_expires_in`` (Keycloak, Nextcloud's oidc app: how long the refresh token itself lives)
  gives :attr:`TokenSet.refresh_expires_at` the same way. ``0`` means the refresh token does not
  lapse (Keycloak's offline tokens): stated, with no expiry. Missing or malformed means "not said"
  (:attr:`TokenSet.refresh_expiry_stated` false): a malformed value never fails the response,
  because the provider may already have rotated the refresh token it carries.
* A refresh answer that carries a new refresh token is kept even when its ``expires_in`` or
  ``scope`` is malformed (unknown expiry, the requested scopes): at a rotating provider the old
  refresh token is already spent, so failing the answer would lose the grant.
* Errors map onto the exception tree: only ``invalid_grant`` ends a grant (:class:`GrantRejected`);
  client-level errors (:data:`CLIENT_ERRORS`) raise :class:`ClientRejected` whatever the 4xx
  status, because they are faults of the deployment, never of one user's grant; 5xx, 408 and 429
  are :class:`ProviderUnavailable` with the provider's Retry-After.
* Messages carry an OAuth ``error`` code and a sanitized, truncated ``error_description`` with
  every secret of the request redacted.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, quote_plus

from consent_flow.errors import (
    ClientRejected,
    GrantRejected,
    ProviderError,
    ProviderResponseError,
    ProviderUnavailable,
)
from consent_flow.oidc.transport import (
    TRANSIENT_STATUSES,
    Reply,
    Transport,
    clip,
    json_object,
    loads_strict,
    retry_after,
)
from consent_flow.settings import Settings

__all__ = [
    "CLIENT_ERRORS",
    "MAX_DESCRIPTION_CHARS",
    "MAX_ERROR_CODE_CHARS",
    "MAX_EXPIRES_IN",
    "TokenEndpoint",
    "TokenSet",
    "error_for",
    "parse_token_response",
    "sanitize",
]

MAX_EXPIRES_IN: Final = 10 * 365 * 24 * 3600
"""An ``expires_in`` beyond ten years is a malformed answer, not a token that never lapses."""
MAX_DESCRIPTION_CHARS: Final = 200
MAX_ERROR_CODE_CHARS: Final = 64
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
_TOKENISH_RE: Final = re.compile(r"[A-Za-z0-9._~+/=-]{20,}")


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


class TokenEndpoint:
    """Requests to the provider's token and revocation endpoints, as one confidential client."""

    def __init__(
        self, settings: Settings, transport: Transport, *, clock: Callable[[], float]
    ) -> None:
        self._settings = settings
        self._transport = transport
        self._clock = clock

    async def exchange_code(
        self,
        endpoint: str,
        code: str,
        *,
        code_verifier: str,
        scopes: Sequence[str] | None = None,
    ) -> TokenSet:
        """Redeem an authorization code (RFC 6749 4.1.3, RFC 7636 4.5)."""
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self._settings.redirect_uri,
            "code_verifier": code_verifier,
        }
        if self._settings.resource:
            data["resource"] = self._settings.resource  # RFC 8707 2.2
        return await self._token_request(
            endpoint,
            data,
            secrets_=(code, code_verifier),
            requested=tuple(scopes) if scopes is not None else self._settings.scopes,
        )

    async def refresh(
        self, endpoint: str, refresh_token: str, *, scopes: Sequence[str] | None = None
    ) -> TokenSet:
        """Use a refresh token (RFC 6749 6); see :meth:`OAuthClient.refresh`."""
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if self._settings.resource:
            data["resource"] = self._settings.resource  # RFC 8707 2.2
        requested = tuple(scopes) if scopes is not None else self._settings.scopes
        return await self._token_request(
            endpoint, data, secrets_=(refresh_token,), requested=requested, refreshing=True
        )

    async def revoke(self, endpoint: str, token: str, *, token_type_hint: str | None) -> None:
        """Revoke a token (RFC 7009 2.1), client authenticated; returns on 200, which the
        provider also answers for a token it does not know (RFC 7009 2.2)."""
        what = "revocation endpoint"
        data = {"token": token}
        if token_type_hint:
            data["token_type_hint"] = token_type_hint
        data, headers = self.authenticate(data)
        reply = await self._transport.request(
            "POST", endpoint, what=what, data=data, headers=headers
        )
        if reply.status == 200:
            return
        err = error_for(
            reply,
            what,
            now=self._clock(),
            oauth=True,
            secrets_=(token, self._settings.client_secret.reveal()),
        )
        if isinstance(err, ProviderResponseError) and err.error == "unsupported_token_type":
            # RFC 7009 2.2.1: the server cannot revoke this type; say which, not the token.
            raise ProviderResponseError(
                f"revocation endpoint does not revoke {clip(token_type_hint or 'this')} tokens "
                "(unsupported_token_type)",
                error="unsupported_token_type",
            )
        raise err

    async def _token_request(
        self,
        endpoint: str,
        data: dict[str, str],
        *,
        secrets_: Sequence[str],
        requested: tuple[str, ...],
        refreshing: bool = False,
    ) -> TokenSet:
        what = "token endpoint"
        data, headers = self.authenticate(data)
        sent_at = self._clock()
        reply = await self._transport.request(
            "POST", endpoint, what=what, data=data, headers=headers
        )
        all_secrets = (*secrets_, self._settings.client_secret.reveal())
        if reply.status != 200:
            raise error_for(reply, what, now=self._clock(), oauth=True, secrets_=all_secrets)
        return parse_token_response(
            reply.body,
            sent_at=sent_at,
            requested=requested,
            secrets_=all_secrets,
            refreshing=refreshing,
        )

    def authenticate(self, data: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
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


def parse_token_response(
    body: bytes,
    *,
    sent_at: float,
    requested: tuple[str, ...],
    secrets_: Sequence[str],
    refreshing: bool = False,
) -> TokenSet:
    """A successful token response (RFC 6749 5.1) as a :class:`TokenSet`, validated.

    ``refreshing``: the answer to a refresh. If it rotated the refresh token, a malformed
    ``expires_in`` or ``scope`` is read as not said instead of failing the answer.
    """
    what = "token endpoint"
    doc = json_object(body, what)
    access = doc.get("access_token")
    if not isinstance(access, str) or not access:
        code = doc.get("error")
        if isinstance(code, str):
            # Some providers answer errors with 200; no standard status, so nothing ends here.
            clean = sanitize(code, secrets_, MAX_ERROR_CODE_CHARS)
            raise ProviderResponseError(f"{what} answered 200 with error {clean}", error=clean)
        raise ProviderResponseError(f"{what} response has no access_token")
    token_type = doc.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        # RFC 6749 7.1: we only know how to use bearer tokens (RFC 6750).
        shown = sanitize(token_type, secrets_, 20) if isinstance(token_type, str) else None
        raise ProviderResponseError(f"{what} issued a token_type other than Bearer ({shown})")
    refresh = doc.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise ProviderResponseError(f"{what} response has an invalid refresh_token")
    id_token = doc.get("id_token")
    if id_token is not None and (not isinstance(id_token, str) or not id_token):
        raise ProviderResponseError(f"{what} response has an invalid id_token")
    rotated = refreshing and refresh is not None
    try:
        expires_in = _expires_in(doc.get("expires_in"))
    except ProviderResponseError:
        if not rotated:
            raise
        expires_in = None  # unknown: refreshed on the keep-alive schedule
    refresh_stated, refresh_expires_in = _refresh_expires_in(doc.get("refresh_expires_in"))
    scope = doc.get("scope")
    if scope is None:
        scopes = requested  # RFC 6749 5.1: omitted means identical to the requested scope
    elif isinstance(scope, str):
        scopes = tuple(dict.fromkeys(scope.split()))
    elif isinstance(scope, list) and all(isinstance(s, str) for s in scope):
        scopes = tuple(dict.fromkeys(scope))  # non-standard, but unambiguous
    elif rotated:
        scopes = requested
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


def error_for(
    reply: Reply,
    what: str,
    *,
    now: float,
    oauth: bool,
    secrets_: Iterable[str] = (),
    suffix: str = "",
) -> ProviderError:
    """Map a non-200 answer to the exception tree.

    Only ``invalid_grant`` on 400/401 ends a grant (RFC 6749 5.2); ``invalid_client`` (or a bare
    401) blames our own credentials; 5xx, 408 and 429 are transient. ``oauth`` is false for
    endpoints that do not speak RFC 6749 errors (discovery, JWKS, userinfo).
    """
    status = reply.status
    if status >= 500 or status in TRANSIENT_STATUSES:
        return ProviderUnavailable(
            f"{what} unavailable (HTTP {status})",
            retry_after=retry_after(reply.headers.get("retry-after"), now),
            status=status,
        )
    secrets_ = tuple(secrets_)
    code: str | None = None
    description: str | None = None
    try:
        doc = loads_strict(reply.body)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict):
        code = sanitize(doc.get("error"), secrets_, MAX_ERROR_CODE_CHARS)
        description = sanitize(doc.get("error_description"), secrets_, MAX_DESCRIPTION_CHARS)
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


def sanitize(value: object, secrets_: Iterable[str], limit: int) -> str | None:
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
