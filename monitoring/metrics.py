"""What a task metric is: outcome counters and two histograms, keyed by task name and queue.

Shared by the collector (monitoring/collect.py), the roll-up (monitoring/rollup.py), the
queries behind the admin page and Prometheus. Redis holds one hash per minute and one of
running totals; each field is `task \\t queue \\t name`, where name is an outcome, a
histogram bucket (`rt:3`), a histogram sum in microseconds (`rt_sum`) or an exception
type (`exc:SMTPServerDisconnected`).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence

OUTCOMES = ("sent", "succeeded", "failed", "retried", "revoked", "rejected")

# Upper bounds (seconds) of the histogram buckets, as Prometheus's `le`; the last bucket is
# +Inf. From a few milliseconds (queue wait on an idle system) to minutes (long jobs).
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, math.inf)
HISTOGRAMS = ("rt", "wt")  # run time, queue wait
HISTOGRAM_NAMES = {"rt": "run time", "wt": "queue wait"}

SEPARATOR = "\t"
MINUTES_KEY = "jobs:metrics:minutes"  # sorted set of minute starts (epoch seconds) with data
TOTALS_KEY = "jobs:metrics:total"


def minute_key(minute: int) -> str:
    return f"jobs:metrics:m:{minute}"


def field(task: str, queue: str, name: str) -> str:
    return f"{task}{SEPARATOR}{queue}{SEPARATOR}{name}"


def split_field(raw: str) -> tuple[str, str, str]:
    task, queue, name = raw.split(SEPARATOR, 2)
    return task, queue, name


def bucket_index(seconds: float) -> int:
    return bisect.bisect_left(BUCKETS, seconds)


def quantile(q: float, counts: Sequence[int]) -> float | None:
    """The q-quantile (0-1) of a histogram, interpolated linearly inside its bucket.

    As Prometheus's histogram_quantile: a value in the +Inf bucket reads as the last finite bound.
    None when the histogram is empty.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            upper = BUCKETS[index]
            lower = BUCKETS[index - 1] if index else 0.0
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return BUCKETS[-2]


def merge(into: dict[str, int], items: Iterable[tuple[str, int]]) -> dict[str, int]:
    for key, value in items:
        into[key] = into.get(key, 0) + value
    return into
