"""The dead-letter store: tasks that failed for good, kept for a person to look at and replay."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Protocol

from celery.utils import uuid as new_task_id
from django.db.models import F, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from config import brokers
from jobs.models import Job
from jobs.protocol import FIRST_FAILURE_HEADER, JOB_HEADER, REPLAY_HEADER, effective_priority
from tasks.errors import PermanentJobError
from tasks.models import DeadLetter
from tasks.services.maintenance import delete_in_batches

logger = logging.getLogger(__name__)


class JobTask(Protocol):
    """What a dead letter needs of the task that failed (tasks.base.JobTask, which calls us)."""

    @property
    def name(self) -> str: ...
    @property
    def request(self) -> Any: ...

    def request_header(self, name: str) -> Any: ...


def _first_failure(task: JobTask, now: datetime) -> datetime:
    stamped = task.request_header(FIRST_FAILURE_HEADER)
    parsed = parse_datetime(stamped) if isinstance(stamped, str) else None
    return parsed or now


def _job_of(task: JobTask) -> uuid.UUID | None:
    """The id of the job row the failed message was for (its `x_job_id`), if that row exists."""
    try:
        job_id = uuid.UUID(str(task.request_header(JOB_HEADER)))
    except ValueError:  # absent (None) or not a job id
        return None
    return Job.objects.filter(pk=job_id).values_list("pk", flat=True).first()


def record_failure(
    task: JobTask, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
) -> None:
    """Stores (or, for a failed replay, updates) the dead letter of a task that failed for good."""
    now = timezone.now()
    details = {
        "exception_type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "exception_message": str(exc)[:10_000],
        "traceback": str(getattr(einfo, "traceback", "") or ""),
        "last_failed_at": now,
    }
    attempts = (task.request.retries or 0) + 1
    replayed = task.request_header(REPLAY_HEADER)
    if replayed is not None:
        updated = DeadLetter.objects.filter(pk=int(replayed)).update(
            replay_status=DeadLetter.ReplayStatus.FAILED, replay_task_id=task_id, **details
        )
        if updated:
            logger.warning("replay of dead letter %s failed again: %s", replayed, details["exception_type"])
            return
    delivery = task.request.delivery_info or {}
    letter, _ = DeadLetter.objects.update_or_create(
        task_id=task_id,
        defaults={
            "task_name": task.name,
            "queue": brokers.queue_of(delivery.get("routing_key")),
            "priority": effective_priority(delivery.get("priority")),
            "args": list(args or []),
            "kwargs": dict(kwargs or {}),
            "attempts": attempts,
            "first_failed_at": _first_failure(task, now),
            "job_id": _job_of(task),
            **details,
        },
    )
    logger.warning(
        "%s[%s] failed for good after %d attempt(s) (%s); dead letter %d",
        task.name,
        task_id,
        attempts,
        details["exception_type"],
        letter.pk,
    )


def record_replay_success(dead_letter_id: int) -> None:
    DeadLetter.objects.filter(pk=dead_letter_id).update(replay_status=DeadLetter.ReplayStatus.SUCCEEDED)


def replay(letter: DeadLetter) -> str:
    """Sends the task again with the same arguments; returns the new task id.

    The new run carries the dead letter's id, so its outcome is written back here.
    Raises PermanentJobError when the task no longer exists or its arguments are
    no longer valid. A letter whose job row exists is run again as that job instead
    (jobs.services.replay): this is for the others.
    """
    from config.celery_app import app

    task = app.tasks.get(letter.task_name)
    if task is None:
        raise PermanentJobError(f"task {letter.task_name!r} is not registered; it cannot be replayed")
    # With the failed message's priority; one stored without it gets the default (the middle).
    priority: dict[str, Any] = {} if letter.priority is None else {"priority": letter.priority}
    with replaying(letter) as task_id:
        task.apply_async(
            args=letter.args,
            kwargs=letter.kwargs,
            task_id=task_id,
            headers={REPLAY_HEADER: str(letter.pk)},
            **priority,
        )
    return task_id


@contextmanager
def replaying(letter: DeadLetter) -> Iterator[str]:
    """The task id of the letter's replay, recorded on the letter before the replay is sent (it may
    finish, and write its outcome here, before the send returns); put back as it was if the send
    raises."""
    task_id = new_task_id()
    DeadLetter.objects.filter(pk=letter.pk).update(
        replay_count=F("replay_count") + 1,
        replayed_at=timezone.now(),
        replay_task_id=task_id,
        replay_status=DeadLetter.ReplayStatus.SENT,
    )
    try:
        yield task_id
    except BaseException:
        DeadLetter.objects.filter(pk=letter.pk).update(
            replay_count=F("replay_count") - 1,
            replayed_at=letter.replayed_at,
            replay_task_id=letter.replay_task_id,
            replay_status=letter.replay_status,
        )
        raise


def purge(queryset: QuerySet[DeadLetter] | None = None, *, older_than: timedelta | None = None) -> int:
    """Deletes dead letters (all of `queryset`, or those last failed before now - older_than)."""
    letters = DeadLetter.objects.all() if queryset is None else queryset
    if older_than is not None:
        letters = letters.filter(last_failed_at__lt=timezone.now() - older_than)
    return delete_in_batches(letters)
