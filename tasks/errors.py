"""How a task says it failed: for good (no retry) or for now (retry with backoff).

Imported by tasks.base (which re-exports them) and by the modules below it, such as
tasks.deadletters, which must not import tasks.base.
"""

from __future__ import annotations


class PermanentJobError(Exception):
    """The task cannot succeed by trying again: fail now, no retry."""


class InvalidArguments(PermanentJobError):
    """The arguments do not match the task's schema."""


class DeliveryLimitExceeded(PermanentJobError):
    """The message was delivered more than JOBS_MAX_DELIVERIES times: each time its worker died."""


class TransientJobError(Exception):
    """Something outside the task failed and may work later: retry with backoff.

    `retry_after`: seconds the other side asked us to wait (HTTP `Retry-After`, an SMTP reply that
    says when), or None. The retry waits at least that long, capped by the task's retry policy.
    """

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after
