"""Analytics and clean-up throughput: ingestion, the daily roll-up, batched deletes.

    .venv/bin/python -m bench.analytics [--events 200000] [--days 7] [--database-url postgres://.../bench]

On a fresh database (SQLite in a temporary folder unless told; a PostgreSQL
database given here is migrated and its analytics tables emptied first):

1. `ingest_events` of N events (20 names, 5,000 users, spread over D days in
   Europe/Berlin), chunks of ANALYTICS_INGEST_CHUNK_SIZE: events/s, and per-chunk latency;
2. the `analytics.ingest` schema check of one 10,000-event message (done when sent and at start);
3. `aggregate_day` for each day (N/D events a day): latency per day, and a second run (idempotent);
4. `default.cleanup`'s batched delete of all N events (MAINTENANCE_BATCH_SIZE rows a batch): rows/s,
   per-batch latency.
Prints throughput, latency percentiles and the peak RSS of the process, and writes them to
docs/results/analytics.json.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.support import ensure_database, write_results


def latency(samples: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles and the maximum, in milliseconds."""
    ordered = sorted(samples)

    def at(fraction: float) -> float:
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    return {"p50_ms": at(0.5), "p95_ms": at(0.95), "p99_ms": at(0.99), "max_ms": ordered[-1] * 1000}


def percentiles(samples: list[float]) -> str:
    cut = latency(samples)
    return (
        f"p50 {cut['p50_ms']:.1f} ms, p95 {cut['p95_ms']:.1f} ms, p99 {cut['p99_ms']:.1f} ms, "
        f"max {cut['max_ms']:.1f} ms"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--database-url", default=f"sqlite:///{tempfile.mkdtemp()}/bench.sqlite3")
    options = parser.parse_args()

    ensure_database(options.database_url)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=options.database_url,
        TIME_ZONE="Europe/Berlin",
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from tasks.analytics import IngestSchema
    from tasks.models import DailyMetric, Event, EventBatch
    from tasks.services import analytics, maintenance

    call_command("migrate", verbosity=0)
    for model in (Event, EventBatch, DailyMetric):
        model.objects.all().delete()
    print(f"database: {connection.vendor}, time zone {settings.TIME_ZONE}")
    figures: dict[str, Any] = {"database": connection.vendor}

    rng = random.Random(7)  # noqa: S311 (made-up data, not secrets)
    first_day = date(2026, 3, 26)  # the range holds the 23-hour day of 29 March
    start = analytics.day_bounds(first_day)[0]
    span = (analytics.day_bounds(first_day + timedelta(days=options.days - 1))[1] - start).total_seconds()
    names = [f"event_{i:02d}" for i in range(20)]

    def produce(count: int) -> Iterator[dict[str, Any]]:
        for _ in range(count):
            yield {
                "name": rng.choice(names),
                "user_id": f"user-{rng.randrange(5000)}" if rng.random() < 0.9 else "",
                "timestamp": (start + timedelta(seconds=rng.random() * span)).isoformat(),
                "properties": {"page": f"/p/{rng.randrange(100)}", "plan": rng.choice(["free", "pro"])},
            }

    # 1. ingestion, timed per chunk; events are generated a chunk at a time, so memory stays flat
    chunk = settings.ANALYTICS_INGEST_CHUNK_SIZE
    chunk_times: list[float] = []
    rss_before = peak_rss_mb()
    generator = produce(options.events)
    while batch_of_events := list(islice(generator, chunk)):
        started = time.perf_counter()
        analytics.ingest_events(batch_of_events)
        chunk_times.append(time.perf_counter() - started)
    total = sum(chunk_times)
    figures["ingest"] = {
        "events": options.events,
        "chunk_size": chunk,
        "seconds": total,
        "events_per_s": options.events / total,
        "chunk": latency(chunk_times),
        "peak_rss_mb_before": rss_before,
        "peak_rss_mb_after": peak_rss_mb(),
    }
    print(
        f"ingest: {options.events} events in {total:.2f} s = {options.events / total:,.0f} events/s "
        f"(chunks of {chunk}: {percentiles(chunk_times)}); "
        f"peak RSS {rss_before:.0f} -> {peak_rss_mb():.0f} MB"
    )

    # 2. the schema check of one full message
    message = list(produce(10_000))
    checks = [timed(lambda: IngestSchema.model_validate({"events": message}))[1] for _ in range(5)]
    print(f"analytics.ingest schema, 10,000 events: {percentiles(checks)} per check")
    figures["schema_check_10000_events"] = latency(checks)

    # 3. the roll-up, day by day, twice
    days = [first_day + timedelta(days=i) for i in range(options.days)]
    for run in ("first", "second"):
        latencies = []
        for day in days:
            started = time.perf_counter()
            analytics.aggregate_day(day)
            latencies.append(time.perf_counter() - started)
        figures[f"aggregate_day_{run}_run"] = {
            "events_a_day": options.events // options.days,
            **latency(latencies),
        }
        print(
            f"aggregate_day ({run} run), {options.events // options.days:,} events a day: "
            f"{percentiles(latencies)}"
        )
    counted = sum(DailyMetric.objects.values_list("count", flat=True))
    assert counted == options.events, (counted, options.events)

    # 4. the batched delete
    batch = settings.MAINTENANCE_BATCH_SIZE
    outcome, total = timed(lambda: maintenance.delete_batches(Event.objects.all(), batch_size=batch))
    print(
        f"cleanup: {outcome.deleted} events in {total:.2f} s = {outcome.deleted / total:,.0f} rows/s "
        f"({outcome.batches} batches of {batch}, {1000 * total / outcome.batches:.1f} ms a batch on average)"
    )
    print(f"peak RSS: {peak_rss_mb():.0f} MB")
    figures["cleanup"] = {
        "deleted": outcome.deleted,
        "batch_size": batch,
        "batches": outcome.batches,
        "seconds": total,
        "rows_per_s": outcome.deleted / total,
        "mean_batch_ms": 1000 * total / outcome.batches,
    }
    figures["peak_rss_mb"] = peak_rss_mb()
    write_results("analytics", figures, vars(options), database_url=options.database_url)


if __name__ == "__main__":
    main()
