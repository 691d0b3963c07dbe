"""Clean-up by age, called directly: what goes, what stays, and that it goes in batches."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, get_args

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_results.models import GroupResult, TaskResult

from scheduling.models import ScheduledRun
from tasks.base import InvalidArguments
from tasks.maintenance import Kind, cleanup
from tasks.models import DataSource, DeadLetter, EmailLog, Event, EventBatch, QuarantinedMessage, SyncRun
from tasks.services import maintenance as service

pytestmark = pytest.mark.django_db

NOW = timezone.now()


def ago(**delta: float) -> datetime:
    return NOW - timedelta(**delta)


def deletes(queries: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("DELETE")]


def make_dead_letter(last_failed_at: datetime) -> DeadLetter:
    return DeadLetter.objects.create(
        task_id=f"t-{last_failed_at.timestamp()}",
        task_name="default.probe",
        exception_type="x.Error",
        first_failed_at=last_failed_at,
        last_failed_at=last_failed_at,
    )


def make_email_log(created_at: datetime, status: str) -> EmailLog:
    log = EmailLog.objects.create(
        key=f"k-{EmailLog.objects.count()}", recipient="r@example.com", template="t", status=status
    )
    EmailLog.objects.filter(pk=log.pk).update(created_at=created_at)  # auto_now_add ignores a given value
    return log


def make_task_result(date_done: datetime) -> TaskResult:
    result = TaskResult.objects.create(task_id=f"r-{TaskResult.objects.count()}", status="SUCCESS")
    TaskResult.objects.filter(pk=result.pk).update(date_done=date_done)
    return result


def make_group_result(date_done: datetime) -> GroupResult:
    result = GroupResult.objects.create(group_id=f"g-{GroupResult.objects.count()}")
    GroupResult.objects.filter(pk=result.pk).update(date_done=date_done)
    return result


def make_event(timestamp: datetime) -> Event:
    return Event.objects.create(name="tick", timestamp=timestamp)


def make_event_batch(received_at: datetime) -> EventBatch:
    batch = EventBatch.objects.create(key=f"b-{EventBatch.objects.count()}", events=1)
    EventBatch.objects.filter(pk=batch.pk).update(received_at=received_at)
    return batch


def make_sync_run(started_at: datetime) -> SyncRun:
    source, _ = DataSource.objects.get_or_create(name="crm", defaults={"url": "https://crm.example.com/api"})
    return SyncRun.objects.create(
        source=source, task_id=f"s-{SyncRun.objects.count()}", started_at=started_at, status="succeeded"
    )


# --- delete_batches -----------------------------------------------------------------


def test_it_deletes_only_matching_rows_a_batch_at_a_time() -> None:
    old = [make_dead_letter(ago(days=40, minutes=i)) for i in range(10)]
    recent = [make_dead_letter(ago(days=2, minutes=i)) for i in range(3)]

    with CaptureQueriesContext(connection) as queries:
        outcome = service.delete_batches(
            DeadLetter.objects.filter(last_failed_at__lt=ago(days=30)), batch_size=3
        )

    assert outcome == service.Deletion(deleted=10, batches=4, complete=True)
    assert len(deletes(queries)) == 4  # 3 + 3 + 3 + 1
    assert set(DeadLetter.objects.values_list("pk", flat=True)) == {letter.pk for letter in recent}
    assert not DeadLetter.objects.filter(pk__in=[letter.pk for letter in old]).exists()


def test_it_never_reads_more_than_a_batch_of_keys() -> None:
    for i in range(7):
        make_event(ago(days=10, seconds=i))

    with CaptureQueriesContext(connection) as queries:
        service.delete_batches(Event.objects.all(), batch_size=2)

    selects = [q["sql"] for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")]
    assert selects and all("LIMIT 2" in sql for sql in selects)


def test_a_spent_time_budget_stops_between_batches() -> None:
    for i in range(5):
        make_event(ago(days=10, seconds=i))

    outcome = service.delete_batches(Event.objects.all(), batch_size=2, deadline=0.0)

    assert outcome == service.Deletion(deleted=0, batches=0, complete=False)
    assert Event.objects.count() == 5


def test_delete_in_batches_still_returns_the_count_and_uses_the_setting(settings) -> None:
    settings.MAINTENANCE_BATCH_SIZE = 2
    for i in range(5):
        make_event(ago(days=10, seconds=i))

    with CaptureQueriesContext(connection) as queries:
        assert service.delete_in_batches(Event.objects.all()) == 5

    assert len(deletes(queries)) == 3


# --- cleanup ----------------------------------------------------------------------


@pytest.fixture
def rows_of_every_kind(settings) -> dict[str, tuple[list[Any], list[Any]]]:
    """(old, recent) rows of every kind, against retentions of 7 days (results) and 30/90/90/365/7 days."""
    settings.CELERY_RESULT_EXPIRES = 7 * 24 * 3600
    settings.MAINTENANCE_DEAD_LETTER_RETENTION_DAYS = 30
    settings.MAINTENANCE_QUARANTINE_RETENTION_DAYS = 30
    settings.MAINTENANCE_EMAIL_LOG_RETENTION_DAYS = 90
    settings.MAINTENANCE_SYNC_RUN_RETENTION_DAYS = 90
    settings.ANALYTICS_EVENT_RETENTION_DAYS = 365
    settings.ANALYTICS_INGEST_KEY_RETENTION_DAYS = 7
    settings.SCHEDULES_HISTORY_DAYS = 14
    return {
        "task_results": ([make_task_result(ago(days=8)) for _ in range(3)], [make_task_result(ago(days=6))]),
        "group_results": ([make_group_result(ago(days=7, minutes=1))], [make_group_result(ago(days=6))]),
        "dead_letters": (
            [make_dead_letter(ago(days=31, minutes=i)) for i in range(3)],
            [make_dead_letter(ago(days=29))],
        ),
        "quarantined_messages": (
            [make_quarantined(ago(days=31)), make_quarantined(ago(days=400))],
            [make_quarantined(ago(days=29))],
        ),
        "email_logs": (
            [make_email_log(ago(days=91), status) for status in ("sent", "failed", "unknown")],
            # Recent, or old but still in flight (a retry may need it).
            [
                make_email_log(ago(days=89), "sent"),
                make_email_log(ago(days=200), "pending"),
                make_email_log(ago(days=200), "sending"),
            ],
        ),
        "sync_runs": ([make_sync_run(ago(days=91)) for _ in range(2)], [make_sync_run(ago(days=1))]),
        "events": ([make_event(ago(days=366, seconds=i)) for i in range(5)], [make_event(ago(days=364))]),
        "event_batches": ([make_event_batch(ago(days=8))], [make_event_batch(ago(days=6))]),
        "scheduled_runs": ([make_scheduled_run(ago(days=15))], [make_scheduled_run(ago(days=13))]),
    }


def make_quarantined(when: datetime) -> QuarantinedMessage:
    return QuarantinedMessage.objects.create(
        quarantined_at=when, queue="email", kind="undecodable", reason="not JSON", body="{", size=1
    )


def make_scheduled_run(when: datetime) -> ScheduledRun:
    return ScheduledRun.objects.create(
        schedule_name="nightly", task="default.ping", occurrence=when, dispatched_at=when
    )


def test_cleanup_deletes_what_is_past_each_kinds_retention_and_keeps_the_rest(
    rows_of_every_kind: dict[str, tuple[list[Any], list[Any]]],
) -> None:
    report = service.cleanup(now=NOW, batch_size=2)

    assert {kind: outcome["deleted"] for kind, outcome in report.items()} == {
        kind: len(old) for kind, (old, _) in rows_of_every_kind.items()
    }
    assert report["events"]["batches"] == 3  # 2 + 2 + 1
    assert report["dead_letters"]["batches"] == 2
    assert all(outcome["complete"] for outcome in report.values())
    for kind, (old, recent) in rows_of_every_kind.items():
        model = type(recent[0])
        assert not model.objects.filter(pk__in=[row.pk for row in old]).exists(), kind
        assert model.objects.filter(pk__in=[row.pk for row in recent]).count() == len(recent), kind


def test_a_retention_of_zero_keeps_that_kind_forever(settings) -> None:
    settings.ANALYTICS_EVENT_RETENTION_DAYS = 0
    settings.MAINTENANCE_DEAD_LETTER_RETENTION_DAYS = 0
    make_event(ago(days=5000))
    make_dead_letter(ago(days=5000))

    report = service.cleanup(["events", "dead_letters"], now=NOW)

    assert report == {
        "events": {"deleted": 0, "batches": 0, "complete": True, "cutoff": None},
        "dead_letters": {"deleted": 0, "batches": 0, "complete": True, "cutoff": None},
    }
    assert Event.objects.count() == DeadLetter.objects.count() == 1


def test_cleanup_can_be_limited_to_some_kinds(rows_of_every_kind: dict[str, Any]) -> None:
    report = service.cleanup(["dead_letters"], now=NOW)

    assert list(report) == ["dead_letters"]
    assert report["dead_letters"]["deleted"] == 3
    assert Event.objects.count() == 6


def test_an_unknown_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown clean-up kind 'logs'; choose from task_results, "):
        service.cleanup(["logs"])
    with pytest.raises(InvalidArguments, match=r"field 'kinds\.0': Input should be 'task_results'"):
        cleanup.delay(kinds=["logs"])


def test_the_task_schema_lists_every_kind() -> None:
    assert get_args(Kind) == service.KINDS
