"""The vault: AES-GCM under a key ring, ciphertext bound to its user and purpose, in the v1 text
layout and the v2 binary one."""

from __future__ import annotations

import json

import pytest

from consent_flow import KeyRing, UnknownKeyError, VaultError, generate_key
from consent_flow.store.vault import open_tokens, seal_tokens


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


# Explicit ids: a generated key differs per process, and pytest-xdist workers must collect the
# same test names.
@pytest.mark.parametrize(
    "bad",
    ["", "short", "!" * 43, generate_key()[:-4]],
    ids=["empty", "short", "not-base64", "truncated"],
)
def test_malformed_keys_are_refused(bad):
    with pytest.raises(ValueError, match="key 1"):
        KeyRing.from_strings([bad])


def test_generated_keys_differ_and_have_distinct_ids():
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    assert len({KeyRing.from_strings([k]).primary_id for k in keys}) == 50


def test_binary_layout_carries_version_and_key_id_and_binds_user_and_purpose():
    ring = KeyRing.from_strings([generate_key()])
    sealed = ring.seal(b"refresh-token-value", user="alice", purpose="tokens")
    assert sealed[:1] == b"\x02" and sealed[1:7] == bytes.fromhex(ring.primary_id)
    assert len(sealed) == 1 + 6 + 12 + len(b"refresh-token-value") + 16
    assert KeyRing.is_binary(sealed) and KeyRing.key_id_of(sealed) == ring.primary_id
    assert ring.decrypt(sealed, user="alice", purpose="tokens") == b"refresh-token-value"
    for user, purpose in (("mallory", "tokens"), ("alice", "session")):
        with pytest.raises(VaultError):
            ring.decrypt(sealed, user=user, purpose=purpose)
    with pytest.raises(VaultError):
        ring.decrypt(sealed[:-1] + bytes([sealed[-1] ^ 1]), user="alice", purpose="tokens")
    with pytest.raises(VaultError):
        ring.decrypt(sealed[:10], user="alice", purpose="tokens")


def test_the_binary_header_is_authenticated():
    """A blob relabelled with another key id of the ring does not open."""
    first, second = generate_key(), generate_key()
    ring = KeyRing.from_strings([first, second])
    other_id = KeyRing.from_strings([second]).primary_id
    sealed = ring.seal(b"x", user="alice", purpose="tokens")
    relabelled = sealed[:1] + bytes.fromhex(other_id) + sealed[7:]
    with pytest.raises(VaultError):
        ring.decrypt(relabelled, user="alice", purpose="tokens")


def test_tokens_are_deflated_and_only_the_binary_layout_opens():
    ring = KeyRing.from_strings([generate_key()])
    tokens = {"access_token": "eyJ" + "a1b2" * 256, "refresh_token": "r" * 64}
    sealed = seal_tokens(ring, "alice", tokens)
    assert KeyRing.is_binary(sealed) and len(sealed) < len(tokens["access_token"])
    assert open_tokens(ring, "alice", sealed) == tokens
    text = ring.encrypt(json.dumps(tokens).encode(), user="alice", purpose="tokens")
    with pytest.raises(VaultError):
        open_tokens(ring, "alice", text)
    with pytest.raises(VaultError):
        open_tokens(ring, "mallory", sealed)


def test_a_reply_opens_only_with_its_key_and_for_its_event():
    from consent_flow.store.vault import ReplyKey, seal_reply

    key = ReplyKey()
    url = "https://op.example/auth?state=s3cr3t&nonce=n0nce"
    sealed = seal_reply(key.public, url, context="event-1")
    assert "s3cr3t" not in sealed and key.public not in sealed
    assert sealed != seal_reply(key.public, url, context="event-1")  # a fresh exchange each time
    assert key.open(sealed, context="event-1") == url
    for opener, context, blob in [
        (key, "event-2", sealed),  # another event's reply
        (ReplyKey(), "event-1", sealed),  # another caller
        (key, "event-1", sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]),
        (key, "event-1", "r1.short"),
        (key, "event-1", "v1.x.y"),
    ]:
        with pytest.raises(VaultError):
            opener.open(blob, context=context)
    assert "s3cr3t" not in repr(key) and key.public in repr(key)


def test_sealing_to_a_malformed_or_low_order_key_is_a_vault_error():
    from consent_flow.store.vault import seal_reply

    for public in ("not-base64!", "AAAA", "A" * 43):  # the last: the all-zero point
        with pytest.raises(VaultError):
            seal_reply(public, "x", context="e")


def test_a_ciphertext_is_bound_to_its_provider():
    """Sealed at rest, bound to user and provider: one user's tokens at one provider do not
    open as the same user's at another."""
    ring = KeyRing.from_strings([generate_key()])
    github, nextcloud = ring.for_provider("github"), ring.for_provider("nextcloud")
    sealed = seal_tokens(github, "alice", {"access_token": "a", "refresh_token": "r"})
    assert open_tokens(github, "alice", sealed)["refresh_token"] == "r"
    for other in (nextcloud, ring):  # a ring binds to "default" unless told otherwise
        with pytest.raises(VaultError):
            open_tokens(other, "alice", sealed)
    text = github.encrypt(b"code", user="alice", purpose="code:1")
    with pytest.raises(VaultError):
        nextcloud.decrypt(text, user="alice", purpose="code:1")
    assert github.primary_id == ring.primary_id and github.provider == "github"
