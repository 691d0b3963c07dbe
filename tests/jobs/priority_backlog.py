"""Sends a backlog of `default.probe_effect` messages by every path the project sends one by,
with and without priorities: `python -m tests.jobs.priority_backlog DIRECTORY`.

Its own process, so that it publishes to whichever broker CELERY_BROKER_URL names (the test
process's app is bound to the suite's Redis), as a web process or beat would. Prints one JSON
list of [key, the priority the message must run at], in the order the messages were sent; each
run appends its key to DIRECTORY/executions.log (tests/probes.py).
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any

import django

django.setup()

from celery.utils import uuid  # noqa: E402
from django.db import transaction  # noqa: E402
from django.utils import timezone  # noqa: E402
from django_celery_beat.models import IntervalSchedule, PeriodicTask  # noqa: E402

from config.celery_app import app  # noqa: E402
from jobs import outbox, reconcile, services  # noqa: E402
from jobs.models import Job  # noqa: E402
from jobs.registry import JobRequest  # noqa: E402
from scheduling import beat  # noqa: E402
from tasks import deadletters  # noqa: E402
from tasks.models import DeadLetter  # noqa: E402
from tests.probes import probe_effect  # noqa: E402

TASK = "default.probe_effect"
MIDDLE = 5


def main(directory: str) -> list[tuple[str, int]]:
    sent: list[tuple[str, int]] = []

    def args(key: str) -> dict[str, Any]:
        return {"directory": directory, "key": key}

    def api(key: str, priority: int | None) -> None:
        request = JobRequest(
            type=TASK,
            queue="default",
            payload=args(key),
            priority=priority,
            delay_seconds=0,
            idempotency_key="",
        )
        services.enqueue([request], token=None)
        sent.append((key, MIDDLE if priority is None else priority))

    def schedule(key: str, priority: int | None) -> None:
        every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.HOURS)
        model = PeriodicTask.objects.create(
            name=key, task=TASK, interval=every, kwargs=json.dumps(args(key)), priority=priority
        )
        beat.run_now(app, model)  # beat's own publish(), as "Run now" in the admin
        sent.append((key, MIDDLE if priority is None else priority))

    def job_row(key: str, priority: int | None, **fields: Any) -> Job:
        return Job.objects.create(
            type=TASK, queue="default", payload=args(key), priority=priority, task_id=uuid(), **fields
        )

    # The review's case: unprioritised messages already waiting when a prioritised one comes.
    for n in range(20):
        probe_effect.apply_async(kwargs=args(f"bulk-{n}"))
        sent.append((f"bulk-{n}", MIDDLE))
    api("api-9", 9)
    api("api-none", None)
    api("api-0", 0)
    probe_effect.apply_async(kwargs=args("plain-0"), priority=0)
    sent.append(("plain-0", 0))
    app.send_task(TASK, kwargs=args("by-name"))  # no Task.apply_async: no task_default_priority
    sent.append(("by-name", MIDDLE))
    with transaction.atomic():
        outbox.enqueue(TASK, priority=7, **args("outbox-7"))
    sent.append(("outbox-7", 7))
    api("api-5", 5)
    probe_effect.apply_async(kwargs=args("plain-9"), priority=9)
    sent.append(("plain-9", 9))
    with transaction.atomic():
        outbox.enqueue(TASK, **args("outbox-none"))
    sent.append(("outbox-none", MIDDLE))
    api("api-1", 1)
    probe_effect.delay(**args("delay"))
    sent.append(("delay", MIDDLE))
    schedule("beat-none", None)
    schedule("beat-8", 8)

    # Sent again: a dead letter's replay, a failed job's retry, a job whose publish never happened.
    now = timezone.now()
    letter = DeadLetter.objects.create(
        task_id=uuid(),
        task_name=TASK,
        queue="default",
        kwargs=args("replay-3"),
        exception_type="tests.Failure",
        priority=3,
        first_failed_at=now,
        last_failed_at=now,
    )
    deadletters.replay(letter)
    sent.append(("replay-3", 3))
    services.retry(job_row("retry-6", 6, status=Job.Status.FAILED))
    sent.append(("retry-6", 6))
    services.retry(job_row("retry-none", None, status=Job.Status.CANCELLED))
    sent.append(("retry-none", MIDDLE))
    unpublished = job_row("release-4", 4, status=Job.Status.QUEUED)
    Job.objects.filter(pk=unpublished.pk).update(created_at=now - timedelta(hours=1))
    assert services.release_due() == 1
    sent.append(("release-4", 4))
    # Published an hour ago and in no queue: lost. Only the Redis reconciler looks (RabbitMQ keeps
    # its queues on disk).
    job_row("resend-2", 2, status=Job.Status.QUEUED, published_at=now - timedelta(hours=1))
    if reconcile.resend_lost():
        sent.append(("resend-2", 2))
    return sent


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
