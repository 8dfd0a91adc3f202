"""The token vault: AES-256-GCM under a key ring, each ciphertext bound to its user.

A key is 32 random bytes written as unpadded base64url (43 characters). Its key id is derived from
the key itself, so a ring needs no extra bookkeeping and a mistyped key shows up as an unknown key
id, never as a silently different key. The first key of the ring encrypts; every key decrypts.

Ciphertext format (ASCII, safe in a Redis hash)::

    v1.<key id>.<base64url(nonce || ciphertext || tag)>

The associated data binds a ciphertext to its purpose and its user: a blob copied into another
user's record does not decrypt (design.md invariant 6).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from collections.abc import Iterable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ._errors import UnknownKeyError, VaultError

__all__ = ["KeyRing", "generate_key"]

_VERSION = "v1"
_NONCE_BYTES = 12  # 96-bit nonces, random per message (NIST SP 800-38D 8.2.2)
_KEY_BYTES = 32


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


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
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead[self.primary_id].encrypt(nonce, plaintext, self._aad(user, purpose))
        return f"{_VERSION}.{self.primary_id}.{_b64e(nonce + sealed)}"

    @staticmethod
    def key_id_of(ciphertext: str) -> str:
        parts = ciphertext.split(".")
        if len(parts) != 3 or parts[0] != _VERSION:
            raise VaultError("not a consent-flow ciphertext")
        return parts[1]

    def decrypt(self, ciphertext: str, *, user: str, purpose: str) -> bytes:
        kid = self.key_id_of(ciphertext)
        aead = self._aead.get(kid)
        if aead is None:
            raise UnknownKeyError(
                f"data for this user was encrypted under key id {kid}, which is not in "
                "CONSENT_ENCRYPTION_KEYS",
                key_id=kid,
                user=user,
            )
        try:
            blob = _b64d(ciphertext.split(".")[2])
            return aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], self._aad(user, purpose))
        except (InvalidTag, ValueError):
            # Wrong user, wrong purpose or tampered bytes: all look the same from here, and the
            # message must not say more than that.
            raise VaultError("ciphertext does not authenticate for this user", user=user) from None

    def needs_rotation(self, ciphertext: str) -> bool:
        return self.key_id_of(ciphertext) != self.primary_id
