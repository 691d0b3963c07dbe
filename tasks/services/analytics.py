"""Analytics: taking events in, rolling each local day up into `DailyMetric` rows, the daily report.

Days are days of the project's time zone (settings.TIME_ZONE): a day runs from
local midnight to the next local midnight, which is 23 or 25 hours on the days
the clocks change. All counting is done by the database (GROUP BY with COUNT
and COUNT DISTINCT); Python only sees one row per event name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import islice
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.mail import EmailMultiAlternatives, get_connection
from django.core.mail.backends.base import BaseEmailBackend
from django.db import IntegrityError, transaction
from django.db.models import Count, Q
from django.template.loader import render_to_string
from django.utils import timezone
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from tasks.base import PermanentJobError
from tasks.models import DailyMetric, EmailLog, Event, EventBatch
from tasks.services.email import classify_smtp_error, message_id_for

logger = logging.getLogger(__name__)

# A JSON object of properties is for dimensions (plan, page, button), not payloads.
MAX_PROPERTIES_BYTES = 16 * 1024
# Days one backfill may cover: a year, leap day included.
MAX_BACKFILL_DAYS = 366
REPORT_TEMPLATE = "analytics/daily_report"


# --- events ---------------------------------------------------------------------


class InvalidEvent(ValueError):
    """An event that does not match the schema; the message names the event and the field."""


# RFC 3339 (what JSON Schema's `date-time` is), the offset left to pydantic: without one, its
# "Input should have timezone info" says what is missing.
_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})?")

# What the REST API's document says an event is (EventIn is what checks it). Printable names and
# ids, and the 16 KB of properties, are checked but not stated.
EVENT_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Event",
    "required": ["name", "timestamp"],
    "additionalProperties": False,
    "properties": {
        "name": {
            "type": "string",
            "minLength": 1,
            "maxLength": 100,
            "pattern": r"\S",
            "description": "1-100 printable characters (surrounding spaces removed).",
        },
        "user_id": {
            "anyOf": [
                {"type": "string", "maxLength": 100},
                {"type": "number", "exclusiveMinimum": -1e99, "exclusiveMaximum": 1e99},
            ],
            "default": "",
            "description": "Up to 100 characters; a number is taken as text; empty for an anonymous event.",
        },
        "properties": {"type": "object", "description": "A JSON object, at most 16 KB as JSON."},
        "timestamp": {
            "type": "string",
            "format": "date-time",
            "description": "RFC 3339 with a UTC offset, e.g. 2026-05-04T10:00:00+02:00.",
        },
    },
}


class EventIn(BaseModel):
    """One event as producers send it: JSON, with an ISO 8601 timestamp carrying its UTC offset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    user_id: Annotated[str, StringConstraints(strip_whitespace=True, max_length=100)] = Field(
        default="", coerce_numbers_to_str=True
    )
    properties: dict[str, Any] = Field(default_factory=dict)
    timestamp: AwareDatetime

    @field_validator("timestamp", mode="before")
    @classmethod
    def _rfc_3339(cls, value: Any) -> Any:
        # pydantic alone also takes Unix times (numbers, digit strings) and a space for the T.
        if isinstance(value, datetime) or (isinstance(value, str) and _DATE_TIME.fullmatch(value)):
            return value
        raise ValueError(
            "Input should be a valid datetime: an ISO 8601 date-time with a UTC offset, "
            "e.g. 2026-05-04T10:00:00+02:00"
        )

    @field_validator("timestamp")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        # Stored in UTC: PostgreSQL refuses offsets past 15:59 (RFC 3339 allows 23:59), and an
        # offset can carry 0001-01-01 into year 0, which no datetime holds.
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range (before 0001-01-01 or after 9999-12-31 in UTC)") from None

    @field_validator("name", "user_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("must not contain control characters")
        return value

    @field_validator("properties")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        except (TypeError, ValueError):
            raise ValueError(
                "must hold JSON values only (strings, numbers, booleans, null, lists, objects)"
            ) from None
        if size > MAX_PROPERTIES_BYTES:
            raise ValueError(f"is {size} bytes as JSON; at most {MAX_PROPERTIES_BYTES} are allowed")
        return value

    def to_model(self) -> Event:
        return Event(
            name=self.name, user_id=self.user_id, properties=self.properties, timestamp=self.timestamp
        )


def describe_event_error(index: int, error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"field '{field}': {message}" if field else message)
    return f"event {index}: " + "; ".join(problems)


def validate_event(event: Mapping[str, Any] | EventIn, index: int = 0) -> EventIn:
    """The event checked against `EventIn`; InvalidEvent naming the event's index and field if not."""
    if isinstance(event, EventIn):
        return event
    try:
        return EventIn.model_validate(event)
    except ValidationError as exc:
        raise InvalidEvent(describe_event_error(index, exc)) from None


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def ingest_events(
    events: Iterable[Mapping[str, Any] | EventIn],
    *,
    batch_key: str | None = None,
    chunk_size: int | None = None,
) -> int:
    """Validates and stores events, `chunk_size` per INSERT; returns how many were stored.

    All or nothing: one transaction, so a bad event (InvalidEvent, naming the
    field) stores none of them. `events` may be any iterable, a generator over
    a file included; only one chunk is held in memory at a time.

    With a `batch_key` the batch is recorded (EventBatch) in the same
    transaction: the same key a second time stores nothing and returns the
    count stored the first time.
    """
    size = chunk_size or settings.ANALYTICS_INGEST_CHUNK_SIZE
    with transaction.atomic():
        if batch_key is not None:
            try:
                with transaction.atomic():
                    batch = EventBatch.objects.create(key=batch_key, events=0)
            except IntegrityError:
                # Taken by an earlier (committed) run; on PostgreSQL a concurrent
                # run's insert waits for that run to commit or roll back first.
                stored = EventBatch.objects.get(key=batch_key).events
                logger.info("event batch %s was ingested before (%d events); skipped", batch_key, stored)
                return stored
        total = 0
        for chunk in _chunks(events, size):
            rows = [validate_event(event, total + offset).to_model() for offset, event in enumerate(chunk)]
            Event.objects.bulk_create(rows, batch_size=size)
            total += len(rows)
        if batch_key is not None:
            EventBatch.objects.filter(pk=batch.pk).update(events=total)
    return total


# --- days -----------------------------------------------------------------------


def project_zone() -> ZoneInfo:
    return ZoneInfo(settings.TIME_ZONE)


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """[start, end) of a local day, in UTC: 23, 24 or 25 hours apart.

    UTC, because Python subtracts and adds datetimes that share a tzinfo in
    wall-clock time: local `end - start` would say 24 hours on every day.
    """
    zone = project_zone()
    start = datetime.combine(day, time.min, tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time.min, tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


def local_today(now: datetime | None = None) -> date:
    return timezone.localtime(now or timezone.now(), project_zone()).date()


def yesterday(now: datetime | None = None) -> date:
    return local_today(now) - timedelta(days=1)


def days_between(start: date, end: date) -> list[date]:
    """Every day from `start` to `end`, both included; ValueError when the range is reversed or too long."""
    if start > end:
        raise ValueError(f"start {start.isoformat()} is after end {end.isoformat()}")
    count = (end - start).days + 1
    if count > MAX_BACKFILL_DAYS:
        raise ValueError(
            f"{start.isoformat()}..{end.isoformat()} is {count} days; at most {MAX_BACKFILL_DAYS} at a time"
        )
    return [start + timedelta(days=offset) for offset in range(count)]


def events_kept_since(now: datetime | None = None) -> datetime | None:
    """Events before this moment may have been deleted (ANALYTICS_EVENT_RETENTION_DAYS); None: all kept."""
    days = settings.ANALYTICS_EVENT_RETENTION_DAYS
    return (now or timezone.now()) - timedelta(days=days) if days else None


def check_recomputable(day: date, now: datetime | None = None) -> None:
    """ValueError when the day's events may be gone: recomputing would wipe its metrics."""
    kept_since = events_kept_since(now)
    if kept_since is not None and day_bounds(day)[0] < kept_since:
        raise ValueError(
            f"events of {day.isoformat()} may already be deleted (ANALYTICS_EVENT_RETENTION_DAYS="
            f"{settings.ANALYTICS_EVENT_RETENTION_DAYS}); recomputing it would erase its metrics"
        )


def is_recomputable(day: date, now: datetime | None = None) -> bool:
    try:
        check_recomputable(day, now)
    except ValueError:
        return False
    return True


# --- the daily roll-up ----------------------------------------------------------


def aggregate_day(day: date) -> dict[str, Any]:
    """Rolls one local day's events into DailyMetric rows: one per event name, nothing else for the day.

    In one transaction: the counts are computed by the database, upserted on
    (day, event_name), and rows of names with no events left that day are
    deleted. Running it again gives the same rows.
    """
    check_recomputable(day)
    start, end = day_bounds(day)
    with transaction.atomic():
        rows = (
            Event.objects.filter(timestamp__gte=start, timestamp__lt=end)
            .order_by()
            .values("name")
            .annotate(
                count=Count("pk"),
                # Anonymous events (no user id) count as events, not as a user.
                distinct_users=Count("user_id", distinct=True, filter=~Q(user_id="")),
            )
            # The same order in every run: concurrent upserts take row locks in one order.
            .order_by("name")
        )
        metrics = [
            DailyMetric(
                day=day, event_name=row["name"], count=row["count"], distinct_users=row["distinct_users"]
            )
            for row in rows
        ]
        if metrics:
            DailyMetric.objects.bulk_create(
                metrics,
                update_conflicts=True,
                unique_fields=["day", "event_name"],
                update_fields=["count", "distinct_users", "computed_at"],
            )
        current = {metric.event_name for metric in metrics}
        stale = sorted(
            set(DailyMetric.objects.filter(day=day).values_list("event_name", flat=True)) - current
        )
        removed = 0
        for names in _chunks(stale, 500):
            removed += DailyMetric.objects.filter(day=day, event_name__in=names).delete()[0]
    result = {
        "day": day.isoformat(),
        "event_names": len(metrics),
        "events": sum(metric.count for metric in metrics),
        "removed": removed,
    }
    logger.info(
        "analytics %s: %d events under %d names rolled up, %d stale row(s) removed",
        result["day"],
        result["events"],
        result["event_names"],
        removed,
    )
    return result


# --- the daily report -----------------------------------------------------------


def _change(current: int, previous: int) -> str:
    if previous == 0:
        return "new" if current else "0"
    delta = current - previous
    return f"{delta:+d} ({100 * delta / previous:+.1f}%)"


@dataclass(frozen=True)
class ReportLine:
    event_name: str
    count: int
    distinct_users: int
    previous_count: int

    @property
    def change(self) -> str:
        return _change(self.count, self.previous_count)


@dataclass(frozen=True)
class DailyReport:
    day: date
    previous_day: date
    total_events: int
    previous_total_events: int
    event_names: int
    top: list[ReportLine]

    @property
    def change(self) -> str:
        return _change(self.total_events, self.previous_total_events)

    @property
    def names_not_shown(self) -> int:
        return self.event_names - len(self.top)


def build_daily_report(day: date, top_n: int | None = None) -> DailyReport:
    """The day's roll-up (DailyMetric rows) against the day before: the busiest names first."""
    previous_day = day - timedelta(days=1)
    metrics = list(DailyMetric.objects.filter(day=day).order_by("-count", "event_name"))
    previous = dict(DailyMetric.objects.filter(day=previous_day).values_list("event_name", "count"))
    top = [
        ReportLine(m.event_name, m.count, m.distinct_users, previous.get(m.event_name, 0))
        for m in metrics[: top_n or settings.ANALYTICS_REPORT_TOP_N]
    ]
    return DailyReport(
        day=day,
        previous_day=previous_day,
        total_events=sum(m.count for m in metrics),
        previous_total_events=sum(previous.values()),
        event_names=len(metrics),
        top=top,
    )


def render_daily_report(report: DailyReport) -> tuple[str, str, str]:
    """(subject, text body, HTML body)."""
    context = {"report": report, "time_zone": settings.TIME_ZONE, "site_name": "Jobs"}
    subject = render_to_string(f"{REPORT_TEMPLATE}/subject.txt", context)
    text = render_to_string(f"{REPORT_TEMPLATE}/body.txt", context)
    html = render_to_string(f"{REPORT_TEMPLATE}/body.html", context)
    return " ".join(subject.split()), text, html


def report_recipients() -> list[str]:
    """Active staff users with an email address, and settings.ADMINS; each address once."""
    staff = (
        get_user_model()
        .objects.filter(is_staff=True, is_active=True)
        .exclude(email="")
        .values_list("email", flat=True)
    )
    admins = [entry if isinstance(entry, str) else entry[1] for entry in settings.ADMINS]
    unique: dict[str, str] = {}
    for address in [*staff, *admins]:
        unique.setdefault(address.strip().lower(), address.strip())
    return sorted(unique.values(), key=str.lower)


def report_key(day: date, address: str) -> str:
    """The email-log key of one day's report to one address (hashed: keys show up in logs)."""
    digest = hashlib.sha256(address.strip().lower().encode()).hexdigest()[:24]
    return f"analytics.daily_report:{day.isoformat()}:{digest}"


def _send_once(connection: BaseEmailBackend, key: str, to: str, subject: str, text: str, html: str) -> bool:
    """Sends one report message unless the email log says it went already; True if sent now.

    Unlike a password reset, a report cut off mid-send (log left in SENDING) is
    sent again: a second copy of a report is better than none.
    """
    with transaction.atomic():
        log, _ = EmailLog.objects.select_for_update().get_or_create(
            key=key, defaults={"recipient": to, "template": REPORT_TEMPLATE}
        )
        if log.status == EmailLog.Status.SENT:
            return False
        log.subject = subject
        log.message_id = message_id_for(key)
        log.status = EmailLog.Status.SENDING
        log.attempts += 1
        log.save(update_fields=["subject", "message_id", "status", "attempts", "updated_at"])
    message = EmailMultiAlternatives(
        subject=subject,
        body=text,
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[to],
        headers={"Message-ID": log.message_id},
    )
    message.attach_alternative(html, "text/html")
    try:
        connection.send_messages([message])
    except Exception as exc:
        error = classify_smtp_error(exc)
        permanent = isinstance(error, PermanentJobError)
        EmailLog.objects.filter(pk=log.pk).update(
            status=EmailLog.Status.FAILED if permanent else EmailLog.Status.PENDING,
            last_error=str(error)[:2000],
            updated_at=timezone.now(),
        )
        raise error from exc
    EmailLog.objects.filter(pk=log.pk).update(
        status=EmailLog.Status.SENT, sent_at=timezone.now(), last_error="", updated_at=timezone.now()
    )
    return True


def send_daily_report(day: date, *, refresh: bool = True) -> dict[str, Any]:
    """Emails the day's report (text and HTML) to every recipient, one message each.

    With `refresh`, the day and the day before are rolled up first (where their
    events are still kept), so the numbers are current. Every message is keyed
    in the email log: a retry sends only to whom it has not reached yet.
    Connection trouble and 4xx replies stop the run with TransientJobError (to
    retry); a recipient refused for good (5xx) is skipped, and after the others
    got theirs the run fails with PermanentJobError (a dead letter to replay).
    """
    if refresh:
        for each in (day - timedelta(days=1), day):
            if is_recomputable(each):
                aggregate_day(each)
    report = build_daily_report(day)
    recipients = report_recipients()
    outcome: dict[str, Any] = {
        "day": day.isoformat(),
        "recipients": len(recipients),
        "sent": 0,
        "already_sent": 0,
        "failed": 0,
    }
    if not recipients:
        logger.warning("analytics report %s: no recipients (no staff with an email, no ADMINS)", day)
        return outcome
    subject, text, html = render_daily_report(report)
    connection = get_connection(fail_silently=False)
    try:
        connection.open()
    except Exception as exc:
        raise classify_smtp_error(exc) from exc
    refused: list[PermanentJobError] = []
    try:
        for address in recipients:
            try:
                sent = _send_once(connection, report_key(day, address), address, subject, text, html)
            except PermanentJobError as exc:
                refused.append(exc)
                outcome["failed"] += 1
                continue
            outcome["sent" if sent else "already_sent"] += 1
    finally:
        connection.close()
        # Counts only: addresses stay out of the logs.
        logger.info(
            "analytics report %s: %d recipient(s), %d sent, %d sent before, %d refused",
            day,
            outcome["recipients"],
            outcome["sent"],
            outcome["already_sent"],
            outcome["failed"],
        )
    if refused:
        raise PermanentJobError(
            f"analytics report {day}: {len(refused)} of {len(recipients)} recipient(s) refused for good "
            f"(the others got it); first: {refused[0]}"
        )
    return outcome
