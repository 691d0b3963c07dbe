"""The worker's broker and events path: jobs/s draining a backlog, and Redis commands per job.

    .venv/bin/python -m bench.worker_path [--task ping|noop] [--jobs 3000] [--repetitions 3]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_worker_path]
        [--broker-url redis://127.0.0.1:6379/13] [--count] [--workers 1] [--set NAME=VALUE ...]
        [-- extra worker arguments]

A worker as the Procfile's general worker runs it (`celery -A config worker -Q
default,images,data_sync,analytics`, production settings, prefork unless the extra arguments say
otherwise; `--workers N` starts N of them), its consumers cancelled; N jobs are sent with
`apply_async` from one client; the consumers added back; the drain is the time until every job is
done: for `ping` (default.ping, a JobTask) until every job row is `succeeded`, for `noop`
(default.bench_noop, no result) until a sentinel sent last has its result.

`--count` watches the broker's Redis database with MONITOR during the enqueue and during the drain
(a run of its own: MONITOR slows Redis, so its rates are not reported) and prints the commands per
job, by command: what a client sent (a pipeline's commands count one each) and what ran inside
Lua scripts (not round trips). `--set NAME=VALUE` passes a setting to the worker's environment
(e.g. `--set CELERY_WORKER_PREFETCH_MULTIPLIER=4`). Prints each run and the median; writes nothing
to docs/results (a tool for comparing two trees or two settings back to back).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUEUES = "default,images,data_sync,analytics"  # the Procfile's general worker


class CommandCounter(threading.Thread):
    """Counts the commands Redis runs in one database (MONITOR), by name; scripts' own apart."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        import redis

        self.client = redis.Redis.from_url(url)
        self.db = self.client.connection_pool.connection_kwargs.get("db", 0)
        self.counts: collections.Counter[str] = collections.Counter()
        self.recording = False
        self._stop = threading.Event()
        self._ready = threading.Event()

    def run(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            for entry in monitor.listen():
                if self._stop.is_set():
                    return
                if not self.recording or int(entry.get("db", -1)) != self.db:
                    continue
                command = str(entry.get("command", "")).split(" ", 1)[0].upper()
                where = "lua" if entry.get("client_type") == "lua" else "client"
                self.counts[f"{where}:{command}"] += 1

    def start(self) -> None:
        super().start()
        self._ready.wait(5)

    @contextlib.contextmanager
    def recording_into(self, into: collections.Counter[str]) -> Iterator[None]:
        time.sleep(0.2)  # let MONITOR catch up with what came before
        self.counts = collections.Counter()
        self.recording = True
        try:
            yield
        finally:
            time.sleep(0.5)  # what the broker ran just before the end still arrives
            self.recording = False
            into.update(self.counts)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.client.ping()  # wakes listen()


@contextlib.contextmanager
def workers(app: Any, count: int, settings: dict[str, str], extra: list[str], noop: bool) -> Iterator[None]:
    app.control.purge()
    processes = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **settings}
    for index in range(count):
        log = Path(tempfile.gettempdir()) / f"bench_worker_path_{os.getpid()}_{index}.log"
        with log.open("w") as log_file:
            processes.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", QUEUES),
                        *("-n", f"bench{index}@%h", "--loglevel=WARNING"),
                        *(("-I", "bench.noop") if noop else ()),
                        *extra,
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        deadline = time.monotonic() + 90
        while True:
            names = {name for reply in app.control.ping(timeout=0.5) or [] for name in reply}
            if sum(1 for name in names if name.startswith("bench")) >= count:
                break
            if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
                raise SystemExit(f"a worker did not start; see {tempfile.gettempdir()}/bench_worker_path_*")
        yield
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)


