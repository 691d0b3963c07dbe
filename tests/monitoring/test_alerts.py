"""Each alert rule fires on a situation built for it, stays quiet otherwise; repeat and recovery.

Notices go through Django's SMTP backend to a real SMTP server on loopback.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery
from django.utils import timezone
from django_celery_beat.models import CrontabSchedule, PeriodicTask

from monitoring import alerts
from monitoring.models import Alert, AlertRule
from scheduling.models import ScheduledRun
from tasks.models import DeadLetter
from tests.monitoring.conftest import add_metric_row
from tests.smtp import SmtpServer

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def admins(settings, smtp_server: SmtpServer) -> SmtpServer:
    settings.ADMINS = [("Ops", "ops@example.com")]
    return smtp_server


def rule(kind: str, **values: object) -> AlertRule:
    alerts.ensure_rules()
    AlertRule.objects.filter(kind=kind).update(**values)
    return AlertRule.objects.get(kind=kind)


def add_runs(task: str, queue: str, *, ok: int, failed: int = 0, wait: float = 0.004) -> None:
    assert task.startswith(f"{queue}.")
    add_metric_row(task, succeeded=ok, failed=failed, run=0.1, wait=wait)


def subjects(kind: str) -> set[str]:
    return set(Alert.objects.filter(rule__kind=kind, resolved_at=None).values_list("subject", flat=True))


def test_failure_rate_fires_once_repeats_after_the_interval_and_recovers(admins: SmtpServer) -> None:
    rule(AlertRule.Kind.FAILURE_RATE, threshold=1, min_runs=20, repeat_minutes=10, window_minutes=15)
    add_runs("email.send", "email", ok=95, failed=5)  # 5% > 1%: fires
    add_runs("images.process", "images", ok=100)  # no failure
    add_runs("data_sync.sync", "data_sync", ok=5, failed=5)  # 50%, but too few runs to judge
    now = timezone.now()

    first = alerts.evaluate(now, kinds=[AlertRule.Kind.FAILURE_RATE])
    assert first.fired == ["failure_rate:email.send"]
    [mail] = admins.wait_for_messages(1)
    assert mail.subject.startswith("[jobs] FIRING: email.send: 5 of 100 runs failed")
    assert mail.envelope_to == ["ops@example.com"]

    # A minute later: still firing, but inside the repeat interval: no new notice.
    again = alerts.evaluate(now + timedelta(minutes=1), kinds=[AlertRule.Kind.FAILURE_RATE])
    assert (again.fired, again.repeated) == ([], [])
    # Past the interval (the runs still in the window): one reminder.
    later = alerts.evaluate(now + timedelta(minutes=11), kinds=[AlertRule.Kind.FAILURE_RATE])
    assert later.repeated == ["failure_rate:email.send"]
    messages = admins.wait_for_messages(2)
    assert messages[1].subject.startswith("[jobs] STILL FIRING: email.send")
    assert Alert.objects.get().notifications == 2

    # The failures leave the window: recovered, with a notice; history keeps the alert.
    recovered = alerts.evaluate(now + timedelta(minutes=30), kinds=[AlertRule.Kind.FAILURE_RATE])
    assert recovered.resolved == ["failure_rate:email.send"]
    assert admins.wait_for_messages(3)[2].subject.startswith("[jobs] RECOVERED: failure rate")
    assert Alert.objects.get().resolved_at is not None
    assert subjects(AlertRule.Kind.FAILURE_RATE) == set()


def test_queue_wait_fires_for_the_slow_queue_only() -> None:
    rule(AlertRule.Kind.QUEUE_WAIT, threshold=100, min_runs=20)
    add_runs("email.send", "email", ok=30, wait=0.3)  # p95 ~ 300 ms
    add_runs("images.process", "images", ok=30, wait=0.004)

    alerts.evaluate(kinds=[AlertRule.Kind.QUEUE_WAIT])

    assert subjects(AlertRule.Kind.QUEUE_WAIT) == {"email"}
    value = Alert.objects.get().value
    assert value is not None and value > 100


def test_backlog_fires_when_a_queue_holds_more_than_the_threshold(
    celery_app: Celery, empty_queues: None
) -> None:
    rule(AlertRule.Kind.BACKLOG, threshold=3)
    for _ in range(5):
        celery_app.send_task("analytics.probe")  # nobody consumes `analytics` in this test
    celery_app.send_task("images.probe")

    alerts.evaluate(kinds=[AlertRule.Kind.BACKLOG])
    assert subjects(AlertRule.Kind.BACKLOG) == {"analytics"}

    celery_app.control.purge()
    assert alerts.evaluate(kinds=[AlertRule.Kind.BACKLOG]).resolved == ["backlog:analytics"]


@pytest.mark.integration
def test_no_worker_fires_for_each_queue_nobody_consumes(worker_process) -> None:
    rule(AlertRule.Kind.NO_WORKER)
    alerts.evaluate(kinds=[AlertRule.Kind.NO_WORKER])
    assert subjects(AlertRule.Kind.NO_WORKER) == {"email", "images", "data_sync", "analytics", "default"}

    worker_process("alerts", "-Q", "email,images", "--pool=solo")
    result = alerts.evaluate(kinds=[AlertRule.Kind.NO_WORKER])

    assert sorted(result.resolved) == ["no_worker:email", "no_worker:images"]
    assert subjects(AlertRule.Kind.NO_WORKER) == {"data_sync", "analytics", "default"}


def test_missed_run_fires_for_a_schedule_whose_due_run_was_not_sent() -> None:
    rule(AlertRule.Kind.MISSED_RUN)
    every_minute = CrontabSchedule.objects.create(minute="*", hour="*", timezone="UTC")
    PeriodicTask.objects.create(name="probe every minute", task="default.ping", crontab=every_minute)
    PeriodicTask.objects.filter(name="probe every minute").update(
        date_changed=timezone.now() - timedelta(hours=1)
    )
    now = timezone.now()

    alerts.evaluate(now, kinds=[AlertRule.Kind.MISSED_RUN])
    assert subjects(AlertRule.Kind.MISSED_RUN) == {"probe every minute"}
    assert "was not sent" in Alert.objects.get().message

    # Beat sends the next one: recovered.
    due = (now + timedelta(minutes=1) - timedelta(seconds=120)).replace(second=0, microsecond=0)
    ScheduledRun.objects.create(
        schedule_name="probe every minute", task="default.ping", occurrence=due, dispatched_at=due, beat="t"
    )
    result = alerts.evaluate(now + timedelta(minutes=1), kinds=[AlertRule.Kind.MISSED_RUN])
    assert result.resolved == ["missed_run:probe every minute"]


def test_a_disabled_schedule_or_one_just_created_is_not_missing_anything() -> None:
    rule(AlertRule.Kind.MISSED_RUN)
    every_minute = CrontabSchedule.objects.create(minute="*", hour="*", timezone="UTC")
    PeriodicTask.objects.create(name="new", task="default.ping", crontab=every_minute)
    PeriodicTask.objects.create(name="off", task="default.ping", crontab=every_minute, enabled=False)
    PeriodicTask.objects.filter(name="off").update(date_changed=timezone.now() - timedelta(hours=1))

    assert alerts.evaluate(kinds=[AlertRule.Kind.MISSED_RUN]).fired == []


def test_dead_letters_fire_when_new_ones_arrive_and_recover_when_replayed() -> None:
    rule(AlertRule.Kind.DEAD_LETTERS, threshold=0, window_minutes=15)
    assert alerts.evaluate(kinds=[AlertRule.Kind.DEAD_LETTERS]).fired == []
    now = timezone.now()
    letter = DeadLetter.objects.create(
        task_id="t1", task_name="email.send", exception_type="X", first_failed_at=now, last_failed_at=now
    )

    assert alerts.evaluate(kinds=[AlertRule.Kind.DEAD_LETTERS]).fired == ["dead_letters:dead letters"]
    letter.replayed_at = timezone.now()
    letter.save()
    assert alerts.evaluate(kinds=[AlertRule.Kind.DEAD_LETTERS]).resolved == ["dead_letters:dead letters"]


def test_a_disabled_rule_resolves_what_it_had_open_and_fires_nothing() -> None:
    rule(AlertRule.Kind.FAILURE_RATE, threshold=1, min_runs=1)
    add_runs("email.send", "email", ok=1, failed=1)
    assert alerts.evaluate(kinds=[AlertRule.Kind.FAILURE_RATE]).fired == ["failure_rate:email.send"]

    AlertRule.objects.filter(kind=AlertRule.Kind.FAILURE_RATE).update(enabled=False)
    result = alerts.evaluate(kinds=[AlertRule.Kind.FAILURE_RATE])
    assert (result.fired, result.resolved) == ([], ["failure_rate:email.send"])


def test_rules_are_created_from_settings_once_and_then_left_as_edited(settings) -> None:
    settings.ALERT_BACKLOG_MESSAGES = 50
    alerts.ensure_rules()
    assert AlertRule.objects.get(kind=AlertRule.Kind.BACKLOG).threshold == 50
    AlertRule.objects.filter(kind=AlertRule.Kind.BACKLOG).update(threshold=7)
    settings.ALERT_BACKLOG_MESSAGES = 99
    alerts.ensure_rules()
    assert AlertRule.objects.get(kind=AlertRule.Kind.BACKLOG).threshold == 7
    assert AlertRule.objects.count() == len(AlertRule.Kind)


def test_the_admin_edits_rules_and_shows_the_history(client, admin_user) -> None:
    alerts.ensure_rules()
    backlog = AlertRule.objects.get(kind=AlertRule.Kind.BACKLOG)
    client.force_login(admin_user)

    page = client.get(f"/admin/monitoring/alertrule/{backlog.pk}/change/")
    assert page.status_code == 200
    response = client.post(
        f"/admin/monitoring/alertrule/{backlog.pk}/change/",
        {
            "enabled": "on",
            "threshold": "250",
            "window_minutes": "5",
            "min_runs": "10",
            "repeat_minutes": "30",
        },
    )
    assert response.status_code == 302
    backlog.refresh_from_db()
    assert (backlog.threshold, backlog.window_minutes, backlog.repeat_minutes) == (250, 5, 30)

    Alert.objects.create(
        rule=backlog,
        subject="email",
        message="queue email: 300 messages waiting",
        started_at=timezone.now(),
        last_notified_at=timezone.now(),
    )
    history = client.get("/admin/monitoring/alert/").content.decode()
    assert 'class="field-subject">email<' in history
