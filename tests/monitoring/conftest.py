"""Fixtures for the monitoring tests: a clean slate of counters in Redis and rows in the database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from monitoring import collect, rollup
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
