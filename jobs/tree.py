"""Jobs made of jobs: children a task spawns, and jobs that wait for others.

**Children.** A task that fans work out (a newsletter's batches, a sync's upserts, a backfill's
days) does it with `JobTask.spawn` (tasks.base), which calls `spawn` here: one bulk INSERT of the
children's rows (each with `parent` set, the parent's priority and owner), then one pipelined
publish. Their ids come from the parent's task id and their position, so a parent that runs
again (a retry, a redelivery after its worker died) finds the same children and sends only those
not yet sent. When the parent's own task returns, its row stays `running` with
`own_finished_at` set; `settle_parent` makes it final when its last child is, under a row lock on
the parent, so two children finishing together settle it once. What "final" means is the
family's rule (`finish_tree` on its task; `default_outcome` otherwise): succeeded when every
child did, failed when none did, else `partially_failed`.

**Dependencies.** A job created with `depends_on` (or a batch's callback) is `waiting`, with a
JobDependency row per prerequisite and no message. When a prerequisite becomes final,
`settle_waiting` releases the waiter once all of them are (publishes it), or cancels it with the
reason when a prerequisite of a `depends_on` job did not succeed (a callback runs whatever the
outcome).

**Nothing stalls.** `after_final` is called wherever a job becomes final (jobs.tracking in
the worker, cancel in the API); if the process dies before it runs, `sweep` (every minute, from
`default.release_jobs`) settles parents whose children are all final and waiters whose
prerequisites are.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, Exists, OuterRef
from django.utils import timezone

from config.celery_app import app
from jobs import sql
from jobs.models import Job, JobDependency
from jobs.protocol import storable
from jobs.publish import BrokerUnavailable, publish, queue_for

logger = logging.getLogger(__name__)

NOT_FINAL = tuple(status for status in Job.Status.values if status not in Job.FINAL)
_CHILD_IDS = uuid.UUID("6f3c1d5e-2b8a-4c1e-9f00-7a1b2c3d4e5f")


# --- spawning children ------------------------------------------------------------------


@dataclass(frozen=True)
class ChildSpec:
    """One child to spawn: a task name, its (already checked) keyword arguments, a delay."""

    task: str
    kwargs: dict[str, Any]
    countdown: float = 0.0


def child_id(parent_task_id: str, index: int) -> uuid.UUID:
    """The id (and task id) of a parent's `index`-th child: the same each time the parent runs."""
    return uuid.uuid5(_CHILD_IDS, f"{parent_task_id}/{index}")


def spawn(
    parent_job_id: str | None, parent_task_id: str, children: Sequence[ChildSpec], *, first_index: int = 0
) -> list[Job]:
    """Records `children` of the job in one INSERT and sends them in one batch; returns their rows.

    `first_index`: the position of the first of them among the parent's children, for a parent that
    spawns in several calls (a sync, page after page); positions make the ids. A rerun of the
    parent (same task id) inserts nothing and sends only the children whose message was never sent.
    Children due later than the broker can hold are sent by `default.release_jobs` when due; so
    are children the broker did not take now.
    """
    if not children:
        return []
    now = timezone.now()
    ran_before: set[Any] = set()
    try:
        with transaction.atomic():
            # The parent's row locked while its children are inserted: a cancel (jobs.services.cancel)
            # either sees them all, or has already asked the parent to stop (its children are then
            # recorded cancelled and never sent).
            parent = (
                Job.objects.select_for_update()
                .filter(pk=parent_job_id)
                .values("priority", "token_id", "status", "cancel_requested_at")
                .first()
                if parent_job_id
                else None
            ) or {"priority": None, "token_id": None, "status": None, "cancel_requested_at": None}
            stopped = parent["cancel_requested_at"] is not None or parent["status"] in Job.FINAL
            rows = []
            for index, spec in enumerate(children, start=first_index):
                run_at = now + timedelta(seconds=spec.countdown) if spec.countdown > 0 else None
                identity = child_id(parent_task_id, index)
                row = Job(
                    id=identity,
                    task_id=str(identity),
                    type=spec.task,
                    queue=queue_for(spec.task),
                    payload=spec.kwargs,
                    priority=parent["priority"],
                    status=Job.Status.SCHEDULED if run_at else Job.Status.QUEUED,
                    run_at=run_at,
                    parent_id=parent_job_id,
                    token_id=parent["token_id"],
                )
                if stopped:
                    row.status, row.finished_at, row.error_type = Job.Status.CANCELLED, now, "Cancelled"
                    row.error_message = f"job {parent_job_id} above it was cancelled"
                rows.append(row)
            # The parent ran before: its children are there (all of them, or, for a parent that spawns
            # in several calls and whose rerun groups them otherwise, some of them).
            ran_before = set(Job.objects.filter(pk__in=[row.id for row in rows]).values_list("pk", flat=True))
            fresh = [row for row in rows if row.id not in ran_before]
            # In statements of 100 rows: one statement holding every child's arguments (a sync's
            # 100,000 records) would be built whole in memory.
            if fresh:
                sql.insert_all(fresh, batch_size=100)
    except IntegrityError:  # another delivery of the parent inserted them just now
        ran_before.add(rows[0].id)
    if ran_before:
        rows = _unsent(rows)
    _send([row for row in rows if row.status != Job.Status.CANCELLED], now)
    return rows


