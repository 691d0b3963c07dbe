"""What task-metrics collection costs: no-op tasks through a real worker, collection off and on.

    .venv/bin/python bench/metrics_overhead.py [--tasks 5000] [--repetitions 3] [--concurrency 2]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_metrics]
        [--broker-url redis://127.0.0.1:6379/13]

For each repetition, back to back: a worker with METRICS_ENABLED=false, then one with
METRICS_ENABLED=true (`celery -A config worker -Q default -c C -I bench.noop`, prefork).
With the worker ready, its consumer is cancelled, N `default.bench_noop` messages (no
result stored) and a sentinel are published, the consumer is added back, and the time from
then to the sentinel's result is the run's. Prints tasks/s per run, the median per mode and
the overhead; then the publish side in this process: N `apply_async` calls with the
publish handler connected and not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support import ensure_database  # noqa: E402


def run_worker(app: Any, collect: bool, tasks: int, concurrency: int) -> float:
    import subprocess
    import tempfile

    from bench.noop import noop, sentinel

    log = Path(tempfile.gettempdir()) / f"bench_metrics_{'on' if collect else 'off'}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "METRICS_ENABLED": "true" if collect else "false"}
    app.control.purge()
    with log.open("w") as log_file:
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", "default"),
                *("-n", "bench@%h", "-c", str(concurrency), "-I", "bench.noop"),
                *("--without-mingle", "--without-gossip", "--loglevel=WARNING"),
            ],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the worker did not start; see {log}")
        app.control.cancel_consumer("default", reply=True, timeout=5)
        with app.producer_or_acquire() as producer:
            for _ in range(tasks):
                noop.apply_async(producer=producer)
            done = sentinel.apply_async(producer=producer)
        started = time.perf_counter()
        app.control.add_consumer("default", reply=True, timeout=5)
        done.get(timeout=600)
        return time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def publish_side(tasks: int) -> tuple[float, float]:
    from celery import signals

    from bench.noop import noop
    from monitoring import collect

    def timed() -> float:
        started = time.perf_counter()
        from config.celery_app import app

        with app.producer_or_acquire() as producer:
            for _ in range(tasks):
                noop.apply_async(producer=producer)
        return time.perf_counter() - started

    collect.install()
    on = timed()
    signals.before_task_publish.disconnect(collect.on_publish)
    off = timed()
    signals.before_task_publish.connect(collect.on_publish, weak=False)
    return off, on


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench_metrics")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()

    os.environ["DATABASE_URL"] = args.database_url
    os.environ["CELERY_BROKER_URL"] = args.broker_url
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only")
    os.environ["DJANGO_SETTINGS_MODULE"] = "config.settings.base"
    ensure_database(args.database_url)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from config.celery_app import app

    rates: dict[bool, list[float]] = {False: [], True: []}
    print(f"{args.tasks} no-op tasks per run, worker -c {args.concurrency} (prefork), {args.broker_url}")
    for repetition in range(1, args.repetitions + 1):
        for collect in (False, True):
            elapsed = run_worker(app, collect, args.tasks, args.concurrency)
            rates[collect].append(args.tasks / elapsed)
            mode = "on " if collect else "off"
            print(f"  run {repetition} collection {mode}: {args.tasks / elapsed:8.0f} tasks/s")
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"median: off {off:.0f} tasks/s, on {on:.0f} tasks/s: overhead {(off - on) / off * 100:+.1f}%")

    publish_off, publish_on = publish_side(args.tasks)
    print(
        f"publish side, {args.tasks} apply_async in this process: off {args.tasks / publish_off:.0f}/s, "
        f"on {args.tasks / publish_on:.0f}/s ({(publish_on - publish_off) / publish_off * 100:+.1f}% time)"
    )


if __name__ == "__main__":
    main()
