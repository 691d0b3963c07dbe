"""From Redis to the database: per-minute rows, compacted to hourly ones, pruned.

`roll_up()` (task `default.metrics_rollup`, every minute) writes every minute Redis holds
as rows, replacing what an earlier roll-up wrote for it: a minute is written again while
counts still arrive for it, so running twice, or late, does no harm. Once a minute is
REDIS_KEEP_SECONDS old, well after the last flush should have reached it, its hash is
taken and deleted atomically and the minute is marked closed; a flush that still comes
for it (Redis was out of reach for minutes) makes a new hash, which is added to the rows.

`compact()` replaces the minute rows older than METRICS_MINUTE_ROWS_HOURS by hourly rows
(in one transaction per hour), and `prune()` deletes rows older than METRICS_RETENTION_DAYS.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from monitoring import metrics
from monitoring.models import COUNT_COLUMNS, TaskMetric

logger = logging.getLogger(__name__)

REDIS_KEEP_SECONDS = 5 * 60
# Minutes rolled up for good, so that a hash recreated by a late flush is added, not replaced.
CLOSED_MINUTES_KEY = "jobs:metrics:closed"
CLOSED_MINUTES_KEPT_SECONDS = 2 * 24 * 3600  # as long as a minute hash can live (collect.MINUTE_KEY_TTL)


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(settings.METRICS_REDIS_URL, socket_timeout=10, socket_connect_timeout=5)


def rows_from_hash(minute: int, raw: dict[bytes, bytes]) -> list[TaskMetric]:
    by_series: defaultdict[tuple[str, str], dict[str, Any]] = defaultdict(dict)
    for key, value in raw.items():
        task, queue, name = metrics.split_field(key.decode())
        values = by_series[(task, queue)]
        if name.startswith("exc:"):
            values.setdefault("exceptions", {})[name[4:]] = int(value)
        else:
            values[name.replace(":", "_")] = int(value)
    start = datetime.fromtimestamp(minute, tz=UTC)
    known = set(COUNT_COLUMNS) | {"exceptions"}
    return [
        TaskMetric(
            period_start=start,
            resolution=TaskMetric.Resolution.MINUTE,
            task=task[:200],
            queue=queue[:100],
            **{name: value for name, value in values.items() if name in known},
        )
        for (task, queue), values in by_series.items()
    ]


@dataclass
class RollUp:
    minutes: int = 0
    rows: int = 0
    compacted_hours: int = 0
    pruned: int = 0


def roll_up(now: float | None = None) -> RollUp:
    now = time.time() if now is None else now
    client = redis_client()
    report = RollUp()
    for raw_minute in client.zrange(metrics.MINUTES_KEY, 0, -1):
        minute = int(raw_minute)
        key = metrics.minute_key(minute)
        if minute + 60 + REDIS_KEEP_SECONDS >= now:
            rows = rows_from_hash(minute, client.hgetall(key))
            replace_rows(rows)
        else:
            rows = take_final(client, minute, raw_minute)
        report.minutes += 1
        report.rows += len(rows)
    report.compacted_hours = compact(timezone.now())
    report.pruned = prune(timezone.now())
    return report


# Removes a minute from the index only if no flush recreated its hash in the meantime.
_FORGET_MINUTE = """
if redis.call('exists', KEYS[1]) == 0 then return redis.call('zrem', KEYS[2], ARGV[1]) end
return 0
"""


def take_final(client: Any, minute: int, raw_minute: bytes) -> list[TaskMetric]:
    """The last roll-up of a minute: its hash is taken and deleted in one step, then written.

    The first time, the rows are replaced (they hold what earlier roll-ups saw of the same
    hash); a hash that shows up again for a minute already closed (a flush that came very
    late: Redis was out of reach) is added to the rows instead. If the database refuses,
    the counts go back into Redis for the next roll-up.
    """
    key = metrics.minute_key(minute)
    pipe = client.pipeline(transaction=True)
    pipe.hgetall(key)
    pipe.delete(key)
    raw, _ = pipe.execute()
    late = client.zscore(CLOSED_MINUTES_KEY, raw_minute) is not None
    rows = rows_from_hash(minute, raw)
    try:
        add_rows(rows) if late else replace_rows(rows)
    except Exception:
        if raw:
            pipe = client.pipeline(transaction=False)
            for name, value in raw.items():
                pipe.hincrby(key, name, int(value))
            pipe.execute()
        raise
    pipe = client.pipeline(transaction=False)
    pipe.zadd(CLOSED_MINUTES_KEY, {raw_minute: minute})
    pipe.zremrangebyscore(CLOSED_MINUTES_KEY, "-inf", minute - CLOSED_MINUTES_KEPT_SECONDS)
    pipe.eval(_FORGET_MINUTE, 2, key, metrics.MINUTES_KEY, raw_minute)
    pipe.execute()
    return rows


def replace_rows(rows: list[TaskMetric]) -> None:
    if rows:
        TaskMetric.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["period_start", "resolution", "task", "queue"],
            update_fields=[*COUNT_COLUMNS, "exceptions"],
        )


def add_rows(rows: list[TaskMetric]) -> None:
    """Adds each row's counts to the row already stored for its minute (or stores it)."""
    with transaction.atomic():
        for row in rows:
            stored = (
                TaskMetric.objects.select_for_update()
                .filter(
                    period_start=row.period_start, resolution=row.resolution, task=row.task, queue=row.queue
                )
                .first()
            )
            if stored is None:
                row.save()
                continue
            for column in COUNT_COLUMNS:
                setattr(stored, column, getattr(stored, column) + getattr(row, column))
            stored.exceptions = metrics.merge(dict(stored.exceptions), row.exceptions.items())
            stored.save()


