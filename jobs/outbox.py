"""`enqueue()`: a job recorded in the caller's transaction and sent when it commits.

For application code that must not lose a job (a transactional outbox, as pg-boss and
Procrastinate give by keeping the queue in PostgreSQL):

    from jobs.outbox import enqueue

    with transaction.atomic():
        order = Order.objects.create(...)
        sent = enqueue("email.send", to=order.email, template="order_confirmation", context={...})
        enqueue("analytics.ingest", events=[...], depends_on=[sent])   # after it succeeded

The job's row is written in the same transaction as the caller's own rows: if the
transaction rolls back there is no job, and if it commits there is one. Its message is
published when the transaction commits; if the broker does not take it then (or the process
dies first), the row stays unpublished and `default.release_jobs` publishes it within a
minute, with the same task id (a second message cannot run it twice: jobs.tracking.claim).
Arguments are checked against the task's schema before anything is written: bad ones raise
InvalidJob (a ValueError) naming the field.

`task.apply_async(...)` stays the way to send when the broker's own durability is enough:
such a task gets its record when a worker claims it (tasks.base.JobTask.before_start).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import timedelta
from functools import partial
from typing import Any
from uuid import UUID

from celery.utils import uuid
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from config.celery_app import app
from jobs import tree
from jobs.models import Job, JobDependency
from jobs.publish import BrokerUnavailable, publish, queue_for

logger = logging.getLogger(__name__)


class InvalidJob(ValueError):
    """The job cannot be recorded as asked: unknown task, arguments that do not fit, bad options."""


def enqueue(
    task: Any,
    /,
    *,
    priority: int | None = None,
    delay_seconds: float = 0,
    depends_on: Sequence[Job | Any] = (),
    using: str | None = None,
    **kwargs: Any,
) -> Job:
    """Records a job of `task` with keyword arguments `kwargs`; sends it when the transaction commits.

    `task` is a task of this project (a JobTask) or its name; `priority` 0-9 (9 first),
    `delay_seconds` to run it later; `depends_on`: jobs (or their ids) it waits for: it is sent
    once they have all succeeded, and cancelled with the reason if one does not (jobs.tree).
    Raises InvalidJob when the task is unknown, the arguments do not match its schema or are
    not JSON, an option is out of range, or a job it depends on does not exist.
    """
    name = task if isinstance(task, str) else getattr(task, "name", repr(task))
    task = app.tasks.get(name)
    # Every JobTask checks its arguments against its schema (tasks.base); other tasks cannot.
    validate = getattr(task, "validate_arguments", None)
    if validate is None:
        raise InvalidJob(f"{name!r} is not a task of this project")
    try:
        validate((), kwargs)
    except Exception as exc:  # InvalidArguments, with the field and what is wrong with it
        raise InvalidJob(str(exc)) from None
    missing = task.missing_references(kwargs)
    if missing:
        raise InvalidJob(f"{name}: " + "; ".join(f"field '{f}': {why}" for f, why in missing.items()))
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"{name}: arguments must be JSON values ({exc})") from None
    if priority is not None and not 0 <= priority <= 9:
        raise InvalidJob(f"{name}: priority must be 0-9, not {priority}")
    try:
        prerequisites = list(dict.fromkeys(UUID(str(getattr(item, "pk", item))) for item in depends_on))
    except ValueError:
        raise InvalidJob(f"{name}: depends_on: jobs or job ids, not {list(depends_on)!r}") from None
    if prerequisites:
        found = set(Job.objects.using(using).filter(pk__in=prerequisites).values_list("pk", flat=True))
        missing = [str(pk) for pk in prerequisites if pk not in found]
        if missing:
            raise InvalidJob(f"{name}: depends_on: there is no job {', '.join(missing)}")
    now = timezone.now()
    run_at = now + timedelta(seconds=delay_seconds) if delay_seconds > 0 else None
    waiting = bool(prerequisites)
    job = Job.objects.using(using).create(
        type=name,
        queue=queue_for(name),
        payload=kwargs,
        priority=priority,
        status=Job.Status.WAITING if waiting else Job.Status.SCHEDULED if run_at else Job.Status.QUEUED,
        run_after=Job.RunAfter.SUCCESS if waiting else "",
        task_id=uuid(),
        run_at=run_at,
    )
    if waiting:
        JobDependency.objects.using(using).bulk_create(
            JobDependency(job=job, prerequisite_id=pk) for pk in prerequisites
        )
        # Sent by jobs.tree when the last of them is final (at once if they all are).
        transaction.on_commit(partial(tree.settle_waiting, [job.pk]), using=using, robust=True)
        return job
    held = run_at is not None and delay_seconds > settings.JOBS_BROKER_MAX_DELAY_SECONDS
    if not held:  # a long delay waits in the database; default.release_jobs sends it when due
        transaction.on_commit(partial(_send, job), using=using, robust=True)
    return job


def _send(job: Job) -> None:
    try:
        publish([job])
    except BrokerUnavailable:
        logger.warning(
            "job %s (%s) is recorded; the broker did not take it now, default.release_jobs sends it",
            job.pk,
            job.type,
        )
        return
    Job.objects.filter(pk=job.pk, published_at__isnull=True).update(published_at=timezone.now())
