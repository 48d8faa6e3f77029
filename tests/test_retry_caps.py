"""Every wait ``RetryPolicy`` asks for is bounded: by the cap, by the timeout left, by ``left``."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.api.retry import MAX_SERVER_WAIT, NO_WAIT, RetryPolicy


@pytest.fixture
def highest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jitter always draws the top of its range, so a test sees the ceiling."""
    monkeypatch.setattr("runner.api.retry.random.uniform", lambda low, high: high)


def test_the_cap_is_ten_minutes():
    """The documented cap on a single wait."""
    assert MAX_SERVER_WAIT == 600.0


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        pytest.param(99_999_999.0, MAX_SERVER_WAIT, id="retry-after-99999999"),
        pytest.param(1e300, MAX_SERVER_WAIT, id="retry-after-1e300"),
        pytest.param(math.inf, 1.0, id="infinite-is-no-advice"),
        pytest.param(math.nan, 1.0, id="nan-is-no-advice"),
        pytest.param(-30.0, 1.0, id="negative-is-no-advice"),
        pytest.param(599.0, 599.0, id="under-the-cap-kept"),
    ],
)
def test_a_server_requested_wait_is_capped(highest, retry_after, expected):
    """A huge Retry-After waits the cap; a non-finite or negative one leaves our backoff."""
    assert RetryPolicy(timeout=10_000).wait(1, retry_after) == expected


def test_our_own_backoff_is_capped_too(highest):
    """Even a policy built with an absurd ``wait_max`` never waits past the cap."""
    policy = RetryPolicy(timeout=1e9, wait_initial=1e6, wait_max=math.inf)
    assert policy.wait(40) == MAX_SERVER_WAIT


@pytest.mark.parametrize(
    ("elapsed", "left", "expected"),
    [
        pytest.param(0.0, None, 100.0, id="whole-timeout"),
        pytest.param(30.0, None, 70.0, id="rest-of-timeout"),
        pytest.param(150.0, None, 0.0, id="timeout-spent"),
        pytest.param(0.0, 12.0, 12.0, id="rest-of-deadline"),
        pytest.param(90.0, 40.0, 10.0, id="tighter-of-both"),
        pytest.param(0.0, -5.0, 0.0, id="deadline-passed"),
        pytest.param(0.0, math.nan, 0.0, id="deadline-unknown"),
    ],
)
def test_no_wait_outlasts_the_timeout_or_the_deadline(highest, elapsed, left, expected):
    """A Retry-After past the policy's timeout or the caller's deadline waits only what is left."""
    policy = RetryPolicy(timeout=100.0)
    assert policy.wait(1, 500.0, elapsed=elapsed, left=left) == expected


def test_no_wait_still_honours_a_short_retry_after():
    """``NO_WAIT`` has no backoff of its own but keeps a server's modest Retry-After."""
    assert NO_WAIT.wait(3, 2.5) == 2.5


@given(
    attempt=st.integers(min_value=1, max_value=10**6),
    retry_after=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    elapsed=st.floats(min_value=0, max_value=1e12),
    left=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    wait_max=st.floats(min_value=0, allow_infinity=True),
)
def test_every_wait_is_finite_and_within_every_bound(attempt, retry_after, elapsed, left, wait_max):
    """For any input the wait is a number in [0, min(cap, timeout left, left)]."""
    policy = RetryPolicy(timeout=900.0, wait_max=wait_max)
    wait = policy.wait(attempt, retry_after, elapsed=elapsed, left=left)
    bound = min(MAX_SERVER_WAIT, 900.0 - elapsed)
    if left is not None:
        bound = min(bound, left) if not math.isnan(left) else 0.0
    assert math.isfinite(wait)
    assert 0.0 <= wait <= max(0.0, bound)
