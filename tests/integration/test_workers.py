"""Real workers against the real broker and database: the wiring, end to end."""

from __future__ import annotations

import pytest
from django_celery_results.models import TaskResult

from jobs.models import Job
from tasks.default import ping

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_default_ping_runs_on_a_real_worker_and_its_result_is_stored_in_its_job(
    celery_worker: object,
) -> None:
    result = ping.delay()

    value = result.get(timeout=30)

    assert set(value) == {"pong", "at"}
    job = Job.objects.get(task_id=result.id)
    assert (job.type, job.status, job.result) == ("default.ping", "succeeded", value)
    assert not TaskResult.objects.filter(task_id=result.id).exists()  # one record: the job's row
