"""A cancel that reaches a running job asks it to stop; the job's row then says how the run ended.

What ends a run whose cancel was requested (jobs.services.cancel sets `cancel_requested_at`): its
own outcome (it finished before the cancel could stop it), its termination (tasks.requests, shown
with real workers in test_workers.py), or whatever finds it stopped: a redelivery of its message
after its worker died, a retry, the reconciler past the hard time limit. Here each of those calls
the real code against the real database, with the rows a running job has.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import uuid4

import pytest
from django.conf import settings
from django.utils import timezone

from config.celery_app import app
from jobs import reconcile, tracking, tree
from jobs.models import Job
from tasks.errors import TransientJobError

pytestmark = [pytest.mark.django_db(transaction=True)]


def running(**fields: Any) -> Job:
    """A job whose run started (attempt 1) and whose cancel was requested just now."""
    values: dict[str, Any] = {
        "type": "default.ping",
        "queue": "default",
        "task_id": uuid4().hex,
        "status": "running",
        "attempts": 1,
        "deliveries": 1,
        "started_at": timezone.now(),
        "published_at": timezone.now(),
        "cancel_requested_at": timezone.now(),
    }
    values.update(fields)
    return Job.objects.create(**values)


def reread(job: Job) -> Job:
    return Job.objects.get(pk=job.pk)


def test_a_message_delivered_again_after_the_cancel_does_not_run_it_and_the_job_is_cancelled() -> None:
    job = running()

    # Its worker died: the broker delivers the same message again.
    assert tracking.claim(str(job.pk), job.task_id, 1, True, counted=True) == 0

    job = reread(job)
    assert (job.status, job.error_type) == ("cancelled", "Cancelled")
    assert job.error_message == "its worker was lost after the cancel was requested"
    assert job.finished_at is not None


def test_the_next_attempts_message_of_a_run_asked_to_stop_does_not_run_it() -> None:
    job = running()  # its "retrying" was never written (the database was away)

    assert tracking.claim(str(job.pk), job.task_id, 2, False) == 0

    assert reread(job).status == "cancelled"


def test_a_run_without_a_cancel_request_is_still_claimed_again_after_its_worker_died() -> None:
    job = running(cancel_requested_at=None)

    assert tracking.claim(str(job.pk), job.task_id, 1, True, counted=True) == 2

    assert reread(job).status == "running"


@pytest.mark.parametrize("held", [False, True], ids=["retry sent", "retry held in the row"])
def test_a_run_asked_to_stop_that_fails_for_a_retry_is_cancelled_not_retried(held: bool) -> None:
    job = running()
    error = TransientJobError("the upstream answered 503")

    if held:
        assert tracking.hold_retry(str(job.pk), job.task_id, 30, {}, error) is False
    else:
        tracking.retrying(str(job.pk), job.task_id, error, attempt=1)

    job = reread(job)
    assert job.status == "cancelled"
    assert job.error_message.startswith("cancelled instead of retried")
    assert job.run_at is None


def test_a_run_that_finished_before_the_cancel_could_stop_it_keeps_its_outcome() -> None:
    job = running()

    tracking.succeeded(str(job.pk), job.task_id, {"pong": "worker@host"})
    # The worker's main process then learns its pool process was terminated (too late).
    assert tracking.cancelled_while_running(job.task_id, "terminated by the cancel while it ran") is False

    job = reread(job)
    assert (job.status, job.result) == ("succeeded", {"pong": "worker@host"})
    assert job.cancel_requested_at is not None


def test_a_run_that_failed_before_the_cancel_could_stop_it_is_failed() -> None:
    job = running()

    tracking.failed(str(job.pk), job.task_id, ValueError("bad input"))

    assert (reread(job).status, reread(job).error_type) == ("failed", "ValueError")


def test_children_spawned_after_the_cancel_are_recorded_cancelled_and_never_sent() -> None:
    parent = running(type="email.newsletter", queue="email")

    rows = tree.spawn(str(parent.pk), parent.task_id, [tree.ChildSpec("default.ping", {})] * 3)

    children = Job.objects.filter(parent_id=parent.pk)
    assert [row.status for row in rows] == ["cancelled"] * 3
    assert set(children.values_list("status", "published_at")) == {("cancelled", None)}
    assert children.first().error_message == f"job {parent.pk} above it was cancelled"  # type: ignore[union-attr]


def test_a_parent_asked_to_stop_whose_children_all_succeeded_anyway_succeeded() -> None:
    parent = running(type="email.newsletter", queue="email", own_finished_at=timezone.now(), result={})
    for _ in range(2):
        running(parent=parent, cancel_requested_at=timezone.now(), status="succeeded", result={"sent": 1})

    assert tree.settle_parent(parent.pk)

    assert reread(parent).status == "succeeded"


def test_a_parent_asked_to_stop_with_a_cancelled_child_is_cancelled_with_its_familys_result() -> None:
    parent = running(type="email.newsletter", queue="email", own_finished_at=timezone.now(), result={})
    running(parent=parent, status="succeeded", result={"sent": 2}, payload={"recipients": ["a", "b"]})
    running(parent=parent, status="cancelled", payload={"recipients": ["c", "d", "e"]})

    assert tree.settle_parent(parent.pk)

    parent = reread(parent)
    assert (parent.status, parent.error_type) == ("cancelled", "Cancelled")
    assert parent.error_message.startswith("cancelled while its children ran")
    assert isinstance(parent.result, dict)
    assert (parent.result["sent"], parent.result["undelivered"]) == (2, 3)


def test_the_reconciler_cancels_a_run_asked_to_stop_once_past_its_hard_time_limit() -> None:
    limit = app.conf.task_time_limit + settings.JOBS_RECONCILE_AFTER_SECONDS
    stale = running(cancel_requested_at=timezone.now() - timedelta(seconds=limit + 5))
    recent = running(cancel_requested_at=timezone.now() - timedelta(seconds=limit - 30))
    not_asked = running(cancel_requested_at=None, started_at=timezone.now() - timedelta(seconds=limit + 5))

    assert reconcile.finish_cancel_requests() == 1

    assert reread(stale).status == "cancelled"
    assert reread(stale).error_message == (
        "its run was cancelled and nothing was heard of it within its hard time limit"
    )
    assert (reread(recent).status, reread(not_asked).status) == ("running", "running")
