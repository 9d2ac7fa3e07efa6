"""The per-site token bucket."""

from __future__ import annotations

import pytest

from serve.api.ratelimit import RateLimiter
from serve.errors import TooManyRequestsError


def test_each_site_may_send_a_burst_then_only_its_average_rate():
    now = [0.0]
    lim = RateLimiter(clock=lambda: now[0])
    for _ in range(3):
        lim.check("a", rate=0.5, burst=3)
    with pytest.raises(TooManyRequestsError) as ei:
        lim.check("a", rate=0.5, burst=3)
    assert ei.value.status == 429 and ei.value.retry_after == 2 and "retry in 2 s" in ei.value.message
    lim.check("b", rate=0.5, burst=3)  # another site has its own bucket
    now[0] = 2.0  # one token back after 1/rate seconds
    lim.check("a", rate=0.5, burst=3)
    with pytest.raises(TooManyRequestsError):
        lim.check("a", rate=0.5, burst=3)
    now[0] = 1000.0  # refills up to the burst, no further
    for _ in range(3):
        lim.check("a", rate=0.5, burst=3)
    with pytest.raises(TooManyRequestsError):
        lim.check("a", rate=0.5, burst=3)


def test_zero_rate_is_unlimited():
    lim = RateLimiter(clock=lambda: 0.0)
    for _ in range(1000):
        lim.check("a", rate=0, burst=0)
