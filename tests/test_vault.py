"""The vault: AES-GCM under a key ring, ciphertext bound to its user and purpose."""

from __future__ import annotations

import pytest

from consent_flow import KeyRing, UnknownKeyError, VaultError, generate_key


def test_round_trip_and_format():
    ring = KeyRing.from_strings([generate_key()])
    sealed = ring.encrypt(b"refresh-token-value", user="alice", purpose="tokens")
    assert sealed.startswith(f"v1.{ring.primary_id}.")
    assert b"refresh-token-value" not in sealed.encode()
    assert ring.decrypt(sealed, user="alice", purpose="tokens") == b"refresh-token-value"


def test_ciphertext_copied_to_another_user_does_not_decrypt():
    ring = KeyRing.from_strings([generate_key()])
    sealed = ring.encrypt(b"secret", user="alice", purpose="tokens")
    with pytest.raises(VaultError) as info:
        ring.decrypt(sealed, user="mallory", purpose="tokens")
    assert "secret" not in str(info.value)
    with pytest.raises(VaultError):
        ring.decrypt(sealed, user="alice", purpose="session")


def test_tampered_ciphertext_is_refused():
    ring = KeyRing.from_strings([generate_key()])
    sealed = ring.encrypt(b"secret", user="alice", purpose="tokens")
    head, body = sealed.rsplit(".", 1)
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    with pytest.raises(VaultError):
        ring.decrypt(f"{head}.{flipped}", user="alice", purpose="tokens")
    with pytest.raises(VaultError):
        ring.decrypt("not-a-ciphertext", user="alice", purpose="tokens")


def test_rotation_first_key_encrypts_all_keys_decrypt():
    old, new = generate_key(), generate_key()
    old_ring = KeyRing.from_strings([old])
    sealed = old_ring.encrypt(b"x", user="alice", purpose="tokens")
    rotated = KeyRing.from_strings([new, old])
    assert rotated.decrypt(sealed, user="alice", purpose="tokens") == b"x"
    assert rotated.needs_rotation(sealed)
    assert not rotated.needs_rotation(rotated.encrypt(b"x", user="alice", purpose="tokens"))


def test_unknown_key_is_a_clear_error_naming_the_key_id():
    sealed = KeyRing.from_strings([generate_key()]).encrypt(b"x", user="alice", purpose="t")
    other = KeyRing.from_strings([generate_key()])
    with pytest.raises(UnknownKeyError) as info:
        other.decrypt(sealed, user="alice", purpose="t")
    assert info.value.key_id == KeyRing.key_id_of(sealed)
    assert "CONSENT_ENCRYPTION_KEYS" in str(info.value)


@pytest.mark.parametrize("bad", ["", "short", "!" * 43, generate_key()[:-4]])
def test_malformed_keys_are_refused(bad):
    with pytest.raises(ValueError, match="key 1"):
        KeyRing.from_strings([bad])


def test_generated_keys_differ_and_have_distinct_ids():
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    assert len({KeyRing.from_strings([k]).primary_id for k in keys}) == 50
