"""The write-ahead spool for refreshed tokens, and the rule that decides whether a refresh's
answer is still to be stored after its commit conflicted. Pure: files and data, no servers."""

from __future__ import annotations

import stat
from typing import Any

from structlog.testing import capture_logs

from consent_flow import KeyRing, State, generate_key
from consent_flow.core.records import ConsentRecord
from consent_flow.engine.refresh import Fit, fits
from consent_flow.store.spool import PendingTokens, TokenSpool, token_digest
from consent_flow.store.vault import open_tokens, seal_tokens

ACCESS = "access-token-value-0123456789"
FRESH = "rotated-refresh-token-0123456789"
SPENT = "spent-refresh-token-0123456789"
SINCE = 1_700_000_000.0
AT = SINCE + 3600


def pending(ring: KeyRing, *, at: float = AT) -> PendingTokens:
    return PendingTokens(
        user="alice",
        event_id="e1",
        at=at,
        since=SINCE,
        base=token_digest(SPENT),
        sealed=seal_tokens(ring, "alice", {"access_token": ACCESS, "refresh_token": FRESH}),
        expires_at=at + 60,
        refresh_expires_at=at + 900,
        scopes=("openid", "offline_access"),
        due_at=at + 30,
    )


def record(ring: KeyRing, *, refresh_token: str = SPENT, **fields: Any) -> ConsentRecord:
    sealed = seal_tokens(ring, "alice", {"access_token": "old", "refresh_token": refresh_token})
    values: dict[str, Any] = {"since": SINCE, "last_refresh_at": AT - 30, **fields}
    return ConsentRecord(user="alice", state=State.PROVISIONED, version=7, tokens=sealed, **values)


def test_a_spooled_answer_round_trips_sealed_and_private(tmp_path):
    ring = KeyRing.from_strings([generate_key()])
    spool = TokenSpool(tmp_path / "spool" / "cf")
    entry = pending(ring)
    spool.write(entry)
    spool.make_durable(entry)
    path = spool.path(entry)
    raw = path.read_bytes()
    for secret in (ACCESS, FRESH, SPENT):
        assert secret.encode() not in raw
    assert "alice" not in path.name  # the file name carries a digest, not the user id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    [back] = spool.entries()
    assert back == entry
    assert open_tokens(ring, "alice", back.sealed)["refresh_token"] == FRESH
    spool.remove(entry)
    spool.remove(entry)  # gone already: fine
    assert spool.entries() == []


def test_an_unreadable_spool_file_is_logged_and_left(tmp_path):
    spool = TokenSpool(tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    with capture_logs() as logs:
        assert spool.entries() == []
    assert [e["event"] for e in logs] == ["spool_entry_unreadable"]
    assert (tmp_path / "broken.json").exists()


def test_a_change_that_left_the_grant_alive_leaves_the_answer_to_store():
    old = generate_key()
    ring = KeyRing.from_strings([old])
    # A key rotation re-sealed the same tokens under a new key and bumped the version.
    rotated = KeyRing.from_strings([generate_key(), old])
    assert fits(pending(ring), record(rotated), rotated) is Fit.STORE
    # A reschedule after a failure: counters and the schedule moved, the tokens did not.
    assert (
        fits(pending(ring), record(ring, refresh_failures=2, next_refresh_at=AT + 5), ring)
        is Fit.STORE
    )


def test_a_grant_that_ended_or_was_granted_anew_gets_the_answer_revoked():
    ring = KeyRing.from_strings([generate_key()])
    revoked = ConsentRecord(user="alice", state=State.REVOKED, version=8, since=AT + 1)
    assert fits(pending(ring), revoked, ring) is Fit.ENDED
    anew = record(ring, since=SINCE + 10)
    assert fits(pending(ring), anew, ring) is Fit.ENDED


def test_an_answer_already_stored_or_overtaken_is_not_stored_again():
    ring = KeyRing.from_strings([generate_key()])
    # This very answer, stored by a commit whose reply was lost (a failover's promoted replica
    # has it): nothing to warn about.
    assert fits(pending(ring), record(ring, last_refresh_at=AT), ring) is Fit.STORED
    # A later refresh of the same grant got there first: this answer is dropped.
    assert fits(pending(ring), record(ring, last_refresh_at=AT + 5), ring) is Fit.OVERTAKEN
    other = record(ring, refresh_token="someone-elses-newer-token")
    assert fits(pending(ring), other, ring) is Fit.OVERTAKEN


def test_entries_younger_than_asked_are_not_read(tmp_path):
    """The cleanup job leaves a sibling worker's fresh file alone (its commit is most likely
    under way): it does not even read it. An old one is read."""
    import os
    import time

    ring = KeyRing.from_strings([generate_key()])
    spool = TokenSpool(tmp_path)
    entry = pending(ring)
    spool.write(entry)
    assert spool.entries(min_age=30) == []
    old = time.time() - 31
    os.utime(spool.path(entry), (old, old))
    assert spool.entries(min_age=30) == [entry]
    assert spool.entries() == [entry]
