"""The measurements `python -m bench` makes of each system, the same way for every one.

A system (bench/peers/project.py, celery_stock.py, dramatiq_app.py, huey_app.py) says how to
send a job, what its batch path is, how its worker is started, how to empty it and where it
records when each job started. This module does the rest, in this order, in one process (the
client) that starts the worker as a process of its own:

1. enqueue: each batch path (and the system's other paths) from one client, for `jobs` jobs or
   `enqueue_seconds`, whichever comes first, then emptied; then jobs sent one at a time, one
   after another, by the same client: the single-client enqueue rate, and the backlog;
2. drain: the worker started (`processes` processes, the cores) with the backlog waiting; from
   the first job's start to the last job's end, for the whole backlog or `drain_seconds`,
   whichever comes first (what is left is purged): end-to-end jobs/s;
3. paced: jobs sent at half the rate the drain measured, for `paced_seconds`, each stamped with
   its send time; queue wait = the job's start minus its send (p50, p95, p99, max);
4. memory: the peak RSS of the worker's process tree over the drain and the paced load;
5. scaling: for every other process count, a fresh worker on a backlog (sent by the fastest
   path: what the drain measures is the worker), drain rate only.

Workers run in sessions of their own, so stopping one takes every process it started; the
process groups are listed in `run_dir/workers.pids` for the parent to clean up after a crash.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.peers.record import DIRECTORY_VARIABLE, Records

# Jobs sent only to time an enqueue path (emptied before any worker runs), the backlog, the paced load,
# the scaling backlogs.
PHASE_NONE, PHASE_BACKLOG, PHASE_PACED, PHASE_SCALING = 0, 1, 2, 3
POLL_SECONDS = 0.02
# The broker URL a peer's app module (bench/peers/*_app.py, celery_stock.py) reads when imported.
BROKER_VARIABLE = "BENCH_BROKER_URL"


@dataclass
class Plan:
    jobs: int
    enqueue_seconds: float
    drain_seconds: float
    paced_seconds: float
    scaling_seconds: float
    processes: int
    scaling: list[int]
    run_dir: str
    start_timeout: float = 120.0


@dataclass
class Progress:
    done: int
    first_start: float | None  # wall-clock seconds (time.time())
    last_end: float | None


# (count, deadline on time.monotonic()) -> how many were sent
EnqueuePath = Callable[[int, float], int]


class System:
    """What a system under test provides; see the module docstring."""

    name = ""
    # How often the client looks at its progress: reading the records is cheap; the project's is a
    # query on the database its worker writes to, so it is asked less often.
    poll_seconds = POLL_SECONDS

    def reset(self) -> None:
        """Broker and records emptied; no worker runs."""
        raise NotImplementedError

    def purge(self) -> None:
        """The jobs still queued dropped, with the worker running."""
        raise NotImplementedError

    def send(self, phase: int, sent: float) -> str:
        """One job, sent now; a key that `waits` can find it by."""
        raise NotImplementedError

    def enqueue_paths(self) -> dict[str, EnqueuePath]:
        """Other ways to enqueue, by figure name ("batch" first); each leaves its jobs queued."""
        raise NotImplementedError

    def backlog(self, count: int, phase: int) -> None:
        """`count` jobs queued by the fastest path."""
        raise NotImplementedError

    def worker(self, processes: int) -> tuple[list[str], dict[str, str]]:
        """The worker's command line and environment."""
        raise NotImplementedError

    def progress(self, phase: int, keys: Collection[str] | None = None) -> Progress:
        raise NotImplementedError

    def waits(self, phase: int, sent: dict[str, float]) -> list[float]:
        """Seconds from send to start, for the jobs of `phase` that started."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Versions and settings, for the results file."""
        raise NotImplementedError


