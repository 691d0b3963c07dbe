"""A newsletter fanned out through a real worker to a local SMTP server: time to the last message sent.

    .venv/bin/python -m bench.fanout [--recipients 10000] [--batch-size 100] [--repeat 3]
        [--concurrency 2] [--timeout 120]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_fanout]
        [--broker-url redis://127.0.0.1:6379/13]

Starts an aiosmtpd server on loopback that accepts every message at once, then
`celery -A config worker -Q email -c C` as a process, pointed at that server
(EMAIL_URL) with EMAIL_SEND_RATE at 1,000,000/second, so the global rate
limiter is not what is measured. Each run sends `email.newsletter` to N
recipients (batches of --batch-size, window_seconds 0, a new campaign name so
every message key is new) with a plain `apply_async(kwargs=...)`, and times
from that call to (a) every recipient having an EmailLog row with status
sent, and (b) the newsletter's Job row (found by its task id) reaching a
final status (succeeded, failed, cancelled or partially_failed); both are
polled every 50 ms. Prints, per run and as the median (min-max) over
--repeat runs: (a), (b), messages/s (N / (a)), and the peak RSS of the
worker's process tree (sampled every 50 ms). Writes the figures to
docs/results/fanout.json.

Only the task's name and arguments, the EmailLog model and the Job model are
relied on. The database given is created if missing (PostgreSQL) and
migrated; email log rows of earlier runs of this benchmark are deleted first,
and on PostgreSQL the database is vacuumed (VACUUM ANALYZE) before each run,
outside the timing, so that no run pays for the dead rows of the ones before
it (autovacuum may be slow to come, or off: it is off on the machine this was
written on).
A run that takes longer than --timeout seconds ends the benchmark with a
message saying how far it got; the worker is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support import TreeSampler, setup_django, worker_process, write_results  # noqa: E402

CAMPAIGN_PREFIX = "bench-fanout-"
# A job in one of these is done; "partially_failed" is accepted for code that may report it.
FINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled", "partially_failed"})
# EmailLog statuses a message does not leave by itself.
SETTLED_EMAIL_STATUSES = frozenset({"sent", "failed", "unknown"})
SEND_RATE = "1000000/second"
POLL_SECONDS = 0.05
# Every how many polls the email log is counted by status (a message that will never be sent).
SETTLED_CHECK_EVERY = 20


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def shown(values: list[float], unit: str, digits: int) -> str:
    figure = spread(values)
    return (
        f"{figure['median']:,.{digits}f}{unit} "
        f"({figure['min']:,.{digits}f}-{figure['max']:,.{digits}f}{unit})"
    )


def autovacuum() -> str:
    """The server's autovacuum setting ("on" or "off"; "n/a" off PostgreSQL)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return "n/a"
    with connection.cursor() as cursor:
        cursor.execute("SHOW autovacuum")
        return str(cursor.fetchone()[0])


def vacuum() -> float:
    """VACUUM ANALYZE of the benchmark's whole database (PostgreSQL only); the seconds it took."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return 0.0
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")  # autocommit: VACUUM cannot run inside a transaction
    return time.perf_counter() - started


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, of its live descendants and of the children it reaped."""
    root = psutil.Process(pid)
    times = root.cpu_times()
    total = float(times.user + times.system + times.children_user + times.children_system)
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a child that just exited
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return total


