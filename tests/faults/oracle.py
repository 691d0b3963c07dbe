"""The fault suite's oracle: jobs accepted as the API accepts them, and what became of each.

PostgreSQL (the Job rows) says what was accepted and what each job's record says now; the
probe task (`default.probe_effect`, tests/probes.py) logs every execution to a file and writes
its effect (a line in effects.log) unless a run finds the job's marker. A scenario accepts
jobs, injects a fault, ends it, and asks for a Report: accepted, completed, lost or stuck
(not final in time), duplicate executions, duplicate effects, and seconds to recover.

Sizes come from FAULTS_JOBS (CI runs small ones; `python -m tests.faults.run` the full ones).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.utils import uuid
from django.db import connection
from django.utils import timezone

from jobs.models import Job
from jobs.publish import publish
from tests import probes  # noqa: F401  (registers default.probe_effect here too)


def broker() -> str:
    """The broker the suite runs on, as the table's `broker` column names it."""
    from django.conf import settings

    return "RabbitMQ" if settings.CELERY_BROKER_URL.startswith(("amqp", "pyamqp")) else "Redis"


def size(default: int, most: int | None = None) -> int:
    """FAULTS_JOBS, or `default`; at most `most` (scenarios of long tasks stay minutes long)."""
    count = int(os.environ.get("FAULTS_JOBS", default))
    return count if most is None else min(count, most)


def accept_jobs(
    count: int, directory: Path, seconds: float = 0.0, queue: str = "default", first: int = 0
) -> list[str]:
    """Writes `count` job rows and publishes them, as POST /api/jobs does; returns their ids.

    Their keys are k<first> to k<first + count - 1>: a second batch into the same directory
    starts where the first ended."""
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [
        Job(
            type="default.probe_effect",
            queue=queue,
            payload={"directory": str(directory), "key": f"k{first + index}", "seconds": seconds},
            task_id=uuid(),
        )
        for index in range(count)
    ]
    Job.objects.bulk_create(jobs)
    for start in range(0, count, 500):
        publish(jobs[start : start + 500])
    Job.objects.filter(pk__in=[job.pk for job in jobs]).update(published_at=timezone.now())
    return [str(job.pk) for job in jobs]


@dataclass
class Report:
    scenario: str
    accepted: int
    completed: int
    not_final: int
    duplicate_executions: int
    duplicate_effects: int
    missing_effects: int
    recovery_seconds: float

    def line(self) -> str:
        return (
            f"{self.scenario}: accepted {self.accepted}, completed {self.completed}, "
            f"lost or stuck {self.not_final}, duplicate executions {self.duplicate_executions}, "
            f"duplicate effects {self.duplicate_effects}, missing effects {self.missing_effects}, "
            f"recovered in {self.recovery_seconds:.1f} s"
        )

    def record(self, note: str = "") -> None:
        """Prints the line, and appends it to FAULTS_REPORT when set (tests/faults/run.py)."""
        line = self.line() + (f" ({note})" if note else "")
        print(line)
        target = os.environ.get("FAULTS_REPORT")
        if target:
            with open(target, "a") as report_file:
                report_file.write(
                    f"| {broker()} | {self.scenario} | {self.accepted} | {self.completed} | {self.not_final} "
                    f"| {self.duplicate_executions} | {self.duplicate_effects} "
                    f"| {self.missing_effects} | {self.recovery_seconds:.1f} | {note} |\n"
                )

    @property
    def perfect(self) -> bool:
        return not (self.not_final or self.duplicate_effects or self.missing_effects)


def final_count(job_ids: list[str]) -> int:
    return Job.objects.filter(pk__in=job_ids, status__in=Job.FINAL).count()


def wait_until_final(job_ids: list[str], timeout: float, workers: Sequence[Any] = ()) -> float:
    """Seconds until every job is final (or `timeout`, or every one of `workers` has exited:
    nothing is left to take them, whichever comes first)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if workers and all(worker.process.poll() is not None for worker in workers):
            break
        try:
            if final_count(job_ids) == len(job_ids):
                break
        except Exception:  # the database may still be coming back
            connection.close()
        time.sleep(0.2)
    return time.monotonic() - started


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def report(scenario: str, job_ids: list[str], directory: Path, recovery_seconds: float) -> Report:
    jobs = list(Job.objects.filter(pk__in=job_ids).values("payload", "status"))
    keys = {job["payload"]["key"] for job in jobs}
    log = directory / "executions.log"
    executions = Counter(line.split()[0] for line in _lines(log))
    effects = Counter(_lines(directory / "effects.log"))
    succeeded = {job["payload"]["key"] for job in jobs if job["status"] == Job.Status.SUCCEEDED}
    return Report(
        scenario=scenario,
        accepted=len(job_ids),
        completed=len(succeeded),
        not_final=sum(1 for job in jobs if job["status"] not in Job.FINAL),
        duplicate_executions=sum(count - 1 for count in executions.values() if count > 1),
        duplicate_effects=sum(n - 1 for n in effects.values() if n > 1) + len(set(effects) - keys),
        missing_effects=len(succeeded - set(effects)),
        recovery_seconds=recovery_seconds,
    )
