"""What the API does, as plain functions: enqueue, cancel, retry, release held jobs.

Durability: a job's row is committed first, then its message is published. If
the broker does not take it, the rows are deleted and the caller gets
BrokerUnavailable (the API answers 503): no job is reported accepted that is
not queued. If the process dies between commit and publish, the row stays
unpublished and `default.release_jobs` publishes it (same task id, so a
duplicate message cannot start it twice: jobs.tracking.claim).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery.utils import uuid
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from config.celery_app import app
from jobs.models import ApiToken, Job
from jobs.publish import BrokerUnavailable, publish
from jobs.registry import JobRequest
from tasks.base import JobTask

logger = logging.getLogger(__name__)


class Conflict(Exception):
    """The request contradicts the job's state or an earlier request (HTTP 409)."""


@dataclass
class Accepted:
    job: Job
    created: bool  # False: an earlier request with the same idempotency key made it


def _new_job(request: JobRequest, token: ApiToken | None, now: datetime) -> Job:
    delayed = request.delay_seconds > 0
    return Job(
        type=request.type,
        queue=request.queue,
        payload=request.payload,
        priority=request.priority,
        status=Job.Status.SCHEDULED if delayed else Job.Status.QUEUED,
        task_id=uuid(),
        run_at=now + timedelta(seconds=request.delay_seconds) if delayed else None,
        token=token,
        idempotency_key=request.idempotency_key,
        request_hash=request.fingerprint(),
    )


def _held(job: Job, now: datetime) -> bool:
    """Delays longer than the broker can hold safely wait in the database (Redis would redeliver them)."""
    return job.run_at is not None and job.run_at - now > timedelta(
        seconds=settings.JOBS_BROKER_MAX_DELAY_SECONDS
    )


def _existing(request: JobRequest, token: ApiToken | None) -> Job | None:
    if not request.idempotency_key:
        return None
    job = Job.objects.filter(token=token, idempotency_key=request.idempotency_key).first()
    if job is not None and job.request_hash != request.fingerprint():
        raise Conflict(
            f"idempotency key {request.idempotency_key!r} was used for a different request (job {job.id})"
        )
    return job


def enqueue(requests: Sequence[JobRequest], token: ApiToken | None) -> list[Accepted | Conflict]:
    """Writes and publishes jobs; one entry per request, in order (a Conflict for a reused key).

    Raises BrokerUnavailable when the broker did not take the messages (nothing is kept).
    """
    now = timezone.now()
    outcomes: list[Accepted | Conflict] = []
    fresh: list[Job] = []
    seen_keys: dict[str, int] = {}
    with transaction.atomic():
        for request in requests:
            try:
                existing = _existing(request, token)
                if existing is None and request.idempotency_key in seen_keys:
                    earlier = outcomes[seen_keys[request.idempotency_key]]
                    assert isinstance(earlier, Accepted)
                    if earlier.job.request_hash != request.fingerprint():
                        raise Conflict(
                            f"idempotency key {request.idempotency_key!r} is used twice in this batch "
                            "with different bodies"
                        )
                    existing = earlier.job
            except Conflict as conflict:
                outcomes.append(conflict)
                continue
            if existing is not None:
                outcomes.append(Accepted(existing, created=False))
                continue
            job = _new_job(request, token, now)
            if request.idempotency_key:
                seen_keys[request.idempotency_key] = len(outcomes)
            fresh.append(job)
            outcomes.append(Accepted(job, created=True))
        try:
            Job.objects.bulk_create(fresh)
        except IntegrityError:
            # Another request with one of these keys committed first: retry one by one, which
            # finds it. Rare; correctness over speed.
            transaction.set_rollback(True)
            raise _KeyRace() from None
    to_send = [job for job in fresh if not _held(job, now)]
    try:
        publish(to_send)
    except BrokerUnavailable:
        Job.objects.filter(pk__in=[job.pk for job in fresh]).delete()
        logger.warning("broker unavailable: %d job(s) refused", len(fresh))
        raise
    if to_send:
        published = timezone.now()
        Job.objects.filter(pk__in=[job.pk for job in to_send]).update(published_at=published)
        for job in to_send:
            job.published_at = published
    return outcomes


class _KeyRace(Exception):
    pass


def enqueue_with_key_retry(
    requests: Sequence[JobRequest], token: ApiToken | None
) -> list[Accepted | Conflict]:
    try:
        return enqueue(requests, token)
    except _KeyRace:
        return enqueue(requests, token)


