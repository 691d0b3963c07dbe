"""The beat scheduler under a controlled clock: DST, missed runs, split brain, edits.

Real scheduler, real database, real broker (messages are read back off the queue);
only the scheduler's clock is moved, so days pass in a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest
from celery import Celery
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_celery_beat.models import PeriodicTask

from scheduling.beat import Scheduler
from scheduling.defaults import crontab_for
from scheduling.models import ScheduledRun
from tests.scheduling.beatdriver import Clock, add_cron, add_interval, dispatched, drain, run_until, utc

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def make_scheduler(celery_app: Celery, empty_queues: None) -> Iterator[Callable[[], Scheduler]]:
    made: list[Scheduler] = []

    def make() -> Scheduler:
        scheduler = Scheduler(
            app=celery_app, max_interval=3600
        )  # sleeps until the next run: days in few ticks
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        scheduler.close()
    celery_app.control.purge()


def local(moments: list[datetime], zone: str) -> list[str]:
    from zoneinfo import ZoneInfo

    return [moment.astimezone(ZoneInfo(zone)).strftime("%m-%d %H:%M %Z") for moment in moments]


def test_a_0130_new_york_job_is_sent_once_on_the_night_clocks_fall_back(
    make_scheduler: Callable[[], Scheduler], celery_app: Celery
) -> None:
    with Clock(utc(2026, 10, 30, 12)) as clock:
        add_cron("nightly", "30 1 * * *", "America/New_York")
        run_until(make_scheduler(), clock, utc(2026, 11, 2, 12))

    assert local(dispatched("nightly"), "America/New_York") == [
        "10-31 01:30 EDT",
        "11-01 01:30 EDT",
        "11-02 01:30 EST",
    ]
    sent = drain(celery_app)
    assert sorted(message["occurrence"] for message in sent) == [
        "2026-10-31T05:30:00+00:00",
        "2026-11-01T05:30:00+00:00",
        "2026-11-02T06:30:00+00:00",
    ]
    assert {message["task"] for message in sent} == {"default.ping"}


def test_a_0230_new_york_job_runs_at_0330_on_the_night_clocks_spring_forward(
    make_scheduler: Callable[[], Scheduler],
) -> None:
    with Clock(utc(2026, 3, 6, 12)) as clock:
        add_cron("early", "30 2 * * *", "America/New_York")
        run_until(make_scheduler(), clock, utc(2026, 3, 9, 12))

    assert local(dispatched("early"), "America/New_York") == [
        "03-07 02:30 EST",
        "03-08 03:30 EDT",
        "03-09 02:30 EDT",
    ]


def test_berlin_jobs_across_both_changes(make_scheduler: Callable[[], Scheduler]) -> None:
    with Clock(utc(2026, 3, 28, 0)) as clock:
        add_cron("hourly", "30 * * * *", "Europe/Berlin")
        add_cron("daily", "30 2 * * *", "Europe/Berlin")
        scheduler = make_scheduler()
        run_until(scheduler, clock, utc(2026, 3, 29, 4))
        clock.move_to(utc(2026, 10, 24, 20))  # beat "sleeps" through the summer: one catch-up run each
        run_until(scheduler, clock, utc(2026, 10, 25, 4))

    daily = local(dispatched("daily"), "Europe/Berlin")
    assert daily == ["03-28 02:30 CET", "03-29 03:30 CEST", "10-24 02:30 CEST", "10-25 02:30 CEST"]
    hourly = local(dispatched("hourly"), "Europe/Berlin")
    spring = [run for run in hourly if run.startswith("03-29")]
    assert spring == [
        "03-29 00:30 CET",
        "03-29 01:30 CET",
        "03-29 03:30 CEST",
        "03-29 04:30 CEST",
        "03-29 05:30 CEST",
    ]
    autumn = [run for run in hourly if run.startswith("10-25")]
    assert autumn == [
        "10-25 00:30 CEST",
        "10-25 01:30 CEST",
        "10-25 02:30 CEST",
        "10-25 02:30 CET",
        "10-25 03:30 CET",
        "10-25 04:30 CET",
    ]
    assert len(hourly) == len(set(hourly))


def test_after_a_downtime_a_task_runs_once_not_once_per_missed_run(
    make_scheduler: Callable[[], Scheduler],
) -> None:
    with Clock(utc(2026, 11, 20, 0, 0, 30)) as clock:
        add_cron("every-hour", "0 * * * *", missed_runs="run_once")
        add_cron("every-hour-skip", "0 * * * *", missed_runs="skip")
        clock.move_to(utc(2026, 11, 23, 9, 20))  # beat was down for three days
        run_until(make_scheduler(), clock, utc(2026, 11, 23, 10, 30))

    assert dispatched("every-hour") == [utc(2026, 11, 23, 9), utc(2026, 11, 23, 10)]
    assert dispatched("every-hour-skip") == [utc(2026, 11, 23, 10)]
    skipped = ScheduledRun.objects.get(schedule_name="every-hour-skip", status=ScheduledRun.Status.SKIPPED)
    assert skipped.occurrence == utc(2026, 11, 23, 9)
    assert "policy is skip" in skipped.detail


class SplitBrain:
    """Stands in for the lease to play a network partition: both beats believe they lead."""

    renew_every = 5.0

    def hold(self) -> bool:
        return True

    def release(self) -> None:
        pass


def test_two_beats_that_both_think_they_lead_still_send_each_occurrence_once(
    make_scheduler: Callable[[], Scheduler], celery_app: Celery
) -> None:
    with Clock(utc(2026, 11, 23, 10, 0, 1)) as clock:
        add_cron("minutely", "* * * * *")
        add_interval("every-20s", 20)
        first, second = make_scheduler(), make_scheduler()
        first.lease = second.lease = SplitBrain()  # type: ignore[assignment]
        end = clock.now + timedelta(minutes=10)
        while clock.now < end:  # the two interleave, each waking every second
            for scheduler in (first, second, second, first):
                scheduler.tick()
            clock.move_to(clock.now + timedelta(seconds=1))

    minutely, every_20s = dispatched("minutely"), dispatched("every-20s")
    assert len(minutely) == 10 and len(set(minutely)) == 10
    assert len(every_20s) == 30 and len(set(every_20s)) == 30
    sent = drain(celery_app)
    assert len(sent) == 40  # what reached the broker: once per occurrence, not twice
    assert len({message["id"] for message in sent}) == 40
    beats = set(ScheduledRun.objects.values_list("beat", flat=True))
    assert len(beats) == 1  # both ran in this process: the claim, not luck, kept them apart
    assert ScheduledRun.objects.count() == 40


def test_a_task_with_arguments_is_sent_with_them_and_bad_ones_are_refused_not_retried(
    make_scheduler: Callable[[], Scheduler], celery_app: Celery
) -> None:
    with Clock(utc(2026, 11, 23, 10, 0, 1)) as clock:
        good = add_cron("cleanup", "*/5 * * * *", task="default.cleanup")
        good.kwargs = '{"kinds": ["dead_letters"]}'
        good.save()
        bad = add_cron("bad", "*/5 * * * *", task="default.cleanup")
        bad.kwargs = '{"kinds": ["everything"]}'
        bad.save()
        run_until(make_scheduler(), clock, utc(2026, 11, 23, 10, 6))

    [sent] = drain(celery_app)
    assert sent["task"] == "default.cleanup" and sent["kwargs"] == {"kinds": ["dead_letters"]}
    assert sent["periodic_task_name"] == "cleanup"
    refused = ScheduledRun.objects.get(schedule_name="bad")
    assert refused.status == ScheduledRun.Status.REFUSED
    assert "field 'kinds.0'" in refused.detail


def test_a_thousand_schedules_due_together_are_claimed_in_one_statement_and_sent_once_by_two_racing_beats(
    make_scheduler: Callable[[], Scheduler], celery_app: Celery
) -> None:
    start = utc(2026, 11, 23, 10, 0, 30)
    with Clock(start) as clock:
        every_minute = crontab_for("* * * * *", "UTC")
        PeriodicTask.objects.bulk_create(
            PeriodicTask(
                name=f"minutely {n:04d}", task="default.ping", crontab=every_minute, last_run_at=clock.now
            )
            for n in range(1000)
        )
        first, second = make_scheduler(), make_scheduler()
        first.lease = second.lease = SplitBrain()  # type: ignore[assignment]
        first.tick(), second.tick()  # both read the schedules; nothing is due before 10:01
        assert ScheduledRun.objects.count() == 0
        clock.move_to(utc(2026, 11, 23, 10, 1, 0) + timedelta(milliseconds=500))
        with CaptureQueriesContext(connection) as queries:
            first.tick()
        second.tick()  # it finds every occurrence claimed already
        for _ in range(3):
            first.tick(), second.tick()

    claims = [query for query in queries if query["sql"].startswith('INSERT INTO "scheduling_scheduledrun"')]
    assert len(claims) == 1  # 1,000 claims, one statement
    runs = ScheduledRun.objects.filter(
        kind=ScheduledRun.Kind.SCHEDULED, status=ScheduledRun.Status.DISPATCHED
    )
    assert runs.count() == 1000
    assert runs.values("schedule_name").distinct().count() == 1000
    assert set(runs.values_list("occurrence", flat=True)) == {utc(2026, 11, 23, 10, 1)}
    sent = drain(celery_app)
    assert len(sent) == 1000 and len({message["id"] for message in sent}) == 1000
    assert {message["id"] for message in sent} == set(runs.values_list("task_id", flat=True))