def _unsent(rows: list[Job]) -> list[Job]:
    return list(
        Job.objects.filter(
            pk__in=[row.id for row in rows], published_at__isnull=True, status__in=Job.STARTABLE
        )
    )


def _send(rows: Sequence[Job], now: Any) -> None:
    horizon = now + timedelta(seconds=settings.JOBS_BROKER_MAX_DELAY_SECONDS)
    due = [row for row in rows if row.run_at is None or row.run_at <= horizon]
    if not due:
        return
    try:
        publish(due)
    except BrokerUnavailable:
        logger.warning(
            "%d job(s) recorded; the broker did not take them now, default.release_jobs sends them", len(due)
        )
        return
    Job.objects.filter(pk__in=[row.id for row in due], published_at__isnull=True).update(
        published_at=timezone.now()
    )


# --- settling a parent ----------------------------------------------------------------


@dataclass(frozen=True)
class Child:
    id: uuid.UUID
    type: str
    status: str
    result: Any


@dataclass
class Outcome:
    """What a parent becomes once its children are final."""

    status: str
    result: Any
    error_type: str = ""
    error_message: str = ""


@dataclass
class Summary:
    """How many of a job's children are in each status."""

    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def final(self) -> int:
        return sum(n for status, n in self.counts.items() if status in Job.FINAL)

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "final": self.final, "counts": dict(sorted(self.counts.items()))}


def children_path(job: Job, status: str | None = None) -> str:
    """Where the API lists a job's children (of one status)."""
    return f"/api/jobs/{job.pk}/children" + (f"?status={status}" if status else "")


def default_outcome(job: Job, children: Sequence[Child]) -> Outcome:
    """Succeeded when every child did; failed when none did (nor partly); else partially failed."""
    counts = Counter(child.status for child in children)
    total = len(children)
    own = job.result if isinstance(job.result, dict) else ({} if job.result is None else {"own": job.result})
    result = {**own, "children": dict(sorted(counts.items()))}
    unsuccessful = total - counts[Job.Status.SUCCEEDED]
    if not unsuccessful:
        return Outcome(Job.Status.SUCCEEDED, result)
    described = ", ".join(
        f"{counts[status]} {status.replace('_', ' ')}"
        for status in (Job.Status.FAILED, Job.Status.CANCELLED, Job.Status.PARTIALLY_FAILED)
        if counts[status]
    )
    where = children_path(job)
    if unsuccessful == total and not counts[Job.Status.PARTIALLY_FAILED]:
        return Outcome(
            Job.Status.FAILED,
            result,
            "ChildrenFailed",
            f"none of {total} children succeeded ({described}): {where}",
        )
    return Outcome(
        Job.Status.PARTIALLY_FAILED,
        result,
        "ChildrenFailed",
        f"{unsuccessful} of {total} children did not succeed ({described}): {where}",
    )


def _outcome(job: Job, children: Sequence[Child]) -> Outcome:
    # The family's rule, found through Celery's task registry (the record imports no family).
    rule: Callable[[Job, Sequence[Child]], Outcome] | None = getattr(
        app.tasks.get(job.type), "finish_tree", None
    )
    if rule is None:
        return default_outcome(job, children)
    try:
        return rule(job, children)
    except Exception as exc:
        logger.exception("job %s: %s's finish_tree failed", job.pk, job.type)
        outcome = default_outcome(job, children)
        outcome.status = Job.Status.FAILED
        outcome.error_type, outcome.error_message = (
            type(exc).__name__,
            f"finishing the job failed: {exc}"[:2000],
        )
        return outcome


