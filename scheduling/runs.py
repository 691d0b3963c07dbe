"""Which schedules missed a run: what the monitoring alert rule asks the scheduling app."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django_celery_beat.models import PeriodicTask

from scheduling.beat import schedule_of
from scheduling.models import ScheduledRun


@dataclass(frozen=True)
class MissedRun:
    schedule: str
    task: str
    due: datetime
    status: str  # "not sent", or the run's status (skipped, refused)


def missed_runs(now: datetime, grace: timedelta) -> list[MissedRun]:
    """Enabled cron and interval schedules whose latest run due before `now - grace` was not sent.

    A run due before the schedule was last changed (or created) does not count.
    """
    moment = now - grace
    found = []
    tasks = PeriodicTask.objects.filter(enabled=True).exclude(crontab=None, interval=None)
    for model in tasks.select_related("crontab", "interval"):
        schedule = schedule_of(model, None)
        due = schedule.occurrence(moment)
        if due > moment or due < model.date_changed or (model.start_time and due < model.start_time):
            continue
        run = (
            ScheduledRun.objects.filter(
                schedule_name=model.name, occurrence=due, kind=ScheduledRun.Kind.SCHEDULED
            )
            .values_list("status", flat=True)
            .first()
        )
        if run != ScheduledRun.Status.DISPATCHED:
            found.append(MissedRun(model.name, model.task, due, run or "not sent"))
    return found
