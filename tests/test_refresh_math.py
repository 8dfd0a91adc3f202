"""The pure arithmetic of refresh scheduling and retry backoff."""

from __future__ import annotations

import pytest

from consent_flow.core.records import ON_DEMAND_COOLDOWN, ConsentRecord
from consent_flow.engine.engine import (
    MIN_REFRESH_DELAY,
    REFRESH_JITTER,
    next_refresh_at,
    refresh_expiry_after,
    scheduling_lapse,
)
from consent_flow.engine.refresh import RetryPolicy
from consent_flow.oidc import TokenSet

NOW = 1_000_000.0


def test_due_margin_before_expiry_without_jitter():
    assert next_refresh_at(NOW + 3600, NOW, margin=120, keepalive=86400) == NOW + 3600 - 120


def test_jitter_only_ever_moves_the_refresh_earlier():
    plain = next_refresh_at(NOW + 3600, NOW, margin=120, keepalive=86400)
    for jitter in (0.0, 0.3, 0.999):
        due = next_refresh_at(NOW + 3600, NOW, margin=120, keepalive=86400, jitter=jitter)
        assert plain - 120 * REFRESH_JITTER <= due <= plain


def test_tokens_issued_together_spread_out():
    dues = {
        next_refresh_at(NOW + 3600, NOW, margin=600, keepalive=86400, jitter=j / 10)
        for j in range(10)
    }
    assert len(dues) == 10


def test_a_token_shorter_than_twice_the_margin_refreshes_half_way():
    assert next_refresh_at(NOW + 4, NOW, margin=120, keepalive=86400) == NOW + 2


def test_no_expiry_means_the_keepalive():
    assert next_refresh_at(None, NOW, margin=120, keepalive=3600) == NOW + 3600


def test_a_very_long_lived_token_is_still_refreshed_at_the_keepalive():
    assert next_refresh_at(NOW + 10 * 86400, NOW, margin=120, keepalive=86400) == NOW + 86400


def test_an_already_expired_token_is_refreshed_soon_but_not_in_a_loop():
    due = next_refresh_at(NOW - 5, NOW, margin=120, keepalive=86400)
    assert NOW <= due <= NOW + MIN_REFRESH_DELAY


@pytest.mark.parametrize("failures", [1, 2, 3, 4, 10, 50])
def test_backoff_grows_exponentially_within_bounds(failures):
    policy = RetryPolicy(base=2.0, cap=300.0)
    raw = min(300.0, 2.0 * 2 ** (failures - 1))
    for _ in range(50):
        delay = policy.delay(failures)
        assert raw / 2 <= delay <= raw


def test_retry_after_is_honoured_up_to_the_cap():
    policy = RetryPolicy(base=1.0, cap=60.0)
    assert policy.delay(1, retry_after=30) >= 30
    assert policy.delay(1, retry_after=10_000) <= 60


# --- the refresh token's own lifetime (refresh_expires_in) -----------------------------------


def test_a_refresh_token_lapsing_first_decides_the_refresh():
    # Nextcloud's defaults: access token 900 s, refresh token 900 s more is the later one.
    assert (
        next_refresh_at(NOW + 900, NOW, margin=120, keepalive=86400, refresh_expires_at=NOW + 1800)
        == NOW + 900 - 120
    )
    # A refresh token that lives 20 s, an access token an hour: refreshed half-way through the
    # refresh token's life, with the same margin rule.
    assert (
        next_refresh_at(NOW + 3600, NOW, margin=120, keepalive=86400, refresh_expires_at=NOW + 20)
        == NOW + 10
    )
    assert (
        next_refresh_at(NOW + 3600, NOW, margin=120, keepalive=86400, refresh_expires_at=NOW + 600)
        == NOW + 600 - 120
    )


def test_a_refresh_token_lapse_bounds_an_access_token_without_expiry():
    due = next_refresh_at(None, NOW, margin=120, keepalive=86400, refresh_expires_at=NOW + 1000)
    assert due == NOW + 1000 - 120


