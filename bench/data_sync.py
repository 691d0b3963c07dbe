"""Records per second of `data_sync.sync` through a real worker process, on PostgreSQL.

    .venv/bin/python -m bench.data_sync [--records 100000] [--page-size 1000] [--batch-size 500]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_data_sync]
        [--broker-url redis://127.0.0.1:6379/6] [--concurrency 2]

Serves N records as JSON pages from an HTTP server on loopback (pages built in
advance, so the server is not what is measured), starts
`celery -A config worker -Q data_sync` as a process, and times from sending
`data_sync.sync` until its SyncRun is finished, four times: the first sync
(everything created), a no-op re-sync (everything unchanged), then re-syncs
with 1% and with 99% of the records changed; before them, the same rows loaded
with one plain PostgreSQL COPY into a scratch table shaped like SyncedRecord's
(the ceiling; each run's `of_copy` is its records/s over COPY's rows/s), and
`upsert_records` alone over the same rows in this process (batches of
`--batch-size`; every record created, then every one unchanged). Prints
records/second for each, how long fetching took (the sync task: pages, parsing,
sending the batches) against upserting (the child batches, from the sync task's
end to the run's end), and peak RSS: of the largest worker process (getrusage of
the waited-for children) and of the whole worker process tree (sampled every
50 ms). Writes the figures to docs/results/data_sync.json.

The database given is created if missing (PostgreSQL) and migrated; the
benchmark's source is deleted first, so runs start from empty.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support import TreeSampler, ensure_database, worker_process, write_results  # noqa: E402


def make_pages(count: int, page_size: int, changed_every: int = 0) -> dict[str, bytes]:
    pages: dict[str, bytes] = {}
    total_pages = (count + page_size - 1) // page_size
    for page in range(1, total_pages + 1):
        start = (page - 1) * page_size
        records = [
            {
                "id": number,
                "sku": f"SKU-{number:08d}",
                "name": f"Product {number}",
                "price": round(number * 0.37, 2)
                + (1 if changed_every and number % changed_every == 0 else 0),
                "stock": number % 97,
                "tags": ["bench", f"group-{number % 10}"],
                "updated": "2026-11-22T12:00:00Z",
            }
            for number in range(start + 1, min(start + page_size, count) + 1)
        ]
        following = f"/records?page={page + 1}" if page < total_pages else None
        pages[f"/records?page={page}"] = json.dumps({"results": records, "next": following}).encode()
    return pages


class PageServer:
    def __init__(self) -> None:
        self.pages: dict[str, bytes] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = server.pages.get(self.path)
                self.send_response(200 if body is not None else 404)
                body = body or b"{}"
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"


def copy_baseline(records: int, page_size: int, repetitions: int = 3) -> dict[str, float]:
    """The same rows as the first sync stores, loaded with one plain COPY into a scratch table shaped like
    SyncedRecord's (same columns, indexes and constraints), median of `repetitions`: the ceiling."""
    import statistics

    from django.db import connection
    from django.utils import timezone

    from tasks.models import SyncedRecord
    from tasks.services.data_sync import canonical_json, checksum_of

    table = connection.ops.quote_name(SyncedRecord._meta.db_table)
    now = timezone.now()
    rows = []
    for body in make_pages(records, page_size).values():
        for record in json.loads(body)["results"]:
            text = canonical_json(record)
            rows.append((0, str(record["id"]), text, checksum_of(text), now, now))
    seconds = []
    with connection.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS bench_copy_baseline")
        cursor.execute(f"CREATE TABLE bench_copy_baseline (LIKE {table} INCLUDING ALL)")
        try:
            for _ in range(repetitions):
                cursor.execute("TRUNCATE bench_copy_baseline")
                started = time.perf_counter()
                with (
                    connection.cursor() as copying,
                    copying.cursor.copy(
                        "COPY bench_copy_baseline (source_id, external_id, data, checksum, created_at, "
                        "changed_at) FROM STDIN"
                    ) as copy,
                ):
                    for row in rows:
                        copy.write_row(row)
                seconds.append(time.perf_counter() - started)
        finally:
            cursor.execute("DROP TABLE IF EXISTS bench_copy_baseline")
    median = statistics.median(seconds)
    return {"rows": len(rows), "seconds": median, "rows_per_s": len(rows) / median}


