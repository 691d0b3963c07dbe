"""The reconciler: a job the database says is waiting, whose message no broker holds, is sent again.

A broker that restarts without persistence (or loses a message any other way) leaves job
rows `queued` with nothing to deliver them. Every run of `default.release_jobs` (each
minute) looks at the jobs that should have a message by now: published more than
JOBS_RECONCILE_AFTER_SECONDS ago and still `queued`, `scheduled` or `retrying`, or
`running` for as long (a running task's message waits in `unacked` until the task ends: a
running job whose message is nowhere was cut short and lost). It reads every message the Redis
broker holds (the queues with their priority lists, and the `unacked` hash where messages
taken by workers wait for their acknowledgement) and sends again, with the same task id,
each job whose message is in neither, twice in a row (a message moving from a queue to
`unacked` between two reads is not taken for lost). A copy that turns out to be a second one
is harmless: a job runs only for the message that claims its row first (jobs.tracking.claim).

RabbitMQ: this reconciler sends nothing again (`broker_task_ids` is None), and need not. Every
publish waits for RabbitMQ's confirm (publisher confirms: on a quorum queue, a majority of its
replicas wrote it) before the row is marked published, so a row with `published_at` has a message
RabbitMQ holds on disk; a worker's unacknowledged messages go back to their queue when its
connection drops (RabbitMQ redelivers them: resending would only make copies); a quorum queue
survives the loss of a node. The gap, a row whose publish was never confirmed (refused, or the
web process died in between), has no `published_at`: `default.release_jobs` publishes it
(jobs.services.release_due), on either broker. What RabbitMQ itself dead-letters becomes a dead
letter (tasks.dead_lettered). See docs/brokers.md.

`finish_from_results` repairs the other half: a job whose task stored its result but whose
row was never finished (its pool process was killed after the result was written and before
the row was, and Celery acknowledged the message as "succeeded before the worker was lost").
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from config.celery_app import app
from jobs.models import Job
from jobs.protocol import RESENT_HEADER
from jobs.publish import publish

logger = logging.getLogger(__name__)


def _task_id(raw: bytes | str) -> str | None:
    try:
        payload = json.loads(raw)
        if isinstance(payload, list):  # the unacked hash holds [message, exchange, routing key]
            payload = payload[0]
        return str(payload["headers"]["id"])
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def broker_task_ids(queues: list[str]) -> set[str] | None:
    """Task ids of every message the Redis broker holds for `queues`; None when it is not Redis
    or holds more than JOBS_RECONCILE_MAX_MESSAGES (reading them all would cost too much)."""
    if not app.conf.broker_url.startswith(("redis://", "rediss://")):
        return None
    with app.connection_for_read() as connection:
        channel: Any = connection.default_channel
        client = channel.client
        keys = [
            channel._q_for_pri(queue, priority) for queue in queues for priority in channel.priority_steps
        ]
        sizes = client.pipeline()
        for key in keys:
            sizes.llen(key)
        sizes.hlen(channel.unacked_key)
        total = sum(sizes.execute())
        if total > settings.JOBS_RECONCILE_MAX_MESSAGES:
            logger.warning(
                "reconciler: the broker holds %d messages (over JOBS_RECONCILE_MAX_MESSAGES); not checked",
                total,
            )
            return None
        reads = client.pipeline()
        for key in keys:
            reads.lrange(key, 0, -1)
        reads.hvals(channel.unacked_key)
        found: set[str] = set()
        for messages in reads.execute():
            found.update(task_id for task_id in map(_task_id, messages) if task_id)
        return found


def _waiting(now: Any) -> Any:
    # A running job's message stays in `unacked` until its task has ended (late acks, on every
    # task): one in no queue and not there either was lost with the broker, or was restored to
    # a broker that then lost it, while its task was cut short (Celery cancels what runs when
    # its broker connection drops). It need not wait for the hard time limit to be sent again.
    before = now - timedelta(seconds=settings.JOBS_RECONCILE_AFTER_SECONDS)
    # A parent waiting for its children (own_finished_at set) has no message left, by design.
    return Job.objects.filter(published_at__lte=before).filter(
        Q(status__in=Job.STARTABLE)
        | Q(status=Job.Status.RUNNING, started_at__lte=before, own_finished_at__isnull=True)
    )


def finish_from_results(limit: int = 1000) -> int:
    """Finishes `running` rows whose task's result says it ended; returns how many."""
    from django_celery_results.models import TaskResult

    from jobs import tracking

    grace = timezone.now() - timedelta(seconds=settings.JOBS_RECONCILE_AFTER_SECONDS)
    rows = Job.objects.filter(status=Job.Status.RUNNING, started_at__lte=grace, own_finished_at__isnull=True)
    running = {
        task_id: (pk, parent_id)
        for task_id, pk, parent_id in rows.values_list("task_id", "pk", "parent_id")[:limit]
    }
    if not running:
        return 0
    results = TaskResult.objects.filter(task_id__in=list(running), status__in=("SUCCESS", "FAILURE"))
    finished = 0
    for task_id, status, result in results.values_list("task_id", "status", "result"):
        job_id, parent_id = running[task_id]
        parent = None if parent_id is None else str(parent_id)
        try:
            value = json.loads(result) if result else None
        except ValueError:
            value = None
        if status == "SUCCESS":
            # A task that spawned children returned: its job now waits for them (jobs.tree).
            spawned = Job.objects.filter(parent_id=job_id).exists()
            tracking.succeeded(str(job_id), task_id, value, spawned=spawned, parent_id=parent)
        else:
            error = value if isinstance(value, dict) else {}
            tracking.failed(
                str(job_id),
                task_id,
                _StoredError(error.get("exc_type", "Error"), error.get("exc_message")),
                parent_id=parent,
            )
        finished += 1
    if finished:
        logger.warning("reconciler: finished %d running job(s) from their stored outcome", finished)
    return finished


