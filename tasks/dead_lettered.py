"""Messages RabbitMQ dead-lettered, turned into our dead letters (quorum queues only).

Every quorum task queue names the exchange `jobs.dead` as its dead-letter exchange
(config/brokers.py): a message returned more than RABBITMQ_DELIVERY_LIMIT times (its workers died
each time, and our own cap, JOBS_MAX_DELIVERIES, could not record it), or rejected without
requeue, goes, at least once, into the queue `jobs.dead_letters`. `drain()` (run by
`default.release_jobs`) takes each one, writes a dead letter (tasks/deadletters.py's store) with
its task name, arguments, queue and the reason RabbitMQ gives, marks its job failed, and only
then acknowledges it: a crash in between leaves it to the next run (the dead letter is keyed by
task id, so writing it twice does no harm). A message that is not a Celery task goes to the
quarantine instead. Nothing RabbitMQ dead-letters is lost silently.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.conf import settings
from django.utils import timezone

from config import brokers
from config.celery_app import app
from jobs import tracking
from jobs.models import Job
from jobs.protocol import JOB_HEADER, PARENT_HEADER
from tasks import quarantine
from tasks.models import DeadLetter, QuarantinedMessage

logger = logging.getLogger(__name__)

# Messages taken per run; the rest wait for the next run (a few seconds later).
DRAIN_BATCH = 500
EXCEPTION_TYPE = "rabbitmq.DeadLettered"


class DeadLettered(Exception):
    """RabbitMQ dead-lettered the message; the text says why."""

    type_name = EXCEPTION_TYPE


def _death(headers: dict[str, Any]) -> tuple[str, str]:
    """(the queue it left, RabbitMQ's reason) from the newest `x-death` entry."""
    deaths = headers.get("x-death") or []
    first = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
    reason = str(first.get("reason") or headers.get("x-first-death-reason") or "unknown")
    queue = str(first.get("queue") or headers.get("x-first-death-queue") or "")
    return queue, reason


def _explain(reason: str) -> str:
    if reason == "delivery_limit":
        return (
            f"RabbitMQ dead-lettered the message: returned more than RABBITMQ_DELIVERY_LIMIT "
            f"({settings.RABBITMQ_DELIVERY_LIMIT}) times, each time its worker was lost. Not run "
            "again: replay the dead letter once the cause is fixed."
        )
    if reason == "rejected":
        return "RabbitMQ dead-lettered the message: a consumer rejected it without requeue."
    return f"RabbitMQ dead-lettered the message ({reason})."


def _job_of(headers: dict[str, Any]) -> uuid.UUID | None:
    try:
        job_id = uuid.UUID(str(headers.get(JOB_HEADER)))
    except ValueError:
        return None
    return Job.objects.filter(pk=job_id).values_list("pk", flat=True).first()


def record(message: Any) -> str:
    """Records one dead-lettered message; "dead_letter" or "quarantine" (where it went)."""
    headers: dict[str, Any] = dict(message.headers or {})
    queue, reason = _death(headers)
    task_name, task_id = headers.get("task"), headers.get("id")
    problem = ""
    try:
        payload = message.decode()
        args, kwargs = payload[0], payload[1]
        if not (isinstance(args, list) and isinstance(kwargs, dict)):
            raise ValueError("not [args, kwargs, embed]")
    except Exception as exc:  # not a Celery (protocol 2) task message: keep it for a person
        problem = f" ({type(exc).__name__})"
    if problem or not task_name or not task_id:
        row = quarantine.build(
            queue=queue,
            kind=QuarantinedMessage.Kind.ENVELOPE,
            reason=f"dead-lettered by RabbitMQ ({reason}); not a Celery task message{problem}",
            body=message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )
        quarantine.record_message(row)
        return "quarantine"
    now = timezone.now()
    error = DeadLettered(_explain(reason))
    job_id = _job_of(headers)
    letter, created = DeadLetter.objects.get_or_create(
        task_id=str(task_id),
        defaults={
            "task_name": str(task_name),
            "queue": queue,
            "priority": message.properties.get("priority"),
            "args": args,
            "kwargs": kwargs,
            "attempts": int(headers.get("retries") or 0) + 1,
            "exception_type": EXCEPTION_TYPE,
            "exception_message": str(error),
            "traceback": "",
            "first_failed_at": now,
            "last_failed_at": now,
            "job_id": job_id,
        },
    )
    if job_id is not None:
        parent = headers.get(PARENT_HEADER)
        tracking.failed(str(job_id), str(task_id), error, parent_id=None if parent is None else str(parent))
    logger.warning(
        "%s[%s] dead-lettered by RabbitMQ from queue %s (%s); dead letter %d%s",
        task_name,
        task_id,
        queue,
        reason,
        letter.pk,
        "" if created else " (already recorded)",
    )
    return "dead_letter"


def drain(connection: Any = None, limit: int = DRAIN_BATCH) -> int:
    """Moves up to `limit` messages from `jobs.dead_letters` into the dead-letter store; how many.

    Does nothing unless the broker is RabbitMQ with quorum queues (or a `connection` is given).
    """
    if connection is None and not settings.RABBITMQ_QUORUM_QUEUES:
        return 0
    if connection is None:
        with app.connection_for_write() as own:
            return _drain(own, limit)
    return _drain(connection, limit)


def _drain(connection: Any, limit: int) -> int:
    brokers.declare(connection)
    channel: Any = connection.channel()
    taken = 0
    try:
        queue = brokers.dead_letter_queue().bind(channel)
        while taken < limit:
            message = queue.get(no_ack=False, accept=["json"])
            if message is None:
                break
            record(message)
            message.ack()
            taken += 1
    finally:
        channel.close()
    if taken:
        logger.warning("%d message(s) RabbitMQ dead-lettered recorded as dead letters", taken)
    return taken