def upsert_in_process(records: int, page_size: int, batch_size: int) -> dict[str, Any]:
    """`upsert_records` alone over the same rows, in batches of `batch_size`, in this process (no worker,
    broker or job rows): a first pass creating every record, a second finding every one unchanged."""
    from tasks.models import DataSource
    from tasks.services.data_sync import batches, upsert_records

    rows = [
        record for body in make_pages(records, page_size).values() for record in json.loads(body)["results"]
    ]
    DataSource.objects.filter(name="bench-in-process").delete()
    source = DataSource.objects.create(name="bench-in-process", url="http://127.0.0.1/unused")
    figures: dict[str, Any] = {"batch_size": batch_size}
    try:
        for key, expected in (("created", "created"), ("unchanged", "unchanged")):
            started = time.perf_counter()
            totals = {"created": 0, "updated": 0, "unchanged": 0, "failed": 0}
            for batch in batches(rows, batch_size):
                for name, count in upsert_records(source, batch).as_dict().items():
                    totals[name] += count
            elapsed = time.perf_counter() - started
            assert totals[expected] == len(rows), totals
            figures[key] = {"records_per_s": len(rows) / elapsed, "seconds": elapsed}
    finally:
        DataSource.objects.filter(name="bench-in-process").delete()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench_data_sync"),
    )
    parser.add_argument("--broker-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/6"))
    parser.add_argument(
        "--results-name",
        default="data_sync",
        help="the results file (docs/results/<name>.json): another name keeps a comparison run apart",
    )
    options = parser.parse_args()

    ensure_database(options.database_url)
    server = PageServer()
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings.test",
        DATABASE_URL=options.database_url,
        CELERY_BROKER_URL=options.broker_url,
        DATA_SYNC_ALLOWED_HOSTS=server.host,
        LOG_LEVEL="WARNING",
    )
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from config.celery_app import app
    from tasks import data_sync
    from tasks.models import DataSource, SyncedRecord, SyncRun

    call_command("migrate", verbosity=0)
    DataSource.objects.filter(name="bench").delete()
    source = DataSource.objects.create(
        name="bench", url=f"http://{server.host}/records?page=1", batch_size=options.batch_size
    )
    runs: dict[str, dict[str, Any]] = {}
    with worker_process(app, "data_sync", options.concurrency) as worker:
        sampler = TreeSampler(worker.pid)
        print(
            f"{options.records} records, pages of {options.page_size}, batches of {options.batch_size}; "
            f"worker -c {options.concurrency}; "
            f"database {connection.vendor} ({connection.settings_dict['NAME']})"
        )

        def run(label: str, key: str, changed_every: int = 0) -> None:
            server.pages = make_pages(options.records, options.page_size, changed_every)
            started = time.perf_counter()
            result = data_sync.sync.delay(source_id=source.pk)
            outcome = result.get(timeout=600, interval=0.02)
            fetched = time.perf_counter() - started
            while True:
                sync_run = SyncRun.objects.get(pk=outcome["run_id"])
                if sync_run.status != SyncRun.Status.RUNNING:
                    break
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            assert sync_run.status == SyncRun.Status.SUCCEEDED, sync_run.error
            runs[key] = {
                "records_per_s": options.records / elapsed,
                "seconds": elapsed,
                "fetch_seconds": fetched,
                "upsert_seconds": elapsed - fetched,
                "created": sync_run.created,
                "updated": sync_run.updated,
                "unchanged": sync_run.unchanged,
                "failed": sync_run.failed,
            }
            print(
                f"{label:<22} {options.records / elapsed:>9,.0f} records/s  {elapsed:6.2f} s "
                f"(fetch {fetched:5.2f} s, upsert {elapsed - fetched:5.2f} s)  "
                f"created {sync_run.created} updated {sync_run.updated} unchanged {sync_run.unchanged} "
                f"failed {sync_run.failed}"
            )

        baseline = copy_baseline(options.records, options.page_size)
        print(
            f"{'plain COPY, same rows':<22} {baseline['rows_per_s']:>9,.0f} rows/s     "
            f"{baseline['seconds']:6.2f} s (median of 3, into a scratch table shaped like SyncedRecord's)"
        )
        alone = upsert_in_process(options.records, options.page_size, options.batch_size)
        for key in ("created", "unchanged"):
            alone[key]["of_copy"] = alone[key]["records_per_s"] / baseline["rows_per_s"]
            print(
                f"{'upsert_records, ' + key:<22} {alone[key]['records_per_s']:>9,.0f} records/s  "
                f"{alone[key]['seconds']:6.2f} s (in this process, batches of {options.batch_size}; "
                f"{alone[key]['of_copy']:.2f} of COPY)"
            )
        run("first sync", "first_sync")
        run("no-op re-sync", "noop_resync")
        run("re-sync, 1% changed", "resync_1pct_changed", changed_every=100)
        run("re-sync, 99% changed", "resync_99pct_changed", changed_every=1)
        assert SyncedRecord.objects.filter(source=source).count() == options.records
        tree_peak = sampler.stop()
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(
        f"peak RSS: largest worker process {largest / 1024:.0f} MiB; "
        f"worker process tree {tree_peak / 2**20:.0f} MiB (sampled); "
        f"this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    for figures_of_run in runs.values():
        figures_of_run["of_copy"] = figures_of_run["records_per_s"] / baseline["rows_per_s"]
    print(
        "sync / COPY: "
        + ", ".join(f"{key} {figures_of_run['of_copy']:.2f}" for key, figures_of_run in runs.items())
        + " (goal: the first sync at least 0.25)"
    )
    figures = {
        "copy_baseline": baseline,
        "upsert_in_process": alone,
        **runs,
        "largest_worker_process_peak_rss_mib": largest / 1024,
        "worker_process_tree_peak_rss_mib": tree_peak / 2**20,
    }
    write_results(
        options.results_name,
        figures,
        vars(options),
        database_url=options.database_url,
        redis_url=options.broker_url,
    )


if __name__ == "__main__":
    main()
