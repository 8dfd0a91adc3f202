"""The pure arithmetic of refresh scheduling and retry backoff."""

from __future__ import annotations

import pytest

from consent_flow._engine import MIN_REFRESH_DELAY, REFRESH_JITTER, next_refresh_at
from consent_flow._refresh import RetryPolicy

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
