"""Cancels while pool processes are SIGKILLed: every job ends final, and its status is what happened.

A `-c 2` prefork worker drains jobs of 0.3 s while, every half second, a job is cancelled through
jobs.services.cancel (as DELETE /api/jobs/<id> does; a running one more often than a queued one)
and, every second, a random pool process is SIGKILLed. A running job asked to stop ends as its run
did (jobs.services.cancel): terminated (the worker's main process writes `cancelled`), finished
first (its outcome), or lost with its pool process (its redelivered message, claimed or discarded by
the revoke list, ends it `cancelled`). The oracle checks the usual (none lost or stuck, no duplicate
or missing effect) and that a job cancelled before it started never executed.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from jobs import services
from jobs.models import Job
from tests.faults import harness, oracle
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_cancelled_jobs_under_pool_process_kills_all_end_final_and_as_they_ran(
    empty_queues: None, worker_process, tmp_path: Path, settings
) -> None:
    settings.JOBS_RECONCILE_AFTER_SECONDS = 0
    worker = worker_process("cancels", *harness.WORKER_ARGS)
    effects = tmp_path / "effects"
    job_ids = oracle.accept_jobs(oracle.size(150), effects, seconds=0.3)
    wait_for(lambda: (effects / "executions.log").exists(), what="the first execution")

    rng = random.Random(29)
    kills = cancels = asked_to_stop = 0
    started = time.monotonic()
    next_kill = started + 1.0
    while oracle.final_count(job_ids) < 0.8 * len(job_ids) and time.monotonic() - started < 300:
        open_jobs = Job.objects.filter(pk__in=job_ids).exclude(status__in=Job.FINAL)
        running = list(open_jobs.filter(status=Job.Status.RUNNING, cancel_requested_at__isnull=True))
        waiting = list(open_jobs.exclude(status=Job.Status.RUNNING))
        pool = running if running and (rng.random() < 0.7 or not waiting) else waiting
        if pool:
            try:
                after = services.cancel(rng.choice(pool))
            except services.Conflict:  # it became final meanwhile
                pass
            else:
                cancels += 1
                asked_to_stop += after.status == Job.Status.RUNNING
        if time.monotonic() >= next_kill:
            kills += harness.kill_random_child(worker, rng) is not None
            next_kill += 1.0
        time.sleep(0.5)
    recovery = harness.wait_after_fault(job_ids, harness.patience(job_ids), reconcile_every=5)

    result = oracle.report(
        "cancels (running and queued) under pool process SIGKILL every 1 s", job_ids, effects, recovery.final
    )
    rows = list(
        Job.objects.filter(pk__in=job_ids).values("payload", "status", "started_at", "cancel_requested_at")
    )
    executed = {line.split()[0] for line in (effects / "executions.log").read_text().splitlines()}
    done = (
        set((effects / "effects.log").read_text().splitlines())
        if (effects / "effects.log").exists()
        else set()
    )
    never_started = [row for row in rows if row["status"] == "cancelled" and row["started_at"] is None]
    ran_anyway = [row["payload"]["key"] for row in never_started if row["payload"]["key"] in executed]
    stopped = [row for row in rows if row["cancel_requested_at"] is not None]
    ends = {
        status: sum(row["status"] == status for row in stopped)
        for status in ("cancelled", "succeeded", "failed")
    }
    stopped_after_effect = sum(
        row["status"] == "cancelled" and row["payload"]["key"] in done for row in stopped
    )
    result.record(
        f"{cancels} cancelled ({len(never_started)} before they started, none of which ran: "
        f"{not ran_anyway}); {asked_to_stop} asked to stop while running, ended "
        + ", ".join(f"{n} {status}" for status, n in ends.items() if n)
        + f" ({stopped_after_effect} cancelled after their effect); {kills} pool processes killed; "
        + recovery.note()
    )
    assert worker.process.poll() is None, harness.tail(worker)
    assert result.perfect, result.line() + "\n" + harness.tail(worker)
    assert not ran_anyway, f"cancelled before they started, yet executed: {ran_anyway}"
    assert asked_to_stop, "no running job was cancelled: the scenario did not test what it says"
    recovery.check(result.line())
