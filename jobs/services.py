"""What the API does, as plain functions: enqueue, cancel, retry, release held jobs.

Durability: a job's row is committed first, then its message is published. If
the broker does not take it, the rows are deleted and the caller gets
BrokerUnavailable (the API answers 503): no job is reported accepted that is
not queued. If the process dies between commit and publish, the row stays
unpublished and `default.release_jobs` publishes it (same task id, so a
duplicate message cannot start it twice: jobs.tracking.claim).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery.utils import uuid
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from config.celery_app import app
from jobs import sql, tracking, tree
from jobs.models import ApiToken, Job, JobDependency
from jobs.protocol import BROKER_ERRORS, REPLAY_HEADER
from jobs.publish import BrokerUnavailable, mark_published, marked_before_sending, publish
from jobs.registry import JobRequest
from tasks import deadletters
from tasks.errors import PermanentJobError
from tasks.models import DeadLetter

logger = logging.getLogger(__name__)


class Conflict(Exception):
    """The request contradicts the job's state or an earlier request (HTTP 409)."""


@dataclass
class Accepted:
    job: Job
    created: bool  # False: an earlier request with the same idempotency key made it


def _new_job(request: JobRequest, token: ApiToken | None, now: datetime) -> Job:
    delayed = request.delay_seconds > 0
    if request.depends_on:
        status = Job.Status.WAITING
    else:
        status = Job.Status.SCHEDULED if delayed else Job.Status.QUEUED
    return Job(
        type=request.type,
        queue=request.queue,
        payload=request.payload,
        priority=request.priority,
        status=status,
        run_after=request.run_after if request.depends_on else "",
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

    A request's `depends_on` names existing jobs (ids the caller may see: the API checks) or other
    requests of the same call by position; such a job is written `waiting`, with a JobDependency
    per prerequisite, and sent once they are final (jobs.tree). One that depends on a refused
    request is refused too. Raises BrokerUnavailable when the broker did not take the messages
    (nothing is kept).
    """
    now = timezone.now()
    outcomes: list[Accepted | Conflict] = []
    fresh: list[Job] = []
    seen_keys: dict[str, int] = {}
    # One job with no key to look up and nothing to depend on is one INSERT: its own transaction,
    # one round trip, not BEGIN, INSERT and COMMIT.
    block = len(requests) > 1 or any(request.idempotency_key or request.depends_on for request in requests)
    with transaction.atomic() if block else contextlib.nullcontext():
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
        dependencies = _refuse_dependents_of_refused(requests, outcomes)
        still = {id(outcome.job) for outcome in outcomes if isinstance(outcome, Accepted)}
        fresh = [job for job in fresh if id(job) in still]
        premarked = marked_before_sending()
        if premarked:
            for job in fresh:
                if job.status != Job.Status.WAITING and not _held(job, now):
                    job.published_at = now
        try:
            sql.insert_all(fresh)  # as bulk_create, without building the statement through the ORM
            new = {job.pk for job in fresh}
            JobDependency.objects.bulk_create(
                JobDependency(job_id=job_id, prerequisite_id=prerequisite)
                for job_id, prerequisites in dependencies.items()
                if job_id in new
                for prerequisite in prerequisites
            )
        except IntegrityError:
            if not block:
                raise
            # Another request with one of these keys committed first: retry one by one, which
            # finds it. Rare; correctness over speed.
            transaction.set_rollback(True)
            raise _KeyRace() from None
    to_send = [job for job in fresh if job.status != Job.Status.WAITING and not _held(job, now)]
    try:
        publish(to_send)
    except BrokerUnavailable:
        Job.objects.filter(pk__in=[job.pk for job in fresh]).delete()
        logger.warning("broker unavailable: %d job(s) refused", len(fresh))
        raise
    if to_send and not premarked:
        # One UPDATE, committed without waiting for the WAL flush (jobs.publish.mark_published).
        published = mark_published([job.pk for job in to_send])
        for job in to_send:
            job.published_at = published
    waiting = [job.pk for job in fresh if job.status == Job.Status.WAITING]
    if waiting and tree.settle_waiting(waiting):  # some depend only on jobs that are final already
        for outcome in outcomes:
            if isinstance(outcome, Accepted) and outcome.job.pk in waiting:
                outcome.job.refresh_from_db()
    return outcomes


def _refuse_dependents_of_refused(
    requests: Sequence[JobRequest], outcomes: list[Accepted | Conflict]
) -> dict[Any, list[Any]]:
    """Each new job's prerequisites (job ids), after refusing (in `outcomes`, in place) the requests
    that depend, directly or not, on a refused one. A batch's callback (run after completion) waits
    for the accepted jobs only."""
    wanted = {index: list(request.depends_on) for index, request in enumerate(requests)}
    changed = True
    while changed:
        changed = False
        for index, request in enumerate(requests):
            if not isinstance(outcomes[index], Accepted):
                continue
            refused = [
                item
                for item in wanted[index]
                if isinstance(item, int) and not isinstance(outcomes[item], Accepted)
            ]
            if not refused:
                continue
            changed = True
            if request.run_after == Job.RunAfter.COMPLETION:
                wanted[index] = [item for item in wanted[index] if item not in refused]
                if not wanted[index]:
                    outcomes[index] = Conflict("no job it waits for was accepted")
            else:
                outcomes[index] = Conflict(f"depends on entry {refused[0]} of this batch, which was refused")
    dependencies: dict[Any, list[Any]] = {}
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Accepted) and outcome.created and wanted[index]:
            prerequisites = []
            for item in wanted[index]:
                earlier = outcomes[item] if isinstance(item, int) else None
                prerequisites.append(earlier.job.pk if isinstance(earlier, Accepted) else item)
            dependencies[outcome.job.pk] = list(dict.fromkeys(prerequisites))
    return dependencies


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


CANCELLABLE = (Job.Status.WAITING, *Job.STARTABLE, Job.Status.RUNNING)
RETRYABLE = (Job.Status.FAILED, Job.Status.CANCELLED, Job.Status.PARTIALLY_FAILED)
_ONLY_RETRYABLE = "only failed, cancelled or partially failed jobs can be retried"


def cancel(job: Job) -> Job:
    """Cancels a waiting, queued, scheduled, retrying or running job and every job below it that is
    not final yet (its children, theirs, ...); a final job is a Conflict.

    What is not running is `cancelled` at once: the rows are what stop it (a worker claims a job's
    row before running it, jobs.tracking.claim, and finds it cancelled). What is running is asked to
    stop: its row gets `cancel_requested_at` and stays `running`, and its task is terminated where it
    runs (revoke with terminate). Its worker then writes how the run ended: `cancelled` when it was
    stopped (tasks.requests), or the outcome it reached before the cancel could stop it (a run that
    finished first, a pool that cannot interrupt a task). A parent waiting for children still
    running becomes final with them: `cancelled` unless all of them succeeded after all. So the
    returned job is final, or `running` with its cancel requested; never a guess.
    """
    now = timezone.now()
    with transaction.atomic():
        # The status as it is now, locked: a worker's claim (an UPDATE of this row) waits for the
        # commit and then finds it cancelled, so "is it running?" cannot change under us. The
        # caller's copy may be stale: a job claimed since it was read must still be terminated.
        before = Job.objects.select_for_update().filter(pk=job.pk).values_list("status", flat=True).first()
        if before not in CANCELLABLE:
            job.refresh_from_db()
            raise Conflict(
                f"job {job.id} is {job.status}; only waiting, queued, scheduled, retrying or running jobs "
                "can be cancelled"
            )
        below = _locked_descendants(job.pk)
        running = Job.objects.filter(pk__in=[job.pk, *below], status=Job.Status.RUNNING)
        stopping = list(running.values_list("pk", "task_id", "own_finished_at"))
        running.filter(cancel_requested_at__isnull=True).update(cancel_requested_at=now)
        if before != Job.Status.RUNNING:
            Job.objects.filter(pk=job.pk).update(status=Job.Status.CANCELLED, finished_at=now)
        Job.objects.filter(pk__in=below, status__in=CANCELLABLE).exclude(status=Job.Status.RUNNING).update(
            status=Job.Status.CANCELLED,
            finished_at=now,
            error_type="Cancelled",
            error_message=f"job {job.pk} above it was cancelled",
        )
    try:
        # Drops them from workers' reserved and ETA lists now, and kills the runs where they run.
        # Best effort: the rows decide either way.
        if before != Job.Status.RUNNING:
            app.control.revoke(job.task_id)
        runs = [task_id for _, task_id, own_finished_at in stopping if own_finished_at is None]
        if runs:
            app.control.revoke(runs, terminate=True, signal="SIGTERM")
    except Exception:
        logger.warning("job %s cancelled; telling the workers failed (the row still stops it)", job.id)
    if before != Job.Status.RUNNING:
        tracking.after_cancel(job.pk, job.type, job.task_id, job.payload)
    try:
        # Parents waiting only for children that are final now settle now, the deepest first; then
        # what the job being final finishes (its parent, jobs waiting on it).
        depth = {pk: index for index, pk in enumerate([job.pk, *below])}
        waiting = [pk for pk, _, own_finished_at in stopping if own_finished_at is not None]
        for pk in sorted(waiting, key=lambda pk: -depth[pk]):
            tree.settle_parent(pk)
        if before != Job.Status.RUNNING:
            tree.after_final(job.pk, job.parent_id)
    except Exception:
        logger.exception("job %s cancelled; settling what it finishes failed (the reconciler will)", job.id)
    job.refresh_from_db()
    return job


def _locked_descendants(job_id: Any) -> list[Any]:
    """The ids of the jobs below `job_id`, each row locked (in the caller's transaction), deepest
    generations last. A parent running its own task spawns under a lock on its own row (jobs.tree.
    spawn): once every row found is locked, no child can appear under them any more. Asked again
    until nothing new is found, so children committed while we locked are cancelled too."""
    locked: set[Any] = set()
    while True:
        below = tree.descendants(job_id)
        fresh = [pk for pk in below if pk not in locked]
        if not fresh:
            return below
        list(Job.objects.select_for_update().filter(pk__in=fresh).values_list("pk", flat=True))
        locked.update(fresh)


def retry(job: Job, *, task_id: str | None = None, headers: dict[str, Any] | None = None) -> Job:
    """Runs a failed, cancelled or partially failed job again; other states are a Conflict.

    A job whose own task had finished and that waited for children (a newsletter, a sync) runs
    only its children that did not succeed again, each under a new task id, and waits for them
    once more. Any other job runs again under a new task id (children of an earlier run that
    never finished are dropped: the new run spawns its own). If the broker does not take a
    job's own message, the job is put back as it was (and BrokerUnavailable raised).
    `task_id` and `headers`: the new run's task id and extra message headers (a dead letter's
    replay), for a job that runs again itself.
    """
    if job.own_finished_at is not None and Job.objects.filter(parent_id=job.pk).exists():
        return _retry_children(job)
    before: dict[str, Any] = dict(Job.objects.filter(pk=job.pk).values().first() or {})
    new_task_id = task_id or uuid()
    with transaction.atomic():
        updated = Job.objects.filter(pk=job.pk, status__in=RETRYABLE).update(
            status=Job.Status.QUEUED,
            task_id=new_task_id,
            attempts=0,
            result=None,
            error_type="",
            error_message="",
            run_at=None,
            # Kept in the row, so every later send of this run carries them too (the reconciler's
            # of a lost message, a held retry's): a replay's outcome is written back to its letter.
            held_headers=headers or None,
            published_at=None,
            started_at=None,
            finished_at=None,
            own_finished_at=None,
            cancel_requested_at=None,
        )
        if updated:
            Job.objects.filter(parent_id=job.pk).delete()
            _reopen_ancestors(job.parent_id)
    job.refresh_from_db()
    if not updated:
        raise Conflict(f"job {job.id} is {job.status}; {_ONLY_RETRYABLE}")
    try:
        publish([job])  # with its held headers
    except BrokerUnavailable:
        restore: dict[str, Any] = {name: before[name] for name in _RETRY_FIELDS}
        restored = Job.objects.filter(pk=job.pk, task_id=new_task_id, published_at__isnull=True).update(
            **restore
        )
        if restored and job.parent_id is not None:
            # Final again: the jobs above it settle as they were (from their children, as before).
            tree.settle_parent(job.parent_id)
        raise
    Job.objects.filter(pk=job.pk).update(published_at=timezone.now())
    job.refresh_from_db()
    return job


def replay(letter: DeadLetter) -> str:
    """Runs a dead letter's task again; returns the new task id.

    A letter whose job row exists (every job's: the API's, enqueue's, a plain apply_async's) runs
    that job again as `retry` does: the same row under a new task id, the jobs above it waiting for
    it again, its outcome written back to the letter (whose id the message carries). A job that is
    not failed, cancelled or partially failed any more (retried since, running or done) is a
    Conflict: it is not run twice. A letter without a row (deleted since) is sent again as a task
    (tasks.deadletters.replay), with a row of its own.
    """
    job = Job.objects.filter(pk=letter.job_id).first() if letter.job_id else None
    if job is None:
        return deadletters.replay(letter)
    if job.type not in app.tasks:
        raise PermanentJobError(f"task {job.type!r} is not registered; it cannot be replayed")
    if job.own_finished_at is not None:
        raise Conflict(
            f"job {job.id}'s own task has succeeded since this dead letter; retry the job to run "
            "again those of its children that did not succeed"
        )
    with deadletters.replaying(letter) as task_id:
        retry(job, task_id=task_id, headers={REPLAY_HEADER: str(letter.pk)})
    return task_id


_NOT_TAKEN: tuple[type[Exception], ...] = (BrokerUnavailable, *BROKER_ERRORS)


def replay_many(letters: Iterable[DeadLetter]) -> tuple[list[str], list[str]]:
    """Replays each; returns (new task ids, error messages). One bad letter does not stop the rest."""
    sent, errors = [], []
    for letter in letters:
        try:
            sent.append(replay(letter))
        except (PermanentJobError, Conflict) as exc:
            errors.append(f"dead letter {letter.pk}: {exc}")
        except _NOT_TAKEN as exc:
            # The rest would wait on the same broker: stop, and say what was left as it was.
            name = type(exc.__cause__ or exc).__name__
            errors.append(
                f"dead letter {letter.pk}: the broker did not take the replay ({name}); "
                "it and the ones after it were not replayed, try again when the broker answers"
            )
            break
    return sent, errors


def _reopen_ancestors(parent_id: Any) -> None:
    """A child runs again: the jobs above it wait for it again (they settle anew when it is final).

    Committed before the child's message is sent: a child that finishes at once must find its
    parent waiting for it, or the parent, reopened after that child settled it, would wait for it
    forever (until the reconciler's sweep)."""
    while parent_id is not None:
        Job.objects.filter(pk=parent_id, status__in=RETRYABLE, own_finished_at__isnull=False).update(
            status=Job.Status.RUNNING,
            error_type="",
            error_message="",
            finished_at=None,
            cancel_requested_at=None,
        )
        parent_id = Job.objects.filter(pk=parent_id).values_list("parent_id", flat=True).first()


def _retry_children(job: Job) -> Job:
    """Reopens `job` and runs again its children (and theirs) that did not succeed."""
    reopened: list[Any] = []
    rerun: list[Job] = []

    def collect(parent_id: Any) -> None:
        for child in Job.objects.filter(parent_id=parent_id, status__in=RETRYABLE):
            if child.own_finished_at is not None and Job.objects.filter(parent_id=child.pk).exists():
                reopened.append(child.pk)
                collect(child.pk)
            else:
                rerun.append(child)

    with transaction.atomic():
        updated = Job.objects.filter(pk=job.pk, status__in=RETRYABLE).update(
            status=Job.Status.RUNNING,
            error_type="",
            error_message="",
            finished_at=None,
            cancel_requested_at=None,
        )
        if not updated:
            job.refresh_from_db()
            raise Conflict(f"job {job.id} is {job.status}; {_ONLY_RETRYABLE}")
        collect(job.pk)
        Job.objects.filter(pk__in=reopened).update(
            status=Job.Status.RUNNING,
            error_type="",
            error_message="",
            finished_at=None,
            cancel_requested_at=None,
        )
        for child in rerun:
            child.status, child.task_id, child.attempts = Job.Status.QUEUED, uuid(), 0
            child.result, child.error_type, child.error_message = None, "", ""
            child.run_at = child.published_at = child.started_at = child.finished_at = None
            child.own_finished_at = child.cancel_requested_at = None
        Job.objects.bulk_update(rerun, [*_RETRY_FIELDS, "own_finished_at"], batch_size=500)
        Job.objects.filter(parent_id__in=[child.pk for child in rerun]).delete()
        _reopen_ancestors(job.parent_id)
    try:
        publish(rerun)
    except BrokerUnavailable:
        # The children are recorded as queued: default.release_jobs sends them.
        logger.warning("job %s: %d children to rerun, not taken by the broker now", job.id, len(rerun))
    else:
        Job.objects.filter(pk__in=[child.pk for child in rerun]).update(published_at=timezone.now())
    # Nothing to run again (every child had succeeded): the job settles at once.
    tree.settle_parent(job.pk)
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
    "held_headers",
    "published_at",
    "started_at",
    "finished_at",
    "cancel_requested_at",
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