def compact(now: datetime) -> int:
    """Hourly rows replace the minute rows of every hour that ended before the cut-off."""
    cutoff = (now - timedelta(hours=settings.METRICS_MINUTE_ROWS_HOURS)).replace(
        minute=0, second=0, microsecond=0
    )
    old = TaskMetric.objects.filter(resolution=TaskMetric.Resolution.MINUTE, period_start__lt=cutoff)
    first = old.order_by("period_start").values_list("period_start", flat=True).first()
    hours = 0
    while first is not None and first < cutoff:
        hour = first.replace(minute=0, second=0, microsecond=0)
        with transaction.atomic():
            compact_hour(hour)
        hours += 1
        first = old.order_by("period_start").values_list("period_start", flat=True).first()
    return hours


def compact_hour(hour: datetime) -> None:
    minutes = TaskMetric.objects.filter(
        resolution=TaskMetric.Resolution.MINUTE,
        period_start__gte=hour,
        period_start__lt=hour + timedelta(hours=1),
    )
    sums: Any = minutes.values("task", "queue").annotate(**{f"s_{c}": Sum(c) for c in COUNT_COLUMNS})
    exceptions: defaultdict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for task, queue, counts in minutes.exclude(exceptions={}).values_list("task", "queue", "exceptions"):
        metrics.merge(exceptions[(task, queue)], counts.items())
    existing = {
        (row.task, row.queue): row
        for row in TaskMetric.objects.filter(resolution=TaskMetric.Resolution.HOUR, period_start=hour)
    }
    rows = []
    for item in sums:
        series = (item["task"], item["queue"])
        row = existing.get(series) or TaskMetric(
            period_start=hour, resolution=TaskMetric.Resolution.HOUR, task=series[0], queue=series[1]
        )
        for column in COUNT_COLUMNS:
            setattr(row, column, getattr(row, column) + (item[f"s_{column}"] or 0))
        row.exceptions = metrics.merge(dict(row.exceptions), exceptions.get(series, {}).items())
        rows.append(row)
    TaskMetric.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["period_start", "resolution", "task", "queue"],
        update_fields=[*COUNT_COLUMNS, "exceptions"],
    )
    minutes.delete()


def prune(now: datetime) -> int:
    deleted, _ = TaskMetric.objects.filter(
        period_start__lt=now - timedelta(days=settings.METRICS_RETENTION_DAYS)
    ).delete()
    return deleted
