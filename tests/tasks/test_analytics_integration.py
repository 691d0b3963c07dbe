"""The analytics tasks through a real worker and broker, the daily report through a real SMTP server."""

from __future__ import annotations

import threading
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.contrib.auth import get_user_model

from jobs.models import Job
from tasks import retries
from tasks.analytics import aggregate_daily, backfill, daily_report, ingest
from tasks.models import DailyMetric, DeadLetter, EmailLog, Event
from tasks.services import analytics as service
from tests.smtp import SmtpServer
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BERLIN = ZoneInfo("Europe/Berlin")


def event(name: str, at: datetime, user: str = "") -> dict[str, Any]:
    return {"name": name, "user_id": user, "timestamp": at.isoformat()}


def metric_rows() -> set[tuple[Any, ...]]:
    return set(DailyMetric.objects.values_list("day", "event_name", "count", "distinct_users"))


def test_events_sent_through_the_queue_are_stored_once_per_batch(celery_worker: object) -> None:
    events = [event("click", datetime(2026, 5, 4, 9, i, tzinfo=UTC), user=f"u{i}") for i in range(3)]

    first = ingest.delay(events=events, batch_key="shop:42").get(timeout=30)
    again = ingest.delay(events=events, batch_key="shop:42").get(timeout=30)

    assert first == again == {"batch_key": "shop:42", "events": 3}
    assert Event.objects.count() == 3


def test_aggregate_daily_defaults_to_yesterday_in_the_project_time_zone(
    celery_worker: object, settings
) -> None:
    settings.TIME_ZONE = "America/New_York"
    yesterday = service.yesterday()
    start, end = service.day_bounds(yesterday)
    service.ingest_events(
        [event("open", start, "a"), event("open", end, "b"), event("open", start + timedelta(hours=5), "a")]
    )

    result = aggregate_daily.delay().get(timeout=30)

    assert result == {"day": yesterday.isoformat(), "event_names": 1, "events": 2, "removed": 0}
    assert metric_rows() == {(yesterday, "open", 2, 1)}


def test_backfill_rolls_up_every_day_of_the_range(celery_worker: object, settings) -> None:
    settings.TIME_ZONE = "Europe/Berlin"
    service.ingest_events(
        [
            event("view", datetime(2026, 3, 28, 23, 30, tzinfo=BERLIN), "a"),
            event("view", datetime(2026, 3, 29, 0, 30, tzinfo=BERLIN), "a"),
            event("view", datetime(2026, 3, 29, 23, 30, tzinfo=BERLIN), "b"),
            event("buy", datetime(2026, 3, 30, 8, 0, tzinfo=BERLIN), "b"),
        ]
    )
    DailyMetric.objects.create(day=date(2026, 3, 30), event_name="stale", count=1, distinct_users=1)

    result = backfill.delay(start="2026-03-28", end="2026-03-31")
    sent = result.get(timeout=30)
    # The backfill's job is final once every day's roll-up is (jobs.tree).
    job = wait_for(lambda: Job.objects.filter(task_id=result.id, status__in=Job.FINAL).first())
    assert job.status == Job.Status.SUCCEEDED, job.error_message
    days = Job.objects.filter(parent=job).order_by("payload__day")
    assert [(child.result or {})["day"] for child in days] == [
        "2026-03-28",
        "2026-03-29",
        "2026-03-30",
        "2026-03-31",
    ]
    assert {child.status for child in days} == {Job.Status.SUCCEEDED}

    assert sent["days"] == 4
    assert metric_rows() == {
        (date(2026, 3, 28), "view", 1, 1),
        (date(2026, 3, 29), "view", 2, 2),
        (date(2026, 3, 30), "buy", 1, 1),
    }


def make_report_data(settings) -> date:
    """Two Berlin days of events, a staff user and an admin to send the report to."""
    settings.TIME_ZONE = "Europe/Berlin"
    settings.ADMINS = [("Ops", "ops@example.com")]
    get_user_model().objects.create_user("ann", "ann@example.com", is_staff=True)
    get_user_model().objects.create_user("not-staff", "cy@example.com")
    service.ingest_events(
        [event("page_view", datetime(2026, 3, 28, 12, 0, tzinfo=BERLIN), "x")]
        + [
            event("page_view", datetime(2026, 3, 29, h, 0, tzinfo=BERLIN), u)
            for h, u in [(0, "a"), (9, "a"), (23, "b")]
        ]
        + [event("page_view", datetime(2026, 3, 29, 10, 0, tzinfo=BERLIN))]
        + [event("signup", datetime(2026, 3, 29, 11, 0, tzinfo=BERLIN), "b")]
        + [event("signup", datetime(2026, 3, 30, 0, 0, tzinfo=BERLIN), "c")]
    )
    return date(2026, 3, 29)


