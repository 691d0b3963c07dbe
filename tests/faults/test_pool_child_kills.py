"""Pool processes SIGKILLed one after another (out-of-memory kills): no job lost, stuck or done twice.

A random pool process of a `-c 2` prefork worker is SIGKILLed every second while it drains the
queue. The main process replaces it; the message of the task it ran is given back
(acks_late + reject_on_worker_lost) and runs again, and the probe's marker keeps its effect single.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.faults import harness, oracle
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_jobs_survive_a_storm_of_pool_process_kills(
    empty_queues: None, worker_process, tmp_path: Path, settings
) -> None:
    settings.JOBS_RECONCILE_AFTER_SECONDS = 0
    worker = worker_process("children", *harness.WORKER_ARGS)
    effects = tmp_path / "effects"
    job_ids = oracle.accept_jobs(oracle.size(150), effects, seconds=0.2)
    wait_for(lambda: (effects / "executions.log").exists(), what="the first execution")

    # Every second until most jobs are final (the storm covers the whole drain, at any size).
    rng = random.Random(13)
    kills, started = 0, time.monotonic()
    while oracle.final_count(job_ids) < 0.8 * len(job_ids) and time.monotonic() - started < 300:
        if harness.kill_random_child(worker, rng) is not None:
            kills += 1
        time.sleep(1.0)
    # A pool process killed after its task's result was stored and before the job's row was
    # written leaves the row `running` and the message acknowledged ("succeeded before the
    # worker was lost"): the reconciler finishes it from the result, as release_jobs does.
    recovery = harness.wait_after_fault(job_ids, harness.patience(job_ids), reconcile_every=5)

    result = oracle.report("pool process SIGKILL every 1 s", job_ids, effects, recovery.final)
    result.record(f"{kills} pool processes killed; {recovery.note()}")
    assert worker.process.poll() is None, harness.tail(worker)
    assert result.perfect, result.line() + "\n" + harness.tail(worker)
    recovery.check(result.line())