def settle_parent(parent_id: Any) -> bool:
    """Makes a parent whose own task returned final, if all its children are; True if it did."""
    # A plain read first: each child of a parent still running its own task (a sync, fetching) or
    # waiting for other children ends here, and a locked read in a transaction of its own cost it
    # three round trips and a row lock for nothing. Safe without the lock: whichever of the parent
    # (setting own_finished_at) and its last child (final) commits second reads the other's commit.
    ready = (
        Job.objects.filter(pk=parent_id, status=Job.Status.RUNNING, own_finished_at__isnull=False)
        .exclude(Exists(Job.objects.filter(parent_id=OuterRef("pk"), status__in=NOT_FINAL)))
        .exists()
    )
    if not ready:
        return False
    with transaction.atomic():
        job = (
            Job.objects.select_for_update()
            .filter(pk=parent_id, status=Job.Status.RUNNING, own_finished_at__isnull=False)
            .first()
        )
        if job is None or Job.objects.filter(parent_id=parent_id, status__in=NOT_FINAL).exists():
            return False
        children = [
            Child(*row)
            for row in Job.objects.filter(parent_id=parent_id).values_list("id", "type", "status", "result")
        ]
        outcome = _outcome(job, children)
        if job.cancel_requested_at is not None and outcome.status != Job.Status.SUCCEEDED:
            # Cancelled while its children ran: what they did is in the family's result; the job
            # is what the cancel made it (unless the cancel came too late to stop any of them).
            outcome = Outcome(
                Job.Status.CANCELLED,
                outcome.result,
                "Cancelled",
                "cancelled while its children ran"
                + (f": {outcome.error_message}" if outcome.error_message else ""),
            )
        Job.objects.filter(pk=parent_id).update(
            status=outcome.status,
            result=storable(outcome.result),
            error_type=outcome.error_type[:255],
            error_message=outcome.error_message[:2000],
            finished_at=timezone.now(),
        )
    logger.info(
        "job %s (%s) %s: its %d children are final", parent_id, job.type, outcome.status, len(children)
    )
    after_final(parent_id, job.parent_id)
    return True


# --- waiting for other jobs --------------------------------------------------------------


def settle_waiting(job_ids: Iterable[Any]) -> int:
    """Releases (or cancels) each waiting job of `job_ids` whose prerequisites are all final.

    A cancelled job's own waiters are settled in turn (a worklist, not recursion: a chain of
    1,000 dependencies cancels 1,000 jobs)."""
    pending = list(job_ids)
    settled = 0
    while pending:
        batch, pending = pending[:1000], pending[1000:]
        rows = JobDependency.objects.filter(job_id__in=batch, job__status=Job.Status.WAITING).values_list(
            "job_id", "job__run_after", "job__parent_id", "prerequisite_id", "prerequisite__status"
        )
        waiting: dict[Any, tuple[str, Any, list[tuple[Any, str]]]] = {}
        for job_id, run_after, parent_id, prerequisite_id, status in rows:
            waiting.setdefault(job_id, (run_after, parent_id, []))[2].append((prerequisite_id, status))
        for job_id, (run_after, parent_id, prerequisites) in waiting.items():
            if any(status not in Job.FINAL for _, status in prerequisites):
                continue
            unsuccessful = [(pk, status) for pk, status in prerequisites if status != Job.Status.SUCCEEDED]
            if run_after != Job.RunAfter.SUCCESS or not unsuccessful:
                settled += release([job_id])
                continue
            pk, status = unsuccessful[0]
            more = f" (and {len(unsuccessful) - 1} more did not succeed)" if len(unsuccessful) > 1 else ""
            cancelled = Job.objects.filter(pk=job_id, status=Job.Status.WAITING).update(
                status=Job.Status.CANCELLED,
                error_type="DependencyFailed",
                error_message=f"not run: job {pk} it depends on is {status}{more}",
                finished_at=timezone.now(),
            )
            if cancelled:
                settled += 1
                if parent_id is not None:
                    settle_parent(parent_id)
                pending.extend(_waiters_of(job_id))
    return settled


class Followed:
    """The jobs waiting for `job_id`, asked after its outcome is committed in the same round trip
    (jobs.tracking): the question's SQL and parameters; `rows` its answer, None until it is asked."""

    def __init__(self, job_id: Any) -> None:
        self.job_id = job_id
        self.rows: list[Any] | None = None

    def sql(self) -> str:
        return _waiters_sql()

    def params(self) -> list[Any]:
        return _waiters_params(self.job_id)