def finish_cancel_requests(limit: int = 1000) -> int:
    """Cancels `running` jobs whose cancel was requested longer ago than their task's hard time
    limit (and JOBS_RECONCILE_AFTER_SECONDS more): no run of theirs can still be going, and none
    said how it ended (its worker's main process could not write `cancelled` when it terminated
    the run, tasks.requests). Returns how many. On Redis the resend of their lost message usually
    got there first (jobs.tracking.claim cancels a redelivered run whose cancel was requested)."""
    from jobs import tracking

    now = timezone.now()
    grace = timedelta(seconds=settings.JOBS_RECONCILE_AFTER_SECONDS)
    default_limit = app.conf.task_time_limit or 0
    shortest = min(
        [default_limit, *(getattr(task, "time_limit", None) or default_limit for task in app.tasks.values())]
    )
    rows = Job.objects.filter(
        status=Job.Status.RUNNING,
        own_finished_at__isnull=True,
        cancel_requested_at__lte=now - timedelta(seconds=shortest) - grace,
    ).values_list("task_id", "type", "cancel_requested_at")[:limit]
    finished = 0
    for task_id, job_type, requested in rows:
        limit_seconds = getattr(app.tasks.get(job_type), "time_limit", None) or default_limit
        if (
            requested is not None
            and requested <= now - timedelta(seconds=limit_seconds) - grace
            and tracking.cancelled_while_running(
                task_id, "its run was cancelled and nothing was heard of it within its hard time limit"
            )
        ):
            finished += 1
    if finished:
        logger.warning(
            "reconciler: %d job(s) whose cancel was requested are cancelled (their run is over)", finished
        )
    return finished


class _StoredError(Exception):
    """An error as the result backend stored it, named as the task's exception was."""

    def __init__(self, type_name: str, message: Any) -> None:
        text = " ".join(map(str, message)) if isinstance(message, list) else str(message or "")
        super().__init__(text)
        self.type_name = type_name


def resend_lost(limit: int = 5000) -> int:
    """Sends again the jobs whose message is lost (see the module docstring); returns how many."""
    now = timezone.now()
    candidates = dict(_waiting(now).order_by("published_at").values_list("task_id", "queue")[:limit])
    if not candidates:
        return 0
    queues = sorted(set(candidates.values()))
    missing = set(candidates)
    for _ in range(2):
        held = broker_task_ids(queues)
        if held is None:
            return 0
        missing -= held
        if not missing:
            return 0
    # Still waiting now (not finished or cancelled while we read the broker)?
    lost = list(_waiting(now).filter(task_id__in=missing))
    if not lost:
        return 0
    publish(lost, headers={RESENT_HEADER: 1})
    logger.warning("reconciler: %d job(s) had no message in the broker; sent again", len(lost))
    return len(lost)