def one_run(
    app: Any, args: argparse.Namespace, settings: dict[str, str], counter: CommandCounter | None
) -> dict[str, Any]:
    from bench.noop import noop, sentinel
    from jobs.models import Job
    from tasks.default import ping

    enqueue_counts: collections.Counter[str] = collections.Counter()
    drain_counts: collections.Counter[str] = collections.Counter()
    Job.objects.filter(type="default.ping").delete()
    with workers(app, args.workers, settings, args.worker_args, args.task == "noop"):
        for queue in QUEUES.split(","):
            app.control.cancel_consumer(queue, reply=True, timeout=5, limit=args.workers)
        recording = counter.recording_into if counter else lambda into: contextlib.nullcontext()
        with recording(enqueue_counts):
            started = time.perf_counter()
            with app.producer_or_acquire() as producer:
                task = ping if args.task == "ping" else noop
                for _ in range(args.jobs):
                    task.apply_async(producer=producer)
                done = sentinel.apply_async(producer=producer) if args.task == "noop" else None
            enqueue_seconds = time.perf_counter() - started
        with recording(drain_counts):
            started, busy_before = time.perf_counter(), machine_busy_seconds()
            for queue in QUEUES.split(","):
                app.control.add_consumer(queue, reply=True, timeout=5, limit=args.workers)
            if done is not None:
                done.get(timeout=600, interval=0.005)
            else:
                deadline = time.monotonic() + 600
                while (
                    Job.objects.filter(type="default.ping", status=Job.Status.SUCCEEDED).count() < args.jobs
                ):
                    if time.monotonic() > deadline:
                        raise SystemExit("the jobs did not all succeed within 600 s")
                    time.sleep(0.05)
            drain_seconds = time.perf_counter() - started
            busy = machine_busy_seconds() - busy_before
    run: dict[str, Any] = {
        "enqueue_per_s": args.jobs / enqueue_seconds,
        "drain_jobs_per_s": args.jobs / drain_seconds,
        # Every process's CPU (this one's polling included): what a job costs the machine.
        "drain_cpu_ms_per_job": 1000 * busy / args.jobs,
    }
    if counter:
        run["enqueue_commands"] = dict(enqueue_counts)
        run["drain_commands"] = dict(drain_counts)
    return run


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat: all but idle and iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def print_counts(title: str, counts: dict[str, int], jobs: int) -> None:
    client = sum(n for name, n in counts.items() if name.startswith("client:"))
    lua = sum(n for name, n in counts.items() if name.startswith("lua:"))
    print(f"  {title}: {client / jobs:.2f} client commands per job (+ {lua / jobs:.2f} inside scripts)")
    for name, n in sorted(counts.items(), key=lambda item: -item[1]):
        if n / jobs >= 0.01:
            print(f"      {name:24} {n / jobs:7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=["ping", "noop"], default="ping")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--count", action="store_true", help="count Redis commands per job (MONITOR)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/bench_worker_path")
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("worker_args", nargs="*", help="after --: more arguments for each worker")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)

    from bench.support import setup_django

    setup_django(args.database_url, args.broker_url, **settings)
    from config.celery_app import app

    counter = None
    if args.count:
        counter = CommandCounter(args.broker_url)
        counter.start()
    print(
        f"{args.jobs} {args.task} jobs a run, {args.workers} worker(s) {' '.join(args.worker_args)} "
        f"{' '.join(args.set)}"
    )
    runs = []
    for repetition in range(1, args.repetitions + 1):
        run = one_run(app, args, settings, counter)
        runs.append(run)
        print(
            f"  run {repetition}: enqueue {run['enqueue_per_s']:7.0f}/s, "
            f"drain {run['drain_jobs_per_s']:7.0f} jobs/s, {run['drain_cpu_ms_per_job']:.2f} ms CPU a job"
            + ("  (counting: rates slowed by MONITOR)" if counter else "")
        )
        if counter:
            print_counts("enqueue", run["enqueue_commands"], args.jobs)
            print_counts("drain", run["drain_commands"], args.jobs)
    if counter:
        counter.stop()
    drains = [run["drain_jobs_per_s"] for run in runs]
    enqueues = [run["enqueue_per_s"] for run in runs]
    print(
        f"median: enqueue {statistics.median(enqueues):.0f}/s, drain {statistics.median(drains):.0f} jobs/s "
        f"[{min(drains):.0f}-{max(drains):.0f}], "
        f"{statistics.median(run['drain_cpu_ms_per_job'] for run in runs):.2f} ms of the machine's CPU a job"
    )


if __name__ == "__main__":
    main()