class RecordingPeer(System):
    """A peer whose no-op task records when it started (bench.peers.record): progress and waits
    come from those records, and its worker is told where to write them and which broker to use."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.name = config["label"]
        self.config = config
        self.records = Records(Path(config["record_dir"]))

    def worker_environment(self) -> dict[str, str]:
        return {
            **self.config["env"],
            BROKER_VARIABLE: self.config["broker_url"],
            DIRECTORY_VARIABLE: self.config["record_dir"],
        }

    def progress(self, phase: int, keys: Collection[str] | None = None) -> Progress:
        """A no-op ends as it starts: its record says both."""
        return Progress(*self.records.summary(phase))

    def waits(self, phase: int, sent: dict[str, float]) -> list[float]:
        return [started - sent_at for sent_at, started in self.records.of(phase)]


class WorkerFailed(Exception):
    pass


@dataclass
class Workers:
    """Worker processes, each in a session (process group) of its own, all stopped at the end."""

    run_dir: Path
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: int = 0
    stop_seconds: float = 0.0

    def start(self, command: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        self.started += 1
        log = self.run_dir / f"worker-{self.started}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.running.append(process)
        with (self.run_dir / "workers.pids").open("a") as pids:
            pids.write(f"{process.pid}\n")
        process.log = log  # type: ignore[attr-defined]
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = 2.0) -> None:
        """SIGTERM, then after `grace` seconds SIGKILL to the whole group: its measurements are done,
        and the system is emptied next (a warm shutdown takes 3-8 s here, the time budget cannot)."""
        began = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        kill_group(process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process in self.running:
            self.running.remove(process)
        self.stop_seconds += time.monotonic() - began

    def stop_all(self) -> None:
        for process in list(self.running):
            self.stop(process)


def kill_group(pgid: int) -> None:
    """SIGKILL to what is left of a worker's process group (children that outlived their parent)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def timed(path: EnqueuePath, count: int, seconds: float) -> dict[str, float]:
    started = time.perf_counter()
    sent = path(count, time.monotonic() + seconds)
    elapsed = time.perf_counter() - started
    return {"per_s": sent / elapsed, "jobs": sent}


def one_at_a_time(system: System, phase: int, count: int, seconds: float) -> tuple[int, float]:
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    sent = 0
    while sent < count and (sent % 50 or time.monotonic() < deadline):
        system.send(phase, time.time())
        sent += 1
    return sent, time.perf_counter() - started


