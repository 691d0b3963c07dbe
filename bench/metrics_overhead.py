"""What task-metrics collection costs: no-op tasks through a real worker, collection off and on.

    .venv/bin/python -m bench.metrics_overhead [--tasks 5000] [--repetitions 3] [--concurrency 2]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_metrics]
        [--broker-url redis://127.0.0.1:6379/13]

For each repetition, back to back: a worker with METRICS_ENABLED=false, then one with
METRICS_ENABLED=true (`celery -A config worker -Q default -c C -I bench.noop`, prefork).
Prefetch is raised (--prefetch) so the worker, not the broker round trip, is the limit: the
per-task cost is then smallest and the handlers' share largest. With the worker ready, its
consumer is cancelled, N `default.bench_noop` messages (no
result stored) and a sentinel are published, the consumer is added back, and the time from
then to the sentinel's result is the run's. Prints tasks/s per run, the median per mode and
the overhead; then what the handlers cost per task in this process (publish + prerun +
postrun on a real task, µs), and the publish side: N `apply_async` calls with the publish
handler connected and not. The end-to-end runs vary by several percent between repetitions
on a small machine: read the median and the per-task handler cost together. Writes the figures
to docs/results/metrics_overhead.json.
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

from bench.support import setup_django, write_results  # noqa: E402


def run_worker(app: Any, collect: bool, tasks: int, concurrency: int, prefetch: int) -> float:
    import subprocess
    import tempfile

    from bench.noop import noop, sentinel

    log = Path(tempfile.gettempdir()) / f"bench_metrics_{'on' if collect else 'off'}.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "METRICS_ENABLED": "true" if collect else "false",
        "CELERY_WORKER_PREFETCH_MULTIPLIER": str(prefetch),
    }
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
        # limit=1: return on the worker's reply; without it a broadcast waits out its whole timeout.
        app.control.cancel_consumer("default", reply=True, timeout=5, limit=1)
        with app.producer_or_acquire() as producer:
            for _ in range(tasks):
                noop.apply_async(producer=producer)
            done = sentinel.apply_async(producer=producer)
        started = time.perf_counter()
        app.control.add_consumer("default", reply=True, timeout=5, limit=1)
        done.get(timeout=600, interval=0.005)  # the result backend is polled: finely, so it is not the clock
        return time.perf_counter() - started
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def handler_cost(tasks: int) -> float:
    """Microseconds the prerun + postrun + publish handlers take per task, in this process.

    A real task with a real request pushed on it, as the worker's tracer does; the buffer's
    flush thread runs as in production.
    """
    from bench.noop import noop
    from monitoring import collect

    collect.install()
    noop.push_request(
        id="bench", delivery_info={"routing_key": "default"}, headers={collect.PUBLISHED_HEADER: time.time()}
    )
    headers: dict[str, Any] = {}
    started = time.perf_counter()
    for index in range(tasks):
        task_id = f"bench-{index}"
        collect.on_publish(sender="default.bench_noop", headers=headers, routing_key="default")
        collect.on_prerun(task_id=task_id, task=noop)
        collect.on_postrun(task_id=task_id, task=noop, state="SUCCESS")
    elapsed = time.perf_counter() - started
    noop.pop_request()
    return elapsed / tasks * 1_000_000


def publish_side(tasks: int, repetitions: int = 5) -> tuple[float, float]:
    """Median seconds for `tasks` apply_async calls with the publish handler off and on (alternating)."""
    from celery import signals

    from bench.noop import noop
    from config.celery_app import app
    from monitoring import collect

    def timed() -> float:
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for _ in range(tasks):
                noop.apply_async(producer=producer)
        return time.perf_counter() - started

    collect.install()
    timed()  # warm up: connection, pools
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(repetitions):
        for on in (False, True):
            if not on:
                signals.before_task_publish.disconnect(collect.on_publish)
            times[on].append(timed())
            signals.before_task_publish.connect(collect.on_publish, weak=False)
    app.control.purge()
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument(
        "--prefetch", type=int, default=50, help="prefetch multiplier: high, so the broker is not the limit"
    )
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench_metrics")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()

    setup_django(args.database_url, args.broker_url)
    from config.celery_app import app

    rates: dict[bool, list[float]] = {False: [], True: []}
    print(
        f"{args.tasks} no-op tasks per run, worker -c {args.concurrency} (prefork), "
        f"prefetch x{args.prefetch}, {args.broker_url}"
    )
    for repetition in range(1, args.repetitions + 1):
        # Alternate which mode goes first, so a drift of the machine does not favour one.
        for collect in (False, True) if repetition % 2 else (True, False):
            elapsed = run_worker(app, collect, args.tasks, args.concurrency, args.prefetch)
            rates[collect].append(args.tasks / elapsed)
            mode = "on " if collect else "off"
            print(f"  run {repetition} collection {mode}: {args.tasks / elapsed:8.0f} tasks/s")
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"median: off {off:.0f} tasks/s, on {on:.0f} tasks/s: overhead {(off - on) / off * 100:+.1f}%")

    handlers = handler_cost(50_000)
    print(f"handlers (publish + prerun + postrun), in-process: {handlers:.1f} µs per task")
    sends = args.tasks // 2
    publish_off, publish_on = publish_side(sends)
    print(
        f"publish side, {sends} apply_async in this process, median of 5: off {sends / publish_off:.0f}/s, "
        f"on {sends / publish_on:.0f}/s ({(publish_on - publish_off) / publish_off * 100:+.1f}% time)"
    )
    figures = {
        "tasks_per_s_off": rates[False],
        "tasks_per_s_on": rates[True],
        "median_tasks_per_s_off": off,
        "median_tasks_per_s_on": on,
        "overhead_percent": (off - on) / off * 100,
        "on_slower_in_pairs": sum(1 for a, b in zip(rates[False], rates[True], strict=True) if b < a),
        "pairs": len(rates[False]),
        "handler_cost_us_per_task": handlers,
        "publish_sends": sends,
        "publish_per_s_off": sends / publish_off,
        "publish_per_s_on": sends / publish_on,
        "publish_extra_time_percent": (publish_on - publish_off) / publish_off * 100,
    }
    write_results(
        "metrics_overhead", figures, vars(args), database_url=args.database_url, redis_url=args.broker_url
    )


if __name__ == "__main__":
    main()
