"""The words a job's message and its record share: header names, and what a broker raises.

The lowest layer of the project (with config): the record (jobs.models, tracking, publish,
outbox, reconcile, gate), the task policy (tasks.base) and the faces all use these names, and
this module imports nothing of the project.
"""

from __future__ import annotations

import json
from typing import Any

from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

# The job's row (jobs.models.Job) a message is for; every JobTask message carries it once claimed.
JOB_HEADER = "x_job_id"
# When the first attempt of a task failed; travels with its retries and replays.
FIRST_FAILURE_HEADER = "x_first_failure_at"
# The dead letter a message replays.
REPLAY_HEADER = "x_dead_letter_id"
# The job that spawned this one (jobs.tree): when this job is final, its parent is settled.
PARENT_HEADER = "x_parent_job_id"
# Set by jobs.reconcile on a job's message it sends again because the broker lost the first.
RESENT_HEADER = "x_resent"
# How many times one delivery was sent again because the database was away (tasks.reliability).
# Not an attempt: it counts against neither the task's retries nor the delivery limit.
DEFERRED_HEADER = "x_deferred"
# How many times a message was delivered, 1 the first time (kept by delivery/redis.py).
DELIVERY_COUNT_HEADER = "x_delivery_count"

# Priorities are 0-9, 9 first, on every broker (delivery/redis.py reads Redis's lists that way
# round); a message sent without one gets the middle, CELERY_TASK_DEFAULT_PRIORITY (5).
MIN_PRIORITY, MAX_PRIORITY = 0, 9


def effective_priority(value: Any) -> int | None:
    """A message's priority as the brokers apply it (0-9: Redis clamps, RabbitMQ caps at
    x-max-priority); None when it has none."""
    try:
        return max(MIN_PRIORITY, min(MAX_PRIORITY, int(value)))
    except (TypeError, ValueError):
        return None


# What sending to a broker that is down or frozen raises (after the publish retry policy and the
# socket timeouts in settings): kombu's OperationalError, redis-py's errors, socket errors.
BROKER_ERRORS: tuple[type[Exception], ...] = (
    KombuOperationalError,
    RedisError,
    ConnectionError,
    TimeoutError,
)


# The most of a task's result a job's row keeps (JSON bytes); more is replaced by its size.
MAX_RESULT_BYTES = 64 * 1024


def storable(result: Any) -> Any:
    """A task's result as a job's row keeps it: JSON, at most MAX_RESULT_BYTES."""
    try:
        text = json.dumps(result)
    except (TypeError, ValueError):
        return {"repr": repr(result)[:1000]}
    if len(text) > MAX_RESULT_BYTES:
        return {"truncated": True, "bytes": len(text)}
    return result
