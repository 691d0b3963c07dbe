"""Redis against RabbitMQ as this project's broker: the same jobs, the same worker, one run.

    .venv/bin/python -m bench.brokers [--jobs 2000] [--repetitions 3]
        [--redis-url redis://127.0.0.1:6379/10]
        [--rabbitmq-url amqp://guest:guest@127.0.0.1:5672/bench_brokers]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_brokers]

For each repetition, each broker in turn (the order alternates, so a drift of the machine favours
neither), in a process of its own with the production settings (config.settings.base) on that
broker — on RabbitMQ its queues as the project declares them (quorum queues, publisher confirms):

1. a worker as the Procfile's general worker runs it (`celery -A config worker -Q default`, the
   default concurrency, prefork, events on), its consumer then cancelled; metrics and the
   shared rate limits in the Redis named by --redis-url on both (as a RabbitMQ deployment has);
2. enqueue: N `default.ping` jobs sent with `apply_async` from one client, one after another
   (each publish waits for the broker: on RabbitMQ, for its confirm);
3. drain: the consumer added back; the time until every job's row (jobs.Job) is `succeeded`;
4. the worker's memory (RSS of its process tree, sampled every 50 ms).

Prints each run and the medians with their spread, and writes docs/results/brokers.json.
Recovery after a lost worker or broker comes from the fault suite (docs/faults.md), not from here.
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


def measure(jobs: int) -> dict[str, Any]:
    """One run on the broker this process was set up with (see `child`)."""
    from bench.support import TreeSampler, worker_process
    from config.celery_app import app
    from jobs.models import Job
    from tasks.default import ping

    Job.objects.filter(type="default.ping").delete()
    with worker_process(app, "default", int(os.environ.get("CELERY_WORKER_CONCURRENCY", "2"))) as worker:
        sampler = TreeSampler(worker.pid)
        app.control.cancel_consumer("default", reply=True, timeout=5, limit=1)
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for _ in range(jobs):
                ping.apply_async(producer=producer)
        enqueue_seconds = time.perf_counter() - started
        started = time.perf_counter()
        app.control.add_consumer("default", reply=True, timeout=5, limit=1)
        deadline = time.monotonic() + 600
        done = 0
        while done < jobs:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {done} of {jobs} jobs succeeded within 600 s")
            time.sleep(0.05)
            done = Job.objects.filter(type="default.ping", status=Job.Status.SUCCEEDED).count()
        drain_seconds = time.perf_counter() - started
        peak = sampler.stop()
    return {
        "enqueue_per_s": jobs / enqueue_seconds,
        "drain_jobs_per_s": jobs / drain_seconds,
        "worker_peak_rss_mib": peak / 2**20,
    }


def child(args: argparse.Namespace) -> None:
    from bench.support import setup_django

    setup_django(args.database_url, args.broker_url)
    print(json.dumps(measure(args.jobs)))


def run_child(broker_url: str, args: argparse.Namespace) -> dict[str, Any]:
    done = subprocess.run(
        [
            *(sys.executable, "-m", "bench.brokers", "--child", "--broker-url", broker_url),
            *("--jobs", str(args.jobs), "--database-url", args.database_url),
        ],
        cwd=ROOT,
        # Metrics and the shared rate limits live in Redis on either broker, as a RabbitMQ
        # deployment needs (docs/brokers.md).
        env={**os.environ, "METRICS_REDIS_URL": args.redis_url},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"the run on {broker_url} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for key in runs[0]:
        values = [run[key] for run in runs]
        out[key] = statistics.median(values)
        out[f"{key}_range"] = [min(values), max(values)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--rabbitmq-url", default="amqp://guest:guest@127.0.0.1:5672/bench_brokers")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench_brokers")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from bench.support import ensure_database, write_results

    ensure_database(args.database_url)
    vhost = args.rabbitmq_url.rsplit("/", 1)[-1]
    if vhost:  # the bench's own: queues an earlier run (or version) declared go with it
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, check=False)
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], capture_output=True, check=False)
        subprocess.run(
            ["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
            capture_output=True,
            check=False,
        )
    brokers = {"redis": args.redis_url, "rabbitmq": args.rabbitmq_url}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in brokers}
    print(f"{args.jobs} default.ping jobs a run, {args.repetitions} repetitions, broker order alternating")
    for repetition in range(1, args.repetitions + 1):
        order = list(brokers) if repetition % 2 else list(reversed(brokers))
        for name in order:
            run = run_child(brokers[name], args)
            runs[name].append(run)
            print(
                f"  run {repetition} {name:8}: enqueue {run['enqueue_per_s']:7.0f}/s, "
                f"drain {run['drain_jobs_per_s']:6.0f} jobs/s, worker {run['worker_peak_rss_mib']:.0f} MiB"
            )
    figures = {name: summary(items) for name, items in runs.items()}
    for name, figure in figures.items():
        print(
            f"median {name:8}: enqueue {figure['enqueue_per_s']:7.0f}/s, "
            f"drain {figure['drain_jobs_per_s']:6.0f} jobs/s, worker {figure['worker_peak_rss_mib']:.0f} MiB"
        )
    services = {}
    try:
        version = subprocess.run(
            ["rabbitmqctl", "-q", "version"], capture_output=True, text=True, check=False, timeout=30
        )
        services["rabbitmq"] = version.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        services["rabbitmq"] = "unknown"
    from bench.support import service_versions

    services.update(service_versions(args.database_url, args.redis_url))
    params = {key: value for key, value in vars(args).items() if key not in ("child", "broker_url")}
    write_results("brokers", figures, params, services=services)


if __name__ == "__main__":
    main()
