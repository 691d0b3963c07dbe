"""Enqueue rate limit per API token: a moving window shared by every web process.

The `limits` library's moving window runs as one Lua script in Redis
(RATE_LIMIT_STORAGE_URL), so it is atomic across processes and machines; a
batch costs as many units as it has jobs.
"""

from __future__ import annotations

import math
import time
from functools import cache

from django.conf import settings
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter


@cache
def _limiter() -> tuple[MovingWindowRateLimiter, RateLimitItem]:
    storage = storage_from_string(settings.RATE_LIMIT_STORAGE_URL)
    return MovingWindowRateLimiter(storage), parse(settings.JOBS_API_ENQUEUE_RATE)


def take(token_id: int, cost: int) -> float | None:
    """Takes `cost` units for the token; None when allowed, else the seconds to wait (Retry-After)."""
    if cost <= 0:
        return None
    limiter, rate = _limiter()
    if cost > rate.amount:
        return float(rate.get_expiry())  # never fits: say so as plainly as the window allows
    if limiter.hit(rate, "jobs-api", str(token_id), cost=cost):
        return None
    reset_at, _remaining = limiter.get_window_stats(rate, "jobs-api", str(token_id))
    return max(1.0, math.ceil(reset_at - time.time()))
