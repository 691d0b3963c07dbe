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
