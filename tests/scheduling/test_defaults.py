"""Default schedules: synced from code, never over a person's edit."""

from __future__ import annotations

import dataclasses
import json

import pytest
from django.core.management import CommandError, call_command
from django_celery_beat.models import PeriodicTask

from scheduling import defaults
from scheduling.defaults import DEFAULT_SCHEDULES, crontab_for, sync
from scheduling.models import ScheduleOptions

pytestmark = [pytest.mark.django_db]


def as_rows() -> dict[str, tuple[str, str, str, str, dict[str, object], bool, str]]:
    rows = {}
    for task in PeriodicTask.objects.select_related("crontab"):
        crontab = task.crontab
        cron = " ".join(
            (crontab.minute, crontab.hour, crontab.day_of_month, crontab.month_of_year, crontab.day_of_week)
        )
        rows[task.name] = (
            task.task,
            cron,
            str(crontab.timezone),
            task.description[:20],
            json.loads(task.kwargs),
            task.enabled,
            ScheduleOptions.objects.filter(pk=task.pk).values_list("missed_runs", flat=True).first() or "",
        )
    return rows


def test_the_first_sync_creates_the_defaults_in_the_project_time_zone(settings) -> None:
    settings.TIME_ZONE = "Europe/Berlin"

    report = sync()

    assert report == [f"{default.name}: created" for default in DEFAULT_SCHEDULES]
    rows = as_rows()
    assert {name: row[:3] for name, row in rows.items()} == {
        "analytics: nightly roll-up": ("analytics.aggregate_daily", "0 2 * * *", "Europe/Berlin"),
        "data sync: hourly export": ("data_sync.export", "0 * * * *", "Europe/Berlin"),
        "maintenance: clean-up": ("default.cleanup", "0 */6 * * *", "Europe/Berlin"),
        "email: weekly newsletter": ("email.weekly_newsletter", "0 10 * * 5", "Europe/Berlin"),
        "monitoring: metrics roll-up": ("default.metrics_rollup", "* * * * *", "Europe/Berlin"),
        "jobs: release delayed jobs": ("default.release_jobs", "* * * * *", "Europe/Berlin"),
        "monitoring: alerts": ("default.check_alerts", "* * * * *", "Europe/Berlin"),
    }
    assert rows["email: weekly newsletter"][6] == "skip"
    assert rows["analytics: nightly roll-up"][6] == "run_once"


def test_a_second_sync_changes_nothing() -> None:
    sync()
    before = as_rows()

    assert sync() == [f"{default.name}: unchanged" for default in DEFAULT_SCHEDULES]
    assert as_rows() == before


def test_a_default_nobody_touched_follows_the_code() -> None:
    sync()
    moved = tuple(
        dataclasses.replace(default, cron="30 3 * * *") if default.task == "default.cleanup" else default
        for default in DEFAULT_SCHEDULES
    )

    report = sync(moved)

    assert "maintenance: clean-up: updated from the code" in report
    assert as_rows()["maintenance: clean-up"][1] == "30 3 * * *"


def test_an_edit_made_in_the_admin_survives_every_later_sync() -> None:
    sync()
    task = PeriodicTask.objects.get(name="analytics: nightly roll-up")
    task.crontab = crontab_for("45 4 * * *", "America/New_York")  # what the admin form does
    task.save()
    newsletter = PeriodicTask.objects.get(name="email: weekly newsletter")
    newsletter.enabled = False
    newsletter.save()
    ScheduleOptions.objects.filter(periodic_task__name="data sync: hourly export").update(missed_runs="skip")
    changed_in_code = tuple(dataclasses.replace(default, cron="0 1 * * *") for default in DEFAULT_SCHEDULES)

    report = sync(changed_in_code)

    assert report == [
        "analytics: nightly roll-up: edited in the admin; left as edited",
        "data sync: hourly export: edited in the admin; left as edited",
        "maintenance: clean-up: updated from the code",
        "email: weekly newsletter: edited in the admin; left as edited",
        "monitoring: metrics roll-up: updated from the code",
        "jobs: release delayed jobs: updated from the code",
        "monitoring: alerts: updated from the code",
    ]
    rows = as_rows()
    assert rows["analytics: nightly roll-up"][1:3] == ("45 4 * * *", "America/New_York")
    assert rows["email: weekly newsletter"][5] is False
    assert rows["data sync: hourly export"][1] == "0 * * * *"
    assert rows["maintenance: clean-up"][1] == "0 1 * * *"


def test_beat_writing_its_last_run_is_not_an_edit() -> None:
    sync()
    PeriodicTask.objects.filter(name="maintenance: clean-up").update(
        total_run_count=7, last_run_at="2026-11-23T06:00Z"
    )

    assert "maintenance: clean-up: unchanged" in sync()


def test_a_default_deleted_in_the_admin_stays_deleted_until_reset(capsys: pytest.CaptureFixture[str]) -> None:
    sync()
    PeriodicTask.objects.get(name="email: weekly newsletter").delete()

    assert "email: weekly newsletter: deleted in the admin; not created again (--reset to restore)" in sync()
    assert not PeriodicTask.objects.filter(name="email: weekly newsletter").exists()

    call_command("sync_schedules", "--reset", "email: weekly newsletter")
    assert "email: weekly newsletter: reset to the code's definition" in capsys.readouterr().out
    assert as_rows()["email: weekly newsletter"][1] == "0 10 * * 5"
    assert "email: weekly newsletter: unchanged" in sync()


def test_a_schedule_of_the_same_name_that_sync_did_not_write_is_left_alone() -> None:
    PeriodicTask.objects.create(
        name="maintenance: clean-up", task="default.cleanup", crontab=crontab_for("0 5 * * *", "UTC")
    )

    assert "maintenance: clean-up: exists, but sync did not write it; left alone" in sync()
    assert as_rows()["maintenance: clean-up"][1] == "0 5 * * *"


def test_reset_refuses_an_unknown_name() -> None:
    with pytest.raises(CommandError, match="no default schedule named 'nightly'"):
        call_command("sync_schedules", "--reset", "nightly")


def test_every_default_names_a_registered_task_with_valid_arguments() -> None:
    from config.celery_app import app
    from tasks.base import JobTask

    for default in defaults.DEFAULT_SCHEDULES:
        task = app.tasks[default.task]
        assert isinstance(task, JobTask), default.task
        task.validate_arguments([], default.kwargs)
