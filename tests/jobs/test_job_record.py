"""A job is recorded once per state change, in its row (tasks/backends.py), by a real worker.

No django-celery-results row for a job that succeeds with a result its row holds; what read that
row (AsyncResult, `celery result`, the API) reads the job's row instead, at every state. The
statements a job costs its worker are counted (an execute wrapper in the worker's thread), not timed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.signals import task_postrun, task_prerun
from django.db import connection, transaction
from django_celery_results.models import TaskResult

from jobs.commits import NO_FLUSH_PREFIX
from jobs.models import Job
from jobs.outbox import enqueue
from tasks.default import ping
from tasks.models import DeadLetter
from tests import probes
from tests.jobs.conftest import ApiClient
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def statement_kind(sql: str) -> str:
    """INSERT, UPDATE, ...: "unflushed INSERT" when sent after SET LOCAL synchronous_commit TO OFF;
    "BEGIN; UPDATE; COMMIT; SELECT" for statements sent together in one query."""
    kind = "; ".join(part.split()[0] for part in sql.removeprefix(NO_FLUSH_PREFIX).split("; "))
    return f"unflushed {kind}" if sql.startswith(NO_FLUSH_PREFIX) else kind


class StatementsPerTask:
    """The SQL each task ran in the worker's thread, from its start (task_prerun) to its end (postrun)."""

    def __init__(self) -> None:
        self.by_task: dict[str, list[tuple[str, bool]]] = {}
        self.finished: set[str] = set()
        self._current = threading.local()

    def _count(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        task_id = getattr(self._current, "task_id", None)
        if task_id is not None:
            self.by_task[task_id].append((sql, connection.in_atomic_block))
        return execute(sql, params, many, context)

    def started(self, task_id: str | None = None, **kwargs: Any) -> None:
        if task_id is None:
            return
        self._current.task_id = task_id
        self.by_task[task_id] = []
        connection.execute_wrappers.append(self._count)

    def ended(self, task_id: str | None = None, **kwargs: Any) -> None:
        self._current.task_id = None
        with contextlib.suppress(ValueError):
            connection.execute_wrappers.remove(self._count)
        if task_id is not None:
            self.finished.add(task_id)


@pytest.fixture
def statements() -> Iterator[StatementsPerTask]:
    counter = StatementsPerTask()
    task_prerun.connect(counter.started, weak=False, dispatch_uid="test-statements-start")
    task_postrun.connect(counter.ended, weak=False, dispatch_uid="test-statements-end")
    yield counter
    task_prerun.disconnect(dispatch_uid="test-statements-start")
    task_postrun.disconnect(dispatch_uid="test-statements-end")


def test_a_job_that_succeeds_leaves_a_complete_row_and_no_task_result_row(celery_worker: object) -> None:
    result = ping.delay()

    value = result.get(timeout=30)  # read through the result backend: from the job's row

    job = Job.objects.get(task_id=result.id)
    assert (job.status, job.attempts, job.result) == (Job.Status.SUCCEEDED, 1, value)
    assert job.started_at is not None and job.finished_at is not None and job.started_at <= job.finished_at
    assert (job.type, job.queue, job.error_type, job.error_message) == ("default.ping", "default", "", "")
    assert not TaskResult.objects.filter(task_id=result.id).exists()
    assert result.state == "SUCCESS"
    assert result.date_done == job.finished_at


def test_a_job_costs_its_worker_two_round_trips_and_one_flushed_commit(
    celery_worker: object, statements: StatementsPerTask
) -> None:
    results = [ping.delay() for _ in range(5)]
    for result in results:
        result.get(timeout=30)
    wait_for(lambda: statements.finished >= {result.id for result in results}, what="every task to end")
    postgresql = connection.vendor == "postgresql"

    for result in results:
        ran = statements.by_task[result.id]
        # The claim (one INSERT of the row: sent with apply_async, it had none), whose commit does
        # not wait for the WAL flush on PostgreSQL (jobs.commits: SET LOCAL in the same query); the
        # success (one UPDATE, durable: the message is acknowledged on it); and, once it is committed,
        # whether any job waits for this one (one SELECT): on PostgreSQL in the same round trip
        # (jobs.tracking). Each its own transaction; no django-celery-results row.
        kinds = [statement_kind(sql) for sql, _ in ran]
        outcome = ["BEGIN; UPDATE; COMMIT; SELECT"] if postgresql else ["UPDATE", "SELECT"]
        expected = ["unflushed INSERT" if postgresql else "INSERT", *outcome]
        assert kinds == expected, ran
        assert not any(in_block for _, in_block in ran), ran
        assert "synchronous_commit" not in ran[1][0], ran  # the outcome's commit is flushed
        assert not any("django_celery_results" in sql for sql, _ in ran), ran


def test_a_claim_through_the_api_is_one_unflushed_update(
    celery_worker: object, statements: StatementsPerTask
) -> None:
    job = enqueue(ping)
    ping.AsyncResult(job.task_id).get(timeout=30)
    wait_for(lambda: job.task_id in statements.finished, what="the task to end")

    ran = statements.by_task[job.task_id]
    postgresql = connection.vendor == "postgresql"
    assert [(statement_kind(sql), in_block) for sql, in_block in ran] == [
        ("UPDATE", False),
        *(
            [("BEGIN; UPDATE; COMMIT; SELECT", False)]
            if postgresql
            else [("UPDATE", False), ("SELECT", False)]
        ),
    ], ran
    if postgresql:
        assert "set_config('synchronous_commit', 'off', true)" in ran[0][0], ran
        assert "synchronous_commit" not in ran[1][0], ran
    job.refresh_from_db()
    assert (job.status, job.attempts, set(job.result or ())) == (Job.Status.SUCCEEDED, 1, {"pong", "at"})


def test_a_recorded_jobs_state_is_read_from_its_row_while_queued_running_and_done(
    celery_worker: object, tmp_path: Path, staff_client: ApiClient
) -> None:
    with transaction.atomic():  # recorded, and published only when this commits: queued until then
        job = enqueue(probes.probe_sleep, path=str(tmp_path / "runs"), seconds=1.5)
        result = probes.probe_sleep.AsyncResult(job.task_id)

        assert result.state == "PENDING"
        assert staff_client.get(f"/api/jobs/{job.pk}").json()["status"] == "queued"

    wait_for(lambda: Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).exists(), what="the job to run")
    assert result.state == "STARTED"
    assert staff_client.get(f"/api/jobs/{job.pk}").json()["status"] == "running"

    assert result.get(timeout=30) == 1
    answer = staff_client.get(f"/api/jobs/{job.pk}").json()
    assert (answer["status"], answer["result"]) == ("succeeded", 1)
    assert not TaskResult.objects.filter(task_id=job.task_id).exists()


