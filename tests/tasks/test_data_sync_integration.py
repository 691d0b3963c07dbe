"""Data sync through a real worker and broker, from a real HTTP server on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.urls import reverse

from jobs.models import Job
from tasks import data_sync
from tasks.models import DataSource, DeadLetter, SyncedRecord, SyncExport, SyncRun
from tests.tasks.upstream import Upstream, make_records
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def upstream(settings: Any, tmp_path: Path) -> Iterator[Upstream]:
    server = Upstream(make_records(10), page_size=3).start()
    settings.DATA_SYNC_ALLOWED_HOSTS = [server.host]
    settings.DATA_SYNC_EXPORT_DIR = tmp_path / "exports"
    settings.DATA_SYNC_EXPORT_LAG_SECONDS = 0
    yield server
    server.stop()


def make_source(upstream: Upstream, **fields: Any) -> DataSource:
    values: dict[str, Any] = {"name": "shop", "url": upstream.url("/records?page=1"), "batch_size": 4}
    return DataSource.objects.create(**{**values, **fields})


def finished(run_id: int) -> SyncRun:
    return wait_for(lambda: SyncRun.objects.exclude(status=SyncRun.Status.RUNNING).filter(pk=run_id).first())


def sync(source: DataSource) -> SyncRun:
    outcome = data_sync.sync.delay(source_id=source.pk).get(timeout=30)
    return finished(outcome["run_id"])


def changed_at() -> dict[str, Any]:
    return dict(SyncedRecord.objects.values_list("external_id", "changed_at"))


def test_a_multi_page_sync_stores_every_record_and_counts_them(
    celery_worker: object, upstream: Upstream
) -> None:
    upstream.records.append({"name": "a record without an id"})
    source = make_source(upstream)

    run = sync(source)

    assert run.status == SyncRun.Status.SUCCEEDED, run.error
    assert (run.pages, run.fetched, run.batches) == (4, 11, 3)
    assert (run.created, run.updated, run.unchanged, run.failed) == (10, 0, 0, 1)
    assert run.finished_at is not None
    assert upstream.hits("/records?page=4") == 1
    stored = SyncedRecord.objects.get(source=source, external_id="7")
    assert stored.data == make_records(7)[6]
    assert SyncedRecord.objects.count() == 10


def test_a_second_sync_of_an_unchanged_source_changes_nothing(
    celery_worker: object, upstream: Upstream
) -> None:
    source = make_source(upstream)
    sync(source)
    before = changed_at()

    run = sync(source)

    assert run.status == SyncRun.Status.SUCCEEDED
    assert (run.created, run.updated, run.unchanged, run.failed) == (0, 0, 10, 0)
    assert changed_at() == before
    assert SyncRun.objects.count() == 2


def test_an_upstream_change_updates_exactly_the_changed_records(
    celery_worker: object, upstream: Upstream
) -> None:
    source = make_source(upstream)
    sync(source)
    before = changed_at()
    upstream.records[0]["price"] = 1
    upstream.records[5]["name"] = "renamed"
    upstream.records.pop()  # id 10 disappears upstream: kept here (a sync never deletes)
    upstream.records.append({"id": 11, "name": "new"})

    run = sync(source)

    assert (run.created, run.updated, run.unchanged, run.failed) == (1, 2, 7, 0)
    after = changed_at()
    assert {key for key in before if after[key] != before[key]} == {"1", "6"}
    assert set(after) - set(before) == {"11"}
    assert SyncedRecord.objects.get(external_id="6").data["name"] == "renamed"


def test_a_page_that_answers_503_once_is_retried_and_the_sync_completes(
    celery_worker: object, upstream: Upstream
) -> None:
    upstream.fail("/records?page=2", 503)
    source = make_source(upstream)

    run = sync(source)

    assert run.status == SyncRun.Status.SUCCEEDED
    assert run.created == 10
    assert upstream.hits("/records?page=2") == 2
    assert SyncRun.objects.count() == 1  # the retry reused its run
    assert not DeadLetter.objects.exists()


def test_a_first_page_that_answers_404_fails_the_sync_at_once(
    celery_worker: object, upstream: Upstream
) -> None:
    upstream.fail("/records?page=1", 404)
    source = make_source(upstream)

    result = data_sync.sync.delay(source_id=source.pk)

    with pytest.raises(Exception, match="answered 404"):
        result.get(timeout=30)
    run = finished(SyncRun.objects.get(task_id=result.id).pk)
    assert run.status == SyncRun.Status.FAILED
    assert "data_sync.sync failed: page 1" in run.error and "answered 404" in run.error
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert (letter.task_name, letter.attempts, letter.queue) == ("data_sync.sync", 1, "data_sync")
    assert upstream.hits("/records?page=1") == 1
    assert not SyncedRecord.objects.exists()


def test_a_later_page_that_answers_404_stops_the_sync_at_once_with_the_earlier_pages_stored(
    celery_worker: object, upstream: Upstream
) -> None:
    upstream.fail("/records?page=3", 404)
    source = make_source(upstream)  # pages of 3, batches of 4: pages 1-2 are batches 1-4 and 5-6

    result = data_sync.sync.delay(source_id=source.pk)

    assert result.get(timeout=30)["incomplete"].startswith("page 3 (")
    run = finished(SyncRun.objects.get(task_id=result.id).pk)
    assert run.status == SyncRun.Status.FAILED
    assert "stopped before the source's last page: page 3" in run.error and "answered 404" in run.error
    assert (run.pages, run.fetched, run.batches, run.created, run.failed) == (2, 6, 2, 6, 0)
    assert upstream.hits("/records?page=3") == 1  # permanent: not fetched again
    assert SyncedRecord.objects.count() == 6
    job = wait_for(lambda: Job.objects.filter(task_id=result.id, status__in=Job.FINAL).first())
    assert job.status == Job.Status.PARTIALLY_FAILED and "answered 404" in job.error_message
    assert (job.result or {})["created"] == 6
    # What stopped it is a dead letter of the sync, with its arguments: replaying it syncs again.
    letter = DeadLetter.objects.get(task_id=result.id)
    assert letter.kwargs == {"source_id": source.pk} and letter.job_id == job.pk
    assert "page 3" in letter.exception_message and "answered 404" in letter.exception_message
    assert "PermanentFetchError" in letter.traceback


def test_a_page_nested_too_deep_fails_the_sync_at_once_with_a_clear_error(
    celery_worker: object, upstream: Upstream
) -> None:
    """A hostile source: json.loads raised RecursionError in the worker (retried as a crash)."""
    upstream.route(
        "/deep", lambda handler: handler.answer(200, b'{"results": ' + b"[" * 5000 + b"]" * 5000 + b"}")
    )
    source = make_source(upstream, url=upstream.url("/deep"))

    result = data_sync.sync.delay(source_id=source.pk)

    with pytest.raises(Exception, match="nests arrays and objects 5001 levels deep; at most 64 are accepted"):
        result.get(timeout=30)
    run = finished(SyncRun.objects.get(task_id=result.id).pk)
    assert run.status == SyncRun.Status.FAILED and "5001 levels deep" in run.error
    assert "RecursionError" not in run.error
    assert upstream.hits("/deep") == 1  # permanent: not fetched again
    assert not SyncedRecord.objects.exists()


@pytest.fixture
def refuse_record_7() -> Iterator[None]:
    """A PostgreSQL trigger that refuses to store the record with id 7: its batch fails for good."""
    if connection.vendor != "postgresql":
        pytest.skip("the refusing trigger is PostgreSQL's")
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION refuse_7() RETURNS trigger AS $$ BEGIN "
            "IF NEW.external_id = '7' THEN RAISE EXCEPTION 'record 7 is refused'; END IF; RETURN NEW; "
            "END $$ LANGUAGE plpgsql"
        )
        cursor.execute(
            "CREATE TRIGGER refuse_7 BEFORE INSERT ON tasks_syncedrecord "
            "FOR EACH ROW EXECUTE FUNCTION refuse_7()"
        )
    yield
    with connection.cursor() as cursor:
        cursor.execute("DROP TRIGGER refuse_7 ON tasks_syncedrecord")
        cursor.execute("DROP FUNCTION refuse_7()")


def test_a_batch_that_fails_for_good_leaves_the_run_failed_and_the_job_partially_failed(
    celery_worker: object, upstream: Upstream, refuse_record_7: None
) -> None:
    source = make_source(upstream)  # 10 records in batches of 4: 1-4, 5-8, 9-10

    result = data_sync.sync.delay(source_id=source.pk)
    run = finished(result.get(timeout=30)["run_id"])

    assert run.status == SyncRun.Status.FAILED
    assert "1 of 3 batch(es) failed for good (4 records not stored)" in run.error, run.error
    assert (run.created, run.failed) == (6, 4)
    assert SyncedRecord.objects.count() == 6  # the good batches are stored
    job = wait_for(lambda: Job.objects.filter(task_id=result.id, status__in=Job.FINAL).first())
    assert job.status == Job.Status.PARTIALLY_FAILED
    outcome = job.result or {}
    assert (outcome["created"], outcome["failed"], outcome["failed_batches"]) == (6, 4, 1)
    [failed] = Job.objects.filter(parent=job, status=Job.Status.FAILED)
    letter = DeadLetter.objects.get(task_name="data_sync.upsert_batch")
    assert letter.job_id == failed.pk and "record 7 is refused" in letter.exception_message


def test_a_csv_source_syncs_through_the_worker(celery_worker: object, upstream: Upstream) -> None:
    source = make_source(upstream, kind=DataSource.Kind.CSV, url=upstream.url("/records.csv"), batch_size=100)

    run = sync(source)

    assert (run.status, run.pages, run.batches, run.created) == (SyncRun.Status.SUCCEEDED, 1, 1, 10)
    assert SyncedRecord.objects.get(external_id="3").data["price"] == "30"  # CSV cells are text


def test_the_export_writes_only_records_changed_since_the_last_one(
    celery_worker: object, upstream: Upstream
) -> None:
    source = make_source(upstream)
    sync(source)
    first = data_sync.export.delay(source_id=source.pk).get(timeout=30)
    upstream.records[3]["price"] = 0
    sync(source)

    second = data_sync.export.delay(source_id=source.pk).get(timeout=30)
    third = data_sync.export.delay(source_id=source.pk).get(timeout=30)

    assert first["records"] == 10
    assert second["records"] == 1
    lines = [json.loads(line) for line in Path(second["path"]).read_text().splitlines()]
    assert [(line["external_id"], line["data"]["price"]) for line in lines] == [("4", 0)]
    assert (third["records"], third["path"]) == (0, "")
    assert SyncExport.objects.count() == 3
    assert len(list(Path(second["path"]).parent.iterdir())) == 2


def test_sync_now_in_the_admin_queues_a_sync(
    celery_worker: object, upstream: Upstream, admin_client: Any
) -> None:
    source = make_source(upstream)
    disabled = make_source(upstream, name="paused", enabled=False)

    response = admin_client.post(
        reverse("admin:tasks_datasource_changelist"),
        {"action": "sync_now", "_selected_action": [source.pk, disabled.pk]},
        follow=True,
    )

    page = response.content.decode()
    assert "Sync queued for shop" in page and "&#x27;paused&#x27; is disabled" in page
    run = finished(wait_for(lambda: SyncRun.objects.filter(source=source).first()).pk)
    assert (run.status, run.created) == (SyncRun.Status.SUCCEEDED, 10)
    assert not SyncRun.objects.filter(source=disabled).exists()
