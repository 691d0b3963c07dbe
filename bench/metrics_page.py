"""Server time of the admin metrics page with 14 days of metrics for 50 task names.

    .venv/bin/python -m bench.metrics_page [--tasks 50] [--days 14] [--repetitions 5]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_metrics]
        [--broker-url redis://127.0.0.1:6379/13]

Fills TaskMetric as production would have it after 14 days: per-minute rows for the last
METRICS_MINUTE_ROWS_HOURS (24 h) and hourly rows before, for N task names over the five
queues, every task active every minute (the worst case: 72,000 minute rows + 15,600 hourly
rows for 50 tasks). Then renders /admin/metrics/ for each window through Django's test
client as a staff user and prints, per window, the page's server time (p50, max) and the
part spent on the statistics query (the live part reads queue depths from the broker and the
workers' presence rows: milliseconds). Writes the figures to docs/results/metrics_page.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support import setup_django, write_results  # noqa: E402

QUEUES = ("email", "images", "data_sync", "analytics", "default")


def fill(tasks: int, days: int) -> int:
    from django.conf import settings
    from django.utils import timezone

    from monitoring import metrics
    from monitoring.models import TaskMetric

    TaskMetric.objects.all().delete()
    rng = random.Random(7)  # noqa: S311 (made-up data, repeatable)
    now = timezone.now().replace(second=0, microsecond=0)
    minute_hours = settings.METRICS_MINUTE_ROWS_HOURS
    names = [(f"{QUEUES[i % 5]}.task_{i:02d}", QUEUES[i % 5]) for i in range(tasks)]

    def row(start: datetime, resolution: int, scale: int) -> list[TaskMetric]:
        made = []
        for task, queue in names:
            ok = rng.randint(5, 20) * scale
            failed = rng.randint(0, 1) * scale
            item = TaskMetric(
                period_start=start,
                resolution=resolution,
                task=task,
                queue=queue,
                sent=ok + failed,
                succeeded=ok,
                failed=failed,
                retried=rng.randint(0, 1) * scale,
                rt_sum=(ok + failed) * 200_000,
                wt_sum=(ok + failed) * 20_000,
                exceptions={"TimeoutError": failed} if failed else {},
            )
            for histogram, around in (("rt", 0.2), ("wt", 0.02)):
                for _ in range(4):
                    index = metrics.bucket_index(around * rng.uniform(0.3, 3))
                    setattr(
                        item,
                        f"{histogram}_{index}",
                        getattr(item, f"{histogram}_{index}") + (ok + failed) // 4,
                    )
            made.append(item)
        return made

    batch: list[TaskMetric] = []
    count = 0
    for minute in range(minute_hours * 60):
        batch += row(now - timedelta(minutes=minute + 1), TaskMetric.Resolution.MINUTE, 1)
        if len(batch) >= 5000:
            TaskMetric.objects.bulk_create(batch)
            count += len(batch)
            batch = []
    hour_start = (now - timedelta(hours=minute_hours)).replace(minute=0)
    for hour in range(days * 24 - minute_hours):
        batch += row(hour_start - timedelta(hours=hour + 1), TaskMetric.Resolution.HOUR, 60)
        if len(batch) >= 5000:
            TaskMetric.objects.bulk_create(batch)
            count += len(batch)
            batch = []
    TaskMetric.objects.bulk_create(batch)
    return count + len(batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench_metrics")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()

    setup_django(args.database_url, args.broker_url, DJANGO_ALLOWED_HOSTS="testserver")
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from monitoring import stats

    started = time.perf_counter()
    rows = fill(args.tasks, args.days)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("ANALYZE monitoring_taskmetric")
    print(
        f"{rows} rows ({args.tasks} tasks, {args.days} days) written in {time.perf_counter() - started:.1f} s"
    )

    figures: dict[str, Any] = {"rows": rows, "windows": {}}
    user, _ = User.objects.get_or_create(username="bench", defaults={"is_staff": True})
    client = Client()
    client.force_login(user)
    for window in stats.WINDOWS:
        pages, queries = [], []
        for _ in range(args.repetitions):
            began = time.perf_counter()
            response = client.get(f"/admin/metrics/?window={window}")
            pages.append(time.perf_counter() - began)
            assert response.status_code == 200, response.status_code
            now = timezone.now()
            began = time.perf_counter()
            stats.window_stats(now - stats.WINDOWS[window], now)
            queries.append(time.perf_counter() - began)
        figures["windows"][window] = {
            "page_p50_ms": statistics.median(pages) * 1000,
            "page_max_ms": max(pages) * 1000,
            "statistics_p50_ms": statistics.median(queries) * 1000,
        }
        print(
            f"  {window:>3}: page p50 {statistics.median(pages) * 1000:6.0f} ms, "
            f"max {max(pages) * 1000:6.0f} ms; statistics p50 {statistics.median(queries) * 1000:6.0f} ms"
        )

    write_results(
        "metrics_page", figures, vars(args), database_url=args.database_url, redis_url=args.broker_url
    )


if __name__ == "__main__":
    main()
