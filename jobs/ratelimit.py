"""Enqueue rate limit per API token: a moving window shared by every web process.

The `limits` library's moving window runs as one Lua script in Redis
(RATE_LIMIT_STORAGE_URL), so it is atomic across processes and machines; a
batch costs as many units as it has jobs. With RabbitMQ as the broker the store is
METRICS_REDIS_URL's Redis unless RATE_LIMIT_STORAGE_URL names another; the settings refuse to
load with neither (memory:// only when set explicitly: per process). See docs/brokers.md.
"""

from __future__ import annotations

import math
import time
from functools import cache

from django.conf import settings
from limits import RateLimitItem, parse
from limits.errors import StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter


class LimiterUnavailable(Exception):
    """The rate limiter's store did not answer (in time): the request cannot be counted."""


@cache
def _limiter() -> tuple[MovingWindowRateLimiter, RateLimitItem]:
    url = settings.RATE_LIMIT_STORAGE_URL
    options: dict[str, float | bool] = {}
    if url.startswith(("redis://", "rediss://")):
        # A frozen or unreachable Redis costs a request seconds and a 503, never a hang; its
        # errors come out as StorageError.
        timeout = settings.JOBS_API_PUBLISH_TIMEOUT_SECONDS
        options = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "wrap_exceptions": True}
    storage = storage_from_string(url, **options)
    return MovingWindowRateLimiter(storage), parse(settings.JOBS_API_ENQUEUE_RATE)


def take(token_id: int, cost: int) -> float | None:
    """Takes `cost` units for the token; None when allowed, else the seconds to wait (Retry-After).

    Raises LimiterUnavailable when the store (Redis) does not answer.
    """
    if cost <= 0:
        return None
    limiter, rate = _limiter()
    if cost > rate.amount:
        return float(rate.get_expiry())  # never fits: say so as plainly as the window allows
    try:
        if limiter.hit(rate, "jobs-api", str(token_id), cost=cost):
            return None
        reset_at, _remaining = limiter.get_window_stats(rate, "jobs-api", str(token_id))
    except (StorageError, OSError) as exc:
        # The type only: a Redis error's text names the server's address.
        raise LimiterUnavailable(f"the rate limiter's store did not answer ({type(exc).__name__})") from exc
    return max(1.0, math.ceil(reset_at - time.time()))
