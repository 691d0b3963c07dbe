"""A message whose worker died every time it ran it is not delivered for ever."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery.utils import uuid

from jobs.models import Job
from jobs.publish import message_options
from tasks.models import DeadLetter
from tests import probes
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _send(directory: Path, key: str, deliveries: int) -> Job:
    directory.mkdir(exist_ok=True)
    job = Job.objects.create(
        type="default.probe_effect",
        queue="default",
        payload={"directory": str(directory), "key": key},
        task_id=uuid(),
    )
    options = message_options(job)
    # As the Redis transport (delivery/redis.py) stamps a message it hands out again.
    options["headers"]["x_delivery_count"] = deliveries
    probes.probe_effect.apply_async(kwargs=job.payload, **options)
    return job


def test_a_message_delivered_too_often_fails_for_good_with_a_dead_letter_and_the_queue_flows_on(
    empty_queues: None, worker_process, tmp_path: Path, settings
) -> None:
    worker_process("limits", "-Q", "default", "-I", "tests.probes", "--concurrency=1")
    poison = _send(tmp_path / "effects", "poison", deliveries=settings.JOBS_MAX_DELIVERIES + 1)
    last_chance = _send(tmp_path / "effects", "last", deliveries=settings.JOBS_MAX_DELIVERIES)

    wait_for(
        lambda: Job.objects.filter(pk=poison.pk, status=Job.Status.FAILED).exists(), what="poison failed"
    )
    wait_for(
        lambda: Job.objects.filter(pk=last_chance.pk, status=Job.Status.SUCCEEDED).exists(), what="last ran"
    )

    poison.refresh_from_db()
    assert poison.error_type == "DeliveryLimitExceeded"
    assert f"delivered {settings.JOBS_MAX_DELIVERIES + 1} times" in poison.error_message
    letter = DeadLetter.objects.get(task_id=poison.task_id)
    assert letter.exception_type == "tasks.errors.DeliveryLimitExceeded"
    assert letter.kwargs["key"] == "poison"  # kept for a replay once the cause is fixed
    executed = (tmp_path / "effects" / "executions.log").read_text().split()
    assert "poison" not in executed and "last" in executed


def test_a_message_that_kills_every_worker_running_it_stops_at_the_delivery_limit(
    empty_queues: None, worker_process, tmp_path: Path, settings
) -> None:
    """No header stamped by hand: the broker's own count (delivery/redis.py on Redis, a quorum
    queue's x-delivery-count on RabbitMQ) or, where the broker counts none (RabbitMQ's classic
    queues), the job row's (jobs.tracking.claim) must end a message whose every run SIGKILLs its
    process."""
    worker_process("crashes", "-Q", "default", "-I", "tests.probes", "--concurrency=1")
    runs = tmp_path / "runs.log"
    job = Job.objects.create(
        type="default.probe_crash", queue="default", payload={"path": str(runs)}, task_id=uuid()
    )
    probes.probe_crash.apply_async(kwargs=job.payload, **message_options(job))

    wait_for(
        lambda: Job.objects.filter(pk=job.pk, status=Job.Status.FAILED).exists(), timeout=120, what="failed"
    )
    job.refresh_from_db()
    assert job.error_type == "DeliveryLimitExceeded"
    assert len(runs.read_text().splitlines()) == settings.JOBS_MAX_DELIVERIES
    # The job's row says failed a moment before its dead letter is written (two transactions).
    wait_for(lambda: DeadLetter.objects.filter(task_id=job.task_id).exists(), what="the dead letter")