def stop_tree(process: subprocess.Popen[bytes] | None) -> None:
    """Kills a worker (and its pool) that is still there after its warm shutdown was asked for."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    process.kill()
    process.wait(timeout=30)


class SmtpCounter:
    """An aiosmtpd handler that accepts every message at once and counts them."""

    received = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.received += 1
        return "250 OK"


def run_once(
    number: int,
    worker: subprocess.Popen[bytes],
    smtp: SmtpCounter,
    recipients: list[str],
    batch_size: int,
    timeout: float,
) -> dict[str, Any]:
    """One newsletter to every recipient, timed from apply_async to all sent and to the job's end."""
    from django.db.models import Count

    from jobs.models import Job
    from tasks.email import newsletter
    from tasks.models import EmailLog

    n = len(recipients)
    campaign = f"{CAMPAIGN_PREFIX}{uuid.uuid4().hex[:12]}"  # new message keys every run
    kwargs = {
        "campaign": campaign,
        "template": "newsletter",
        "recipients": recipients,
        "context": {"title": "Bench", "body": "Hello"},
        "batch_size": batch_size,
        "window_seconds": 0,
    }
    vacuumed = vacuum()  # the dead rows of earlier runs, not timed
    received_before = smtp.received
    sampler = TreeSampler(worker.pid)
    worker_cpu, own_cpu = tree_cpu_seconds(worker.pid), time.process_time()
    started = time.perf_counter()
    result = newsletter.apply_async(kwargs=kwargs)
    published = time.perf_counter() - started
    all_sent: float | None = None
    job_final: float | None = None
    job_status: str | None = None
    logs = EmailLog.objects.filter(campaign=campaign)

    def by_status() -> dict[str, int]:
        rows = logs.values_list("status").annotate(count=Count("id")).order_by()
        return {status: count for status, count in rows}

    polls = 0
    try:
        while True:
            polls += 1
            if job_final is None:
                job_status = Job.objects.filter(task_id=result.id).values_list("status", flat=True).first()
                if job_status in FINAL_JOB_STATUSES:
                    job_final = time.perf_counter() - started
            if all_sent is None:
                if logs.filter(status=EmailLog.Status.SENT).count() >= n:
                    all_sent = time.perf_counter() - started
                elif polls % SETTLED_CHECK_EVERY == 0:  # the dearer query, once a second
                    counts = by_status()
                    if sum(counts.get(status, 0) for status in SETTLED_EMAIL_STATUSES) >= n:
                        raise SystemExit(
                            f"run {number}: every message is settled but not every one was sent: "
                            f"{counts}; newsletter job {job_status}; see the worker's log"
                        )
            if all_sent is not None and job_final is not None:
                break
            if worker.poll() is not None:
                raise SystemExit(f"run {number}: the worker exited ({worker.returncode}); see its log")
            if time.perf_counter() - started > timeout:
                raise SystemExit(
                    f"run {number}: timed out after {timeout:.0f} s (--timeout): "
                    f"{'every message sent' if all_sent is not None else f'email log rows {by_status()}'} "
                    f"of {n:,} recipients; newsletter job {job_status or 'not recorded yet'} "
                    f"(task {result.id}); the SMTP server received {smtp.received - received_before:,}"
                )
            time.sleep(POLL_SECONDS)
    finally:
        peak = sampler.stop()
    worker_cpu, own_cpu = tree_cpu_seconds(worker.pid) - worker_cpu, time.process_time() - own_cpu
    outcome = {
        "campaign": campaign,
        "all_sent_seconds": all_sent,
        "job_final_seconds": job_final,
        "job_status": job_status,
        "messages_per_s": n / all_sent,
        "apply_async_seconds": published,
        "vacuum_seconds": vacuumed,
        "received": smtp.received - received_before,
        "worker_process_tree_peak_rss_mib": peak / 2**20,
        "worker_process_tree_cpu_seconds": worker_cpu,
        "bench_process_cpu_seconds": own_cpu,
    }
    print(
        f"run {number}: all sent {all_sent:6.2f} s ({n / all_sent:6,.0f} messages/s); "
        f"newsletter job {job_status} {job_final:6.2f} s; apply_async {published:.2f} s; "
        f"SMTP server received {outcome['received']:,}; worker tree peak RSS {peak / 2**20:.0f} MiB; "
        f"CPU: worker tree {worker_cpu:.1f} s, this process (SMTP server, polling) {own_cpu:.1f} s"
    )
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipients", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=120, help="seconds one run may take")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench_fanout"),
    )
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument(
        "--results-name",
        default="fanout",
        help="the results file (docs/results/<name>.json): another name keeps a comparison run apart",
    )
    options = parser.parse_args()
    if options.recipients < 1 or options.repeat < 1:
        parser.error("--recipients and --repeat must be at least 1")

    from localdev.embedded_broker import free_port

    port = free_port()
    setup_django(
        options.database_url,
        options.broker_url,
        # The worker inherits these: it sends to the server below, as fast as it can.
        EMAIL_URL=f"smtp://127.0.0.1:{port}",
        EMAIL_SEND_RATE=SEND_RATE,
        LOG_LEVEL="WARNING",
        DJANGO_READ_DOT_ENV_FILE="false",
    )
    from aiosmtpd.controller import Controller
    from django.db import connection

    from config.celery_app import app
    from tasks.models import EmailLog

    EmailLog.objects.filter(campaign__startswith=CAMPAIGN_PREFIX).delete()
    vacuum_setting = autovacuum()
    n = options.recipients
    recipients = [f"reader{i}@example.com" for i in range(n)]
    smtp = SmtpCounter()
    controller = Controller(smtp, hostname="127.0.0.1", port=port, server_hostname="bench.localhost")
    controller.start()
    runs: list[dict[str, Any]] = []
    started_worker: subprocess.Popen[bytes] | None = None
    try:
        with worker_process(app, "email", options.concurrency) as worker:
            started_worker = worker
            print(
                f"{n:,} recipients, batches of {options.batch_size}, window 0 s; "
                f"worker -Q email -c {options.concurrency}; SMTP server 127.0.0.1:{port}; "
                f"EMAIL_SEND_RATE {SEND_RATE}; database {connection.vendor} "
                f"({connection.settings_dict['NAME']}, autovacuum {vacuum_setting}, "
                f"VACUUM ANALYZE before each run); {options.repeat} runs"
            )
            for number in range(1, options.repeat + 1):
                runs.append(run_once(number, worker, smtp, recipients, options.batch_size, options.timeout))
                time.sleep(1)  # the last batches' bookkeeping ends before the next run starts
    finally:
        stop_tree(started_worker)  # if its warm shutdown did not end it
        controller.stop()

    all_sent = [run["all_sent_seconds"] for run in runs]
    job_final = [run["job_final_seconds"] for run in runs]
    rates = [run["messages_per_s"] for run in runs]
    peaks = [run["worker_process_tree_peak_rss_mib"] for run in runs]
    print(f"median (min-max) over {len(runs)} runs:")
    print(f"  all sent (EmailLog)        {shown(all_sent, ' s', 2)}")
    print(f"  newsletter job final       {shown(job_final, ' s', 2)}")
    print(f"  messages/s                 {shown(rates, '', 0)}")
    print(f"  worker tree peak RSS       {shown(peaks, ' MiB', 0)} (sampled every 50 ms)")
    print(f"received by the SMTP server: {smtp.received:,} (expected {n * len(runs):,})")
    figures = {
        "recipients": n,
        "batches": -(-n // options.batch_size),
        "email_send_rate": SEND_RATE,
        "autovacuum": vacuum_setting,
        "runs": runs,
        "all_sent_seconds": spread(all_sent),
        "job_final_seconds": spread(job_final),
        "messages_per_s": spread(rates),
        "worker_process_tree_peak_rss_mib": spread(peaks),
        "received": smtp.received,
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