def test_a_failed_job_keeps_its_error_in_the_row_and_in_the_task_result(celery_worker: object) -> None:
    result = probes.probe_needs_file.delay(path="/nonexistent/for/this/test")

    with pytest.raises(Exception, match="does not exist") as raised:
        result.get(timeout=30)

    assert type(raised.value).__name__ == "PermanentJobError"
    job = Job.objects.get(task_id=result.id)
    assert (job.status, job.error_type) == (Job.Status.FAILED, "PermanentJobError")
    # A failure is rare and its exception is read back with its type: both are written, in one transaction.
    assert TaskResult.objects.get(task_id=result.id).status == "FAILURE"
    # Then its dead letter: the worker's last write for it (the test database is flushed after).
    wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).exists(), what="the dead letter")


def test_a_result_too_large_for_the_row_is_kept_whole_in_the_task_result(
    celery_worker: object, tmp_path: Path
) -> None:
    path = tmp_path / "large.txt"
    path.write_text("x" * (65 * 1024))
    result = probes.probe_needs_file.delay(path=str(path))

    assert len(result.get(timeout=30)) == 65 * 1024
    assert Job.objects.get(task_id=result.id).result == {"truncated": True, "bytes": 65 * 1024 + 2}
    assert TaskResult.objects.get(task_id=result.id).status == "SUCCESS"


def test_a_worker_keeps_its_connection_and_replaces_one_the_database_dropped(celery_worker: object) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("sessions are terminated with PostgreSQL's pg_terminate_backend")
    first = ping.delay()
    first.get(timeout=30)
    second = ping.delay()
    second.get(timeout=30)
    with connection.cursor() as cursor:  # the worker's sessions: every one on this database but ours
        cursor.execute(
            "SELECT pid, backend_start FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        kept = cursor.fetchall()
    assert kept, "the worker kept no connection between its jobs"

    with connection.cursor() as cursor:  # as a database restart or failover drops them
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [[pid for pid, _ in kept]]
        )
    third = ping.delay()

    assert set(third.get(timeout=30)) == {"pong", "at"}  # claimed and finished over a new connection
    assert Job.objects.get(task_id=third.id).status == Job.Status.SUCCEEDED


