"""A job's row follows its task: claimed before it runs, then retrying, succeeded or failed.

Called by tasks.base.JobTask for messages that carry the `x_job_id` header (jobs
sent through the API). The claim is one conditional UPDATE: a message may start
the job only while the row is queued or scheduled with the same task id, retrying
for an earlier attempt than the message's, or running, when the broker redelivers
it after a worker died. Anything else (cancelled, finished, retried under a new
id, a duplicate or stale message) is skipped, which is what makes a cancel durable
across worker restarts. The same UPDATE counts the deliveries of the attempt's
message (`Job.deliveries`), for the brokers that count none.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from jobs import commits, sql, tree
from jobs.models import Job
from jobs.protocol import effective_priority, storable

logger = logging.getLogger(__name__)


def claim(
    job_id: str,
    task_id: str,
    attempt: int,
    redelivered: bool,
    *,
    counted: bool = False,
    at: datetime | None = None,
) -> int:
    """Marks the job running for this message: the deliveries of this attempt's message that claimed
    the row (1 the first time), or 0 when the message must not run it. `counted`: the broker says it
    delivered this message before (a worker died running it), so this delivery counts one more; a
    copy sent again by a worker (a deferral, a resend) does not. `at`: this delivery's claim time,
    the same for a claim sent again on a new connection (jobs.connections.claiming): a row that
    already holds it holds this very claim, and the delivery is not counted twice."""
    now = at or timezone.now()

    def where() -> str:
        # A retry whose "retrying" could not be written (the database was away) finds the row still
        # running from the attempt before; a redelivered message finds it running from its own first
        # delivery. A retrying row waits for its next attempt's message: an earlier attempt's
        # message, delivered again because its worker died before acknowledging it, must not start
        # it before its backoff is over (a held retry would have run at once).
        running_since = "" if redelivered else f" AND {_column('attempts')} < %s"
        status, attempts = _column("status"), _column("attempts")
        # A running row whose cancel was requested is not run again: its run was stopped (or its
        # worker died) before it ended, and the row becomes `cancelled` (below).
        requested = _column("cancel_requested_at")
        return (
            f"{_column('id')} = %s AND {_column('task_id')} = %s AND ({status} IN (%s, %s) OR "
            f"({status} = %s AND {attempts} < %s) OR ({status} = %s AND {requested} IS NULL{running_since}))"
        )

    # Against the row as it was: running for this very attempt means this message ran before.
    status, attempts, deliveries = _column("status"), _column("attempts"), _column("deliveries")
    started = _column("started_at")
    counting = Expression(
        f"CASE WHEN {status} = %s AND {attempts} = %s AND {started} = %s THEN {deliveries} "
        f"WHEN {status} = %s AND {attempts} = %s THEN {deliveries} + %s ELSE 1 END",
        [
            Job.Status.RUNNING,
            attempt,
            *sql.values(Job, ("started_at",), [now]),
            Job.Status.RUNNING,
            attempt,
            1 if counted else 0,
        ],
    )
    returned: list[Any] = []
    claimed = _update(
        ("claim", redelivered),
        {
            "status": Job.Status.RUNNING,
            "attempts": attempt,
            "started_at": now,
            "finished_at": None,
            "deliveries": counting,
        },
        where,
        [
            *(job_id, task_id, Job.Status.QUEUED, Job.Status.SCHEDULED, Job.Status.RETRYING, attempt),
            *(Job.Status.RUNNING, *([] if redelivered else [attempt])),
        ],
        # Without waiting for the WAL flush (jobs.commits): a claim lost in a crash of PostgreSQL
        # leaves the row as the unacknowledged message found it.
        flush=False,
        returning=("deliveries", returned),
    )
    if not claimed:
        current = (
            Job.objects.filter(pk=job_id).values_list("status", "task_id", "cancel_requested_at").first()
        )
        if current is not None and current[0] == Job.Status.RUNNING and current[2] is not None:
            # Delivered again (its worker died, or the reconciler sent it again) after a cancel was
            # requested: the run it was part of is over, and did not end. It is not run again.
            cancelled_while_running(task_id, "its worker was lost after the cancel was requested")
            current = (Job.Status.CANCELLED, current[1], current[2])
        logger.info(
            "job %s not started by task %s: %s",
            job_id,
            task_id,
            "no such job" if current is None else f"it is {current[0]} (task {current[1]})",
        )
        return 0
    return max(1, int(returned[0])) if returned else 1


def record_and_claim(
    task_name: str,
    task_id: str,
    queue: str,
    payload: dict[str, Any],
    attempt: int,
    redelivered: bool,
    priority: int | None = None,
    *,
    counted: bool = False,
    at: datetime | None = None,
) -> tuple[str, int] | None:
    """The record of a task sent without one (plain apply_async, beat), made when it starts.

    `priority` is the message's: a retry of the job through the API sends it with the same one.
    Returns the job's id and the deliveries that claimed it (`claim`), or None when the message
    must not run it (its record says it was cancelled or is done: a duplicate message).
    """
    now = at or timezone.now()
    fields = {
        "type": task_name,
        "queue": queue,
        "payload": payload,
        "priority": effective_priority(priority),
        "status": Job.Status.RUNNING,
        "attempts": attempt,
        "started_at": now,
        "published_at": now,
        "deliveries": 1,
    }
    # One INSERT: the first delivery of a message (nearly all of them) has no row yet. A redelivered
    # or duplicate one finds it there (the unique task_id) and claims it instead.
    # Its commit does not wait for the WAL flush, for the same reason as a claim's (jobs.commits).
    job = Job(task_id=task_id, **fields)
    try:
        with transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext():
            _insert(job, flush=False)
        return str(job.pk), 1
    except IntegrityError:
        existing = Job.objects.filter(task_id=task_id).values_list("pk", flat=True).first()
        if existing is None:
            raise
    deliveries = claim(str(existing), task_id, attempt, redelivered, counted=counted, at=now)
    return (str(existing), deliveries) if deliveries else None


def done_with(job_id: str | None, task_id: str) -> bool:
    """No message of `task_id` may run its job any more: the row is final, or (for `job_id`, the
    job a message names) it runs under another task id now. False when there is no row yet (a
    task sent without one whose claim never made it): the message has a run to fail."""
    if job_id is not None:
        row = Job.objects.filter(pk=job_id).values_list("status", "task_id").first()
        return row is not None and (row[0] in Job.FINAL or row[1] != task_id)
    status = Job.objects.filter(task_id=task_id).values_list("status", flat=True).first()
    return status in Job.FINAL


class Expression:
    """A SET value computed by the database: SQL with %s placeholders, and their values (as given)."""

    def __init__(self, sql: str, params: list[Any]) -> None:
        self.sql = sql
        self.params = params


def _column(name: str) -> str:
    return sql.column(Job, name)


def _insert(job: Job, *, flush: bool = True) -> None:
    """INSERT `job` (a new instance). `flush=False`: outside a transaction on PostgreSQL, `SET LOCAL
    synchronous_commit TO OFF` goes in the same simple query, which PostgreSQL runs as one
    transaction: one round trip, no disk flush."""
    unflushed = not flush and commits.one_query(connection)
    sql.insert([job], prefix=commits.NO_FLUSH_PREFIX if unflushed else "")


def _update(
    key: tuple[Any, ...],
    changes: dict[str, Any],
    where: Callable[[], str],
    where_values: list[Any],
    *,
    flush: bool = True,
    then: tree.Followed | None = None,
    returning: tuple[str, list[Any]] | None = None,
) -> int:
    """UPDATE the job's row: SET `changes` WHERE `where()` (its %s filled by `where_values`, the first two
    of which are the job's id and task id; `key` names its shape, for the statement's cache); the rows
    changed. `flush=False`: its commit does not wait for the WAL flush (jobs.commits), when it is one of
    its own. `then`: a question asked after the commit, in the same round trip when it can be
    (jobs.tree.Followed), its answer left in `then.rows`. `returning` (a field, a list): the field's
    new value is appended to the list when a row changed (RETURNING where the database has it, a
    SELECT after it elsewhere). A value of `changes` may be an `Expression`."""
    unflushed = not flush and commits.applies(connection)
    followed = then is not None and commits.one_query(connection)
    # UPDATE ... RETURNING: PostgreSQL, SQLite from 3.35 (as INSERT ... RETURNING, which Django checks).
    returned_here = returning is not None and connection.features.can_return_columns_from_insert
    assert not (followed and returning), "one or the other"

    def build() -> str:
        assignments = ", ".join(
            f"{_column(name)} = {value.sql if isinstance(value, Expression) else '%s'}"
            for name, value in changes.items()
        )
        text = f"UPDATE {sql.table(Job)} SET {assignments} WHERE {where()}"  # noqa: S608 (model names)
        if unflushed:
            text += f" AND {commits.NO_FLUSH_CONDITION}"
        if returned_here:
            assert returning is not None
            text += f" RETURNING {_column(returning[0])}"
        if followed:
            assert then is not None
            # One simple query: the outcome's transaction, then the question, asked after the outcome is
            # committed, as if asked apart. The BEGIN makes the transaction an explicit one: a COMMIT
            # ending PostgreSQL's implicit one is obeyed but logged as a WARNING ("there is no
            # transaction in progress"), a line in the server's log for every job.
            text = f"BEGIN; {text}; COMMIT; {then.sql()}"
        return text

    statement = sql.statement(
        ("job update", key, tuple(changes), unflushed, followed, returning and returning[0]), build
    )
    params: list[Any] = []
    for name, value in changes.items():
        if isinstance(value, Expression):
            params += value.params
        else:
            params += sql.values(Job, (name,), [value])
    params += [*sql.values(Job, ("id", "task_id"), where_values[:2]), *where_values[2:]]
    if followed:
        assert then is not None
        params += then.params()
    with connection.cursor() as cursor:
        if not followed:
            cursor.execute(statement, params)
            if returned_here:
                assert returning is not None
                # Counted from the rows returned: SQLite's rowcount is known only once they are read.
                rows = cursor.fetchall()
                returning[1].extend(row[0] for row in rows)
                return len(rows)
            changed = int(cursor.rowcount)
            if returning is not None and changed:
                name, into = returning
                into.extend(Job.objects.filter(pk=where_values[0]).values_list(name, flat=True))
            return changed
        assert then is not None
        try:
            cursor.execute(statement, params)
        except Exception:
            # A statement that failed after the BEGIN leaves the explicit transaction open and aborted
            # (the rest of the query is skipped): ended here, so the connection serves the next job.
            _roll_back_failed(connection)
            raise
        cursor.nextset()  # BEGIN's, then the UPDATE's
        changed = int(cursor.rowcount)
        cursor.nextset()  # COMMIT
        cursor.nextset()
        then.rows = [row[0] for row in cursor.fetchall()]
        return changed


def _roll_back_failed(conn: Any) -> None:
    import psycopg

    raw = conn.connection
    if raw is not None and raw.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        with contextlib.suppress(Exception):
            raw.rollback()


def _finish(job_id: str, task_id: str, **changes: Any) -> tuple[int, list[Any] | None]:
    """The outcome of this run, written unless the row is final (a cancel) or a newer run's: the rows
    changed, and the jobs waiting for this one when they could be asked in the same round trip (None
    when they could not: jobs.tree.after_final asks)."""

    def where() -> str:
        final = ", ".join(["%s"] * len(Job.FINAL))
        return f"{_column('id')} = %s AND {_column('task_id')} = %s AND {_column('status')} NOT IN ({final})"

    waiters = tree.Followed(job_id)
    changed = _update(("finish",), changes, where, [job_id, task_id, *Job.FINAL], then=waiters)
    return changed, waiters.rows


def _current(job_id: str, task_id: str) -> Any:
    # Never overwrite a cancel, nor a newer run's row.
    return Job.objects.filter(pk=job_id, task_id=task_id).exclude(status=Job.Status.CANCELLED)


def _unfinished(job_id: str, task_id: str) -> Any:
    return _current(job_id, task_id).exclude(status__in=Job.FINAL)


def retrying(job_id: str, task_id: str, exc: BaseException, attempt: int | None = None) -> None:
    """Attempt `attempt` failed and will be retried. Written after the retry was sent (or held):
    a row the next attempt has claimed already (its `attempts` is higher) is left running. A run
    whose cancel was requested meanwhile is not retried: the row becomes `cancelled` (the retry's
    message then finds it so and does not run)."""
    rows = _unfinished(job_id, task_id)
    if attempt is not None:
        rows = rows.filter(attempts__lte=attempt)
    if rows.filter(cancel_requested_at__isnull=True).update(
        status=Job.Status.RETRYING, error_type=type(exc).__name__, error_message=str(exc)[:2000]
    ):
        return
    cancelled_while_running(task_id, f"cancelled instead of retried ({type(exc).__name__}: {exc})"[:2000])


def hold_retry(
    job_id: str, task_id: str, countdown: float, headers: dict[str, Any], exc: BaseException | None
) -> bool:
    """Holds the job's next attempt in its row: `retrying`, due in `countdown` seconds, unpublished.

    `default.release_jobs` (jobs.services.release_due) publishes it when it is due (within
    JOBS_BROKER_MAX_DELAY_SECONDS), as retry number `attempts` with `headers` (jobs.publish). Until
    then the reconciler leaves it alone (nothing was published, nothing is lost) and a cancel stops
    it like any other retrying job. False when the row is cancelled or finished, or its cancel was
    requested (it is then cancelled): nothing to hold.
    """
    if cancelled_while_running(task_id, "cancelled instead of retried" + (f" ({exc})" if exc else "")):
        return False
    updated = (
        _unfinished(job_id, task_id)
        .filter(cancel_requested_at__isnull=True)
        .update(
            status=Job.Status.RETRYING,
            run_at=timezone.now() + timedelta(seconds=countdown),
            published_at=None,
            held_headers=headers or None,
            error_type=type(exc).__name__ if exc is not None else "",
            error_message=str(exc)[:2000] if exc is not None else "",
        )
    )
    return bool(updated)


def _then(step: Callable[..., Any], *args: Any) -> None:
    """Runs `step` once the job's own row is committed (the result backend writes it in one
    transaction with the task's result). What it finishes (a parent, waiting jobs) is settled by
    jobs.tree.sweep if it cannot be now: a failure here never undoes the outcome recorded."""

    def settle() -> None:
        try:
            step(*args)
        except Exception:
            logger.exception("job %s: settling its parent or dependents failed; the reconciler will", args[0])

    transaction.on_commit(settle)


def succeeded(
    job_id: str,
    task_id: str,
    result: Any,
    *,
    spawned: bool = False,
    partial: str | None = None,
    parent_id: str | None = None,
) -> None:
    """The task returned `result`. A job that `spawned` children stays running until they are final
    (jobs.tree); one whose task says part of its work failed for good (`partial`, why) is
    partially_failed."""
    now = timezone.now()
    # Written once: by the result backend with the task's result, and not again by on_success.
    if spawned:
        if (
            _current(job_id, task_id)
            .filter(own_finished_at__isnull=True)
            .update(own_finished_at=now, result=storable(result))
        ):
            _then(tree.settle_parent, job_id)
        return
    updated, waiters = _finish(
        job_id,
        task_id,
        status=Job.Status.PARTIALLY_FAILED if partial else Job.Status.SUCCEEDED,
        result=storable(result),
        error_type="PartialFailure" if partial else "",
        error_message=(partial or "")[:2000],
        finished_at=now,
    )
    if updated:
        _then(tree.after_final, job_id, parent_id, waiters)


def failed(job_id: str, task_id: str, exc: BaseException, *, parent_id: str | None = None) -> None:
    updated, waiters = _finish(
        job_id,
        task_id,
        status=Job.Status.FAILED,
        error_type=getattr(exc, "type_name", type(exc).__name__),
        error_message=str(exc)[:2000],
        finished_at=timezone.now(),
    )
    if updated:
        _then(tree.after_final, job_id, parent_id, waiters)


def cancelled_while_running(task_id: str, why: str) -> bool:
    """The run of `task_id`, whose cancel was requested while it ran (jobs.services.cancel), ended
    without an outcome of its own: it was terminated (tasks.base.JobRequest, in the worker's main
    process, once its pool process is gone), its worker was lost, or it was to be retried. The row
    becomes `cancelled`; its task's `on_cancelled` hook runs and what it finishes is settled. False
    when there is no such run (it reached its own outcome first: that outcome stands)."""
    now = timezone.now()
    rows = Job.objects.filter(
        task_id=task_id,
        status=Job.Status.RUNNING,
        cancel_requested_at__isnull=False,
        own_finished_at__isnull=True,
    )
    found = rows.values_list("pk", "parent_id", "type", "payload").first()
    if found is None:
        return False
    job_id, parent_id, job_type, payload = found
    if not rows.filter(pk=job_id).update(
        status=Job.Status.CANCELLED, finished_at=now, error_type="Cancelled", error_message=why[:2000]
    ):
        return False
    logger.info("job %s cancelled: %s", job_id, why)
    after_cancel(job_id, job_type, task_id, payload)
    try:
        tree.after_final(job_id, parent_id)
    except Exception:
        logger.exception("job %s cancelled; settling what it finishes failed (the reconciler will)", job_id)
    return True


def after_cancel(job_id: Any, job_type: str, task_id: str, payload: Any) -> None:
    """The clean-up of a job that became `cancelled`: its task's `on_cancelled` hook, wherever the row
    became so (the API, a worker); a failing hook is logged, never raised."""
    from config.celery_app import app

    hook = getattr(app.tasks.get(job_type), "on_cancelled", None)
    if hook is None:
        return
    try:
        hook(task_id, (), payload if isinstance(payload, dict) else {})
    except Exception:
        logger.exception("job %s cancelled; its task's clean-up failed", job_id)
