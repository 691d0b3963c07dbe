"""What this app adds to django-celery-beat's tables.

- `ScheduleOptions`: per periodic task, what to do about runs missed while beat was down.
- `ScheduledRun`: one row per occurrence beat dispatched (or skipped), unique per
  (schedule, occurrence): the key that makes an occurrence run at most once, even
  with two beats, and the history behind "last run" in the admin.
- `ManagedSchedule`: the fingerprint of each default schedule as `sync_schedules`
  last wrote it, to tell a schedule nobody touched from one a person edited.
- `BeatLease`: the lease the dispatching beat holds and renews.
"""

from __future__ import annotations

from django.db import models
from django_celery_beat.models import PeriodicTask


class MissedRuns(models.TextChoices):
    RUN_ONCE = "run_once", "Run once (however many were missed)"
    SKIP = "skip", "Skip (wait for the next one)"


class ScheduleOptions(models.Model):
    periodic_task = models.OneToOneField(
        PeriodicTask, on_delete=models.CASCADE, primary_key=True, related_name="schedule_options"
    )
    missed_runs = models.CharField(
        max_length=10,
        choices=MissedRuns.choices,
        default=MissedRuns.RUN_ONCE,
        help_text="When beat comes back after missing this task's runs: run it once, "
        "or skip to the next run. Never a burst.",
    )

    class Meta:
        verbose_name = "schedule options"
        verbose_name_plural = "schedule options"

    def __str__(self) -> str:
        return f"options of {self.periodic_task_id}"


class ScheduledRun(models.Model):
    class Kind(models.TextChoices):
        SCHEDULED = "scheduled"
        MANUAL = "manual", "run now"

    class Status(models.TextChoices):
        DISPATCHED = "dispatched"
        SKIPPED = "skipped", "skipped (missed)"
        REFUSED = "refused", "refused (invalid)"

    schedule_name = models.CharField(max_length=200)  # PeriodicTask.name: kept when the task is deleted
    task = models.CharField(max_length=200)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.SCHEDULED)
    occurrence = models.DateTimeField(help_text="When it was due (for run-now: when it was asked for).")
    dispatched_at = models.DateTimeField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DISPATCHED)
    task_id = models.CharField(max_length=255, blank=True, db_index=True)
    beat = models.CharField(max_length=255, blank=True, help_text="host:pid of the beat that sent it")
    detail = models.TextField(blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["schedule_name", "occurrence"],
                condition=models.Q(kind="scheduled"),
                name="scheduling_one_dispatch_per_occurrence",
            )
        ]
        indexes = [models.Index(fields=["schedule_name", "-dispatched_at"], name="scheduling_run_latest")]
        ordering = ["-dispatched_at"]

    def __str__(self) -> str:
        return f"{self.schedule_name} @ {self.occurrence:%Y-%m-%d %H:%M:%S}"

    @property
    def lag_seconds(self) -> float:
        return (self.dispatched_at - self.occurrence).total_seconds()


class ManagedSchedule(models.Model):
    name = models.CharField(max_length=200, unique=True)
    fingerprint = models.CharField(max_length=64)
    synced_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.name


class BeatLease(models.Model):
    name = models.CharField(max_length=50, primary_key=True)
    holder = models.CharField(max_length=255, blank=True)
    expires_at = models.DateTimeField()
    acquired_at = models.DateTimeField(null=True)

    def __str__(self) -> str:
        return f"{self.name} held by {self.holder or 'nobody'}"
