"""Real workers against the real broker and database: the wiring, end to end."""

from __future__ import annotations

import pytest
from django_celery_results.models import TaskResult

from tasks.default import ping

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_default_ping_runs_on_a_real_worker_and_its_result_is_stored(celery_worker: object) -> None:
    result = ping.delay()

    value = result.get(timeout=30)

    assert set(value) == {"pong", "at"}
    stored = TaskResult.objects.get(task_id=result.id)
    assert stored.status == "SUCCESS"
    assert stored.task_name == "default.ping"
