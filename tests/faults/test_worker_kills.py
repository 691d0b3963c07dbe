"""Whole workers SIGKILLed one after another (a host or container dying): no job lost or stuck.

Every ~3 s the worker's main process and its pool processes are SIGKILLed together and a fresh
worker is started, as a supervisor would. Messages the dead worker had taken must come back
within 30 s: with kombu's Redis transport they wait for the visibility timeout (2 h), with the
reliable transport (delivery/redis.py) its reaper returns them once the dead consumer's
heartbeat lapses.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.faults import harness, oracle
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_jobs_survive_a_storm_of_whole_worker_kills(
    empty_queues: None, worker_process, tmp_path: Path
) -> None:
    effects = tmp_path / "effects"
    job_ids = oracle.accept_jobs(oracle.size(150), effects, seconds=0.2)
    worker = worker_process("whole-0", *harness.WORKER_ARGS)
    wait_for(lambda: (effects / "executions.log").exists(), what="the first execution")

    kills, started = 0, time.monotonic()
    while oracle.final_count(job_ids) < 0.8 * len(job_ids) and time.monotonic() - started < 300:
        time.sleep(3.0)
        harness.kill_whole_worker(worker)
        kills += 1
        worker = worker_process(f"whole-{kills}", *harness.WORKER_ARGS)
    recovery = harness.wait_after_fault(job_ids, timeout=harness.patience(job_ids))

    result = oracle.report("whole worker SIGKILL every 3 s", job_ids, effects, recovery.final)
    result.record(f"{kills} workers killed, a fresh one started after each; {recovery.note()}")
    assert result.perfect, result.line() + "\n" + harness.tail(worker)
    recovery.check(result.line())


def test_a_worker_stopped_during_long_tasks_finishes_them_and_loses_nothing(
    empty_queues: None, worker_process, tmp_path: Path
) -> None:
    """SIGTERM (a deploy): the warm shutdown finishes what runs; the rest waits for the next worker."""
    effects = tmp_path / "effects"
    job_ids = oracle.accept_jobs(oracle.size(12, most=40), effects, seconds=2)
    first = worker_process("deployed", *harness.WORKER_ARGS)
    wait_for(lambda: len(oracle._lines(effects / "executions.log")) >= 2, what="two tasks running")

    stopping = time.monotonic()
    first.stop()  # SIGTERM, then waits for the warm shutdown
    shutdown = time.monotonic() - stopping
    second = worker_process("next", *harness.WORKER_ARGS)
    recovery = harness.wait_after_fault(job_ids, timeout=harness.patience(job_ids, per_job=2))

    result = oracle.report("worker SIGTERM during 2 s tasks", job_ids, effects, recovery.final)
    result.record(f"warm shutdown took {shutdown:.1f} s, exit code {first.process.returncode}")
    assert first.process.returncode == 0, harness.tail(first)
    assert result.perfect, result.line() + "\n" + harness.tail(first, second)
    assert result.duplicate_executions == 0, result.line()  # what ran was finished, not cut short
    recovery.check(result.line())
