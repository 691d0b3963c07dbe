"""Clean-up by age, in batches that never load a whole table into memory.

`cleanup()` is what `default.cleanup` runs: for each kind of row it deletes what
is older than that kind's retention (see `retention_cutoffs`), a batch of
primary keys at a time, and says how many rows and batches went.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Model, QuerySet
from django.utils import timezone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deletion:
    """What one batched delete did."""

    deleted: int = 0
    batches: int = 0
    # False when the time budget ran out with rows left; the next run goes on from there.
    complete: bool = True


def delete_batches(
    queryset: QuerySet[Any], *, batch_size: int | None = None, deadline: float | None = None
) -> Deletion:
    """Deletes every row of `queryset`, `batch_size` primary keys at a time.

    Each batch is its own short statement (in autocommit), so a large clean-up
    neither holds a long lock nor reads the table into memory: only one batch
    of primary keys is ever held. The batch is deleted through `queryset`
    again, so a row that stopped matching in between is left alone. With a
    `deadline` (a `time.monotonic()` value) it stops between batches once the
    deadline has passed.
    """
    size = batch_size or settings.MAINTENANCE_BATCH_SIZE
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, not {size}")
    label = queryset.model._meta.label
    # No ORDER BY: the database picks the cheapest way to find any matching rows.
    candidates = queryset.order_by().values_list("pk", flat=True)
    deleted = batches = 0
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            return Deletion(deleted, batches, complete=False)
        batch = list(candidates[:size])
        if not batch:
            return Deletion(deleted, batches)
        _, per_model = queryset.filter(pk__in=batch).delete()
        deleted += per_model.get(label, 0)
        batches += 1
        if len(batch) < size:
            return Deletion(deleted, batches)


def delete_in_batches(queryset: QuerySet[Model], batch_size: int | None = None) -> int:
    """Deletes every row of `queryset` in batches (see `delete_batches`); returns the count."""
    return delete_batches(queryset, batch_size=batch_size).deleted


# --- the clean-up -----------------------------------------------------------------


def _older_than(days: int, now: datetime) -> datetime | None:
    return now - timedelta(days=days) if days > 0 else None


def retention_cutoffs(now: datetime | None = None) -> dict[str, datetime | None]:
    """Per kind, the moment before which rows are deleted; None keeps that kind forever."""
    now = now or timezone.now()
    return {
        "task_results": now - timedelta(seconds=settings.CELERY_RESULT_EXPIRES),
        "group_results": now - timedelta(seconds=settings.CELERY_RESULT_EXPIRES),
        "dead_letters": _older_than(settings.MAINTENANCE_DEAD_LETTER_RETENTION_DAYS, now),
        "quarantined_messages": _older_than(settings.MAINTENANCE_QUARANTINE_RETENTION_DAYS, now),
        "email_logs": _older_than(settings.MAINTENANCE_EMAIL_LOG_RETENTION_DAYS, now),
        "sync_runs": _older_than(settings.MAINTENANCE_SYNC_RUN_RETENTION_DAYS, now),
        "events": _older_than(settings.ANALYTICS_EVENT_RETENTION_DAYS, now),
        "event_batches": _older_than(settings.ANALYTICS_INGEST_KEY_RETENTION_DAYS, now),
        "scheduled_runs": _older_than(settings.SCHEDULES_HISTORY_DAYS, now),
    }


def expired(kind: str, cutoff: datetime) -> QuerySet[Any]:
    """The rows of `kind` that are older than `cutoff`."""
    from django_celery_results.models import GroupResult, TaskResult

    from tasks.models import DeadLetter, EmailLog, Event, EventBatch, QuarantinedMessage, SyncRun

    if kind == "task_results":
        return TaskResult.objects.filter(date_done__lt=cutoff)
    if kind == "group_results":
        return GroupResult.objects.filter(date_done__lt=cutoff)
    if kind == "dead_letters":
        return DeadLetter.objects.filter(last_failed_at__lt=cutoff)
    if kind == "quarantined_messages":
        return QuarantinedMessage.objects.filter(quarantined_at__lt=cutoff)
    if kind == "email_logs":
        # Pending or sending rows are work in progress (a retry may still need them).
        final = [EmailLog.Status.SENT, EmailLog.Status.FAILED, EmailLog.Status.UNKNOWN]
        return EmailLog.objects.filter(created_at__lt=cutoff, status__in=final)
    if kind == "sync_runs":
        # By start: no run outlives the task's hard time limit, so an old one is over.
        return SyncRun.objects.filter(started_at__lt=cutoff)
    if kind == "events":
        return Event.objects.filter(timestamp__lt=cutoff)
    if kind == "event_batches":
        return EventBatch.objects.filter(received_at__lt=cutoff)
    if kind == "scheduled_runs":
        from scheduling.models import ScheduledRun

        return ScheduledRun.objects.filter(dispatched_at__lt=cutoff)
    raise ValueError(f"unknown clean-up kind {kind!r}; choose from {', '.join(KINDS)}")


KINDS = (
    "task_results",
    "group_results",
    "dead_letters",
    "quarantined_messages",
    "email_logs",
    "sync_runs",
    "events",
    "event_batches",
    "scheduled_runs",
)


def cleanup(
    kinds: Iterable[str] | None = None,
    *,
    now: datetime | None = None,
    batch_size: int | None = None,
    time_budget: float | None = None,
    on_progress: Callable[[float, str], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Deletes expired rows of each kind (all kinds unless told); returns what went, per kind.

    `{"dead_letters": {"deleted": 12, "batches": 1, "complete": True, "cutoff": "<ISO time>"}, ...}`;
    a kind kept forever is skipped (`cutoff: None`). When `time_budget` seconds run out, the
    remaining kinds are left for the next run (`complete: False`).
    """
    chosen = list(KINDS if kinds is None else kinds)
    for kind in chosen:
        if kind not in KINDS:
            raise ValueError(f"unknown clean-up kind {kind!r}; choose from {', '.join(KINDS)}")
    cutoffs = retention_cutoffs(now)
    deadline = None if time_budget is None else time.monotonic() + time_budget
    report: dict[str, dict[str, Any]] = {}
    for index, kind in enumerate(chosen):
        cutoff = cutoffs[kind]
        if cutoff is None:
            report[kind] = {**asdict(Deletion()), "cutoff": None}
            continue
        outcome = delete_batches(expired(kind, cutoff), batch_size=batch_size, deadline=deadline)
        report[kind] = {**asdict(outcome), "cutoff": cutoff.isoformat()}
        logger.info(
            "clean-up %s: deleted %d row(s) older than %s in %d batch(es)%s",
            kind,
            outcome.deleted,
            cutoff.isoformat(),
            outcome.batches,
            "" if outcome.complete else "; time budget used up, the rest is left for the next run",
        )
        if on_progress:
            on_progress(100 * (index + 1) / len(chosen), f"{kind}: {outcome.deleted} deleted")
    return report
