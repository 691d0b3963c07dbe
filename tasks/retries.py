"""How long a task keeps trying: a retry policy per task family, and the wait before each retry.

A policy is three numbers: `attempts` in all (the first run and its retries), a `base` and a
`cap` in seconds. Retry *n* (0 for the first) has a ceiling of `min(cap, base * 2**n)` and waits
"equal jitter": half the ceiling for sure, plus a uniform share of the other half. So workers
that failed together do not retry together, and each family's retry window has a guaranteed
minimum (the sum of the half-ceilings) as well as a maximum (the sum of the ceilings): the
window is what the README's task table states, and what the family's dependency may be away
for without the job becoming a dead letter.

The defaults below ride out at least a 30-minute outage of what each family depends on (email:
an hour of its SMTP relay); images, whose errors are mostly permanent (a hostile file), try a
few times only. `JOBS_RETRY_<FAMILY>="attempts,base,cap"` replaces a family's policy
(docs/configuration.md); `JOBS_RETRY_DELAY_SCALE` multiplies every wait (tests run the real
attempt counts with the waits scaled down).

A task may wait longer than its ceiling when the other side asked: `TransientJobError(...,
retry_after=seconds)` (an SMTP reply or HTTP `Retry-After` that says when) waits at least that,
bounded by the policy's cap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from django.conf import settings


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` in all (>= 1); retry n waits within [ceiling/2, ceiling],
    ceiling = min(cap, base * 2**n)."""

    attempts: int
    base: float
    cap: float

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"a retry policy needs at least 1 attempt, not {self.attempts}")
        if not 0 < self.base <= self.cap:
            raise ValueError(f"a retry policy needs 0 < base <= cap, not base {self.base}, cap {self.cap}")

    @property
    def retries(self) -> int:
        return self.attempts - 1

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number `retry + 1` (`retry`: retries done so far)."""
        # min() first: 2**retry for a large retry number would be a huge float, not an error.
        return float(min(self.cap, self.base * 2 ** min(retry, 64)))

    def wait(
        self, retry: int, *, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Seconds before the next attempt (unscaled): equal jitter, and at least `retry_after`
        (bounded by the cap) when the other side asked for it."""
        ceiling = self.ceiling(retry)
        wait = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
        if retry_after is not None and retry_after > 0:
            wait = max(wait, min(float(retry_after), self.cap))
        return wait

    def window(self) -> tuple[float, float]:
        """(least, most) seconds from the first failure to the last attempt, without Retry-After."""
        ceilings = [self.ceiling(retry) for retry in range(self.retries)]
        return sum(ceilings) / 2, float(sum(ceilings))

    def __str__(self) -> str:
        return f"{self.attempts},{self.base:g},{self.cap:g}"


# JobTask's own (`default`, `maintenance`, monitoring, the jobs app): their work is mostly the
# database, whose outages are deferred, not counted as attempts (tasks.reliability).
DEFAULT = RetryPolicy(attempts=8, base=5, cap=300)

# The families' policies, by task-name prefix (`email.send` is `email`). A task class may still
# set its own `retry_policy` (or `max_attempts`, which keeps the family's base and cap).
FAMILY_POLICIES: dict[str, RetryPolicy] = {
    # An SMTP relay's outage or restart, greylisting (5-15 minutes): at least an hour.
    "email": RetryPolicy(attempts=13, base=10, cap=1200),
    # An HTTP source's maintenance window: at least half an hour.
    "data_sync": RetryPolicy(attempts=11, base=10, cap=900),
    # Database outages are deferred; what is left is contention (deadlocks, lock and statement
    # timeouts: seconds) and the daily report's SMTP relay (at least half an hour, like a sync).
    "analytics": RetryPolicy(attempts=11, base=5, cap=1200),
    # The storage failing to read or write; the rest (a bad file) is permanent: a few tries.
    "images": RetryPolicy(attempts=5, base=10, cap=120),
}

# The setting that replaces each family's policy (None: the default above).
SETTINGS = {
    "default": "JOBS_RETRY_DEFAULT",
    **{family: f"JOBS_RETRY_{family.upper()}" for family in FAMILY_POLICIES},
}


def configured(family: str) -> RetryPolicy:
    """The policy of `family` (a task-name prefix; anything unknown gets the default), with its
    setting applied."""
    name = SETTINGS.get(family, SETTINGS["default"])
    override = getattr(settings, name, None)
    if override is not None:
        attempts, base, cap = override
        return RetryPolicy(attempts=int(attempts), base=float(base), cap=float(cap))
    return FAMILY_POLICIES.get(family, DEFAULT)


def family_of(task_name: str | None) -> str:
    return (task_name or "").partition(".")[0] if "." in (task_name or "") else "default"


def scaled(seconds: float) -> float:
    """A wait as the worker applies it: JOBS_RETRY_DELAY_SCALE times the policy's (1 in production)."""
    return seconds * float(getattr(settings, "JOBS_RETRY_DELAY_SCALE", 1.0))


def describe_window(policy: RetryPolicy) -> str:
    """`at least 1 h 0 min, at most 2 h 1 min`: how the docs state a window."""
    least, most = policy.window()
    return f"at least {_duration(least)}, at most {_duration(most)}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"