def _waiters_sql() -> str:
    """Who waits for a job: asked of every job that becomes final, nearly always of one that nobody
    waits for, in SQL of its own (jobs.sql): the ORM's building of the statement cost four times
    PostgreSQL's answering it (0.4 ms against 0.1 on the reference machine)."""

    def build() -> str:
        waiter = sql.column(JobDependency, "job")
        return (
            f"SELECT d.{waiter} FROM {sql.table(JobDependency)} d "  # noqa: S608 (names from the models)
            f"INNER JOIN {sql.table(Job)} j ON j.{sql.column(Job, 'id')} = d.{waiter} "
            f"WHERE d.{sql.column(JobDependency, 'prerequisite')} = %s AND j.{sql.column(Job, 'status')} = %s"
        )

    return sql.statement("waiters", build)


def _waiters_params(job_id: Any) -> list[Any]:
    return [*sql.values(Job, ("id",), [job_id]), Job.Status.WAITING]


def _waiters_of(job_id: Any) -> list[Any]:
    """The jobs waiting for `job_id`, asked on their own."""
    with connection.cursor() as cursor:
        cursor.execute(_waiters_sql(), _waiters_params(job_id))
        return [row[0] for row in cursor.fetchall()]


def release(job_ids: Sequence[Any]) -> int:
    """Moves waiting jobs to queued (scheduled if not yet due) and sends them; returns how many."""
    now = timezone.now()
    with transaction.atomic():
        jobs = list(
            Job.objects.select_for_update(skip_locked=True).filter(pk__in=job_ids, status=Job.Status.WAITING)
        )
        for job in jobs:
            job.status = Job.Status.SCHEDULED if job.run_at and job.run_at > now else Job.Status.QUEUED
        Job.objects.bulk_update(jobs, ["status"])
    _send(jobs, now)
    return len(jobs)


def dependency_outcome(job_id: Any) -> dict[str, Any]:
    """How the jobs `job_id` waits for ended: counts per status, and the ids of those that did not succeed."""
    rows = list(
        JobDependency.objects.filter(job_id=job_id).values_list("prerequisite_id", "prerequisite__status")
    )
    counts = Counter(status for _, status in rows)
    return {
        "total": len(rows),
        "counts": dict(sorted(counts.items())),
        "unsuccessful": [str(pk) for pk, status in rows if status != Job.Status.SUCCEEDED][:1000],
    }


# --- after a job is final -------------------------------------------------------------


def after_final(job_id: Any, parent_id: Any = None, waiters: list[Any] | None = None) -> None:
    """What a job becoming final may finish: its parent, and the jobs waiting for it (`waiters`, when
    they were asked after its outcome was committed: jobs.tracking)."""
    if parent_id is not None:
        settle_parent(parent_id)
    if waiters is None:
        waiters = _waiters_of(job_id)
    if waiters:
        settle_waiting(waiters)


def summaries(job_ids: Iterable[Any]) -> dict[Any, Summary]:
    """Children per status of each job in `job_ids` that has children (one query)."""
    found: dict[Any, Summary] = {}
    rows = (
        Job.objects.filter(parent_id__in=list(job_ids))
        .values_list("parent_id", "status")
        .annotate(n=Count("id"))
    )
    for parent_id, status, n in rows.order_by():
        found.setdefault(parent_id, Summary()).counts[status] = n
    return found


def descendants(job_id: Any) -> list[Any]:
    """The ids of a job's children, their children, and so on (one query per generation)."""
    found: list[Any] = []
    generation = [job_id]
    while generation:
        generation = list(Job.objects.filter(parent_id__in=generation).values_list("id", flat=True))
        found.extend(generation)
    return found


def sweep(limit: int = 1000) -> int:
    """Settles what a crash left unsettled: parents whose children are all final, waiting jobs whose
    prerequisites are. Returns how many it settled."""
    unfinished_child = Job.objects.filter(parent_id=OuterRef("pk"), status__in=NOT_FINAL)
    parents = list(
        Job.objects.filter(status=Job.Status.RUNNING, own_finished_at__isnull=False)
        .exclude(Exists(unfinished_child))
        .values_list("id", flat=True)[:limit]
    )
    settled = sum(settle_parent(parent_id) for parent_id in parents)
    unfinished_prerequisite = JobDependency.objects.filter(
        job_id=OuterRef("pk"), prerequisite__status__in=NOT_FINAL
    )
    waiting = list(
        Job.objects.filter(status=Job.Status.WAITING)
        .exclude(Exists(unfinished_prerequisite))
        .values_list("id", flat=True)[:limit]
    )
    settled += settle_waiting(waiting)
    if settled:
        logger.warning("reconciler: settled %d job(s) whose children or prerequisites were final", settled)
    return settled
