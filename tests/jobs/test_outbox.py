"""enqueue() for application code: the job is recorded in the caller's transaction, sent on commit.

And a task sent with plain apply_async gets its record when a worker claims it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from django.db import transaction

from jobs import services
from jobs.models import Job
from jobs.outbox import InvalidJob, enqueue
from localdev.embedded_broker import free_port
from tests import probes, queues
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def depth(celery_app: Celery, queue: str = "default") -> int:
    return queues.depth(celery_app, queue)


def effect(directory: Path, key: str) -> dict[str, Any]:
    directory.mkdir(exist_ok=True)
    return {"directory": str(directory), "key": key}


def test_a_job_enqueued_in_a_transaction_is_sent_when_it_commits_and_runs(
    celery_app: Celery, empty_queues: None, worker_process, tmp_path: Path
) -> None:
    with transaction.atomic():
        job = enqueue("default.probe_effect", **effect(tmp_path, "committed"))
        assert depth(celery_app) == 0  # nothing is sent before the commit
        assert job.status == Job.Status.QUEUED and job.queue == "default"
    assert depth(celery_app) == 1
    job.refresh_from_db()
    assert job.published_at is not None

    worker_process("outbox", "-Q", "default", "-I", "tests.probes", "--pool=solo")
    wait_for(lambda: Job.objects.filter(pk=job.pk, status=Job.Status.SUCCEEDED).exists(), what="the job run")
    assert (tmp_path / "effects.log").read_text() == "committed\n"


def test_a_rolled_back_transaction_leaves_no_job_and_no_message(
    celery_app: Celery, empty_queues: None
) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        enqueue(probes.probe_effect, **effect(Path("/tmp"), "rolled-back"))
        raise RuntimeError("the caller's own work failed")
    assert not Job.objects.exists()
    assert depth(celery_app) == 0


def test_a_job_the_broker_refused_at_commit_is_sent_by_the_release_task(
    celery_app: Celery, empty_queues: None, monkeypatch, settings
) -> None:
    closed = celery_app.connection_for_write(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1)
    monkeypatch.setattr("jobs.publish._connection", closed)
    with transaction.atomic():
        job = enqueue("default.probe_effect", **effect(Path("/tmp"), "later"))
    job.refresh_from_db()
    assert job.published_at is None  # recorded, not sent: the caller still has its job
    monkeypatch.undo()

    settings.JOBS_PUBLISH_GRACE_SECONDS = 0
    assert services.release_due() == 1
    assert depth(celery_app) == 1
    job.refresh_from_db()
    assert job.published_at is not None


def test_arguments_are_checked_before_anything_is_written() -> None:
    with pytest.raises(InvalidJob, match="key"):
        enqueue("default.probe_effect", directory="/tmp", key="not a valid key!")
    with pytest.raises(InvalidJob, match="not a task of this project"):
        enqueue("default.nothing_of_the_sort")
    with pytest.raises(InvalidJob, match="priority"):
        enqueue("default.probe_effect", priority=10, **effect(Path("/tmp"), "k"))
    assert not Job.objects.exists()


def test_a_task_sent_with_apply_async_gets_its_record_when_a_worker_claims_it(
    empty_queues: None, worker_process, tmp_path: Path
) -> None:
    result = probes.probe_effect.apply_async(kwargs=effect(tmp_path, "plain"))
    worker_process("plain", "-Q", "default", "-I", "tests.probes", "--pool=solo")
    assert result.get(timeout=30) == "done"
    job = Job.objects.get(task_id=result.id)
    assert (job.type, job.queue, job.status, job.attempts) == (
        "default.probe_effect",
        "default",
        "succeeded",
        1,
    )
    assert job.payload == effect(tmp_path, "plain")

    # A duplicate of a message whose job is done does not run it again.
    probes.probe_effect.apply_async(kwargs=effect(tmp_path, "plain"), task_id=result.id)
    wait_for(lambda: depth_is_zero(), what="the duplicate taken")
    assert (tmp_path / "executions.log").read_text().split().count("plain") == 1


def depth_is_zero() -> bool:
    from config.celery_app import app

    return depth(app) == 0


def test_a_job_may_wait_for_others_enqueued_before_it(celery_worker: object) -> None:
    with transaction.atomic():
        first = enqueue("default.ping")
        second = enqueue("default.ping", depends_on=[first])
        third = enqueue("default.ping", depends_on=[second.pk])
    assert second.status == third.status == Job.Status.WAITING

    wait_for(lambda: Job.objects.filter(pk=third.pk, status=Job.Status.SUCCEEDED).exists(), what="the chain")
    times = {job.pk: job for job in Job.objects.filter(pk__in=[first.pk, second.pk, third.pk])}
    first_end, second_start = times[first.pk].finished_at, times[second.pk].started_at
    assert first_end and second_start and first_end <= second_start
    with pytest.raises(InvalidJob, match="depends_on: there is no job"):
        enqueue("default.ping", depends_on=["0b6c9d1e-0000-4000-8000-000000000000"])
