"""The worker's database path per job: drain rate, and PostgreSQL transactions and connections per job.

    .venv/bin/python -m bench.worker_db [--jobs 2000] [--repetitions 3]
        [--redis-url redis://127.0.0.1:6379/12]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_worker_db]

Each repetition, in a process of its own with the production settings (config.settings.base):

1. a worker as the Procfile's general worker runs it (`celery -A config worker -Q default`, the
   default concurrency, prefork, events on, results as configured), its consumer then cancelled;
2. N `default.ping` jobs sent with `apply_async` from one client;
3. the database's counters (pg_stat_database: transactions committed and rolled back, sessions
   opened, rows inserted, updated, read) read, the consumer added back, and the time taken until
   every job's row (jobs.Job) is `succeeded`; the counters read again once PostgreSQL has published
   them. What the worker does anyway while idle (its database gate's probe, presence) is measured
   for as long before the drain and taken off, and so are the bench's own polls.

Prints each run and the medians. A trial tool for the worker's per-job path: it writes no results
file (BENCH_RESULTS_DIR and docs/results are left alone) unless `--write` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COUNTERS = ("xact_commit", "xact_rollback", "sessions", "tup_inserted", "tup_updated", "tup_fetched")


READS = [0]  # how many times counters() read them: each read is one session and one commit of ours


def counters(database_url: str) -> dict[str, int]:
    """The database's cumulative counters, as PostgreSQL last published them (one transaction of ours)."""
    import psycopg

    READS[0] += 1
    with psycopg.connect(database_url, autocommit=True) as connection:
        row = connection.execute(
            f"SELECT {', '.join(COUNTERS)} FROM pg_stat_database WHERE datname = current_database()"  # noqa: S608 (our names)
        ).fetchone()
    assert row is not None
    return dict(zip(COUNTERS, (int(value or 0) for value in row), strict=True))


# PostgreSQL 15 publishes a busy backend's counters at most once a second, and an idle one's within
# PGSTAT_IDLE_INTERVAL (10 s): a read this long after the last activity sees all of it.
SETTLE_SECONDS = 11.0


def measure(jobs: int, database_url: str) -> dict[str, Any]:
    """One run on the broker this process was set up with (see `child`)."""
    import psycopg

    from bench.support import TreeSampler, worker_process
    from config.celery_app import app
    from jobs.models import Job
    from tasks.default import ping

    Job.objects.filter(type="default.ping").delete()
    with worker_process(app, "default", int(os.environ.get("CELERY_WORKER_CONCURRENCY", "2"))) as worker:
        sampler = TreeSampler(worker.pid)
        app.control.cancel_consumer("default", reply=True, timeout=5, limit=1)
        with app.producer_or_acquire() as producer:
            for _ in range(jobs):
                ping.apply_async(producer=producer)
        # What the worker does while idle (the gate's probe, presence, ...), per second; our own read
        # (one session, one commit) taken off.
        idle_start = counters(database_url)
        idle_started = time.perf_counter()
        time.sleep(SETTLE_SECONDS)
        before = counters(database_url)
        idle_seconds = time.perf_counter() - idle_started
        ours = {"xact_commit": 1, "sessions": 1}
        idle = {k: max(0.0, before[k] - idle_start[k] - ours.get(k, 0)) / idle_seconds for k in COUNTERS}
        started = time.perf_counter()
        app.control.add_consumer("default", reply=True, timeout=5, limit=1)
        deadline = time.monotonic() + 600
        done = polls = 0
        with psycopg.connect(database_url, autocommit=True) as poller:
            while done < jobs:
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {done} of {jobs} jobs succeeded within 600 s")
                time.sleep(0.1)
                polls += 1
                row = poller.execute(
                    "SELECT count(*) FROM jobs_job WHERE type = 'default.ping' AND status = 'succeeded'"
                ).fetchone()
                done = int(row[0]) if row else 0
        drain_seconds = time.perf_counter() - started
        time.sleep(SETTLE_SECONDS)
        after = counters(database_url)
        wait_seconds = time.perf_counter() - started
        peak = sampler.stop()
    # Ours: the `before` read, the poller's connection and polls.
    ours = {"xact_commit": 1 + polls, "sessions": 2}
    per_job = {k: (after[k] - before[k] - ours.get(k, 0) - idle[k] * wait_seconds) / jobs for k in COUNTERS}
    return {
        "drain_jobs_per_s": jobs / drain_seconds,
        **{f"{k}_per_job": v for k, v in per_job.items()},
        "worker_peak_rss_mib": peak / 2**20,
    }


def child(args: argparse.Namespace) -> None:
    from bench.support import setup_django

    setup_django(args.database_url, args.redis_url)
    print(json.dumps(measure(args.jobs, args.database_url)))


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.worker_db", "--child", "--redis-url", args.redis_url),
            *("--jobs", str(args.jobs), "--database-url", args.database_url),
        ],
        cwd=ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"the run failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench_worker_db")
    parser.add_argument("--write", action="store_true", help="write docs/results/worker_db.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    runs = []
    print(f"{args.jobs} default.ping jobs a run, {args.repetitions} repetitions")
    for repetition in range(1, args.repetitions + 1):
        run = run_child(args)
        runs.append(run)
        print(
            f"  run {repetition}: drain {run['drain_jobs_per_s']:6.0f} jobs/s; per job: "
            f"{run['xact_commit_per_job']:.2f} commits, {run['xact_rollback_per_job']:.2f} rollbacks, "
            f"{run['sessions_per_job']:.3f} connections, {run['tup_inserted_per_job']:.2f} rows inserted, "
            f"{run['tup_updated_per_job']:.2f} updated; worker {run['worker_peak_rss_mib']:.0f} MiB"
        )
    figures: dict[str, Any] = {"runs": runs}
    for key in runs[0]:
        values = [run[key] for run in runs]
        figures[key] = statistics.median(values)
        figures[f"{key}_range"] = [min(values), max(values)]
    print(
        f"median: drain {figures['drain_jobs_per_s']:.0f} jobs/s {figures['drain_jobs_per_s_range']}, "
        f"{figures['xact_commit_per_job']:.2f} commits/job, {figures['sessions_per_job']:.3f} connections/job"
    )
    if args.write:
        from bench.support import write_results

        write_results(
            "worker_db", figures, vars(args), database_url=args.database_url, redis_url=args.redis_url
        )


if __name__ == "__main__":
    main()
