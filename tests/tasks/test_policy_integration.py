"""The shared task policy through a real worker and broker: retries, dead letters, replay, progress."""

from __future__ import annotations

import pytest
from celery.result import AsyncResult

from jobs import reconcile, services
from jobs.models import Job
from jobs.protocol import FIRST_FAILURE_HEADER
from tasks import deadletters
from tasks.models import DeadLetter
from tests import probes
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_transient_errors_are_retried_until_the_task_succeeds(celery_worker: object) -> None:
    result = probes.probe_flaky.delay(fail_times=2)

    assert result.get(timeout=30) == {"attempts": 3}
    assert not DeadLetter.objects.exists()


def test_a_task_that_runs_out_of_attempts_becomes_a_dead_letter(celery_worker: object) -> None:
    result = probes.probe_flaky.delay(fail_times=5)

    with pytest.raises(Exception, match="attempt 3 of a flaky probe failed"):
        result.get(timeout=30)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert letter.task_name == "default.probe_flaky"
    assert letter.queue == "default"
    assert letter.kwargs == {"fail_times": 5}
    assert letter.attempts == 3
    assert letter.exception_type == "tasks.errors.TransientJobError"
    assert "raise TransientJobError" in letter.traceback
    assert letter.first_failed_at < letter.last_failed_at


def test_a_permanent_error_is_not_retried_and_replay_succeeds_once_fixed(
    celery_worker: object, tmp_path
) -> None:
    path = tmp_path / "needed.txt"
    result = probes.probe_needs_file.delay(path=str(path))
    with pytest.raises(Exception, match="does not exist"):
        result.get(timeout=30)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert letter.attempts == 1

    path.write_text("here now")
    new_id = deadletters.replay(letter)

    assert AsyncResult(new_id).get(timeout=30) == "here now"
    letter.refresh_from_db()
    assert letter.replay_task_id == new_id
    assert wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).replay_status == "succeeded")
    assert DeadLetter.objects.count() == 1


def test_the_admin_lists_shows_and_replays_dead_letters(
    celery_worker: object, admin_client, tmp_path
) -> None:
    path = tmp_path / "needed.txt"
    result = probes.probe_needs_file.delay(path=str(path))
    with pytest.raises(Exception, match="does not exist"):
        result.get(timeout=30)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())

    listing = admin_client.get("/admin/tasks/deadletter/?q=probe_needs_file&queue=default")
    assert listing.status_code == 200 and "default.probe_needs_file" in listing.content.decode()
    page = admin_client.get(f"/admin/tasks/deadletter/{letter.pk}/change/").content.decode()
    assert "PermanentJobError" in page and "Traceback" in page and str(path) in page
    assert letter.job_id is not None and f"/admin/jobs/job/{letter.job_id}/change/" in page  # linked

    path.write_text("fixed")
    response = admin_client.post(
        "/admin/tasks/deadletter/",
        {"action": "replay_selected", "_selected_action": [letter.pk]},
        follow=True,
    )
    assert "Replayed 1 dead letter(s)." in response.content.decode()
    assert wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).replay_status == "succeeded")


def test_the_deadletters_command_lists_replays_and_purges(celery_worker: object, tmp_path) -> None:
    from io import StringIO

    from django.core.management import call_command

    path = tmp_path / "needed.txt"
    result = probes.probe_needs_file.delay(path=str(path))
    with pytest.raises(Exception, match="does not exist"):
        result.get(timeout=30)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())

    out = StringIO()
    call_command("deadletters", "list", "--task", "default.probe_needs_file", stdout=out)
    assert f"{letter.pk:>6}" in out.getvalue() and "PermanentJobError" in out.getvalue()

    path.write_text("fixed")
    call_command("deadletters", "replay", str(letter.pk), stdout=out)
    assert wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).replay_status == "succeeded")

    call_command("deadletters", "purge", "--all", stdout=out)
    assert "purged 1 dead letter(s)" in out.getvalue()
    assert not DeadLetter.objects.exists()


def test_a_retry_resends_the_arguments_as_they_came_not_as_parsed(celery_worker: object) -> None:
    result = probes.probe_parsed.delay(window={"start": "2026-03-29", "days": 7}, fail_times=2)

    assert result.get(timeout=30) == "2026-03-29+7"


# --- retries held in the database, and the delivery limit --------------------------------------


# release_due skips a row another transaction has locked (the worker finishing the attempt that
# held it): like release_jobs every few seconds, the tests call it until it sends the retry.
def _held(task_id: str, attempts: int) -> Job | None:
    return Job.objects.filter(
        task_id=task_id, status="retrying", published_at__isnull=True, attempts=attempts
    ).first()


def test_a_long_retry_waits_in_the_database_and_release_jobs_sends_it_when_due(
    celery_worker: object, settings
) -> None:
    # Every wait counts as long here: each retry is held in the job's row, not in the broker.
    settings.JOBS_BROKER_MAX_DELAY_SECONDS = 0
    settings.JOBS_PUBLISH_GRACE_SECONDS = 0
    settings.JOBS_RECONCILE_AFTER_SECONDS = 0  # the reconciler looks at every job at once
    result = probes.probe_flaky.delay(fail_times=2)

    first = wait_for(lambda: _held(result.id, attempts=1), what="the first retry held in the row")
    assert first.run_at is not None and first.error_type == "TransientJobError"
    assert set(first.held_headers or {}) == {FIRST_FAILURE_HEADER}
    assert reconcile.resend_lost() == 0  # nothing was published: nothing is lost
    assert wait_for(services.release_due, what="release_jobs to send the due retry") == 1

    second = wait_for(lambda: _held(result.id, attempts=2), what="the second retry held in the row")
    assert second.held_headers == first.held_headers  # the first failure's time travels on
    assert wait_for(services.release_due, what="release_jobs to send the due retry") == 1

    # Released as retry 1, then retry 2 (the probe answers with its attempt number).
    assert result.get(timeout=30) == {"attempts": 3}
    job = Job.objects.get(task_id=result.id)
    assert (job.status, job.attempts) == ("succeeded", 3)
    assert services.release_due() == 0  # sent once


def test_a_held_retry_that_runs_out_of_attempts_is_a_dead_letter_with_its_first_failure(
    celery_worker: object, settings
) -> None:
    settings.JOBS_BROKER_MAX_DELAY_SECONDS = 0
    settings.JOBS_PUBLISH_GRACE_SECONDS = 0
    result = probes.probe_flaky.delay(fail_times=5)

    wait_for(lambda: _held(result.id, 1), what="retry 1 held")
    assert wait_for(services.release_due, what="release_jobs to send the due retry") == 1
    wait_for(lambda: _held(result.id, 2), what="retry 2 held")
    assert wait_for(services.release_due, what="release_jobs to send the due retry") == 1

    with pytest.raises(Exception, match="attempt 3 of a flaky probe failed"):
        result.get(timeout=30)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert letter.attempts == 3
    assert letter.first_failed_at < letter.last_failed_at


def test_retries_do_not_count_as_deliveries(celery_worker: object, settings) -> None:
    # JOBS_MAX_DELIVERIES stops a message whose worker keeps dying; a retry is a new message, so a
    # task retried more often than that still completes.
    settings.JOBS_MAX_DELIVERIES = 1
    assert probes.probe_flaky.policy.attempts > settings.JOBS_MAX_DELIVERIES + 1

    result = probes.probe_flaky.delay(fail_times=2)

    assert result.get(timeout=30) == {"attempts": 3}
    assert not DeadLetter.objects.exists()
