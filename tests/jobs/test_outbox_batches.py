"""enqueue() and enqueue_many() in numbers: the jobs of a transaction are recorded in one INSERT
(enqueue_many), sent together when it commits and marked published in one UPDATE; a savepoint rolled
back takes its jobs with it; a batch the broker refused is sent by the release task.

No worker runs in this module: what the broker holds is what was sent.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from jobs import services
from jobs.models import Job
from jobs.outbox import InvalidJob, enqueue, enqueue_many
from jobs.publish import marked_before_sending
from localdev.embedded_broker import free_port
from tests import probes, queues

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def depth(celery_app: Celery, queue: str = "default") -> int:
    return queues.depth(celery_app, queue)


def effect(directory: Path, key: str) -> dict[str, Any]:
    return {"directory": str(directory), "key": key}


def _statements(queries: CaptureQueriesContext, verb: str) -> int:
    return sum(query["sql"].count(f'{verb} "jobs_job"') for query in queries)


def marks() -> int:
    """The UPDATEs that mark a batch published: one on RabbitMQ, none on Redis (the rows are written
    marked: jobs.publish.marked_before_sending)."""
    return 0 if marked_before_sending() else 1


def test_a_list_of_jobs_is_recorded_in_one_insert_and_marked_published_in_at_most_one_update(
    celery_app: Celery, empty_queues: None
) -> None:
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        jobs = enqueue_many("default.ping", [{}] * 1000, priority=7)
        assert depth(celery_app) == 0  # nothing is sent before the commit
    # One INSERT on PostgreSQL; SQLite takes at most 999 parameters a statement: as few as fit.
    per_statement = connection.ops.bulk_batch_size(list(Job._meta.concrete_fields), jobs)
    inserts = math.ceil(len(jobs) / per_statement)
    assert (_statements(queries, "INSERT INTO"), _statements(queries, "UPDATE")) == (inserts, marks())
    assert connection.vendor != "postgresql" or inserts == 1
    assert depth(celery_app) == 1000
    assert Job.objects.filter(pk__in=[job.pk for job in jobs], published_at__isnull=False).count() == 1000
    assert set(Job.objects.values_list("priority", "status")) == {(7, Job.Status.QUEUED)}


def test_jobs_enqueued_one_by_one_in_a_transaction_are_sent_together_when_it_commits(
    celery_app: Celery, empty_queues: None
) -> None:
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        for _ in range(50):
            enqueue("default.ping")
    assert _statements(queries, "UPDATE") == marks()  # one mark for the fifty (or none), not one each
    assert depth(celery_app) == 50
    assert not Job.objects.filter(published_at__isnull=True).exists()


def test_a_job_enqueued_in_a_savepoint_that_rolled_back_is_not_sent(
    celery_app: Celery, empty_queues: None
) -> None:
    with transaction.atomic():
        kept = enqueue("default.ping")
        with pytest.raises(RuntimeError), transaction.atomic():
            enqueue("default.ping")
            raise RuntimeError("this part of the caller's work failed")
        with pytest.raises(RuntimeError), transaction.atomic():
            inner = enqueue_many("default.ping", [{}, {}])  # a savepoint that registered nothing new
            raise RuntimeError("and this one")
        also_kept = enqueue("default.ping")
    assert not Job.objects.filter(pk__in=[job.pk for job in inner]).exists()
    assert set(Job.objects.values_list("pk", flat=True)) == {kept.pk, also_kept.pk}
    assert depth(celery_app) == 2


def test_a_savepoint_that_sent_first_and_rolled_back_leaves_the_later_jobs_to_a_new_outbox(
    celery_app: Celery, empty_queues: None
) -> None:
    with transaction.atomic():
        with pytest.raises(RuntimeError), transaction.atomic():
            enqueue("default.ping")  # the outbox's commit callback is registered in this savepoint
            raise RuntimeError("rolled back")
        later = enqueue("default.ping")
    assert list(Job.objects.values_list("pk", flat=True)) == [later.pk]
    assert depth(celery_app) == 1


def test_a_batch_the_broker_refused_at_commit_is_kept_and_sent_by_the_release_task(
    celery_app: Celery, empty_queues: None, monkeypatch, settings
) -> None:
    closed = celery_app.connection_for_write(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1)
    monkeypatch.setattr("jobs.publish._connection", closed)
    with transaction.atomic():
        jobs = enqueue_many("default.ping", [{}] * 20)
    assert Job.objects.filter(published_at__isnull=True).count() == 20  # recorded, not sent
    monkeypatch.undo()

    settings.JOBS_PUBLISH_GRACE_SECONDS = 0
    assert services.release_due() == 20
    assert depth(celery_app) == 20
    assert not Job.objects.filter(pk__in=[job.pk for job in jobs], published_at__isnull=True).exists()


def test_enqueue_many_checks_every_entry_before_anything_is_written() -> None:
    with pytest.raises(InvalidJob, match="key"):
        enqueue_many(
            probes.probe_effect, [effect(Path("/tmp"), "good"), {"directory": "/tmp", "key": "bad key!"}]
        )
    assert not Job.objects.exists()
