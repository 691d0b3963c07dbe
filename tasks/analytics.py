"""The `analytics` task family (queue `analytics`): event ingestion, daily roll-ups, the daily report.

Days are local days of settings.TIME_ZONE, given as "YYYY-MM-DD". A task whose
day defaults to yesterday fills the day in when it is sent (beat sends through
`apply_async` too), so the message, its retries, its result and its dead letter
all name the day: a retry after midnight does not roll up a different day, and
a replay next week reports the day that failed. Arguments stay JSON strings
after validation, so a retry re-sends exactly what came in. Database errors (a
dropped connection, a lock timeout) are retried; bad arguments are not.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Annotated, Any

from django.db import OperationalError
from pydantic import AfterValidator, BaseModel, Field, PlainValidator, WithJsonSchema, model_validator

from config.celery_app import app
from tasks.base import JobTask, PermanentJobError, TransientJobError
from tasks.services import analytics as service

# Events per `analytics.ingest` message: about 2 MB of JSON at 200 bytes an event.
MAX_INGEST_EVENTS = 10_000
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _iso_date(value: Any) -> str:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str) and _ISO_DATE.match(value):
        try:
            date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a calendar date") from None
        return value
    raise ValueError(f"must be a date as YYYY-MM-DD, not {value!r}")


# Validated, but kept a string: what a retry re-sends must be JSON.
IsoDate = Annotated[str, PlainValidator(_iso_date), WithJsonSchema({"type": "string", "format": "date"})]


class DefaultsToYesterday(JobTask):
    """A task with an optional `day`: a missing day becomes yesterday when the task is sent."""

    abstract = True

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:  # type: ignore[override]
        arguments = self.bind_arguments(args or (), kwargs or {})
        if arguments.get("day") is None:
            args, kwargs = (), {**arguments, "day": service.yesterday().isoformat()}
        return super().apply_async(args, kwargs, **options)


def _day(task: JobTask, day: str | None) -> date:
    """The day to work on. Sent by name without one (send_task), it is yesterday, pinned for retries."""
    if day is not None:
        return date.fromisoformat(day)
    chosen = service.yesterday()
    task.request.kwargs = {**(task.request.kwargs or {}), "day": chosen.isoformat()}
    return chosen


# --- analytics.ingest -------------------------------------------------------------


def _valid_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for index, item in enumerate(events):
        service.validate_event(item, index)  # InvalidEvent (a ValueError) names the event and field
    return events


# An event as the document shows it (service.EVENT_JSON_SCHEMA); service.EventIn checks it.
EventJson = Annotated[dict[str, Any], WithJsonSchema(service.EVENT_JSON_SCHEMA)]


class IngestSchema(BaseModel):
    # Checked item by item against service.EventIn, but kept as the JSON objects that came in.
    events: Annotated[list[EventJson], AfterValidator(_valid_events)] = Field(
        min_length=1, max_length=MAX_INGEST_EVENTS
    )
    batch_key: str | None = Field(default=None, min_length=1, max_length=200)


@app.task(
    bind=True,
    base=JobTask,
    name="analytics.ingest",
    schema=IngestSchema,
    body_limit_setting="JOBS_API_MAX_BULK_BODY_BYTES",
    autoretry_for=(TransientJobError, OperationalError),
    idempotency="the batch key (default: the task id) is stored with the events in one transaction; "
    "a retry or redelivery finds it and stores nothing",
)
def ingest(self: JobTask, events: list[dict[str, Any]], batch_key: str | None = None) -> dict[str, Any]:
    """Stores a batch of events (validated by the schema when sent and again here).

    Producers that can resend a batch (after a broker timeout) should give a
    `batch_key` of their own, so the resend is recognised too.
    """
    key = batch_key or f"task:{self.request.id}"
    try:
        stored = service.ingest_events(events, batch_key=key)
    except service.InvalidEvent as exc:
        raise PermanentJobError(str(exc)) from None
    return {"batch_key": key, "events": stored}


# --- analytics.aggregate_daily ----------------------------------------------------


class AggregateSchema(BaseModel):
    day: IsoDate | None = None

    @model_validator(mode="after")
    def _recomputable(self) -> AggregateSchema:
        # ValueError: the day's events may be gone (ANALYTICS_EVENT_RETENTION_DAYS); refused when sent.
        if self.day is not None:
            service.check_recomputable(date.fromisoformat(self.day))
        return self


@app.task(
    bind=True,
    base=DefaultsToYesterday,
    name="analytics.aggregate_daily",
    schema=AggregateSchema,
    autoretry_for=(TransientJobError, OperationalError),
    idempotency="recomputes the day from its events: upserts on (day, event_name) and deletes names "
    "gone from that day, in one transaction",
)
def aggregate_daily(self: JobTask, day: str | None = None) -> dict[str, Any]:
    """Rolls a local day's events (default: yesterday) into DailyMetric rows."""
    try:
        return service.aggregate_day(_day(self, day))
    except ValueError as exc:  # its events are past the retention period
        raise PermanentJobError(str(exc)) from None


# --- analytics.backfill -----------------------------------------------------------


class BackfillSchema(BaseModel):
    start: IsoDate
    end: IsoDate

    @model_validator(mode="after")
    def _range(self) -> BackfillSchema:
        # ValueError: reversed, or longer than allowed.
        service.days_between(date.fromisoformat(self.start), date.fromisoformat(self.end))
        # The first day is the oldest: if its events are kept, every later day's are.
        service.check_recomputable(date.fromisoformat(self.start))
        return self


@app.task(
    bind=True,
    base=JobTask,
    name="analytics.backfill",
    schema=BackfillSchema,
    autoretry_for=(TransientJobError, OperationalError),
    idempotency="sends one analytics.aggregate_daily per day, each idempotent; sending them twice "
    "recomputes the same rows",
)
def backfill(self: JobTask, start: str, end: str) -> dict[str, Any]:
    """Recomputes every day from `start` to `end` (both included, at most a year).

    Fans out one `analytics.aggregate_daily` per day as child jobs (jobs.tree) rather
    than looping here: each day is retried, and if need be dead-lettered, on its
    own, so one bad day neither fails nor repeats the others, and several
    workers share a long range. The backfill's job is final when every day is.
    """
    days = service.days_between(date.fromisoformat(start), date.fromisoformat(end))
    blocked = [day for day in days if not service.is_recomputable(day)]
    if blocked:
        raise PermanentJobError(
            f"{len(blocked)} day(s) from {blocked[0].isoformat()} on are past "
            "ANALYTICS_EVENT_RETENTION_DAYS: their events may be deleted and recomputing would erase "
            "their metrics; backfill a later range"
        )
    self.spawn((aggregate_daily, {"day": day.isoformat()}) for day in days)
    return {"start": start, "end": end, "days": len(days)}


# --- analytics.daily_report -------------------------------------------------------


class ReportSchema(BaseModel):
    day: IsoDate | None = None


@app.task(
    bind=True,
    base=DefaultsToYesterday,
    name="analytics.daily_report",
    schema=ReportSchema,
    autoretry_for=(TransientJobError, OperationalError),
    idempotency="each message is keyed (day, recipient) in the email log; a retry or second run "
    "sends only to recipients not reached yet",
)
def daily_report(self: JobTask, day: str | None = None) -> dict[str, Any]:
    """Emails a local day's summary (default: yesterday) to staff with an address and ADMINS.

    SMTP connection errors, timeouts and 4xx replies are retried; a recipient
    refused with 5xx fails the task for good once the others have theirs.
    """
    return service.send_daily_report(_day(self, day))
