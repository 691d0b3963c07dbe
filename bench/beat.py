"""Beat's dispatch lag (due time to sent) and memory with N enabled schedules in PostgreSQL.

    .venv/bin/python -m bench.beat [--schedules 1000] [--minutes 3] [--warm-up 60]
        [--database-url postgres://postgres@127.0.0.1:5432/bench_beat]
        [--broker-url redis://127.0.0.1:6379/11] [--debug]

Deletes every periodic task, run record and lease in the bench database, then
creates N enabled `default.ping` schedules: 60% cron `* * * * *` and 20% cron
`*/2 * * * *` (each spread over UTC, America/New_York, Europe/Berlin and
Asia/Kolkata), 20% every 30 s (interval); last run "now", so nothing is missed.
Starts `celery -A config beat -S scheduling.beat:Scheduler` as a process (no
worker: the messages stay in the broker), lets it run for --minutes, then until
every occurrence due before then has been sent (at most 60 s more), and stops it
with SIGTERM. Its RSS is sampled every second.

Lag is `dispatched_at - occurrence` of the ScheduledRun rows (scheduled,
dispatched) whose occurrence falls in [start + warm-up, start + minutes): the
first minute (start-up, first load of the schedules) is left out. Prints lag
percentiles (all, and per kind of schedule), sends per second, duplicates (must
be 0), occurrences expected but not sent, start-up time, and the number of
messages really in the broker queues (purged at the end) against the rows. Writes the figures to
docs/results/beat.json.

Beat runs with the production settings (config.settings.base, DEBUG off): with
DEBUG on, Django keeps up to 9,000 queries per connection in memory, which
would count as beat's memory. --debug runs it with DJANGO_DEBUG=1 to compare.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.support import ensure_database, write_results  # noqa: E402

TASK = "default.ping"
ZONES = ("UTC", "America/New_York", "Europe/Berlin", "Asia/Kolkata")
INTERVAL_SECONDS = 30
DRAIN_SECONDS = 60
# (kind label, share of the schedules); the rest of the split goes to the first.
MIX = (("cron * * * * *", 0.6), ("cron */2 * * * *", 0.2), (f"every {INTERVAL_SECONDS} s", 0.2))
# The kinds' keys in the results file.
KIND_KEYS = dict(zip((kind for kind, _ in MIX), ("every_minute", "every_2_minutes", "interval"), strict=True))


class RssSampler:
    """RSS of one process, every `every` seconds, kept as (monotonic time, bytes)."""

    def __init__(self, pid: int, every: float = 1.0) -> None:
        self.process = psutil.Process(pid)
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.samples.append((time.monotonic(), self.process.memory_info().rss))
            except psutil.Error:
                return
            if self._stop.wait(self.every):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def plan(count: int) -> list[tuple[str, str | None, str]]:
    """(kind, zone or None, name) for each schedule, in the proportions of MIX."""
    sizes = [int(count * share) for _, share in MIX]
    sizes[0] += count - sum(sizes)
    schedules = []
    number = 0
    for (kind, _), size in zip(MIX, sizes, strict=True):
        for index in range(size):
            number += 1
            zone = None if kind.startswith("every") else ZONES[index % len(ZONES)]
            schedules.append((kind, zone, f"bench {number:05d}: {kind} {zone or ''}".rstrip()))
    return schedules


def expected_occurrences(kind: str, zone: str | None, start: datetime, end: datetime) -> int:
    """How many occurrences a schedule has in [start, end)."""
    from scheduling.cron import Cron

    if zone is None:
        first = -(-start.timestamp() // INTERVAL_SECONDS)
        last = -(-end.timestamp() // INTERVAL_SECONDS)
        return int(last - first)
    tick = timedelta(microseconds=1)
    return sum(1 for _ in Cron.parse(kind.removeprefix("cron "), zone).iter_between(start - tick, end - tick))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f}"


def lag_figures(lags: list[float]) -> dict[str, float | int | None]:
    if len(lags) < 2:
        return {"sends": len(lags), "p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    return {
        "sends": len(lags),
        "p50_ms": cuts[49] * 1000,
        "p95_ms": cuts[94] * 1000,
        "p99_ms": cuts[98] * 1000,
        "max_ms": max(lags) * 1000,
    }


def lag_row(label: str, lags: list[float]) -> str:
    if len(lags) < 2:
        return f"{label:<20} {len(lags):>6}  (too few to say)"
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    return f"{label:<20} {len(lags):>6} {ms(cuts[49])} {ms(cuts[94])} {ms(cuts[98])} {ms(max(lags))}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedules", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=3.0, help="how long beat runs (then drains)")
    parser.add_argument("--warm-up", type=float, default=60.0, help="seconds left out at the start")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/bench_beat"),
    )
    parser.add_argument("--broker-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11"))
    parser.add_argument("--debug", action="store_true", help="run beat with DJANGO_DEBUG=1")
    options = parser.parse_args()
    if options.minutes * 60 <= options.warm_up:
        parser.error("--minutes must be longer than the warm-up")

    ensure_database(options.database_url)
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings.base",
        DATABASE_URL=options.database_url,
        CELERY_BROKER_URL=options.broker_url,
        LOG_LEVEL="INFO",
    )
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-not-a-secret")
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.db.models import Count
    from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks

    from config.celery_app import app
    from scheduling.defaults import crontab_for
    from scheduling.models import BeatLease, ScheduledRun

    call_command("migrate", verbosity=0)
    PeriodicTask.objects.all().delete()
    ScheduledRun.objects.all().delete()
    BeatLease.objects.all().delete()
    interval, _ = IntervalSchedule.objects.get_or_create(
        every=INTERVAL_SECONDS, period=IntervalSchedule.SECONDS
    )
    schedules = plan(options.schedules)
    now = datetime.now(UTC)
    PeriodicTask.objects.bulk_create(
        [
            PeriodicTask(
                name=name,
                task=TASK,
                enabled=True,
                last_run_at=now,
                crontab=None if zone is None else crontab_for(kind.removeprefix("cron "), zone),
                interval=interval if zone is None else None,
            )
            for kind, zone, name in schedules
        ],
        batch_size=500,
    )
    PeriodicTasks.update_changed()
    enabled = PeriodicTask.objects.filter(enabled=True).count()
    leftover = app.control.purge()

    log = Path(tempfile.gettempdir()) / "bench_beat.log"
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "DJANGO_DEBUG": "1" if options.debug else "0"}
    with log.open("w") as log_file:
        started_wall = datetime.now(UTC)
        started = time.monotonic()
        beat = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "config", "beat"),
                *("-S", "scheduling.beat:Scheduler", "--pidfile=", "-l", "INFO"),
            ],
            cwd=ROOT,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    sampler = RssSampler(beat.pid)
    window_start = started_wall + timedelta(seconds=options.warm_up)
    window_end = started_wall + timedelta(minutes=options.minutes)
    expected = {
        name: expected_occurrences(kind, zone, window_start, window_end) for kind, zone, name in schedules
    }
    in_window = ScheduledRun.objects.filter(
        kind=ScheduledRun.Kind.SCHEDULED,
        status=ScheduledRun.Status.DISPATCHED,
        occurrence__gte=window_start,
        occurrence__lt=window_end,
    )
    try:
        acquired = None
        while time.monotonic() < started + options.minutes * 60:
            if beat.poll() is not None:
                raise SystemExit(f"beat exited ({beat.returncode}); see {log}")
            if acquired is None:
                lease = BeatLease.objects.filter(acquired_at__isnull=False).first()
                acquired = lease.acquired_at if lease else None
            time.sleep(1)
        drain_deadline = time.monotonic() + DRAIN_SECONDS
        while in_window.count() < sum(expected.values()) and time.monotonic() < drain_deadline:
            time.sleep(1)
        drained = time.monotonic() - started - options.minutes * 60
        cpu = psutil.Process(beat.pid).cpu_times()
        ran = time.monotonic() - started
    finally:
        sampler.stop()
        stopping = time.monotonic()
        beat.send_signal(signal.SIGTERM)
        try:
            beat.wait(timeout=60)
        except subprocess.TimeoutExpired:
            beat.kill()
            beat.wait()
    stopped_in = time.monotonic() - stopping

    runs = list(in_window.values_list("schedule_name", "occurrence", "dispatched_at"))
    every = ScheduledRun.objects.filter(kind=ScheduledRun.Kind.SCHEDULED)
    dispatched = every.filter(status=ScheduledRun.Status.DISPATCHED)
    total = dispatched.count()
    other_status = every.exclude(status=ScheduledRun.Status.DISPATCHED).count()
    duplicates = (
        every.values("schedule_name", "occurrence").annotate(rows=Count("id")).filter(rows__gt=1).count()
    )
    first_dispatch = dispatched.order_by("dispatched_at").values_list("dispatched_at", flat=True).first()
    names_sent = dispatched.values("schedule_name").distinct().count()
    messages = app.control.purge()
    sent = Counter(name for name, _, _ in runs)
    missing = sum(max(0, count - sent[name]) for name, count in expected.items())
    kind_of = {name: kind for kind, _, name in schedules}
    lags = [(dispatched_at - occurrence).total_seconds() for _, occurrence, dispatched_at in runs]
    window_seconds = (window_end - window_start).total_seconds()
    busy: dict[datetime, list[datetime]] = {}
    for _, occurrence, dispatched_at in runs:
        busy.setdefault(occurrence, []).append(dispatched_at)
    busy_seconds = sum((max(times) - occurrence).total_seconds() for occurrence, times in busy.items())
    problems = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if " ERROR " in line or " WARNING " in line or "Traceback" in line
    ]
    rss = [value for _, value in sampler.samples]
    after_start = next((value for moment, value in sampler.samples if moment >= started + 10), rss[0])

    print(
        f"beat, {options.schedules} schedules ({', '.join(f'{share:.0%} {kind}' for kind, share in MIX)}; "
        f"zones {', '.join(ZONES)}); database {connection.vendor} ({connection.settings_dict['NAME']}); "
        f"broker {options.broker_url}; DEBUG {'on' if options.debug else 'off'}; no worker"
    )
    print(
        f"ran {ran:.0f} s ({options.minutes:g} min + {drained:.0f} s drain), stopped by SIGTERM in "
        f"{stopped_in:.1f} s (exit {beat.returncode}); lag over occurrences due "
        f"{window_start:%H:%M:%S}-{window_end:%H:%M:%S} UTC ({window_seconds:.0f} s; the first "
        f"{options.warm_up:g} s are warm-up, left out)"
    )
    print(f"{'lag (ms)':<20} {'sends':>6} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}")
    print(lag_row("all", lags))
    for kind, _ in MIX:
        print(
            lag_row(
                kind, [lag for lag, (name, _, _) in zip(lags, runs, strict=True) if kind_of[name] == kind]
            )
        )
    print(
        f"schedules: {enabled} enabled, {names_sent} sent at least once; in the window {len(runs)} sent of "
        f"{sum(expected.values())} expected (missing {missing}); {len(runs) / window_seconds:.1f} sends/s "
        f"on average, {len(runs) / busy_seconds if busy_seconds else 0:.0f} sends/s while busy"
    )
    print(
        f"whole run: {total} sent, {other_status} skipped/refused, duplicates {duplicates} "
        f"(occurrences with more than one row); messages in the broker {messages} (purged; "
        f"{leftover} left from before, purged at the start); warnings/errors in the log {len(problems)}"
    )
    startup = f"{(acquired - started_wall).total_seconds():.1f} s" if acquired else "never"
    first = f"+{(first_dispatch - started_wall).total_seconds():.1f} s" if first_dispatch else "none"
    print(f"start-up: lease taken (ready to dispatch) after {startup}; first send at {first}")
    print(
        f"beat RSS: {after_start / 2**20:.0f} MiB 10 s after start, peak {max(rss) / 2**20:.0f} MiB, "
        f"at end {rss[-1] / 2**20:.0f} MiB ({len(rss)} samples, every 1 s); "
        f"CPU {cpu.user + cpu.system:.1f} s ({(cpu.user + cpu.system) / ran:.0%} of one core); log {log}"
    )
    for line in problems[:5]:
        print(f"  log: {line[:200]}")
    figures = {
        "schedules": options.schedules,
        "lag": lag_figures(lags),
        "lag_by_kind": {
            KIND_KEYS[kind]: lag_figures(
                [lag for lag, (name, _, _) in zip(lags, runs, strict=True) if kind_of[name] == kind]
            )
            for kind, _ in MIX
        },
        "window_seconds": window_seconds,
        "sent_in_window": len(runs),
        "expected_in_window": sum(expected.values()),
        "missing": missing,
        "duplicates": duplicates,
        "sends_per_s_average": len(runs) / window_seconds,
        "sends_per_s_while_busy": len(runs) / busy_seconds if busy_seconds else 0,
        "sent_whole_run": total,
        "messages_in_broker": messages,
        "log_warnings_and_errors": len(problems),
        "lease_taken_after_s": (acquired - started_wall).total_seconds() if acquired else None,
        "first_send_after_s": (first_dispatch - started_wall).total_seconds() if first_dispatch else None,
        "rss_mib_10s_after_start": after_start / 2**20,
        "rss_mib_peak": max(rss) / 2**20,
        "rss_mib_at_end": rss[-1] / 2**20,
        "cpu_share_of_one_core": (cpu.user + cpu.system) / ran,
        "stopped_by_sigterm_in_s": stopped_in,
        "exit_code": beat.returncode,
    }
    write_results(
        "beat", figures, vars(options), database_url=options.database_url, redis_url=options.broker_url
    )


if __name__ == "__main__":
    main()
