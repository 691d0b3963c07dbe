"""Messages the broker lost (a restart without persistence, a flush): the reconciler sends them again.

The queue's messages are deleted from Redis, as a broker restarted without an append-only
file loses them; the job rows still say `queued`. `default.release_jobs` (each minute, here
called directly) finds every job published a while ago whose message no broker holds and
sends it again with the same task id.
"""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import pytest
from celery import Celery
from celery.signals import before_task_publish

from jobs import reconcile, services
from jobs.models import Job
from jobs.registry import parse_job
from tasks.models import DeadLetter
from tests import queues
from tests.faults import oracle
from tests.jobs.letters import dead_letter_of
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _delete_every_message(celery_app: Celery) -> int:
    with celery_app.connection_for_write() as connection:
        client = connection.default_channel.client  # type: ignore[attr-defined]  # Redis channel
        lost = queues.length(client, "default")
        client.delete(*queues.keys("default"), "unacked", "unacked_index")
    return lost


# RabbitMQ keeps durable queues and persistent messages on disk, and the reconciler does nothing there
# (jobs/reconcile.py): losing messages is a Redis failure.
redis_only = pytest.mark.requires_redis_broker


@redis_only
def test_jobs_whose_messages_the_broker_lost_are_sent_again_and_run_once(
    celery_app: Celery, empty_queues: None, worker_process, tmp_path: Path, settings
) -> None:
    settings.JOBS_RECONCILE_AFTER_SECONDS = 0
    count = oracle.size(200)
    job_ids = oracle.accept_jobs(count, tmp_path / "effects")
    assert reconcile.resend_lost() == 0  # every message is where it should be
    assert _delete_every_message(celery_app) == count

    assert reconcile.resend_lost() == count
    assert reconcile.resend_lost() == 0  # and now they are there again
    worker_process("after-loss", "-Q", "default", "-I", "tests.probes", "--concurrency=2")
    recovered = oracle.wait_until_final(job_ids, timeout=120)

    result = oracle.report("broker lost its messages", job_ids, tmp_path / "effects", recovered)
    result.record()
    assert result.perfect, result.line()
    assert result.duplicate_executions == 0


@redis_only
def test_a_replay_whose_message_was_lost_is_sent_again_and_still_writes_its_outcome_to_its_letter(
    celery_app: Celery, empty_queues: None, worker_process, settings
) -> None:
    settings.JOBS_RECONCILE_AFTER_SECONDS = 0
    failed = Job.objects.create(type="default.ping", queue="default", task_id=uuid4().hex, status="failed")
    letter = dead_letter_of(failed)
    task_id = services.replay(letter)
    assert _delete_every_message(celery_app) == 1

    assert reconcile.resend_lost() == 1
    worker_process("after-loss", "-Q", "default", "--concurrency=1")

    wait_for(lambda: Job.objects.get(pk=failed.pk).status == "succeeded", what="the job", timeout=60)
    assert Job.objects.get(pk=failed.pk).task_id == task_id
    wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).replay_status == "succeeded", what="the letter")


class _Died(BaseException):
    """The web process dying between its INSERT and its publish (Celery's signals swallow Exceptions)."""


@redis_only
def test_a_job_whose_web_process_died_before_sending_it_is_sent_by_the_reconciler(
    celery_app: Celery, empty_queues: None, worker_process, settings
) -> None:
    # On Redis a row is marked published as it is written (jobs.publish.marked_before_sending): one
    # whose message never left is a lost message, which the reconciler sends.
    settings.JOBS_RECONCILE_AFTER_SECONDS = 0

    def die(**kwargs: object) -> None:
        raise _Died()

    before_task_publish.connect(die, weak=False)
    try:
        with pytest.raises(_Died):
            services.enqueue([parse_job({"type": "default.ping", "payload": {}})], None)
    finally:
        before_task_publish.disconnect(die)
    job = Job.objects.get()
    assert job.status == "queued" and job.published_at is not None
    assert services.release_due() == 0  # marked: not the release's to send

    assert reconcile.resend_lost() == 1
    worker_process("after-death", "-Q", "default", "--concurrency=1")

    wait_for(lambda: Job.objects.get(pk=job.pk).status == "succeeded", what="the job", timeout=60)


