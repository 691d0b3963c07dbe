"""The schedules this project ships with, and how they reach the database.

`python manage.py sync_schedules` (run by the release step and by bin/run) writes
DEFAULT_SCHEDULES into django-celery-beat's tables. It never overwrites a person's
edit: for each default it stores the fingerprint of the row as it wrote it
(ManagedSchedule). On the next sync a row whose fingerprint still matches was not
touched by anybody, so it is brought up to date with the code; a row whose
fingerprint differs was edited in the admin (schedule, time zone, arguments,
enabled, missed-run policy...) and is left as edited; a default whose row was
deleted in the admin is not created again. `sync_schedules --reset NAME` puts one
back to the code's definition.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import transaction
from django_celery_beat.models import CrontabSchedule, PeriodicTask, PeriodicTasks

from scheduling.cron import Cron
from scheduling.models import ManagedSchedule, MissedRuns, ScheduleOptions


@dataclass(frozen=True)
class DefaultSchedule:
    name: str
    task: str
    cron: str  # minute hour day-of-month month day-of-week
    description: str
    timezone: str | None = None  # None: the project's TIME_ZONE
    kwargs: dict[str, Any] = field(default_factory=dict)
    missed_runs: str = MissedRuns.RUN_ONCE

    @property
    def zone(self) -> str:
        return self.timezone or settings.TIME_ZONE


DEFAULT_SCHEDULES = (
    DefaultSchedule(
        name="analytics: nightly roll-up",
        task="analytics.aggregate_daily",
        cron="0 2 * * *",
        description="Rolls yesterday's events up into daily counts (day left out: yesterday).",
    ),
    DefaultSchedule(
        name="data sync: hourly export",
        task="data_sync.export",
        cron="0 * * * *",
        description="Writes the records changed since the last export, of every source, to a file.",
    ),
    DefaultSchedule(
        name="maintenance: clean-up",
        task="default.cleanup",
        cron="0 */6 * * *",
        description="Deletes expired results, dead letters, logs, sync runs, events and run history.",
    ),
    DefaultSchedule(
        name="email: weekly newsletter",
        task="email.weekly_newsletter",
        cron="0 10 * * 5",
        description="Sends this week's newsletter to the members of the 'newsletter' group.",
        kwargs={"group": "newsletter", "template": "newsletter", "context": {"title": "This week"}},
        # Sent late on a Saturday night is worse than not sent: wait for next Friday.
        missed_runs=MissedRuns.SKIP,
    ),
    DefaultSchedule(
        name="monitoring: metrics roll-up",
        task="default.metrics_rollup",
        cron="* * * * *",
        description="Moves the last minutes' task counters from Redis into the metrics tables.",
    ),
    DefaultSchedule(
        name="jobs: release delayed jobs",
        task="default.release_jobs",
        cron="* * * * *",
        description="Queues API jobs whose delay is (nearly) over or whose publish was interrupted; "
        "re-sends queue pauses to the workers.",
        missed_runs=MissedRuns.SKIP,
    ),
    DefaultSchedule(
        name="monitoring: alerts",
        task="default.check_alerts",
        cron="* * * * *",
        description="Evaluates the alert rules; mails the admins when one fires, repeats or recovers.",
        # A check that comes late is stale: the next one is a minute away.
        missed_runs=MissedRuns.SKIP,
    ),
)


def fingerprint(task: PeriodicTask) -> str:
    """What a person could change about a schedule, hashed."""
    crontab = task.crontab
    try:
        missed = task.schedule_options.missed_runs
    except ScheduleOptions.DoesNotExist:
        missed = None
    state = {
        "task": task.task,
        "cron": None
        if crontab is None
        else [crontab.minute, crontab.hour, crontab.day_of_month, crontab.month_of_year, crontab.day_of_week],
        "timezone": None if crontab is None else str(crontab.timezone),
        "interval": task.interval_id,
        "solar": task.solar_id,
        "clocked": task.clocked_id,
        "args": json.loads(task.args or "[]"),
        "kwargs": json.loads(task.kwargs or "{}"),
        "enabled": task.enabled,
        "queue": task.queue,
        "priority": task.priority,
        "one_off": task.one_off,
        "expires": task.expires.isoformat() if task.expires else None,
        "start_time": task.start_time.isoformat() if task.start_time else None,
        "description": task.description,
        "missed_runs": missed,
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def crontab_for(expression: str, zone: str) -> CrontabSchedule:
    """The CrontabSchedule row for an expression, shared by every task that uses the same one."""
    cron = Cron.parse(expression, zone)
    crontab, _ = CrontabSchedule.objects.get_or_create(
        minute=cron.minute,
        hour=cron.hour,
        day_of_month=cron.day_of_month,
        month_of_year=cron.month_of_year,
        day_of_week=cron.day_of_week,
        timezone=zone,
    )
    return crontab


def _write(task: PeriodicTask, default: DefaultSchedule) -> None:
    task.task = default.task
    task.crontab = crontab_for(default.cron, default.zone)
    task.interval = task.solar = task.clocked = None
    task.args = "[]"
    task.kwargs = json.dumps(default.kwargs, sort_keys=True)
    task.description = default.description
    task.enabled = True
    task.save()
    ScheduleOptions.objects.update_or_create(
        periodic_task=task, defaults={"missed_runs": default.missed_runs}
    )


def sync(
    defaults: tuple[DefaultSchedule, ...] = DEFAULT_SCHEDULES, reset: frozenset[str] = frozenset()
) -> list[str]:
    """Brings the default schedules into the database; one line per schedule saying what happened."""
    report = []
    with transaction.atomic():
        for default in defaults:
            managed = ManagedSchedule.objects.filter(name=default.name).first()
            task = PeriodicTask.objects.select_related("crontab").filter(name=default.name).first()
            if default.name in reset:
                task = task or PeriodicTask(name=default.name)
                _write(task, default)
                outcome = "reset to the code's definition"
            elif task is None and managed is not None:
                report.append(f"{default.name}: deleted in the admin; not created again (--reset to restore)")
                continue
            elif task is None:
                _write(PeriodicTask(name=default.name), default)
                outcome = "created"
            elif managed is None:
                report.append(f"{default.name}: exists, but sync did not write it; left alone")
                continue
            elif fingerprint(task) != managed.fingerprint:
                report.append(f"{default.name}: edited in the admin; left as edited")
                continue
            else:
                before = managed.fingerprint
                _write(task, default)
                outcome = "unchanged" if fingerprint(task) == before else "updated from the code"
            task = PeriodicTask.objects.select_related("crontab").get(name=default.name)
            ManagedSchedule.objects.update_or_create(
                name=default.name, defaults={"fingerprint": fingerprint(task)}
            )
            report.append(f"{default.name}: {outcome}")
        PeriodicTasks.update_changed()
    return report