def _alive(system: System, worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is not None:
        log = getattr(worker, "log", None)
        raise WorkerFailed(
            f"{system.name}: the worker exited with {worker.returncode}"
            + (f"; its log ({log}) ends:\n{tail(log)}" if log else "")
        )


def drain(
    system: System, worker: subprocess.Popen[bytes], phase: int, total: int, cap: float, start_timeout: float
) -> dict[str, Any]:
    """From the first job's start until `total` are done or `cap` seconds went by."""
    waiting_since = time.monotonic()
    progress = system.progress(phase)
    while progress.first_start is None:
        _alive(system, worker)
        if time.monotonic() - waiting_since > start_timeout:
            raise WorkerFailed(
                f"{system.name}: no job started within {start_timeout:.0f} s of starting the worker"
            )
        time.sleep(system.poll_seconds)
        progress = system.progress(phase)
    while progress.done < total and time.time() - progress.first_start < cap:
        _alive(system, worker)
        time.sleep(system.poll_seconds)
        progress = system.progress(phase)
    assert progress.first_start is not None
    seconds = (progress.last_end or progress.first_start) - progress.first_start
    return {
        "jobs_per_s": progress.done / seconds if seconds > 0 else 0.0,
        "done": progress.done,
        "backlog": total,
        "seconds": seconds,
        "complete": progress.done >= total,
    }


def settle(system: System, phase: int, quiet: float = 0.5, limit: float = 30.0) -> None:
    """Until no job of `phase` finished for `quiet` seconds (what a worker held when purged)."""
    last = system.progress(phase).done
    changed = time.monotonic()
    ends = changed + limit
    while time.monotonic() - changed < quiet and time.monotonic() < ends:
        time.sleep(max(0.05, system.poll_seconds))
        done = system.progress(phase).done
        if done != last:
            last, changed = done, time.monotonic()


def paced(
    system: System, worker: subprocess.Popen[bytes], phase: int, rate: float, seconds: float
) -> dict[str, Any]:
    """`rate` jobs/s for `seconds`, each sent on time (or at once when the client is late)."""
    count = max(1, round(rate * seconds))
    sent: dict[str, float] = {}
    started = time.time()
    for index in range(count):
        delay = started + index / rate - time.time()
        if delay > 0.0005:
            time.sleep(delay)
        now = time.time()
        sent[system.send(phase, now)] = now
    sending = time.time() - started
    # Until all started, or long enough past the end to show a queue that keeps growing.
    ends = time.monotonic() + max(10.0, seconds)
    keys = list(sent)
    while system.progress(phase, keys).done < count and time.monotonic() < ends:
        _alive(system, worker)
        time.sleep(max(0.05, system.poll_seconds))
    waits = system.waits(phase, sent)
    figures: dict[str, Any] = {
        "rate_asked": rate,
        "rate_sent": count / sending if sending > 0 else float(count),
        "jobs": count,
        "started": len(waits),
    }
    if waits:
        milliseconds = [wait * 1000 for wait in waits]
        figures.update(
            wait_p50_ms=percentile(milliseconds, 50),
            wait_p95_ms=percentile(milliseconds, 95),
            wait_p99_ms=percentile(milliseconds, 99),
            wait_max_ms=max(milliseconds),
            wait_mean_ms=statistics.fmean(milliseconds),
        )
    return figures


@contextlib.contextmanager
def running_worker(system: System, workers: Workers, processes: int, cwd: Path) -> Iterator[Any]:
    command, env = system.worker(processes)
    worker = workers.start(command, env, cwd)
    try:
        yield worker
    finally:
        workers.stop(worker)


class Clock:
    """Seconds spent in each phase of a run (the results file keeps them: where the time budget goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.monotonic() - started


def measure(
    system: System, plan: Plan, workers: Workers, cwd: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    from bench.support import TreeSampler

    out: dict[str, Any] = {}
    clock = Clock()
    with clock("enqueue"):
        system.reset()
        # Warm-up (connections, pools, imports on first use), not measured.
        for path in system.enqueue_paths().values():
            path(min(50, plan.jobs), time.monotonic() + 5)
        one_at_a_time(system, PHASE_NONE, min(50, plan.jobs), 5.0)
        system.reset()
        for name, path in system.enqueue_paths().items():
            figure = timed(path, plan.jobs, plan.enqueue_seconds)
            out[f"{name}_per_s"] = figure["per_s"]
            out[f"{name}_jobs"] = figure["jobs"]
            system.reset()
        sent, seconds = one_at_a_time(system, PHASE_BACKLOG, plan.jobs, plan.enqueue_seconds)
        out["enqueue_per_s"] = sent / seconds
        out["enqueue_jobs"] = sent
    say(
        f"enqueue: one at a time {out['enqueue_per_s']:,.0f}/s, batch {out.get('batch_per_s', 0):,.0f}/s; "
        f"draining {sent:,} with {plan.processes} processes"
    )

    with clock("worker"), running_worker(system, workers, plan.processes, cwd) as worker:
        sampler = TreeSampler(worker.pid)
        try:
            with clock("drain"):
                result = drain(system, worker, PHASE_BACKLOG, sent, plan.drain_seconds, plan.start_timeout)
            out["drain_jobs_per_s"] = result["jobs_per_s"]
            out["drain"] = result
            say(f"drain {result['jobs_per_s']:,.0f} jobs/s ({result['done']:,} in {result['seconds']:.1f} s)")
            with clock("purge"):
                if not result["complete"]:
                    system.purge()
                    settle(system, PHASE_BACKLOG)
            with clock("paced"):
                rate = max(1.0, result["jobs_per_s"] / 2)
                load = paced(system, worker, PHASE_PACED, rate, plan.paced_seconds)
            out["paced"] = load
            if "wait_p99_ms" in load:
                say(
                    f"paced {load['rate_sent']:,.0f}/s: wait p50 {load['wait_p50_ms']:.1f} ms, "
                    f"p99 {load['wait_p99_ms']:.1f} ms, {load['started']:,}/{load['jobs']:,} started"
                )
        finally:
            out["worker_rss_mib"] = sampler.stop() / 2**20

    scaling: dict[str, float] = {}
    for processes in plan.scaling:
        if processes == plan.processes:
            scaling[str(processes)] = out["drain_jobs_per_s"]
            continue
        with clock("scaling"):
            system.reset()
            # Enough for the time box even if this count is twice as fast (the drain stops at the box).
            count = min(plan.jobs, max(200, int(2 * out["drain_jobs_per_s"] * plan.scaling_seconds)))
            system.backlog(count, PHASE_SCALING)
            with running_worker(system, workers, processes, cwd) as worker:
                result = drain(system, worker, PHASE_SCALING, count, plan.scaling_seconds, plan.start_timeout)
        scaling[str(processes)] = result["jobs_per_s"]
        say(f"{processes} processes: drain {result['jobs_per_s']:,.0f} jobs/s ({result['done']:,} jobs)")
    if scaling:
        out["scaling_jobs_per_s"] = scaling
    system.reset()
    out["phase_seconds"] = {**clock.seconds, "stopping_workers": workers.stop_seconds}
    return out
