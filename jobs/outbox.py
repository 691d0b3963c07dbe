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
from django.db import connections, router, transaction
from django.utils import timezone

from config.celery_app import app
from jobs import sql, tree
from jobs.models import Job, JobDependency
from jobs.publish import BrokerUnavailable, mark_published, marked_before_sending, publish, queue_for

logger = logging.getLogger(__name__)


class InvalidJob(ValueError):
    """The job cannot be recorded as asked: unknown task, arguments that do not fit, bad options."""


def _checked(task: Any, kwargs_list: Sequence[dict[str, Any]], priority: int | None) -> tuple[str, Any]:
    """The task's name and the task, after checking every job's arguments (InvalidJob if one is bad)."""
    name = task if isinstance(task, str) else getattr(task, "name", repr(task))
    task = app.tasks.get(name)
    # Every JobTask checks its arguments against its schema (tasks.base); other tasks cannot.
    validate = getattr(task, "validate_arguments", None)
    if validate is None:
        raise InvalidJob(f"{name!r} is not a task of this project")
    for kwargs in kwargs_list:
        try:
            validate((), kwargs)
        except Exception as exc:  # InvalidArguments, with the field and what is wrong with it
            raise InvalidJob(str(exc)) from None
        missing = task.missing_references(kwargs)
        if missing:
            raise InvalidJob(f"{name}: " + "; ".join(f"field '{f}': {why}" for f, why in missing.items()))
    try:
        json.dumps(list(kwargs_list))
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"{name}: arguments must be JSON values ({exc})") from None
    if priority is not None and not 0 <= priority <= 9:
        raise InvalidJob(f"{name}: priority must be 0-9, not {priority}")
    return name, task


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

    Every job enqueued in one transaction is sent when it commits in one pipelined publish; on
    RabbitMQ then marked published in one UPDATE (on Redis its row is written marked: see _Outbox).
    """
    name, task = _checked(task, [kwargs], priority)
    try:
        prerequisites = list(dict.fromkeys(UUID(str(getattr(item, "pk", item))) for item in depends_on))
    except ValueError:
        raise InvalidJob(f"{name}: depends_on: jobs or job ids, not {list(depends_on)!r}") from None
    if prerequisites:
        found = set(Job.objects.using(using).filter(pk__in=prerequisites).values_list("pk", flat=True))
        missing = [str(pk) for pk in prerequisites if pk not in found]
        if missing:
            raise InvalidJob(f"{name}: depends_on: there is no job {', '.join(missing)}")
    [job] = _record(name, [kwargs], priority, delay_seconds, using, waiting=bool(prerequisites))
    if prerequisites:
        JobDependency.objects.using(using).bulk_create(
            JobDependency(job=job, prerequisite_id=pk) for pk in prerequisites
        )
        # Sent by jobs.tree when the last of them is final (at once if they all are).
        transaction.on_commit(partial(tree.settle_waiting, [job.pk]), using=using, robust=True)
        return job
    _send_on_commit([job], delay_seconds, using)
    return job


def enqueue_many(
    task: Any,
    kwargs_list: Sequence[dict[str, Any]],
    /,
    *,
    priority: int | None = None,
    delay_seconds: float = 0,
    using: str | None = None,
) -> list[Job]:
    """Records one job of `task` per entry of `kwargs_list` (its keyword arguments) in one INSERT;
    they are sent when the transaction commits, in one pipelined publish. As enqueue() otherwise
    (no `depends_on`); nothing is written if one entry is invalid (InvalidJob names it)."""
    if not kwargs_list:
        return []
    name, _ = _checked(task, kwargs_list, priority)
    jobs = _record(name, kwargs_list, priority, delay_seconds, using, waiting=False)
    _send_on_commit(jobs, delay_seconds, using)
    return jobs


def _record(
    name: str,
    kwargs_list: Sequence[dict[str, Any]],
    priority: int | None,
    delay_seconds: float,
    using: str | None,
    *,
    waiting: bool,
) -> list[Job]:
    now = timezone.now()
    run_at = now + timedelta(seconds=delay_seconds) if delay_seconds > 0 else None
    status = Job.Status.WAITING if waiting else Job.Status.SCHEDULED if run_at else Job.Status.QUEUED
    queue = queue_for(name)
    # Redis: marked published as written, for the commit's publish (see jobs.publish.marked_before_sending).
    sent_on_commit = not waiting and delay_seconds <= settings.JOBS_BROKER_MAX_DELAY_SECONDS
    published_at = now if sent_on_commit and marked_before_sending() else None
    jobs = [
        Job(
            type=name,
            queue=queue,
            payload=kwargs,
            priority=priority,
            status=status,
            run_after=Job.RunAfter.SUCCESS if waiting else "",
            task_id=uuid(),
            run_at=run_at,
            published_at=published_at,
        )
        for kwargs in kwargs_list
    ]
    # One INSERT for the lot (up to a thousand rows, or fewer where the database takes fewer values).
    sql.insert_all(jobs, on=connections[using or router.db_for_write(Job)])
    return jobs


def _send_on_commit(jobs: list[Job], delay_seconds: float, using: str | None) -> None:
    if delay_seconds > settings.JOBS_BROKER_MAX_DELAY_SECONDS:
        return  # a long delay waits in the database; default.release_jobs sends it when due
    connection = transaction.get_connection(using)
    if not connection.in_atomic_block:  # autocommit: the rows are committed already
        _send(jobs, using)
        return
    _Outbox.of(connection, using).add(jobs, connection)


class _Outbox:
    """The jobs enqueued in one transaction on one connection, sent together when it commits.

    One on_commit callback per transaction (not one per job): it publishes every job in one
    kombu batch (one Redis pipeline; on RabbitMQ, publisher confirms collected at the end) and
    marks them published in one UPDATE (RabbitMQ; on Redis the rows were written marked, and are
    unmarked if the broker refuses them: jobs.publish.marked_before_sending). A savepoint rolled
    back takes its jobs' rows with it: jobs enqueued inside a savepoint opened after the callback
    was registered are sent only if their row is there at commit (one SELECT); a rolled-back
    savepoint that registered the callback drops it, and the next enqueue starts a new outbox.
    """

    ATTRIBUTE = "_jobs_outbox"

    def __init__(self, using: str | None, savepoints: frozenset[str]) -> None:
        self.using = using
        self.savepoints = savepoints
        self.jobs: list[Job] = []
        self.unsure: set[Any] = set()  # pks of jobs written inside a later savepoint

    @classmethod
    def of(cls, connection: Any, using: str | None) -> _Outbox:
        outbox: _Outbox | None = getattr(connection, cls.ATTRIBUTE, None)
        # Still pending in this transaction? (A rollback, to a savepoint or whole, drops the callback.)
        if outbox is None or not any(func == outbox.flush for _, func, _ in connection.run_on_commit):
            outbox = cls(using, frozenset(connection.savepoint_ids))
            setattr(connection, cls.ATTRIBUTE, outbox)
            transaction.on_commit(outbox.flush, using=using, robust=True)
        return outbox

    def add(self, jobs: list[Job], connection: Any) -> None:
        self.jobs.extend(jobs)
        if not set(connection.savepoint_ids) <= self.savepoints:
            self.unsure.update(job.pk for job in jobs)

    def flush(self) -> None:
        jobs = self.jobs
        if self.unsure:
            kept = set(
                Job.objects.using(self.using).filter(pk__in=list(self.unsure)).values_list("pk", flat=True)
            )
            jobs = [job for job in jobs if job.pk not in self.unsure or job.pk in kept]
        self.jobs, self.unsure = [], set()
        _send(jobs, self.using)


def _send(jobs: list[Job], using: str | None) -> None:
    if not jobs:
        return
    premarked = [job.pk for job in jobs if job.published_at is not None]
    try:
        publish(jobs)
    except BrokerUnavailable:
        if premarked:  # not sent after all: the release's to send, after its grace
            Job.objects.using(using).filter(pk__in=premarked).update(published_at=None)
            for job in jobs:
                job.published_at = None
        logger.warning(
            "%d job(s) (%s, ...) recorded; the broker did not take them now, default.release_jobs sends them",
            len(jobs),
            jobs[0].pk,
        )
        return
    if len(premarked) < len(jobs):
        mark_published([job.pk for job in jobs if job.published_at is None], using=using)