def test_an_earlier_attempts_message_delivered_again_does_not_start_a_retry_before_it_is_due(
    celery_worker: object,
) -> None:
    """A retry held in the row (status retrying, due later, attempts 1) and the first attempt's message
    delivered again (its worker died after holding the retry, before acknowledging): the old message
    is skipped, and the job runs when its retry is released, as attempt 2. Before, the old message's
    claim took any retrying row and ran the job at once, ahead of its backoff."""
    from datetime import timedelta

    from django.utils import timezone

    from jobs import publish
    from jobs.protocol import JOB_HEADER

    job = enqueue(ping)
    ping.AsyncResult(job.task_id).get(timeout=30)
    Job.objects.filter(pk=job.pk).update(  # what tracking.hold_retry leaves after attempt 1
        status=Job.Status.RETRYING,
        attempts=1,
        run_at=timezone.now() + timedelta(hours=1),
        published_at=None,
        result=None,
        finished_at=None,
    )

    ping.apply_async(task_id=job.task_id, headers={JOB_HEADER: str(job.pk)}, arguments_checked=True)
    ping.apply_async().get(timeout=30)  # the worker (solo) took the stale message before this one

    job.refresh_from_db()
    assert (job.status, job.attempts, job.result) == (Job.Status.RETRYING, 1, None)

    Job.objects.filter(pk=job.pk).update(run_at=timezone.now())  # due now
    job.refresh_from_db()
    publish.publish([job])  # what default.release_jobs sends when it is due
    ping.AsyncResult(job.task_id).get(timeout=30)
    job.refresh_from_db()
    assert (job.status, job.attempts) == (Job.Status.SUCCEEDED, 2)


def test_a_duplicate_of_a_plain_tasks_message_does_not_turn_its_result_into_revoked(
    celery_worker: object,
) -> None:
    """A task sent with plain apply_async gets its row at its first claim. The same message delivered
    again after it succeeded is skipped by the claim; Celery's REVOKED for that skip is not stored
    (the row records the job): before, it was, and reads (which take a stored final state first)
    said REVOKED for a job that had succeeded."""
    first = ping.apply_async()
    first.get(timeout=30)

    ping.apply_async(task_id=first.id)  # the same message again, as a broker redelivering it
    ping.apply_async().get(timeout=30)  # the worker (solo) took the duplicate before this one

    assert Job.objects.get(task_id=first.id).status == Job.Status.SUCCEEDED
    assert ping.AsyncResult(first.id).state == "SUCCESS"
    assert not TaskResult.objects.filter(task_id=first.id).exists()


def test_a_message_of_a_finished_job_delivered_too_often_is_skipped_without_a_dead_letter(
    celery_worker: object, settings: Any
) -> None:
    """Its workers died after the outcome was written and before the ack, again and again: the job
    is done, so the message is a duplicate, not a poison message. Before, the delivery limit was
    checked before the row and left a dead letter (a replay of which the API then refused)."""
    from jobs.protocol import JOB_HEADER

    job = enqueue(ping)
    ping.AsyncResult(job.task_id).get(timeout=30)
    headers = {JOB_HEADER: str(job.pk), "x_delivery_count": settings.JOBS_MAX_DELIVERIES + 1}

    ping.apply_async(task_id=job.task_id, headers=headers, arguments_checked=True)
    ping.apply_async().get(timeout=30)  # the worker (solo) took the duplicate before this one

    job.refresh_from_db()
    assert job.status == Job.Status.SUCCEEDED
    assert not DeadLetter.objects.filter(task_id=job.task_id).exists()
    assert ping.AsyncResult(job.task_id).state == "SUCCESS"


def test_a_message_the_revoke_list_discards_ends_a_run_whose_cancel_was_requested(
    celery_worker: object,
) -> None:
    """The run was asked to stop and its worker died; its message, delivered again, reaches a worker
    that was told to revoke the task id and discards it unrun (Celery's revoke list), so no claim
    sees it: the worker ends the run there (tasks.requests), instead of leaving the row running
    until the reconciler gives up on it."""
    from celery import uuid
    from django.utils import timezone

    from config.celery_app import app
    from jobs.protocol import JOB_HEADER

    task_id = uuid()
    job = Job.objects.create(
        type="default.ping",
        queue="default",
        task_id=task_id,
        status=Job.Status.RUNNING,
        attempts=1,
        deliveries=1,
        started_at=timezone.now(),
        published_at=timezone.now(),
        cancel_requested_at=timezone.now(),
    )
    app.control.revoke(task_id)
    wait_for(
        lambda: any(task_id in ids for ids in (app.control.inspect(timeout=1).revoked() or {}).values()),
        what="the worker to hold the revoke",
    )

    ping.apply_async(task_id=task_id, headers={JOB_HEADER: str(job.pk)}, arguments_checked=True)

    stopped = wait_for(lambda: Job.objects.filter(pk=job.pk, status=Job.Status.CANCELLED).first())
    assert stopped.error_message == "its worker was lost after the cancel was requested"