# --- cancel and retry --------------------------------------------------------------


def cancel(job: Job) -> Job:
    """Cancels a queued, scheduled, retrying or running job; a final one is a Conflict.

    The row is what stops it: a worker claims the row before running (jobs.tracking.claim)
    and finds it cancelled. A running one is also terminated where it runs.
    """
    now = timezone.now()
    cancellable = (*Job.STARTABLE, Job.Status.RUNNING)
    with transaction.atomic():
        # The status as it is now, locked: a worker's claim (an UPDATE of this row) waits for the
        # commit and then finds it cancelled, so "was it running?" cannot change under us. The
        # caller's copy may be stale: a job claimed since it was read must still be terminated.
        before = Job.objects.select_for_update().filter(pk=job.pk).values_list("status", flat=True).first()
        updated = Job.objects.filter(pk=job.pk, status__in=cancellable).update(
            status=Job.Status.CANCELLED, finished_at=now
        )
    was_running = before == Job.Status.RUNNING
    job.refresh_from_db()
    if not updated:
        raise Conflict(
            f"job {job.id} is {job.status}; only queued, scheduled, retrying or running jobs can be cancelled"
        )
    try:
        # Drops it from workers' reserved and ETA lists now, and kills it where it runs. Best
        # effort: the row decides either way.
        app.control.revoke(job.task_id, terminate=was_running, signal="SIGTERM")
        app.backend.mark_as_revoked(job.task_id, reason="cancelled through the API")
    except Exception:
        logger.warning("job %s cancelled; telling the workers failed (the row still stops it)", job.id)
    task = app.tasks.get(job.type)
    if isinstance(task, JobTask):
        try:
            task.on_cancelled(job.task_id, (), job.payload)
        except Exception:
            logger.exception("job %s cancelled; its task's clean-up failed", job.id)
    return job


def retry(job: Job) -> Job:
    """Runs a failed or cancelled job again, under a new task id; other states are a Conflict.

    If the broker does not take it, the job is put back as it was (and BrokerUnavailable raised).
    """
    before: dict[str, Any] = dict(Job.objects.filter(pk=job.pk).values().first() or {})
    new_task_id = uuid()
    updated = Job.objects.filter(pk=job.pk, status__in=(Job.Status.FAILED, Job.Status.CANCELLED)).update(
        status=Job.Status.QUEUED,
        task_id=new_task_id,
        attempts=0,
        result=None,
        error_type="",
        error_message="",
        run_at=None,
        published_at=None,
        started_at=None,
        finished_at=None,
    )
    job.refresh_from_db()
    if not updated:
        raise Conflict(f"job {job.id} is {job.status}; only failed or cancelled jobs can be retried")
    try:
        publish([job])
    except BrokerUnavailable:
        restore: dict[str, Any] = {name: before[name] for name in _RETRY_FIELDS}
        Job.objects.filter(pk=job.pk, task_id=new_task_id, published_at__isnull=True).update(**restore)
        raise
    Job.objects.filter(pk=job.pk).update(published_at=timezone.now())
    job.refresh_from_db()
    return job


_RETRY_FIELDS = (
    "status",
    "task_id",
    "attempts",
    "result",
    "error_type",
    "error_message",
    "run_at",
    "published_at",
    "started_at",
    "finished_at",
)


# --- release: held and unpublished jobs ------------------------------------------------


def release_due(limit: int = 1000) -> int:
    """Publishes held jobs that are (nearly) due, and jobs whose publish never happened.

    Only rows older than JOBS_PUBLISH_GRACE_SECONDS are looked at, so a request that is
    publishing right now is left to finish. Returns how many jobs were sent.
    """
    now = timezone.now()
    grace = now - timedelta(seconds=settings.JOBS_PUBLISH_GRACE_SECONDS)
    soon = now + timedelta(seconds=settings.JOBS_BROKER_MAX_DELAY_SECONDS)
    with transaction.atomic():
        due = list(
            Job.objects.select_for_update(skip_locked=True)
            .filter(published_at__isnull=True, status__in=Job.STARTABLE, created_at__lte=grace)
            .filter(Q(run_at__isnull=True) | Q(run_at__lte=soon))
            .order_by("created_at")[:limit]
        )
        if not due:
            return 0
        publish(due)
        Job.objects.filter(pk__in=[job.pk for job in due]).update(published_at=timezone.now())
    logger.info("released %d job(s)", len(due))
    return len(due)
