"""The token vault: AES-256-GCM under a key ring, each ciphertext bound to its user.

A key is 32 random bytes written as unpadded base64url (43 characters). Its key id is derived from
the key itself, so a ring needs no extra bookkeeping and a mistyped key shows up as an unknown key
id, never as a silently different key. The first key of the ring encrypts; every key decrypts.

Two layouts, both read by :meth:`KeyRing.decrypt`:

* v1, text, for values that live in text (a hash field, the code inbox)::

      v1.<key id>.<base64url(nonce || ciphertext || tag)>

* v2, binary, for values in a Redis key of their own (the tokens): a third smaller than base64
  text, which keeps a user's record hash within Redis's compact encoding::

      0x02 || key id (6 bytes) || nonce (12 bytes) || ciphertext || tag (16 bytes)

The associated data binds a ciphertext to its purpose and its user: a blob copied into another
user's record does not decrypt (design.md invariant 6). A v2 blob's header (version and key id)
is authenticated too.

Tokens (:func:`seal_tokens`) are JSON, raw-deflated before sealing in v2 (plain JSON in v1
blobs written by earlier versions). Compressing before encrypting leaks only the compressed
length, and the tokens are compressed alone, with nothing an outsider chooses beside them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import zlib
from collections.abc import Iterable, Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._errors import UnknownKeyError, VaultError

__all__ = ["KeyRing", "generate_key", "open_tokens", "seal_tokens"]

_VERSION = "v1"
_BINARY = b"\x02"  # the v2 layout's first byte; no v1 text starts with it
_KID_BYTES = 6  # a key id is 12 hex digits
_NONCE_BYTES = 12  # 96-bit nonces, random per message (NIST SP 800-38D 8.2.2)
_KEY_BYTES = 32
_HEADER_BYTES = 1 + _KID_BYTES
_DEFLATE_WBITS = -15  # raw deflate: no zlib header or checksum, AES-GCM authenticates already


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _text(ciphertext: str | bytes) -> str:
    if isinstance(ciphertext, str):
        return ciphertext
    try:
        return ciphertext.decode("ascii")
    except UnicodeDecodeError:
        raise VaultError("not a consent-flow ciphertext") from None


def generate_key() -> str:
    """A new key in the format ``CONSENT_ENCRYPTION_KEYS`` takes."""
    return _b64e(secrets.token_bytes(_KEY_BYTES))


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"consent-flow key id\x00" + key).hexdigest()[:12]


class KeyRing:
    """Encrypts with the first key, decrypts with any key of the ring."""

    __slots__ = ("_aead", "primary_id")

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("the key ring is empty")
        self._aead: dict[str, AESGCM] = {}
        for key in keys:
            if len(key) != _KEY_BYTES:
                raise ValueError("every key must be 32 bytes of base64url")
            self._aead.setdefault(key_id(key), AESGCM(key))
        self.primary_id = key_id(keys[0])

    @classmethod
    def from_strings(cls, keys: Iterable[str]) -> KeyRing:
        decoded: list[bytes] = []
        for position, text in enumerate(keys, start=1):
            try:
                raw = _b64d(text.strip())
            except ValueError:
                raise ValueError(
                    f"key {position} is not base64url (make one with: consent-flow keys generate)"
                ) from None
            if len(raw) != _KEY_BYTES:
                raise ValueError(
                    f"key {position} must decode to 32 bytes, got {len(raw)} "
                    "(make one with: consent-flow keys generate)"
                )
            decoded.append(raw)
        return cls(decoded)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._aead)

    @staticmethod
    def _aad(user: str, purpose: str) -> bytes:
        return b"consent-flow\x00" + purpose.encode() + b"\x00" + user.encode()

    def encrypt(self, plaintext: bytes, *, user: str, purpose: str) -> str:
        """Seal in the v1 text layout, for values kept in text."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead[self.primary_id].encrypt(nonce, plaintext, self._aad(user, purpose))
        return f"{_VERSION}.{self.primary_id}.{_b64e(nonce + sealed)}"

    def seal(self, plaintext: bytes, *, user: str, purpose: str) -> bytes:
        """Seal in the v2 binary layout, for values in a key of their own."""
        header = _BINARY + bytes.fromhex(self.primary_id)
        nonce = os.urandom(_NONCE_BYTES)
        aad = header + self._aad(user, purpose)
        return header + nonce + self._aead[self.primary_id].encrypt(nonce, plaintext, aad)

    @staticmethod
    def is_binary(ciphertext: str | bytes) -> bool:
        """Whether ``ciphertext`` is in the v2 binary layout (else v1 text)."""
        return isinstance(ciphertext, bytes) and ciphertext[:1] == _BINARY

    @staticmethod
    def key_id_of(ciphertext: str | bytes) -> str:
        if isinstance(ciphertext, bytes) and ciphertext[:1] == _BINARY:
            if len(ciphertext) < _HEADER_BYTES + _NONCE_BYTES:
                raise VaultError("not a consent-flow ciphertext")
            return ciphertext[1:_HEADER_BYTES].hex()
        parts = _text(ciphertext).split(".")
        if len(parts) != 3 or parts[0] != _VERSION:
            raise VaultError("not a consent-flow ciphertext")
        return parts[1]

    def decrypt(self, ciphertext: str | bytes, *, user: str, purpose: str) -> bytes:
        """Open a ciphertext of either layout."""
        kid = self.key_id_of(ciphertext)
        aead = self._aead.get(kid)
        if aead is None:
            raise UnknownKeyError(
                f"data for this user was encrypted under key id {kid}, which is not in "
                "CONSENT_ENCRYPTION_KEYS",
                key_id=kid,
                user=user,
            )
        aad = self._aad(user, purpose)
        try:
            if isinstance(ciphertext, bytes) and ciphertext[:1] == _BINARY:
                aad = ciphertext[:_HEADER_BYTES] + aad
                blob = ciphertext[_HEADER_BYTES:]
            else:
                blob = _b64d(_text(ciphertext).split(".")[2])
            return aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
        except (InvalidTag, ValueError):
            # Wrong user, wrong purpose or tampered bytes: all look the same from here, and the
            # message must not say more than that.
            raise VaultError("ciphertext does not authenticate for this user", user=user) from None

    def needs_rotation(self, ciphertext: str | bytes) -> bool:
        return self.key_id_of(ciphertext) != self.primary_id


def seal_tokens(ring: KeyRing, user: str, tokens: Mapping[str, str | None]) -> bytes:
    """A user's tokens (access, refresh, ...) as JSON, deflated, sealed in the v2 layout."""
    raw = json.dumps({k: v for k, v in tokens.items() if v}, separators=(",", ":")).encode()
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _DEFLATE_WBITS)
    return ring.seal(deflate.compress(raw) + deflate.flush(), user=user, purpose="tokens")


def open_tokens(ring: KeyRing, user: str, sealed: str | bytes) -> dict[str, str]:
    """The tokens :func:`seal_tokens` sealed; v1 text blobs of earlier versions hold plain JSON."""
    raw = ring.decrypt(sealed, user=user, purpose="tokens")
    if KeyRing.is_binary(sealed):
        try:
            raw = zlib.decompress(raw, _DEFLATE_WBITS)
        except zlib.error:
            raise VaultError("sealed tokens do not inflate", user=user) from None
    data: dict[str, str] = json.loads(raw)
    return data
