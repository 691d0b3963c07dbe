"""`default.cleanup` through a real worker and broker: old rows go, in batches; recent ones stay."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django_celery_results.models import TaskResult

from jobs.models import Job
from tasks.maintenance import cleanup
from tasks.models import DeadLetter, EmailLog, Event

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_cleanup_runs_on_the_default_queue_and_deletes_old_rows_in_batches(
    celery_worker: object, settings
) -> None:
    settings.MAINTENANCE_BATCH_SIZE = 2
    settings.ANALYTICS_EVENT_RETENTION_DAYS = 30
    now = timezone.now()
    Event.objects.bulk_create(
        [Event(name="old", timestamp=now - timedelta(days=31, minutes=i)) for i in range(5)]
        + [Event(name="new", timestamp=now - timedelta(days=29))]
    )
    for i in range(3):
        DeadLetter.objects.create(
            task_id=f"old-{i}",
            task_name="default.probe",
            exception_type="x.Error",
            first_failed_at=now - timedelta(days=40),
            last_failed_at=now - timedelta(days=40),
        )
    log = EmailLog.objects.create(key="old-sent", recipient="r@example.com", template="t", status="sent")
    EmailLog.objects.filter(pk=log.pk).update(created_at=now - timedelta(days=100))
    stale = TaskResult.objects.create(task_id="stale", status="SUCCESS")
    TaskResult.objects.filter(pk=stale.pk).update(date_done=now - timedelta(days=8))

    assert cleanup.app.amqp.router.route({}, cleanup.name)["queue"].name == "default"
    result = cleanup.delay()
    outcome = result.get(timeout=30)

    assert outcome["complete"] is True
    assert outcome["deleted"] == {
        "task_results": 1,
        "group_results": 0,
        "dead_letters": 3,
        "quarantined_messages": 0,
        "email_logs": 1,
        "sync_runs": 0,
        "events": 5,
        "event_batches": 0,
        "scheduled_runs": 0,
        "jobs": 0,
    }
    assert outcome["batches"]["events"] == 3 and outcome["batches"]["dead_letters"] == 2
    assert list(Event.objects.values_list("name", flat=True)) == ["new"]
    assert not DeadLetter.objects.exists() and not EmailLog.objects.exists()
    job = Job.objects.get(task_id=result.id)  # the record (no django-celery-results row besides)
    assert (job.type, job.status, job.result) == ("default.cleanup", "succeeded", outcome)
