"""Fixtures for the monitoring tests: a clean slate of counters in Redis and rows in the database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.utils import timezone

from monitoring import collect, metrics, rollup
from monitoring.models import TaskMetric


@pytest.fixture
def clean_metrics(django_db_blocker) -> Iterator[None]:
    """No counters left in Redis, buffered in this process, or rolled up, by an earlier test."""

    def wipe() -> None:
        buffer = collect.buffer()
        if buffer is not None:
            with buffer.lock:
                buffer.counts.clear()
        client = rollup.redis_client()
        keys = list(client.scan_iter("jobs:metrics:*"))
        if keys:
            client.delete(*keys)
        with django_db_blocker.unblock():
            TaskMetric.objects.all().delete()

    wipe()
    yield
    wipe()


def flush_here() -> None:
    """Flushes this process's buffer now (the test process publishes tasks too)."""
    buffer = collect.buffer()
    assert buffer is not None, "metrics collection is off in the test process"
    buffer.flush()


def add_metric_row(
    task: str,
    *,
    minutes_ago: int = 2,
    succeeded: int = 0,
    failed: int = 0,
    run: float = 0.2,
    wait: float = 0.02,
    exception: str = "SMTPServerDisconnected",
) -> TaskMetric:
    """A minute row as the roll-up writes it: every run in one run-time and one wait bucket."""
    row = TaskMetric(
        period_start=(timezone.now() - timedelta(minutes=minutes_ago)).replace(second=0, microsecond=0),
        task=task,
        queue=task.split(".")[0],
        succeeded=succeeded,
        failed=failed,
        exceptions={exception: failed} if failed else {},
    )
    setattr(row, f"rt_{metrics.bucket_index(run)}", succeeded + failed)
    setattr(row, f"wt_{metrics.bucket_index(wait)}", succeeded + failed)
    row.save()
    return row
