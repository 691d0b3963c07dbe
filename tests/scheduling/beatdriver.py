"""Drives the real beat scheduler with a controlled clock, against the real database and broker.

Only the wall clock is controlled: the scheduler, its database queries and the messages
it publishes are the production ones. Each `tick()` is what `celery beat` calls in its loop.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from scheduling import beat
from scheduling.beat import OCCURRENCE_HEADER, Scheduler
from scheduling.defaults import crontab_for
from scheduling.models import ScheduledRun, ScheduleOptions


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def add_cron(
    name: str,
    expression: str,
    zone: str = "UTC",
    *,
    missed_runs: str = "run_once",
    task: str = "default.ping",
) -> PeriodicTask:
    periodic = PeriodicTask.objects.create(
        name=name, task=task, crontab=crontab_for(expression, zone), last_run_at=beat.current_time()
    )
    ScheduleOptions.objects.create(periodic_task=periodic, missed_runs=missed_runs)
    return periodic


def add_interval(name: str, seconds: int, task: str = "default.ping") -> PeriodicTask:
    every, _ = IntervalSchedule.objects.get_or_create(every=seconds, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(name=name, task=task, interval=every, last_run_at=beat.current_time())


class Clock:
    """The scheduler's clock, held at a moment the test chooses (scheduling.beat.clock)."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def move_to(self, moment: datetime) -> None:
        self.now = moment

    def __enter__(self) -> Clock:
        beat.clock = self
        return self

    def __exit__(self, *exc: object) -> None:
        beat.clock = beat.system_now


def run_until(scheduler: Scheduler, clock: Clock, until: datetime) -> None:
    """Lets beat run until `until`, jumping the clock to each moment beat asks to wake up at."""
    while clock.now < until:
        delay = scheduler.tick()
        # Real time passes between two ticks too (beat's sleep rounds to ~0 s a wait of 10 ms).
        clock.move_to(min(clock.now + timedelta(seconds=max(delay, 0.05)), until))


def dispatched(name: str | None = None) -> list[datetime]:
    runs = ScheduledRun.objects.filter(
        status=ScheduledRun.Status.DISPATCHED, kind=ScheduledRun.Kind.SCHEDULED
    )
    if name is not None:
        runs = runs.filter(schedule_name=name)
    return sorted(runs.values_list("occurrence", flat=True))


def drain(app: Celery, queue: str = "default") -> list[dict[str, Any]]:
    """Takes every message off a queue of the real broker: what beat really sent."""
    messages = []
    with app.connection_for_read() as connection:
        # The queue as the app declares it (its arguments, e.g. x-max-priority): RabbitMQ refuses
        # a second declaration of the same queue with other arguments.
        simple = connection.SimpleQueue(app.amqp.queues[queue], no_ack=True)  # type: ignore[arg-type]
        try:
            while True:
                try:
                    message = simple.get(block=True, timeout=0.5)
                except simple.Empty:
                    break
                headers = message.headers or {}
                messages.append(
                    {
                        "task": headers.get("task"),
                        "id": headers.get("id"),
                        "occurrence": headers.get(OCCURRENCE_HEADER),
                        "periodic_task_name": headers.get("periodic_task_name"),
                        "kwargs": message.decode()[1],
                    }
                )
        finally:
            simple.close()
    return messages
