"""Syncs that ride out a flaky or down source: a page's own retries, checkpoints, resumption.

A real worker and broker, a real HTTP server on loopback (its request log shows what was fetched
again). The waits are the test settings' (hundredths of a second), except where a test honours a
real Retry-After.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from jobs.models import Job
from tasks import data_sync
from tasks.models import DataSource, DeadLetter, SyncedRecord, SyncRun
from tests.tasks.upstream import Upstream, make_records
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PAGES = 10  # 30 records, 3 a page


@pytest.fixture
def upstream(settings: Any) -> Iterator[Upstream]:
    server = Upstream(make_records(3 * PAGES), page_size=3).start()
    settings.DATA_SYNC_ALLOWED_HOSTS = [server.host]
    yield server
    server.stop()


def page(number: int) -> str:
    return f"/records?page={number}"


def make_source(upstream: Upstream, **fields: Any) -> DataSource:
    values: dict[str, Any] = {"name": "flaky", "url": upstream.url(page(1)), "batch_size": 4}
    return DataSource.objects.create(**{**values, **fields})


def settled(task_id: str) -> tuple[SyncRun, Job]:
    """The run and the job once the job is final (its last batch stored and counted)."""
    job = wait_for(lambda: Job.objects.filter(task_id=task_id, status__in=Job.FINAL).first(), timeout=60)
    return SyncRun.objects.get(task_id=task_id), job


def counts(run: SyncRun) -> tuple[int, int, int, int]:
    return (run.created, run.updated, run.unchanged, run.failed)


def no_duplicate_batches(job: Job, run: SyncRun) -> None:
    children = Job.objects.filter(parent=job)
    assert children.count() == run.batches
    stored = sum(len(child.payload["records"]) for child in children)
    assert stored == run.records


@pytest.mark.parametrize("retry_after", [None, "1"], ids=["backoff", "retry-after"])
def test_pages_that_answer_503_twice_are_retried_in_place_and_the_sync_completes(
    celery_worker: object, upstream: Upstream, settings: Any, retry_after: str | None
) -> None:
    """The review's case: pages 2, 5 and 9 each answer 503 twice. It used to restart from page 1
    on every attempt and dead-letter after 5; each page now succeeds on its third try in place."""
    if retry_after:
        settings.DATA_SYNC_PAGE_RETRY_MAX_SECONDS = 1.0  # so the server's 1 s is waited out in place
    headers = {"Retry-After": retry_after} if retry_after else None
    for number in (2, 5, 9):
        upstream.fail(page(number), 503, 503, headers=headers)
    source = make_source(upstream)

    result = data_sync.sync.delay(source_id=source.pk)
    run, job = settled(result.id)

    assert run.status == SyncRun.Status.SUCCEEDED, run.error
    assert job.status == Job.Status.SUCCEEDED and job.attempts == 1
    assert counts(run) == (30, 0, 0, 0)
    assert (run.pages, run.fetched, run.records, run.page_retries) == (PAGES, 30, 30, 6)
    assert [upstream.hits(page(n)) for n in range(1, PAGES + 1)] == [1, 3, 1, 1, 3, 1, 1, 1, 3, 1]
    assert SyncedRecord.objects.filter(source=source).count() == 30
    no_duplicate_batches(job, run)
    assert not DeadLetter.objects.exists()


def test_a_page_past_its_budget_makes_the_task_retry_and_the_retry_resumes_at_that_page(
    celery_worker: object, upstream: Upstream
) -> None:
    # Failures counted once across the resumption: a record without an id before it, and an id
    # of page 2 repeated on page 7 (the first copy is stored, the later one counts as failed).
    upstream.records[1] = {"name": "no id"}
    upstream.records[19] = {**upstream.records[4], "name": "a later copy of record 5"}
    upstream.fail(page(5), 503, 503, 503, 503)  # budget 3 a page: the 4th answer is the retry's
    source = make_source(upstream)

    result = data_sync.sync.delay(source_id=source.pk)
    run, job = settled(result.id)

    assert run.status == SyncRun.Status.SUCCEEDED, run.error
    assert job.attempts == 2  # the task retried once
    # Pages 1-4 were fetched once: the retry started at page 5.
    assert upstream.paths() == [page(n) for n in range(1, 5)] + [page(5)] * 5 + [
        page(n) for n in range(6, PAGES + 1)
    ]
    assert counts(run) == (28, 0, 0, 2)
    assert (run.pages, run.fetched, run.records, run.failed_before) == (PAGES, 30, 28, 2)
    assert SyncedRecord.objects.filter(source=source).count() == 28
    assert SyncedRecord.objects.get(external_id="5").data["name"] == "record 5"
    no_duplicate_batches(job, run)
    assert job.status == Job.Status.PARTIALLY_FAILED  # the two records that failed
    assert (job.result or {})["failed"] == 2 and (job.result or {})["failed_batches"] == 0


def test_a_source_down_longer_than_the_old_budget_is_ridden_out(
    celery_worker: object, upstream: Upstream
) -> None:
    """From page 4 on the source answers 503 to its next 10 requests: 5 attempts of the old sync
    (one request each, from page 1) could not outlast it; attempts that resume, each with its
    page's own retries, do."""
    upstream.fail(page(4), *[503] * 10)
    source = make_source(upstream)

    result = data_sync.sync.delay(source_id=source.pk)
    run, job = settled(result.id)

    assert run.status == SyncRun.Status.SUCCEEDED, run.error
    assert job.status == Job.Status.SUCCEEDED
    assert job.attempts == 4  # 3 tries of page 4 in each of attempts 1-3, 2 in the 4th
    assert counts(run) == (30, 0, 0, 0) and run.page_retries == 7
    assert [upstream.hits(page(n)) for n in range(1, 5)] == [1, 1, 1, 11]
    no_duplicate_batches(job, run)
    assert not DeadLetter.objects.exists()


def test_a_source_that_stays_down_ends_the_run_failed_with_what_was_stored_counted(
    celery_worker: object, upstream: Upstream
) -> None:
    upstream.fail(page(3), *[503] * 100)
    source = make_source(upstream)

    result = data_sync.sync.delay(source_id=source.pk)
    run, job = settled(result.id)

    # Not stuck running: the batches of pages 1-2 are stored and counted, the error says where
    # the source stopped answering.
    assert run.status == SyncRun.Status.FAILED
    assert "stopped before the source's last page: page 3" in run.error and "503" in run.error
    assert counts(run) == (6, 0, 0, 0) and run.finished_at is not None
    assert job.status == Job.Status.PARTIALLY_FAILED and "page 3" in job.error_message
    assert [upstream.hits(page(n)) for n in (1, 2)] == [1, 1]  # every attempt resumed at page 3
    assert upstream.hits(page(3)) == 3 * job.attempts
    assert SyncedRecord.objects.filter(source=source).count() == 6
    # Its attempts ran out: a dead letter says where, for a replay once the source is back.
    letter = DeadLetter.objects.get(task_id=result.id)
    assert letter.attempts == job.attempts and "page 3" in letter.exception_message
