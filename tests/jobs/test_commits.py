"""jobs.commits.unflushed: an UPDATE that commits without waiting for the WAL flush, in one round trip,
and only for its own transaction."""

from __future__ import annotations

import pytest
from celery.utils import uuid
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from jobs.commits import unflushed
from jobs.models import Job

pytestmark = pytest.mark.django_db(transaction=True)

NO_FLUSH = "set_config('synchronous_commit', 'off', true)"


def job_row(status: str) -> Job:
    return Job.objects.create(type="default.ping", queue="default", task_id=uuid(), status=status)


def synchronous_commit() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return str(cursor.fetchone()[0])


def test_an_update_outside_a_transaction_turns_the_flush_off_for_itself_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("synchronous_commit is PostgreSQL's")
    job, other = job_row(Job.Status.QUEUED), job_row(Job.Status.QUEUED)

    with CaptureQueriesContext(connection) as queries:
        updated = unflushed(Job.objects.filter(pk=job.pk)).update(status=Job.Status.RUNNING)

    assert updated == 1
    assert len(queries) == 1 and NO_FLUSH in queries[0]["sql"]
    assert synchronous_commit() == "on"  # the session's setting is untouched
    assert Job.objects.get(pk=job.pk).status == Job.Status.RUNNING
    assert Job.objects.get(pk=other.pk).status == Job.Status.QUEUED
    assert unflushed(Job.objects.filter(pk=job.pk, status=Job.Status.QUEUED)).update(status="failed") == 0


def test_inside_a_transaction_its_commit_decides() -> None:
    job = job_row(Job.Status.QUEUED)

    with transaction.atomic(), CaptureQueriesContext(connection) as queries:
        assert unflushed(Job.objects.filter(pk=job.pk)).update(status=Job.Status.RUNNING) == 1

    assert not any(NO_FLUSH in query["sql"] for query in queries)
    assert Job.objects.get(pk=job.pk).status == Job.Status.RUNNING


def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the outcome's one-query form is PostgreSQL's")


def test_an_outcome_and_its_waiters_are_one_query_that_postgresql_logs_no_warning_for() -> None:
    """The outcome's UPDATE, its COMMIT and the question after it go in one simple query. Without a BEGIN
    of its own, PostgreSQL obeyed the COMMIT but sent (and logged) `WARNING: there is no transaction
    in progress` for every job: 200,000 lines in its log after a benchmark."""
    postgresql_only()
    from jobs import tracking
    from jobs.models import JobDependency

    job, waiter = job_row(Job.Status.RUNNING), job_row(Job.Status.WAITING)
    JobDependency.objects.create(job=waiter, prerequisite=job)
    connection.ensure_connection()
    notices: list[str] = []
    connection.connection.add_notice_handler(lambda notice: notices.append(str(notice.message_primary)))

    with CaptureQueriesContext(connection) as queries:
        changed, waiters = tracking._finish(
            str(job.pk), job.task_id, status=Job.Status.SUCCEEDED, finished_at=job.created_at
        )

    assert (changed, [str(pk) for pk in waiters or []]) == (1, [str(waiter.pk)])
    assert len(queries) == 1
    assert notices == []
    assert Job.objects.get(pk=job.pk).status == Job.Status.SUCCEEDED  # committed: read on the same session
    assert not connection.in_atomic_block and connection.connection.info.transaction_status == 0  # IDLE


def test_an_outcome_whose_statement_fails_leaves_the_connection_ready_for_the_next_job() -> None:
    postgresql_only()
    from django.db import OperationalError, connections

    from jobs import tracking

    job = job_row(Job.Status.RUNNING)
    holder = connections.create_connection("default")
    try:
        holder.set_autocommit(False)
        with holder.cursor() as cursor:  # another session holds the row: the outcome's UPDATE waits
            cursor.execute(f"SELECT 1 FROM {Job._meta.db_table} WHERE id = %s FOR UPDATE", [job.pk])  # noqa: S608
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = 200")
        with pytest.raises(OperationalError):
            tracking._finish(
                str(job.pk), job.task_id, status=Job.Status.SUCCEEDED, finished_at=job.created_at
            )
        with connection.cursor() as cursor:
            cursor.execute("SET statement_timeout = 0")
    finally:
        holder.rollback()
        holder.close()

    assert connection.connection.info.transaction_status == 0  # IDLE, not an aborted transaction
    changed, _ = tracking._finish(
        str(job.pk), job.task_id, status=Job.Status.SUCCEEDED, finished_at=job.created_at
    )
    assert changed == 1
    assert Job.objects.get(pk=job.pk).status == Job.Status.SUCCEEDED


def test_a_claim_counts_the_deliveries_of_its_attempts_message() -> None:
    """The row counts what RabbitMQ's classic queues do not: each time the broker delivered this
    attempt's message again after its worker died. A copy a worker sent again (a deferral) claims
    without counting; the next attempt starts again at 1; a message that must not run it gets 0."""
    from jobs import tracking

    job = job_row(Job.Status.QUEUED)
    claim = tracking.claim

    assert claim(str(job.pk), job.task_id, 1, False) == 1
    assert claim(str(job.pk), job.task_id, 1, True, counted=True) == 2
    assert claim(str(job.pk), job.task_id, 1, True, counted=False) == 2  # a deferral's copy
    assert claim(str(job.pk), job.task_id, 1, True, counted=True) == 3
    assert claim(str(job.pk), job.task_id, 2, False) == 1  # a retry: a new message
    assert Job.objects.values_list("deliveries", "attempts").get(pk=job.pk) == (1, 2)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.SUCCEEDED)
    assert claim(str(job.pk), job.task_id, 2, True, counted=True) == 0


def test_a_claim_sent_again_on_a_new_connection_does_not_count_its_delivery_twice() -> None:
    """jobs.connections.claiming repeats a claim whose connection the database dropped mid-statement:
    the first try may have committed. Both carry the delivery's claim time; a row that already holds
    it was claimed by this delivery, and it is not counted again (before, it was: a message the broker
    redelivered once could be dead-lettered a delivery early)."""
    from django.utils import timezone

    from jobs import tracking

    job = job_row(Job.Status.QUEUED)
    assert tracking.claim(str(job.pk), job.task_id, 1, False) == 1
    redelivery = timezone.now()  # its worker died; the broker delivers the message again

    assert tracking.claim(str(job.pk), job.task_id, 1, True, counted=True, at=redelivery) == 2
    # The connection was dropped after the commit: sent again, as a redelivery, with the same time.
    assert tracking.claim(str(job.pk), job.task_id, 1, True, counted=True, at=redelivery) == 2
    assert Job.objects.values_list("deliveries", "started_at").get(pk=job.pk) == (2, redelivery)
