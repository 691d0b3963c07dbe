"""Dead letters made for tests: the letter a job's task would have left had it failed for good."""

from __future__ import annotations

from jobs.models import Job
from tasks.models import DeadLetter


def dead_letter_of(job: Job) -> DeadLetter:
    return DeadLetter.objects.create(
        task_id=job.task_id,
        task_name=job.type,
        exception_type="x.Boom",
        first_failed_at="2026-01-01T00:00Z",
        last_failed_at="2026-01-01T00:00Z",
        job=job,
    )
