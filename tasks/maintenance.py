"""Maintenance (queue `default`): deleting what is past its retention, in small batches.

`default.cleanup` is meant to run daily from beat. Each kind of row has its own
retention (see tasks.services.maintenance.retention_cutoffs and the settings
MAINTENANCE_*, ANALYTICS_EVENT_RETENTION_DAYS, CELERY_RESULT_EXPIRES).
"""

from __future__ import annotations

from typing import Any, Literal

from django.conf import settings
from django.db import OperationalError
from pydantic import BaseModel, Field

from config.celery_app import app
from tasks.base import JobTask, TransientJobError
from tasks.services import maintenance as service

Kind = Literal[
    "task_results",
    "group_results",
    "dead_letters",
    "quarantined_messages",
    "email_logs",
    "sync_runs",
    "events",
    "event_batches",
    "scheduled_runs",
]


class CleanupSchema(BaseModel):
    kinds: list[Kind] | None = Field(default=None, min_length=1)


@app.task(
    bind=True,
    base=JobTask,
    name="default.cleanup",
    schema=CleanupSchema,
    autoretry_for=(TransientJobError, OperationalError),
    idempotency="deletes by age only; a second run finds nothing left to delete",
)
def cleanup(self: JobTask, kinds: list[str] | None = None) -> dict[str, Any]:
    """Deletes expired task results, group results, dead letters, quarantined messages, email logs,
    sync runs and events.

    Returns the rows deleted and batches used per kind. A run stops between
    batches after MAINTENANCE_TIME_BUDGET_SECONDS (`complete: false`); the next
    run goes on from there. Database errors are retried: what was deleted stays deleted.
    """
    report = service.cleanup(
        kinds, time_budget=settings.MAINTENANCE_TIME_BUDGET_SECONDS, on_progress=self.report_progress
    )
    return {
        "deleted": {kind: outcome["deleted"] for kind, outcome in report.items()},
        "batches": {kind: outcome["batches"] for kind, outcome in report.items()},
        "complete": all(outcome["complete"] for outcome in report.values()),
    }
