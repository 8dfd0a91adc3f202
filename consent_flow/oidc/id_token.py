"""ID-token validation (OpenID Connect Core 1.0 3.1.3.7), as a certified relying party checks it.

First the JWS: compact, signed with an asymmetric algorithm the provider advertises, by a key of
its JWKS that fits the algorithm. Then the claims: ``iss``, ``aud``, ``exp``, ``iat``, ``nbf``,
``nonce`` and ``sub`` through joserfc's claims registry (:class:`IDTokenClaimsRegistry`), and
what the registry has no rule for by hand: ``azp``, the maximum age, ``at_hash`` and the expected
subject. A provider that misbehaves, or a token that was tampered with, never gets a user
provisioned.

Clock skew leeway :data:`CLOCK_SKEW_LEEWAY` (30 s); ID tokens older than :data:`ID_TOKEN_MAX_AGE`
(5 min, plus the leeway) are refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from joserfc import jwk, jws
from joserfc.errors import ExpiredTokenError, InvalidClaimError, JoseError, MissingClaimError
from joserfc.jwt import JWTClaimsRegistry

from consent_flow.errors import IDTokenError
from consent_flow.oidc.authorize import b64url
from consent_flow.oidc.discovery import Discovery, ProviderMetadata
from consent_flow.oidc.transport import clip, loads_strict

__all__ = [
    "CLOCK_SKEW_LEEWAY",
    "ID_TOKEN_MAX_AGE",
    "MAX_ID_TOKEN_CHARS",
    "MAX_SUBJECT_CHARS",
    "IDTokenClaims",
    "IDTokenClaimsRegistry",
    "IDTokenSubjectMismatch",
    "IDTokenValidator",
]

CLOCK_SKEW_LEEWAY: Final = 30.0
"""Seconds of clock difference tolerated between us and the provider (exp, iat, nbf)."""
ID_TOKEN_MAX_AGE: Final = 300.0
"""An ID token fresh from the token endpoint is seconds old; older (plus leeway) is refused."""
MAX_ID_TOKEN_CHARS: Final = 64 * 1024
MAX_SUBJECT_CHARS: Final = 255  # OpenID Connect Core 1.0 section 2, "sub"

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
# Headers that change how a JWS is processed; an ID token has no business using them.
_FORBIDDEN_JOSE_HEADERS: Final = frozenset({"crit", "b64", "enc", "zip"})
# JWTs of the same provider that are not ID tokens (RFC 9068 access tokens, logout tokens).
_FOREIGN_JWT_TYPES: Final = frozenset(
    {"at+jwt", "application/at+jwt", "logout+jwt", "application/logout+jwt"}
)
# Claims lifted into IDTokenClaims' own fields.
_LIFTED_CLAIMS: Final = frozenset({"sub", "iss", "aud", "exp", "iat", "nonce"})
# The order a token with several faults is reported in: the first missing claim of these names.
_ESSENTIAL_CLAIMS: Final = ("iss", "aud", "exp", "iat", "nonce", "sub")
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")


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


class IDTokenClaimsRegistry(JWTClaimsRegistry):
    """joserfc's JWT claims registry with the two rules OpenID Connect adds for its claims.

    joserfc dispatches each claim to ``validate_<name>`` (the registry's extension point); without
    these, a ``nonce`` that is a list holding the expected value would match, and ``sub`` would
    only need to be a string.
    """

    def validate_nonce(self, value: object) -> None:
        # OIDC Core 3.1.3.7 item 11: a string equal to the nonce sent; compared in constant time.
        expected = self.options.get("nonce", {}).get("value")
        if not isinstance(value, str) or not value or not isinstance(expected, str):
            raise InvalidClaimError("nonce")
        if not hmac.compare_digest(value.encode("utf-8"), expected.encode("utf-8")):
            raise InvalidClaimError("nonce")

    def validate_sub(self, value: object) -> None:
        # OIDC Core 2: at most 255 ASCII characters; control characters have no place in it.
        super().validate_sub(value)
        printable = isinstance(value, str) and all(0x20 <= ord(c) <= 0x7E for c in value)
        if not printable or len(str(value)) > MAX_SUBJECT_CHARS:
            raise InvalidClaimError("sub")


class IDTokenValidator:
    """Validates the ID tokens of one client against the provider ``discovery`` describes."""

    def __init__(self, discovery: Discovery, *, client_id: str, clock: Callable[[], float]) -> None:
        self._discovery = discovery
        self._client_id = client_id
        self._clock = clock

    async def validate(
        self,
        id_token: str | None,
        *,
        nonce: str,
        expected_subject: str | None,
        access_token: str | None = None,
    ) -> IDTokenClaims:
        """See :meth:`consent_flow.oidc.OAuthClient.validate_id_token`."""
        if not id_token:
            raise IDTokenError("token response carries no ID token")
        if not nonce:
            raise IDTokenError("no nonce to check the ID token against")
        header = _jose_header(id_token)
        alg = header.get("alg")
        meta = await self._discovery.metadata()
        allowed = [a for a in meta.id_token_signing_alg_values_supported if a in _ID_TOKEN_ALGS]
        if not isinstance(alg, str) or alg not in _ID_TOKEN_ALGS:
            raise IDTokenError(f"ID token algorithm {clip(str(alg), 20)!r} is not accepted")
        if alg not in allowed:
            # OIDC Core 3.1.3.7 item 7: the alg the provider registered, never one it did not.
            raise IDTokenError(
                f"ID token algorithm {alg!r} is not among the provider's advertised algorithms"
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise IDTokenError("ID token kid is not a string")
        payload, key = await self._verify_signature(id_token, meta, alg, kid)
        return check_claims(
            payload,
            now=self._clock(),  # after the fetches: a slow JWKS must not make a token younger
            key=key,
            alg=alg,
            issuer=meta.issuer,
            client_id=self._client_id,
            nonce=nonce,
            expected_subject=expected_subject,
            access_token=access_token,
        )

    async def _verify_signature(
        self, token: str, meta: ProviderMetadata, alg: str, kid: str | None
    ) -> tuple[bytes, jwk.Key]:
        keys = await self._discovery.keys(meta, force=False)
        candidates = _candidates(keys, alg, kid)
        if not candidates:
            # A key rotated in at the provider: fetch the set again, at most once per interval.
            keys = await self._discovery.keys(meta, force=True)
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


def check_claims(
    payload: bytes,
    *,
    now: float,
    key: jwk.Key,
    alg: str,
    issuer: str,
    client_id: str,
    nonce: str,
    expected_subject: str | None,
    access_token: str | None,
) -> IDTokenClaims:
    """The claims of a verified ID token (OIDC Core 3.1.3.7 items 2-11, 3.2.2.9 ``at_hash``)."""
    try:
        claims = loads_strict(payload)
    except (ValueError, RecursionError):
        raise IDTokenError("ID token payload is not JSON") from None
    if not isinstance(claims, dict):
        raise IDTokenError("ID token payload is not a JSON object")

    registry = IDTokenClaimsRegistry(
        # NumericDate compared in whole seconds (joserfc's unit); the leeway dwarfs the rounding.
        now=math.floor(now),
        leeway=int(CLOCK_SKEW_LEEWAY),
        iss={"essential": True, "value": issuer},  # item 2: exactly the discovered issuer
        aud={"essential": True, "value": client_id},  # item 3: this client among the audiences
        exp={"essential": True},  # item 9
        iat={"essential": True},  # item 10
        nonce={"essential": True, "value": nonce},  # item 11
        sub={"essential": True},
    )
    try:
        registry.validate(claims)
    except MissingClaimError as exc:
        missing = set(exc.claim.split(","))
        first = next(name for name in _ESSENTIAL_CLAIMS if name in missing)
        raise IDTokenError(_MISSING[first]) from None
    except ExpiredTokenError:
        raise IDTokenError("ID token has expired") from None
    except InvalidClaimError as exc:
        raise IDTokenError(_invalid(exc.claim, claims.get(exc.claim))) from None

    aud = claims["aud"]
    audience: tuple[str, ...] = (aud,) if isinstance(aud, str) else tuple(aud)
    # Items 4-5: several audiences need an azp, and an azp must name this client.
    azp = claims.get("azp")
    if len(set(audience)) > 1 and azp is None:
        raise IDTokenError("ID token has several audiences but no azp")
    if azp is not None and azp != client_id:
        raise IDTokenError("ID token azp is not this client")

    exp = _number(claims["exp"])
    iat = _number(claims["iat"])
    if exp is None or iat is None:
        raise IDTokenError(f"ID token has no valid {'exp' if exp is None else 'iat'}")
    # Item 10: iat "can be used to reject tokens that were issued too far away from the current
    # time"; one fresh from the token endpoint is seconds old.
    if now - iat > ID_TOKEN_MAX_AGE + CLOCK_SKEW_LEEWAY:
        raise IDTokenError("ID token is too old")

    sub: str = claims["sub"]
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
        nonce=claims["nonce"],
        claims=MappingProxyType(rest),
    )


_MISSING: Final[Mapping[str, str]] = MappingProxyType(
    {
        "iss": "ID token issuer does not match the provider",
        "aud": "ID token has no valid audience",
        "exp": "ID token has no valid exp",
        "iat": "ID token has no valid iat",
        "nonce": "ID token has no nonce",
        "sub": "ID token has no subject",
    }
)


def _invalid(name: str, value: object) -> str:
    """The message for a claim the registry refused; ``value`` tells a bad type from a bad value
    (the registry raises the same error for both)."""
    if name == "iss":
        return "ID token issuer does not match the provider"
    if name == "aud":
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(a, str) for a in value)
        ):
            return "ID token audience does not include this client"
        return "ID token has no valid audience"
    if name in ("exp", "iat", "nbf") and _number(value) is None:
        return "ID token has an invalid nbf" if name == "nbf" else f"ID token has no valid {name}"
    if name == "iat":
        return "ID token is issued in the future"
    if name == "nbf":
        return "ID token is not valid yet"
    if name == "nonce":
        if not isinstance(value, str) or not value:
            return "ID token has no nonce"
        return "ID token nonce does not match"
    if name == "sub":
        if not isinstance(value, str) or not value:
            return "ID token has no subject"
        return "ID token subject is not 1-255 printable ASCII characters"
    return f"ID token claim {clip(name, 20)!r} is invalid"


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
        header = loads_strict(_b64url_decode(parts[0]))
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


def _key_fits(key: jwk.Key, alg: str) -> bool:
    """Whether ``key`` may verify ``alg`` (RFC 7517 4.2-4.4: use, key_ops, alg; RFC 7518 3)."""
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
    return b64url(digest[: len(digest) // 2])


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any date; JSON allows it, a NumericDate does not
        return None
    return number if math.isfinite(number) else None