def test_a_job_still_running_is_not_sent_again_while_its_message_is_held(
    celery_app: Celery, empty_queues: None, worker_process, tmp_path: Path, settings
) -> None:
    settings.JOBS_RECONCILE_AFTER_SECONDS = 0
    settings.CELERY_TASK_TIME_LIMIT = 0
    worker_process("holder", "-Q", "default", "-I", "tests.probes", "--concurrency=1")
    [job_id] = oracle.accept_jobs(1, tmp_path / "effects", seconds=3)
    wait_for(lambda: Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).exists(), what="it running")
    assert reconcile.resend_lost() == 0  # its message waits in `unacked` for the acknowledgement
    wait_for(lambda: Job.objects.filter(pk=job_id, status=Job.Status.SUCCEEDED).exists(), timeout=30)


def test_a_running_job_whose_result_was_stored_is_finished_from_it(settings) -> None:
    """Its pool process died after the result was written and before the row was."""
    from celery.utils import uuid
    from django.utils import timezone
    from django_celery_results.models import TaskResult

    settings.JOBS_RECONCILE_AFTER_SECONDS = 0
    done, failed, still = (
        Job.objects.create(
            type="default.ping",
            queue="default",
            task_id=uuid(),
            status=Job.Status.RUNNING,
            started_at=timezone.now(),
        )
        for _ in range(3)
    )
    TaskResult.objects.create(task_id=done.task_id, status="SUCCESS", result='{"pong": true}')
    TaskResult.objects.create(
        task_id=failed.task_id,
        status="FAILURE",
        result='{"exc_type": "PermanentJobError", "exc_message": ["no such row"]}',
    )
    TaskResult.objects.create(task_id=still.task_id, status="STARTED", result="{}")

    assert reconcile.finish_from_results() == 2

    for job in (done, failed, still):
        job.refresh_from_db()
    assert (done.status, done.result) == (Job.Status.SUCCEEDED, {"pong": True})
    assert (failed.status, failed.error_type, failed.error_message) == (
        Job.Status.FAILED,
        "PermanentJobError",
        "no such row",
    )
    assert still.status == Job.Status.RUNNING


@redis_only
def test_a_running_job_whose_message_the_broker_lost_is_sent_again_without_waiting_for_the_time_limit(
    celery_app: Celery, empty_queues: None, tmp_path: Path, settings
) -> None:
    """Its task was cut short when the worker's connection dropped, and the broker forgot the message."""
    from django.utils import timezone

    settings.JOBS_RECONCILE_AFTER_SECONDS = 0
    [job_id] = oracle.accept_jobs(1, tmp_path / "effects")
    Job.objects.filter(pk=job_id).update(status=Job.Status.RUNNING, started_at=timezone.now())
    assert reconcile.resend_lost() == 0  # its message is still there
    assert _delete_every_message(celery_app) == 1

    assert reconcile.resend_lost() == 1
    assert reconcile.resend_lost() == 0


def test_a_tasks_final_state_and_its_jobs_row_are_written_together() -> None:
    """So a pool process killed between the two cannot leave the row running (no reconciler needed)."""
    from celery.app.task import Context
    from celery.utils import uuid
    from django.utils import timezone
    from django_celery_results.models import TaskResult

    from config.celery_app import app

    now = timezone.now()
    done, failed = (
        Job.objects.create(
            type="default.ping", queue="default", task_id=uuid(), status="running", started_at=now
        )
        for _ in range(2)
    )
    for job, state, value in ((done, "SUCCESS", {"pong": True}), (failed, "FAILURE", KeyError("gone"))):
        request = Context({"id": job.task_id, "x_job_id": str(job.pk), "task": "default.ping"})
        app.backend.store_result(job.task_id, value, state, request=request)

    done.refresh_from_db()
    failed.refresh_from_db()
    assert (done.status, done.result) == (Job.Status.SUCCEEDED, {"pong": True})
    assert (failed.status, failed.error_type) == (Job.Status.FAILED, "KeyError")
    # The success is the row alone (one UPDATE); the failure also keeps its exception's type for
    # AsyncResult in django-celery-results' table, written in the same transaction as the row.
    assert list(
        TaskResult.objects.filter(task_id__in=[done.task_id, failed.task_id]).values_list("task_id")
    ) == [(failed.task_id,)]
    assert app.AsyncResult(done.task_id).get(timeout=1) == {"pong": True}
