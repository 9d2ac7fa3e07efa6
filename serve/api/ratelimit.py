"""Per-site request rate limits: a token bucket per site, refilled continuously.

A site may send ``burst`` requests at once and ``requests_per_second`` on
average; beyond that the API answers 429 with ``Retry-After``. This guards the
shared router against one site's runaway client; the per-site job limit
(:mod:`serve.router.scheduler`) guards the GPUs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from serve.errors import TooManyRequestsError


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """``check(site, rate, burst)`` takes one token or raises 429 saying when to retry."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, site: str, rate: float, burst: int) -> None:
        if rate <= 0:
            return  # unlimited
        now = self._clock()
        b = self._buckets.get(site)
        if b is None:
            b = self._buckets[site] = _Bucket(float(burst), now)
        b.tokens = min(float(burst), b.tokens + (now - b.stamp) * rate)
        b.stamp = now
        if b.tokens < 1.0:
            wait = math.ceil((1.0 - b.tokens) / rate)
            raise TooManyRequestsError(f"site {site} is over its request rate ({rate:g}/s, bursts of {burst}); "
                                       f"retry in {wait} s", retry_after=wait)
        b.tokens -= 1.0
