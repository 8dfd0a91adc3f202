"""The token vault: AES-256-GCM under a key ring, each ciphertext bound to its connection.

A key is 32 random bytes written as unpadded base64url (43 characters). Its key id is derived from
the key itself, so a ring needs no extra bookkeeping and a mistyped key shows up as an unknown key
id, never as a silently different key. The first key of the ring encrypts; every key decrypts.

Two layouts, both read by :meth:`KeyRing.decrypt`:

* v1, text, for values that live in text (a hash field, the code inbox)::

      v1.<key id>.<base64url(nonce || ciphertext || tag)>

* v2, binary, for values in a Redis key of their own (the tokens): a third smaller than base64
  text, which keeps a user's record hash within Redis's compact encoding::

      0x02 || key id (6 bytes) || nonce (12 bytes) || ciphertext || tag (16 bytes)

The associated data binds a ciphertext to its purpose and its connection, the user and the
provider: a blob copied into another user's record, or into the same user's connection at
another provider, does not decrypt (sealed at rest, bound to user and provider). A ring is bound
to one provider (:meth:`KeyRing.for_provider`; ``default`` unless told otherwise), and every
provider's engine stack holds the ring bound to its own. A v2 blob's header (version
and key id) is authenticated too.

A caller's reply (the authorization URL carries the session's ``state`` and nonce) is sealed to
that caller alone: it makes a one-time X25519 key pair (:class:`ReplyKey`), sends the public half
with its event, and the worker seals to it (:func:`seal_reply`: an ephemeral X25519 exchange,
HKDF-SHA256, AES-256-GCM; the shape of RFC 9180's base mode). The caller needs no key ring, and
the private half never leaves the caller's memory::

      r1.<base64url(ephemeral public key (32) || nonce || ciphertext || tag)>

Tokens (:func:`seal_tokens`) are JSON, raw-deflated before sealing, in the v2 layout.
Compressing before encrypting leaks only the compressed length, and the tokens are compressed
alone, with nothing an outsider chooses beside them.
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
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from consent_flow.core.connections import DEFAULT_PROVIDER
from consent_flow.errors import UnknownKeyError, VaultError

__all__ = ["KeyRing", "ReplyKey", "generate_key", "open_tokens", "seal_reply", "seal_tokens"]

_VERSION = "v1"
_BINARY = b"\x02"  # the v2 layout's first byte; no v1 text starts with it
_KID_BYTES = 6  # a key id is 12 hex digits
_NONCE_BYTES = 12  # 96-bit nonces, random per message (NIST SP 800-38D 8.2.2)
_KEY_BYTES = 32
_HEADER_BYTES = 1 + _KID_BYTES
_DEFLATE_WBITS = -15  # raw deflate: no zlib header or checksum, AES-GCM authenticates already
_REPLY_VERSION = "r1"
_X25519_BYTES = 32


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

    __slots__ = ("_aead", "primary_id", "provider")

    def __init__(self, keys: Sequence[bytes], *, provider: str = DEFAULT_PROVIDER) -> None:
        self.provider = provider
        if not keys:
            raise ValueError("the key ring is empty")
        self._aead: dict[str, AESGCM] = {}
        for key in keys:
            if len(key) != _KEY_BYTES:
                raise ValueError("every key must be 32 bytes of base64url")
            self._aead.setdefault(key_id(key), AESGCM(key))
        self.primary_id = key_id(keys[0])

    def for_provider(self, provider: str) -> KeyRing:
        """The same keys, binding what they seal and open to ``provider``'s connections."""
        ring = object.__new__(KeyRing)
        ring._aead = self._aead
        ring.primary_id = self.primary_id
        ring.provider = provider
        return ring

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

    def _aad(self, user: str, purpose: str) -> bytes:
        # Provider names never hold a NUL byte: the three parts cannot run into each other.
        return b"\x00".join(
            (b"consent-flow", purpose.encode(), self.provider.encode(), user.encode())
        )

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
    """The tokens :func:`seal_tokens` sealed."""
    if not KeyRing.is_binary(sealed):
        raise VaultError("sealed tokens are not in the binary layout", user=user)
    try:
        raw = zlib.decompress(ring.decrypt(sealed, user=user, purpose="tokens"), _DEFLATE_WBITS)
    except zlib.error:
        raise VaultError("sealed tokens do not inflate", user=user) from None
    data: dict[str, str] = json.loads(raw)
    return data


def _reply_aead(shared: bytes, sender: bytes, recipient: bytes) -> AESGCM:
    # Both public keys go into the derivation, as in RFC 9180's DHKEM: the key is this exchange's.
    info = b"consent-flow reply\x00" + sender + recipient
    return AESGCM(HKDF(SHA256(), _KEY_BYTES, salt=None, info=info).derive(shared))


def seal_reply(public_key: str, plaintext: str, *, context: str) -> str:
    """Seal ``plaintext`` so that only the holder of ``public_key``'s :class:`ReplyKey` opens it;
    ``context`` (the event id) is authenticated, so a sealed value cannot answer another event."""
    ephemeral = X25519PrivateKey.generate()
    sender = ephemeral.public_key().public_bytes_raw()
    try:
        recipient = X25519PublicKey.from_public_bytes(_b64d(public_key))
        shared = ephemeral.exchange(recipient)  # refuses low-order points
    except ValueError:
        raise VaultError("not a reply key") from None
    aead = _reply_aead(shared, sender, recipient.public_bytes_raw())
    nonce = os.urandom(_NONCE_BYTES)
    sealed = aead.encrypt(nonce, plaintext.encode(), context.encode())
    return f"{_REPLY_VERSION}.{_b64e(sender + nonce + sealed)}"


class ReplyKey:
    """A one-time key pair for the reply to one event; the private half stays in this object."""

    __slots__ = ("_private", "public")

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = _b64e(self._private.public_key().public_bytes_raw())
        """The public half, base64url: it travels with the event."""

    def __repr__(self) -> str:
        return f"ReplyKey(public={self.public!r})"

    def open(self, sealed: str, *, context: str) -> str:
        """What :func:`seal_reply` sealed to this key for ``context``."""
        version, _, body = sealed.partition(".")
        try:
            blob = _b64d(body)
        except ValueError:
            blob = b""
        if version != _REPLY_VERSION or len(blob) < _X25519_BYTES + _NONCE_BYTES:
            raise VaultError("not a sealed reply")
        sender, nonce = blob[:_X25519_BYTES], blob[_X25519_BYTES : _X25519_BYTES + _NONCE_BYTES]
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(sender))
            aead = _reply_aead(shared, sender, _b64d(self.public))
            plain = aead.decrypt(nonce, blob[_X25519_BYTES + _NONCE_BYTES :], context.encode())
        except (InvalidTag, ValueError):
            raise VaultError("the sealed reply is not for this key or this event") from None
        return plain.decode()
