"""How fast one client sends jobs: `apply_async` and the durable `enqueue()`, one by one and batched.

    .venv/bin/python -m bench.enqueue [--jobs 5000] [--batch-size 1000] [--repetitions 3]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_enqueue]
        [--broker-url redis://127.0.0.1:6379/13] [--without-sent-event]

With the production settings (config.settings.base) on the bench's own database and broker, in one
process, no worker (the messages stay in the broker and are purged after each mode), N
`default.ping` jobs in each mode:

- apply_async: `ping.apply_async(producer=producer)` N times (each publish one round trip; on
  RabbitMQ, waiting for its confirm);
- apply_async, batched: the same inside `producer.batch()` (kombu's transport-owned batches:
  one pipeline per batch on Redis), batches of --batch-size;
- enqueue(): `with transaction.atomic(): enqueue("default.ping")` N times (a row, a commit,
  a publish on commit, the row marked published);
- enqueue(), batched: `enqueue_many("default.ping", [{}] * size)` in one transaction, batches
  of --batch-size (one INSERT, one publish, one UPDATE).

Repetitions are interleaved (every mode once, then again); prints each run and the medians with
their spread, and writes docs/results/enqueue.json. --without-sent-event sends no task-sent
event (CELERY_TASK_SEND_SENT_EVENT off), to see what it costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support import setup_django, write_results  # noqa: E402


def apply_async_single(jobs: int, batch_size: int) -> None:
    from config.celery_app import app
    from tasks.default import ping

    with app.producer_or_acquire() as producer:
        for _ in range(jobs):
            ping.apply_async(producer=producer)


def apply_async_batched(jobs: int, batch_size: int) -> None:
    from config.celery_app import app
    from tasks.default import ping

    with app.producer_or_acquire() as producer:
        for start in range(0, jobs, batch_size):
            with producer.batch(max_size=batch_size * 2 + 8):
                for _ in range(min(batch_size, jobs - start)):
                    ping.apply_async(producer=producer)


def enqueue_single(jobs: int, batch_size: int) -> None:
    from django.db import transaction

    from jobs.outbox import enqueue

    for _ in range(jobs):
        with transaction.atomic():
            enqueue("default.ping")


def enqueue_batched(jobs: int, batch_size: int) -> None:
    from django.db import transaction

    from jobs import outbox

    for start in range(0, jobs, batch_size):
        size = min(batch_size, jobs - start)
        with transaction.atomic():
            if hasattr(outbox, "enqueue_many"):
                outbox.enqueue_many("default.ping", [{}] * size)
            else:  # before enqueue_many: one enqueue() per job in one transaction
                for _ in range(size):
                    outbox.enqueue("default.ping")


MODES: dict[str, Callable[[int, int], None]] = {
    "apply_async": apply_async_single,
    "apply_async_batched": apply_async_batched,
    "enqueue": enqueue_single,
    "enqueue_batched": enqueue_batched,
}


def run(mode: str, jobs: int, batch_size: int) -> float:
    from config.celery_app import app
    from jobs.models import Job

    app.control.purge()
    Job.objects.filter(type="default.ping").delete()
    started = time.perf_counter()
    MODES[mode](jobs, batch_size)
    seconds = time.perf_counter() - started
    if mode.startswith("enqueue"):
        unpublished = Job.objects.filter(type="default.ping", published_at__isnull=True).count()
        if unpublished:
            raise SystemExit(f"{mode}: {unpublished} jobs left unpublished")
    return jobs / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench_enqueue")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--without-sent-event", action="store_true")
    args = parser.parse_args()
    modes = [mode for mode in args.modes.split(",") if mode]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")

    setup_django(args.database_url, args.broker_url, LOG_LEVEL="WARNING")
    from config.celery_app import app

    if args.without_sent_event:
        app.conf.task_send_sent_event = False
    for mode in modes:  # warm-up: connections, imports, topology
        run(mode, min(200, args.jobs), args.batch_size)
    runs: dict[str, list[float]] = {mode: [] for mode in modes}
    print(
        f"{args.jobs} default.ping jobs a run, batches of {args.batch_size}, {args.repetitions} repetitions; "
        f"broker {args.broker_url.split('@')[-1]}; sent event {'off' if args.without_sent_event else 'on'}"
    )
    for repetition in range(1, args.repetitions + 1):
        for mode in modes:
            rate = run(mode, args.jobs, args.batch_size)
            runs[mode].append(rate)
            print(f"  run {repetition} {mode:<20} {rate:8.0f} jobs/s")
    figures: dict[str, Any] = {}
    for mode, rates in runs.items():
        median = statistics.median(rates)
        figures[mode] = {"jobs_per_s": median, "range": [min(rates), max(rates)], "runs": rates}
        print(f"median {mode:<20} {median:8.0f} jobs/s [{min(rates):.0f}-{max(rates):.0f}]")
    app.control.purge()
    write_results("enqueue", figures, vars(args), database_url=args.database_url, redis_url=args.broker_url)


if __name__ == "__main__":
    main()