def test_a_refresh_token_lapse_already_past_is_ignored_not_looped_on():
    due = next_refresh_at(NOW + 3600, NOW, margin=120, keepalive=86400, refresh_expires_at=NOW - 1)
    assert due == NOW + 3600 - 120


def _fresh(*, stated: bool, at: float | None) -> TokenSet:
    return TokenSet(
        access_token="a",
        refresh_token=None,
        id_token=None,
        token_type="Bearer",
        expires_at=NOW + 3600,
        scopes=(),
        refresh_expires_at=at,
        refresh_expiry_stated=stated,
    )


def test_the_refresh_expiry_kept_after_a_refresh():
    said = _fresh(stated=True, at=NOW + 900)
    never = _fresh(stated=True, at=None)  # refresh_expires_in 0: does not lapse
    silent = _fresh(stated=False, at=None)
    for rotated in (False, True):
        assert refresh_expiry_after(said, NOW + 50, rotated=rotated, now=NOW) == NOW + 900
        assert refresh_expiry_after(never, NOW + 50, rotated=rotated, now=NOW) is None
    # Said nothing: the same token keeps its lapse; a rotated one's lifetime is unknown.
    assert refresh_expiry_after(silent, NOW + 50, rotated=False, now=NOW) == NOW + 50
    assert refresh_expiry_after(silent, NOW + 50, rotated=True, now=NOW) is None
    assert refresh_expiry_after(silent, None, rotated=False, now=NOW) is None
    # A lapse the provider has evidently outlived is dropped, not kept to loop on.
    assert refresh_expiry_after(silent, NOW - 1, rotated=False, now=NOW) is None


def test_only_a_lapse_that_refreshing_pushes_back_drives_the_schedule():
    assert scheduling_lapse(NOW + 20, None) == NOW + 20  # the first one known
    assert scheduling_lapse(NOW + 30, NOW + 20) == NOW + 30  # slides with each refresh
    assert scheduling_lapse(None, NOW + 20) is None
    # A fixed end (whole seconds from the provider's clock): refreshing sooner cannot help, and
    # scheduling by it would refresh ever more often as it nears.
    assert scheduling_lapse(NOW + 20, NOW + 20) is None
    assert scheduling_lapse(NOW + 21, NOW + 20) is None
    assert scheduling_lapse(NOW + 19, NOW + 20) is None


def test_a_fixed_lapse_does_not_make_refreshes_converge_on_it():
    """A lapse that never moves, refreshed by: each refresh would fall half-way there."""
    lapse, now, previous = NOW + 20, NOW, None
    dues = []
    while now < lapse and len(dues) < 100:
        now = next_refresh_at(
            NOW + 3600,
            now,
            margin=120,
            keepalive=86400,
            refresh_expires_at=scheduling_lapse(lapse, previous),
        )
        previous = lapse
        dues.append(now)
    # One refresh ahead of the lapse (it might have moved); then the access token's schedule.
    assert dues == [NOW + 10, NOW + 3600 - 120]


# --- on-demand cooldown after a failure ------------------------------------------------------


def test_no_cooldown_without_a_failure():
    rec = ConsentRecord(user="u", next_refresh_at=NOW + 10, refresh_failures=0)
    assert rec.on_demand_retry_at() is None


def test_cooldown_lasts_until_the_retry_and_at_least_the_floor():
    late = ConsentRecord(
        user="u", next_refresh_at=NOW + 60, refresh_failures=2, last_failure_at=NOW
    )
    assert late.on_demand_retry_at() == NOW + 60
    soon = ConsentRecord(user="u", next_refresh_at=NOW + 1, refresh_failures=1, last_failure_at=NOW)
    assert soon.on_demand_retry_at() == NOW + ON_DEMAND_COOLDOWN
    # Written by an earlier version: no failure time, the retry alone.
    legacy = ConsentRecord(user="u", next_refresh_at=NOW + 3, refresh_failures=1)
    assert legacy.on_demand_retry_at() == NOW + 3