def test_the_daily_report_arrives_over_smtp_with_text_html_and_the_numbers(
    celery_worker: object, smtp_server: SmtpServer, settings
) -> None:
    day = make_report_data(settings)

    result = daily_report.delay(day=day.isoformat()).get(timeout=30)

    assert result == {"day": "2026-03-29", "recipients": 2, "sent": 2, "already_sent": 0, "failed": 0}
    messages = smtp_server.wait_for_messages(2)
    assert sorted(m.envelope_to[0] for m in messages) == ["ann@example.com", "ops@example.com"]
    message = messages[0]
    assert message.subject == "Analytics 2026-03-29: 5 events (+4 (+400.0%) vs 2026-03-28)"
    assert message.text is not None and message.html is not None
    assert "Events:       5 (+4 (+400.0%) vs 2026-03-28: 1)" in message.text
    assert "- page_view: 4 events, 2 distinct users (+3 (+300.0%) vs 1)" in message.text
    assert "- signup: 1 events, 1 distinct users (new vs 0)" in message.text
    assert '<td>page_view</td><td align="right">4</td><td align="right">2</td>' in message.html
    assert EmailLog.objects.filter(template="analytics/daily_report", status="sent").count() == 2

    assert daily_report.delay(day=day.isoformat()).get(timeout=30)["already_sent"] == 2
    assert len(smtp_server.messages) == 2


def test_a_busy_smtp_server_is_retried_until_the_report_gets_through(
    celery_worker: object, smtp_server: SmtpServer, settings
) -> None:
    settings.ADMINS = [("Ops", "ops@example.com")]
    smtp_server.set_failure(rcpt=(451, "4.7.1 greylisted, try later"), times=2)

    result = daily_report.delay(day="2026-05-03").get(timeout=30)

    assert result["sent"] == 1
    assert len(smtp_server.refused) == 2
    assert smtp_server.wait_for_messages(1)[0].envelope_to == ["ops@example.com"]
    assert EmailLog.objects.get(template="analytics/daily_report").attempts == 3
    assert not DeadLetter.objects.exists()


def test_the_report_rides_out_a_twenty_minute_smtp_outage(
    celery_worker: object, smtp_server: SmtpServer, settings
) -> None:
    settings.ADMINS = [("Ops", "ops@example.com")]
    # Waits at 0.2% of their length: analytics' least window (30 min 37 s) is 3.7 s, the outage 2.4 s.
    settings.JOBS_RETRY_DELAY_SCALE = 0.002
    outage = 20 * 60 * settings.JOBS_RETRY_DELAY_SCALE
    assert retries.configured("analytics").window()[0] > 30 * 60
    smtp_server.set_failure(rcpt=(421, "4.3.2 service not available"), times=None)
    recovery = threading.Timer(outage, lambda: smtp_server.set_failure(rcpt=None))
    recovery.start()
    try:
        sent = daily_report.delay(day="2026-05-04")
        assert sent.get(timeout=120)["sent"] == 1
    finally:
        recovery.cancel()

    refused = len(smtp_server.refused)
    assert refused >= 5  # the old policy's attempts in all
    assert smtp_server.wait_for_messages(1)[0].envelope_to == ["ops@example.com"]
    assert EmailLog.objects.get(template="analytics/daily_report").attempts == refused + 1
    assert Job.objects.get(task_id=sent.id).attempts == refused + 1
    assert not DeadLetter.objects.exists()


def test_a_refused_recipient_leaves_a_dead_letter_naming_the_day_it_chose(
    celery_worker: object, smtp_server: SmtpServer, settings
) -> None:
    settings.ADMINS = [("Ops", "ops@example.com")]
    smtp_server.set_failure(rcpt=(550, "5.1.1 no such mailbox"), times=None)

    result = daily_report.delay()
    with pytest.raises(Exception, match="refused for good"):
        result.get(timeout=30)

    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert letter.attempts == 1
    assert letter.kwargs == {"day": service.yesterday().isoformat()}  # a replay reports the same day
    assert "ops@example.com" not in letter.exception_message
    assert not smtp_server.messages


def test_the_admin_recomputes_the_selected_days(celery_worker: object, admin_client) -> None:
    day = date(2026, 5, 3)
    metric = DailyMetric.objects.create(day=day, event_name="view", count=99, distinct_users=99)
    service.ingest_events([event("view", datetime(2026, 5, 3, 12, tzinfo=UTC), "a")])

    response = admin_client.post(
        "/admin/tasks/dailymetric/",
        {"action": "recompute_days", "_selected_action": [metric.pk]},
        follow=True,
    )

    assert "Queued a recompute of 1 day(s): 2026-05-03." in response.content.decode()
    assert wait_for(lambda: metric_rows() == {(day, "view", 1, 1)})
