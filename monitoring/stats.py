"""What ran over a window, read from TaskMetric rows: one SUM … GROUP BY, then arithmetic.

Used by the admin metrics page, the alert rules and (later) the queues API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import Sum
from django.utils import timezone

from monitoring import metrics
from monitoring.models import COUNT_COLUMNS, TaskMetric, bucket_columns

WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}


@dataclass
class Series:
    """The totals of one task (or one queue, or everything) over the window."""

    name: str
    queue: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    exceptions: dict[str, int] = field(default_factory=dict)

    def add(self, counts: dict[str, int]) -> None:
        metrics.merge(self.counts, counts.items())

    def __getattr__(self, name: str) -> int:
        if name in metrics.OUTCOMES:
            return self.counts.get(name, 0)
        raise AttributeError(name)

    @property
    def finished(self) -> int:
        return self.counts.get("succeeded", 0) + self.counts.get("failed", 0)

    @property
    def success_rate(self) -> float | None:
        return self.counts.get("succeeded", 0) / self.finished if self.finished else None

    @property
    def failure_rate(self) -> float | None:
        return self.counts.get("failed", 0) / self.finished if self.finished else None

    def histogram(self, name: str) -> list[int]:
        return [self.counts.get(column, 0) for column in bucket_columns(name)]

    def percentile(self, histogram: str, q: float) -> float | None:
        return metrics.quantile(q, self.histogram(histogram))

    def mean(self, histogram: str) -> float | None:
        count = sum(self.histogram(histogram))
        return self.counts.get(f"{histogram}_sum", 0) / 1_000_000 / count if count else None

    @property
    def runs(self) -> int:
        return sum(self.histogram("rt"))


@dataclass
class Bin:
    start: datetime
    succeeded: int = 0
    failed: int = 0
    retried: int = 0


@dataclass
class WindowStats:
    since: datetime
    until: datetime
    tasks: list[Series]
    queues: list[Series]
    total: Series
    bins: list[Bin]

    @property
    def minutes(self) -> float:
        return max((self.until - self.since).total_seconds() / 60, 1 / 60)

    def per_minute(self, series: Series) -> float:
        return series.finished / self.minutes

    def top_exceptions(self, limit: int = 10) -> list[tuple[str, str, int]]:
        found = [(task.name, name, count) for task in self.tasks for name, count in task.exceptions.items()]
        return sorted(found, key=lambda item: -item[2])[:limit]


def window_stats(
    since: datetime, until: datetime | None = None, *, bins: int = 60, task: str = "", queue: str = ""
) -> WindowStats:
    until = until or timezone.now()
    rows = TaskMetric.objects.filter(period_start__gte=since, period_start__lt=until)
    if task:
        rows = rows.filter(task=task)
    if queue:
        rows = rows.filter(queue=queue)
    totals = {f"s_{column}": Sum(column) for column in COUNT_COLUMNS}
    sums: Any = rows.values("task", "queue").annotate(**totals)

    by_task: dict[str, Series] = {}
    by_queue: dict[str, Series] = {}
    total = Series("all")
    for item in sums:
        counts = {column: int(item[f"s_{column}"] or 0) for column in COUNT_COLUMNS}
        for series in (
            by_task.setdefault(item["task"], Series(item["task"], item["queue"])),
            by_queue.setdefault(item["queue"], Series(item["queue"], item["queue"])),
            total,
        ):
            series.add(counts)
    for name, exception, count in exception_counts(since, until, task=task, queue=queue):
        if name in by_task:
            by_task[name].exceptions[exception] = count

    return WindowStats(
        since=since,
        until=until,
        tasks=sorted(by_task.values(), key=lambda s: s.name),
        queues=sorted(by_queue.values(), key=lambda s: s.name),
        total=total,
        bins=time_bins(rows, since, until, bins),
    )


def exception_counts(
    since: datetime, until: datetime, *, task: str = "", queue: str = ""
) -> list[tuple[str, str, int]]:
    """(task, exception type, count) over the window, summed by the database's own JSON functions.

    PostgreSQL's jsonb_each_text and SQLite's json_each: one grouped query instead of reading
    every row that had a failure (tens of thousands over a day) into Python.
    """
    table = TaskMetric._meta.db_table
    if connection.vendor == "postgresql":
        source, key, value = f"{table}, jsonb_each_text({table}.exceptions) AS e", "e.key", "e.value::bigint"
    else:
        source, key, value = f"{table}, json_each({table}.exceptions) AS e", "e.key", "e.value"
    where = ["period_start >= %s", "period_start < %s"]
    params: list[Any] = [since, until]
    if task:
        where.append("task = %s")
        params.append(task)
    if queue:
        where.append("queue = %s")
        params.append(queue)
    sql = (
        f"SELECT task, {key}, SUM({value}) FROM {source} "  # noqa: S608 (no user input in the names)
        f"WHERE {' AND '.join(where)} AND (failed > 0 OR retried > 0) GROUP BY task, {key}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [(name, exception, int(count)) for name, exception, count in cursor.fetchall()]


def time_bins(rows: Any, since: datetime, until: datetime, count: int) -> list[Bin]:
    width = (until - since) / count
    result = [Bin(since + width * index) for index in range(count)]
    per_period = (
        rows.values("period_start")
        .annotate(ok=Sum("succeeded"), bad=Sum("failed"), again=Sum("retried"))
        .order_by()
    )
    for item in per_period:
        index = math.floor((item["period_start"] - since) / width)
        if 0 <= index < count:
            result[index].succeeded += item["ok"] or 0
            result[index].failed += item["bad"] or 0
            result[index].retried += item["again"] or 0
    return result
