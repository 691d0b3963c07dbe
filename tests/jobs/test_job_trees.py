"""Jobs with children, batches with callbacks, dependencies: through the API, with real workers,
a real SMTP server and a real HTTP source on loopback (jobs.tree).

A client polling GET /api/jobs/{id} is told `succeeded` only once all of the job's work is done.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any
from uuid import UUID, uuid4

import pytest
from celery.signals import before_task_publish

from jobs import tree
from jobs.models import Job, JobDependency
from tasks.models import DataSource, DeadLetter, SyncedRecord, SyncRun
from tests.jobs.conftest import ApiClient
from tests.jobs.letters import dead_letter_of
from tests.smtp import SmtpServer
from tests.tasks.upstream import Upstream, make_records
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

FINAL = {"succeeded", "partially_failed", "failed", "cancelled"}


@pytest.fixture(autouse=True)
def quiet_smtp_server(caplog: pytest.LogCaptureFixture) -> None:
    # The test SMTP server (aiosmtpd) logs the addresses it is given; the project must not.
    caplog.set_level(logging.WARNING, logger="mail.log")


@pytest.fixture
def upstream(settings: Any) -> Iterator[Upstream]:
    server = Upstream(make_records(10), page_size=3).start()
    settings.DATA_SYNC_ALLOWED_HOSTS = [server.host]
    yield server
    server.stop()


def newsletter(recipients: list[str], *, batch_size: int = 10, window_seconds: int = 0) -> dict[str, Any]:
    return {
        "type": "email.newsletter",
        "payload": {
            "campaign": f"tree-{time.monotonic_ns()}",
            "template": "newsletter",
            "recipients": recipients,
            "context": {"title": "Trees", "body": "News"},
            "batch_size": batch_size,
            "window_seconds": window_seconds,
        },
    }


def readers(count: int) -> list[str]:
    return [f"reader{i}@example.com" for i in range(count)]


def enqueue(client: ApiClient, body: dict[str, Any]) -> str:
    response = client.post("/api/jobs", body)
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


def final(client: ApiClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(
        lambda: (body := client.get(f"/api/jobs/{job_id}").json())["status"] in FINAL and body,
        timeout=timeout,
        what=f"job {job_id} to be final",
    )


def delivered(smtp: SmtpServer) -> Counter[str]:
    return Counter(address for message in smtp.messages for address in message.envelope_to)


# --- children -----------------------------------------------------------------------------


def test_a_newsletter_is_running_until_its_last_message_is_delivered_then_succeeded(
    celery_worker: object, smtp_server: SmtpServer, api_client: ApiClient
) -> None:
    job_id = enqueue(api_client, newsletter(readers(30), window_seconds=2))

    seen: list[tuple[str, int, dict[str, Any]]] = []

    def observe() -> dict[str, Any] | None:
        body = api_client.get(f"/api/jobs/{job_id}").json()
        seen.append((body["status"], sum(delivered(smtp_server).values()), body))
        return body if body["status"] in FINAL else None

    body = wait_for(observe, timeout=60)

    assert body["status"] == "succeeded", body["error"]
    # Never "succeeded" before the last message arrived; "running", waiting for batches, before.
    assert all(count == 30 for status, count, _ in seen if status == "succeeded")
    waiting = [b for status, _, b in seen if status == "running" and b["children"]]
    assert waiting and any("waiting for" in b["progress"]["message"] for b in waiting)
    assert body["children"] == {"total": 3, "final": 3, "counts": {"succeeded": 3}}
    result = body["result"]
    assert (result["sent"], result["refused"], result["undelivered"], result["batches"]) == (30, 0, 0, 3)
    assert delivered(smtp_server) == Counter(readers(30))
    page = api_client.get(f"/api/jobs/{job_id}/children").json()
    assert {item["type"] for item in page["items"]} == {"email.send_batch"}
    assert {item["parent"] for item in page["items"]} == {job_id}


def test_a_refused_recipient_leaves_the_newsletter_partially_failed_and_a_retry_reruns_only_its_batch(
    celery_worker: object, smtp_server: SmtpServer, api_client: ApiClient, staff_client: ApiClient
) -> None:
    smtp_server.refuse("reader7@example.com")
    job_id = enqueue(api_client, newsletter(readers(30)))

    body = final(api_client, job_id)

    assert body["status"] == "partially_failed"
    assert body["error"]["type"] == "RecipientsFailed"
    assert "1 recipient(s) refused for good" in body["error"]["message"]
    assert (body["result"]["sent"], body["result"]["refused"]) == (29, 1)
    assert body["result"]["failures"] == f"/api/jobs/{job_id}/children"
    assert body["children"]["counts"] == {"partially_failed": 1, "succeeded": 2}
    [batch] = api_client.get(f"/api/jobs/{job_id}/children", status="partially_failed").json()["items"]
    assert "1 of 10 recipient(s) refused for good" in batch["error"]["message"]
    assert "reader7" not in str(body) + str(batch)  # counts, not addresses
    task_ids = dict(Job.objects.filter(parent=UUID(job_id)).values_list("pk", "task_id"))

    smtp_server.refuse("reader7@example.com", None)  # the mailbox exists now
    assert staff_client.post(f"/api/jobs/{job_id}/retry").status_code == 202
    body = final(api_client, job_id)

    assert body["status"] == "succeeded", body["error"]
    rerun = {pk for pk, task_id in Job.objects.filter(parent=UUID(job_id)).values_list("pk", "task_id")}
    changed = {pk for pk in rerun if task_ids[pk] != Job.objects.get(pk=pk).task_id}
    assert [str(pk) for pk in changed] == [batch["id"]]  # only the batch that failed ran again
    assert delivered(smtp_server) == Counter(readers(30))  # everyone once, reader7 included


def test_a_sync_reports_its_counts_only_once_its_last_batch_is_stored(
    celery_worker: object, upstream: Upstream, staff_client: ApiClient
) -> None:
    upstream.records.append({"name": "a record without an id"})
    source = DataSource.objects.create(name="tree", url=upstream.url("/records?page=1"), batch_size=2)
    job_id = enqueue(staff_client, {"type": "data_sync.sync", "payload": {"source_id": source.pk}})

    seen: list[tuple[str, int]] = []

    def observe() -> dict[str, Any] | None:
        body = staff_client.get(f"/api/jobs/{job_id}").json()
        seen.append((body["status"], SyncedRecord.objects.count()))
        return body if body["status"] in FINAL else None

    body = wait_for(observe, timeout=60)

    assert all(count == 10 for status, count in seen if status in FINAL)
    # The record without an id failed: the sync did part of its work.
    assert body["status"] == "partially_failed"
    result = body["result"]
    assert (result["created"], result["failed"], result["batches"]) == (10, 1, 5)
    assert body["children"] == {"total": 5, "final": 5, "counts": {"succeeded": 5}}
    run = SyncRun.objects.get(pk=result["run_id"])
    assert (run.status, run.created, run.failed) == (SyncRun.Status.SUCCEEDED, 10, 1)


def test_cancelling_a_newsletter_between_batches_cancels_those_not_yet_sent(
    celery_worker: object, smtp_server: SmtpServer, api_client: ApiClient, staff_client: ApiClient
) -> None:
    job_id = enqueue(api_client, newsletter(readers(30), window_seconds=8))  # batches at 0, 2.7, 5.3 s
    wait_for(
        lambda: Job.objects.filter(parent_id=UUID(job_id), status="succeeded").exists(),
        what="the first batch",
    )

    response = staff_client.delete(f"/api/jobs/{job_id}")

    # Nothing of it was running: final at once, with what its batches did.
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["children"]["counts"] == {"cancelled": 2, "succeeded": 1}
    assert (body["result"]["sent"], body["result"]["undelivered"]) == (10, 20)
    time.sleep(6)  # past the window: nothing more is sent
    assert sum(delivered(smtp_server).values()) == 10
    assert api_client.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled"


def test_a_batch_running_when_its_newsletter_is_cancelled_keeps_the_outcome_it_reached(
    celery_worker: object, smtp_server: SmtpServer, api_client: ApiClient, staff_client: ApiClient
) -> None:
    # The in-process worker's pool (solo) cannot interrupt a task: the running batch ends on its own.
    smtp_server.rcpt_delay = 0.15  # a batch of 10 takes 1.5 s
    job_id = enqueue(api_client, newsletter(readers(30), window_seconds=8))
    wait_for(
        lambda: Job.objects.filter(parent_id=UUID(job_id), status="running").exists(), what="a running batch"
    )

    response = staff_client.delete(f"/api/jobs/{job_id}")

    # Not final yet: one of its batches runs, and how that run ends is not known yet.
    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["status"], body["finished_at"]) == ("running", None)
    assert body["cancel_requested_at"] is not None
    assert body["children"]["counts"] == {"cancelled": 2, "running": 1}
    body = final(api_client, job_id)
    # The batch that was running sent its 10 messages and says so; the newsletter is cancelled.
    assert body["status"] == "cancelled"
    assert body["children"]["counts"] == {"cancelled": 2, "succeeded": 1}
    assert (body["result"]["sent"], body["result"]["undelivered"]) == (10, 20)
    assert body["error"]["type"] == "Cancelled"
    assert sum(delivered(smtp_server).values()) == 10
    batch = Job.objects.get(parent_id=UUID(job_id), status="succeeded")
    assert isinstance(batch.result, dict) and batch.result["sent"] == 10


def backfill(parent: Job | None = None) -> Job:
    """A partially failed backfill whose own task has finished (it waits for its children)."""
    return Job.objects.create(
        type="analytics.backfill",
        queue="analytics",
        task_id=uuid4().hex,
        status="partially_failed",
        own_finished_at="2026-01-01T00:00Z",
        parent=parent,
    )


def partly_failed(parent: Job | None = None) -> tuple[Job, Job]:
    """A backfill left partially failed by its two children, one succeeded and one failed: (it, that one)."""
    job = backfill(parent=parent)
    Job.objects.create(
        type="default.ping", queue="default", task_id=uuid4().hex, status="succeeded", parent=job
    )
    failed = Job.objects.create(
        type="default.ping", queue="default", task_id=uuid4().hex, status="failed", parent=job
    )
    return job, failed


def test_retrying_one_failed_child_reopens_its_parent_which_settles_again(
    celery_worker: object, staff_client: ApiClient
) -> None:
    parent, failed = partly_failed()

    assert staff_client.post(f"/api/jobs/{failed.pk}/retry").status_code == 202
    body = final(staff_client, str(parent.pk))

    assert body["status"] == "succeeded" and body["error"] is None
    assert body["children"]["counts"] == {"succeeded": 2}


@pytest.mark.parametrize("retried", ["the failed child", "its parent"])
def test_the_jobs_above_a_retried_child_wait_for_it_before_its_message_is_sent(
    retried: str, celery_worker: object, staff_client: ApiClient
) -> None:
    # A child that finishes at once must find the jobs above it waiting for it: reopened after it
    # settled them, they would wait for it until the reconciler's sweep (CI saw it, on SQLite).
    top = backfill()
    middle, failed = partly_failed(parent=top)
    seen: list[dict[str, str]] = []

    def look(**kwargs: Any) -> None:
        # Read when the message is sent: the child could be taken and finished from this moment on.
        rows = Job.objects.filter(pk__in=[top.pk, middle.pk]).values_list("pk", "status")
        seen.append({str(pk): status for pk, status in rows})

    before_task_publish.connect(look, weak=False)
    try:
        target = failed if retried == "the failed child" else middle
        assert staff_client.post(f"/api/jobs/{target.pk}/retry").status_code == 202
    finally:
        before_task_publish.disconnect(look)

    assert seen == [{str(top.pk): "running", str(middle.pk): "running"}]
    assert final(staff_client, str(top.pk))["status"] == "succeeded"
    assert Job.objects.get(pk=middle.pk).status == "succeeded"


def test_replaying_a_childs_dead_letter_runs_that_job_again_and_its_parent_settles(
    celery_worker: object, staff_client: ApiClient
) -> None:
    # The job's row is the record: a replay is that job's next run (not a job of its own), so the
    # job, and the parent waiting for it, say how it ended; the letter says so too.
    parent, failed = partly_failed()
    letter = dead_letter_of(failed)

    response = staff_client.post(f"/api/dead-letters/{letter.pk}/replay")

    assert response.status_code == 202, response.content
    task_id = response.json()["task_id"]
    assert final(staff_client, str(parent.pk))["status"] == "succeeded"
    failed.refresh_from_db()
    assert (failed.status, failed.task_id) == ("succeeded", task_id)
    assert Job.objects.count() == 3
    wait_for(lambda: DeadLetter.objects.get(pk=letter.pk).replay_status == "succeeded", what="the letter")


def test_a_dead_letter_of_a_job_that_ran_again_since_is_not_replayed(staff_client: ApiClient) -> None:
    done = Job.objects.create(type="default.ping", queue="default", task_id=uuid4().hex, status="succeeded")
    letter = dead_letter_of(done)

    response = staff_client.post(f"/api/dead-letters/{letter.pk}/replay")

    assert response.status_code == 409
    assert "succeeded" in response.json()["detail"]
    letter.refresh_from_db()
    assert (letter.replay_count, letter.replay_status, letter.replay_task_id) == (0, "", "")
    assert Job.objects.get(pk=done.pk).task_id == done.task_id


def test_a_dead_letter_of_a_job_whose_task_is_gone_is_refused(staff_client: ApiClient) -> None:
    gone = Job.objects.create(type="gone.task", queue="default", task_id=uuid4().hex, status="failed")
    letter = dead_letter_of(gone)

    response = staff_client.post(f"/api/dead-letters/{letter.pk}/replay")

    assert response.status_code == 409
    assert "'gone.task' is not registered" in response.json()["detail"]
    assert DeadLetter.objects.get(pk=letter.pk).replay_count == 0
    assert Job.objects.get(pk=gone.pk).status == "failed"


def test_the_deadletters_command_replays_jobs_and_names_those_it_may_not(
    celery_worker: object,
) -> None:
    from django.core.management import CommandError, call_command

    done = Job.objects.create(type="default.ping", queue="default", task_id=uuid4().hex, status="succeeded")
    failed = Job.objects.create(type="default.ping", queue="default", task_id=uuid4().hex, status="failed")
    refused, replayed = dead_letter_of(done), dead_letter_of(failed)
    errors = io.StringIO()

    with pytest.raises(CommandError, match="1 dead letter"):
        call_command(
            "deadletters", "replay", str(refused.pk), str(replayed.pk), stdout=io.StringIO(), stderr=errors
        )

    assert f"dead letter {refused.pk}: job {done.pk} is succeeded" in errors.getvalue()
    wait_for(lambda: Job.objects.filter(pk=failed.pk, status="succeeded").exists(), what="the replayed job")
    wait_for(lambda: DeadLetter.objects.get(pk=replayed.pk).replay_status == "succeeded", what="the letter")


# --- batches with a callback, and dependencies ----------------------------------------------


def test_a_batch_callback_runs_once_after_the_last_job_whatever_their_outcome(
    celery_worker: object, smtp_server: SmtpServer, api_client: ApiClient
) -> None:
    smtp_server.refuse("nobody@example.com")
    jobs = [
        {"type": "email.send", "payload": {"to": f"reader{i}@example.com", "template": "welcome"}}
        for i in range(3)
    ] + [{"type": "email.send", "payload": {"to": "nobody@example.com", "template": "welcome"}}]

    response = api_client.post("/api/jobs/batch", {"jobs": jobs, "callback": {"type": "default.ping"}})

    assert response.status_code == 200, response.content
    callback = response.json()["callback"]
    assert callback["accepted"] and callback["job"]["status"] == "waiting"
    body = final(api_client, callback["job"]["id"])
    assert body["status"] == "succeeded"
    assert body["depends_on"] == {
        "total": 4,
        "counts": {"failed": 1, "succeeded": 3},
        "run_after": "completion",
    }
    job = Job.objects.get(pk=body["id"])
    batch = Job.objects.filter(pk__in=[r["job"]["id"] for r in response.json()["results"]])
    ended = [other.finished_at for other in batch if other.finished_at]
    assert job.started_at and len(ended) == 4 and job.started_at >= max(ended)
    assert job.attempts == 1 and job.type == "default.ping"


def test_a_dependency_chain_runs_in_order_and_a_failure_cancels_its_dependents(
    celery_worker: object, smtp_server: SmtpServer, api_client: ApiClient
) -> None:
    smtp_server.refuse("nobody@example.com")
    ping = {"type": "default.ping"}
    response = api_client.post(
        "/api/jobs/batch",
        {
            "jobs": [
                {**ping, "depends_on": [1]},  # 0 runs after 1, which runs after 2
                {**ping, "depends_on": [2]},
                ping,
                {"type": "email.send", "payload": {"to": "nobody@example.com", "template": "welcome"}},
                {**ping, "depends_on": [3]},  # 4 waits for a job that fails for good...
                {**ping, "depends_on": [4]},  # ...and 5 for 4
            ]
        },
    )
    assert response.status_code == 200, response.content
    ids = [result["job"]["id"] for result in response.json()["results"]]

    bodies = [final(api_client, job_id) for job_id in ids]

    assert [body["status"] for body in bodies] == ["succeeded"] * 3 + ["failed", "cancelled", "cancelled"]
    times = {
        str(pk): (start, end) for pk, start, end in Job.objects.values_list("pk", "started_at", "finished_at")
    }
    (_, first_end), (second_start, second_end), (third_start, _) = (times[ids[n]] for n in (2, 1, 0))
    assert first_end and second_start and second_end and third_start
    assert first_end <= second_start and second_end <= third_start
    assert bodies[4]["error"]["type"] == "DependencyFailed" and ids[3] in bodies[4]["error"]["message"]
    assert ids[4] in bodies[5]["error"]["message"]
    assert Job.objects.get(pk=ids[5]).started_at is None  # never ran


def test_a_job_may_depend_on_jobs_sent_earlier(celery_worker: object, api_client: ApiClient) -> None:
    earlier = enqueue(api_client, {"type": "default.ping"})
    final(api_client, earlier)

    later = enqueue(api_client, {"type": "default.ping", "depends_on": [earlier]})

    assert final(api_client, later)["status"] == "succeeded"


# --- what the API refuses -------------------------------------------------------------------


def test_cycles_unknown_ids_and_misplaced_indexes_are_refused_naming_the_problem(
    celery_worker: object, api_client: ApiClient
) -> None:
    ping = {"type": "default.ping"}
    someone_elses = Job.objects.create(type="default.ping", queue="default", task_id="elsewhere")

    single = api_client.post("/api/jobs", {**ping, "depends_on": [str(someone_elses.pk)]})
    index = api_client.post("/api/jobs", {**ping, "depends_on": [0]})
    batch = api_client.post(
        "/api/jobs/batch",
        {
            "jobs": [
                {**ping, "depends_on": [1]},
                {**ping, "depends_on": [0]},  # 0 <-> 1
                {**ping, "depends_on": [2]},  # itself
                {**ping, "depends_on": [9]},  # no such entry
                {**ping, "depends_on": [0]},  # on a refused entry
                ping,
            ],
            "callback": ping,
        },
    )
    callback_with_dependencies = api_client.post(
        "/api/jobs/batch", {"jobs": [ping], "callback": {**ping, "depends_on": [0]}}
    )

    assert single.status_code == 400 and f"there is no job {someone_elses.pk}" in single.json()["detail"]
    assert index.status_code == 400 and "only an entry of a batch" in index.json()["detail"]
    results = batch.json()["results"]
    assert [r["status_code"] for r in results] == [400, 400, 400, 400, 400, 202]
    assert "forms a cycle: entries 0 -> 1 -> 0" in results[0]["error"]["detail"]
    assert "cannot depend on itself" in results[2]["error"]["detail"]
    assert "there is no entry 9" in results[3]["error"]["detail"]
    assert "depends on entry 0, which was refused" in results[4]["error"]["detail"]
    callback = batch.json()["callback"]
    assert callback["accepted"] and callback["job"]["depends_on"]["total"] == 1
    assert callback_with_dependencies.status_code == 400
    assert not Job.objects.filter(status=Job.Status.WAITING, run_after="success").exists()
    # The module's worker runs what was accepted: let it finish before the tables are emptied.
    final(api_client, callback["job"]["id"])


# --- nothing stalls ---------------------------------------------------------------------------


def test_the_reconciler_settles_parents_and_waiting_jobs_whose_settling_was_missed(
    celery_worker: object,
) -> None:
    parent = Job.objects.create(
        type="default.ping",
        queue="default",
        task_id="p",
        status="running",
        own_finished_at="2026-01-01T00:00Z",
    )
    for n, status in enumerate(("succeeded", "failed")):
        Job.objects.create(
            type="default.ping", queue="default", task_id=f"c{n}", status=status, parent=parent
        )
    prerequisite = Job.objects.create(type="default.ping", queue="default", task_id="a", status="succeeded")
    waiter = Job.objects.create(
        type="default.ping", queue="default", task_id="w", status="waiting", run_after="success"
    )
    JobDependency.objects.create(job=waiter, prerequisite=prerequisite)

    # As if the worker finishing the last child died before settling them (default.release_jobs).
    settled = tree.sweep()

    parent.refresh_from_db()
    waiter.refresh_from_db()
    assert settled == 2
    assert parent.status == "partially_failed" and "1 of 2 children did not succeed" in parent.error_message
    # Sent: queued, or already run by the worker (it is fast enough to have taken it by now).
    assert waiter.status in ("queued", "running", "succeeded") and waiter.published_at is not None
    assert tree.sweep() == 0
    # The released job is a real message, run by the module's worker: it ends before teardown.
    wait_for(lambda: Job.objects.filter(pk=waiter.pk, status="succeeded").exists(), what="the released job")


def test_a_failed_child_dead_letter_is_listed_with_its_parent(staff_client: ApiClient) -> None:
    parent = Job.objects.create(
        type="email.newsletter", queue="email", task_id="nl", status="partially_failed"
    )
    child = Job.objects.create(
        type="email.send_batch", queue="email", task_id="b1", status="failed", parent=parent
    )
    letter = DeadLetter.objects.create(
        task_id="b1",
        task_name="email.send_batch",
        exception_type="X",
        first_failed_at="2026-01-01T00:00Z",
        last_failed_at="2026-01-01T00:00Z",
        job=child,
    )
    DeadLetter.objects.create(
        task_id="other",
        task_name="default.ping",
        exception_type="X",
        first_failed_at="2026-01-01T00:00Z",
        last_failed_at="2026-01-01T00:00Z",
    )

    listed = staff_client.get("/api/dead-letters", job=str(parent.pk)).json()["items"]

    assert [item["id"] for item in listed] == [letter.pk]


def test_the_admin_job_page_shows_the_tree_and_links_the_dead_letters(admin_client: Any) -> None:
    parent = Job.objects.create(
        type="email.newsletter", queue="email", task_id="nl", status="partially_failed"
    )
    failed = Job.objects.create(
        type="email.send_batch", queue="email", task_id="b1", status="failed", parent=parent
    )
    Job.objects.create(
        type="email.send_batch", queue="email", task_id="b2", status="succeeded", parent=parent
    )
    letter = DeadLetter.objects.create(
        task_id="b1",
        task_name="email.send_batch",
        exception_type="SMTPServerDisconnected",
        first_failed_at="2026-01-01T00:00Z",
        last_failed_at="2026-01-01T00:00Z",
        job=failed,
    )

    page = admin_client.get(f"/admin/jobs/job/{parent.pk}/change/").content.decode()
    child_page = admin_client.get(f"/admin/jobs/job/{failed.pk}/change/").content.decode()
    children = admin_client.get(f"/admin/jobs/job/?parent__id__exact={parent.pk}&status__exact=failed")

    assert f"?parent__id__exact={parent.pk}&amp;status__exact=failed" in page
    assert "1 failed" in page and "1 succeeded" in page and "2 final" in page
    assert f"/admin/tasks/deadletter/{letter.pk}/change/" in page
    assert f"/admin/jobs/job/{parent.pk}/change/" in child_page
    assert children.status_code == 200 and str(failed.pk) in children.content.decode()


def test_a_failure_cancels_a_long_chain_of_dependents_without_recursing() -> None:
    head = Job.objects.create(type="default.ping", queue="default", task_id="head", status="failed")
    chain = Job.objects.bulk_create(
        Job(type="default.ping", queue="default", task_id=f"link-{n}", status="waiting", run_after="success")
        for n in range(1500)
    )
    JobDependency.objects.bulk_create(
        JobDependency(job=job, prerequisite=before)
        for before, job in zip([head, *chain], chain, strict=False)
    )

    tree.after_final(head.pk)

    assert set(Job.objects.filter(pk__in=[job.pk for job in chain]).values_list("status", flat=True)) == {
        "cancelled"
    }
