"""The `data_sync` task family (queue `data_sync`): pull records from HTTP sources, export changes.

`data_sync.sync` fetches every page of a `DataSource` (through the SSRF-guarded
fetcher, tasks/services/fetch.py), then fans the records out as a chord:
one `data_sync.upsert_batch` per `batch_size` records, and
`data_sync.finish_run` as the callback that adds up the counts on the
`SyncRun`. If a batch (or the callback) fails for good, the callback's error
link `data_sync.fail_run` marks the run failed, so no run stays "running".

`data_sync.export` writes the records changed since the previous export to a
JSON Lines file (the hourly backup).

The work lives in tasks/services/data_sync.py; these tasks load rows, call it,
and translate its errors: network trouble, timeouts, 408/429/5xx and database
hiccups are transient (retried with backoff); a refused address, another 4xx,
bad JSON or CSV, a page over the size cap are permanent (dead letter at once).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from celery import Signature, chord
from celery.result import AsyncResult
from django.db import OperationalError
from pydantic import BaseModel, Field

from config.celery_app import app
from tasks.base import MAX_INTEGER, InvalidArguments, JobTask, PermanentJobError, RowId, TransientJobError
from tasks.models import DataSource, SyncRun
from tasks.services import data_sync as service
from tasks.services.fetch import PermanentFetchError, TransientFetchError

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 10_000


@contextmanager
def job_errors() -> Iterator[None]:
    """Service errors as the task policy's two kinds."""
    try:
        yield
    except TransientFetchError as exc:
        raise TransientJobError(str(exc)) from exc
    except PermanentFetchError as exc:
        raise PermanentJobError(str(exc)) from exc


class RunTask(JobTask):
    """A task working for a `SyncRun`: failing for good marks the run failed with the error.

    The run is the `run_id` argument, or for `data_sync.sync` the run its task id owns.
    """

    abstract = True

    def run_id_of(self, task_id: str, args: Any, kwargs: Any) -> int | None:
        try:
            run_id = self.bind_arguments(args or (), kwargs or {}).get("run_id")
        except InvalidArguments:
            run_id = None
        return run_id if isinstance(run_id, int) else service.run_id_for_task(task_id)

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        super().on_failure(exc, task_id, args, kwargs, einfo)
        try:
            run_id = self.run_id_of(task_id, args, kwargs)
            if run_id is not None:
                service.fail_run(run_id, f"{self.name} failed: {exc}")
        except Exception:  # never let bookkeeping hide the task's own failure
            logger.exception("could not mark the sync run of %s[%s] failed", self.name, task_id)

    def on_cancelled(self, task_id: str, args: Any, kwargs: Any) -> None:
        run_id = self.run_id_of(task_id, args, kwargs)
        if run_id is not None:
            service.fail_run(run_id, f"{self.name} was cancelled")

    def on_retry(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        super().on_retry(exc, task_id, args, kwargs, einfo)
        try:
            run_id = self.run_id_of(task_id, args, kwargs)
            if run_id is not None:
                attempt = (self.request.retries or 0) + 1
                service.note_retry(run_id, f"{self.name} attempt {attempt} failed, retrying: {exc}")
        except Exception:
            logger.exception("could not note the retry of %s[%s]", self.name, task_id)


TRANSIENT = (TransientJobError, OperationalError)


class SyncSchema(BaseModel):
    source_id: RowId


@app.task(
    bind=True,
    base=RunTask,
    name="data_sync.sync",
    schema=SyncSchema,
    references={"source_id": "tasks.DataSource"},
    autoretry_for=TRANSIENT,
    idempotency=(
        "the SyncRun is keyed by the task id, so a retry or redelivery reuses it (and does nothing once "
        "it has finished); records are upserted by external id and unchanged ones are not written"
    ),
)
def sync(self: RunTask, source_id: int) -> dict[str, Any]:
    """Fetches every page of the source and sends the upsert chord; returns the run and batch count.

    A disabled source is skipped. A retry refetches from the first page: nothing
    is written before every page has been fetched.
    """
    source = DataSource.objects.filter(pk=source_id).first()
    if source is None:
        raise PermanentJobError(f"data source {source_id} does not exist")
    if not source.enabled:
        return {"source": source.name, "skipped": "the source is disabled"}
    run = service.start_run(source, self.request.id or f"direct-{uuid.uuid4()}")
    if run.status != SyncRun.Status.RUNNING:
        return {"run_id": run.pk, "status": run.status}

    def on_page(pages: int, records: int) -> None:
        self.report_progress(0, f"fetched page {pages} ({records} records)")

    with job_errors():
        collected = service.collect(source, on_page=on_page)
    groups = service.batches(collected.records, min(source.batch_size, MAX_BATCH_SIZE))
    service.record_collected(run, collected, len(groups))
    if not groups:
        service.finish_run(run.pk, [], failed_before=collected.failed)
        return {"run_id": run.pk, "batches": 0, "records": 0}

    header = [upsert_batch.s(run_id=run.pk, records=records) for records in groups]
    finishing = chord(header)(finishing_callback(run.pk, failed_before=collected.failed))
    return {
        "run_id": run.pk,
        "batches": len(groups),
        "records": len(collected.records),
        "finish_task_id": finishing.id,
    }


class UpsertBatchSchema(BaseModel):
    run_id: RowId
    records: list[Any] = Field(max_length=MAX_BATCH_SIZE)


@app.task(
    bind=True,
    base=RunTask,
    name="data_sync.upsert_batch",
    schema=UpsertBatchSchema,
    autoretry_for=TRANSIENT,
    idempotency="an upsert by external id and checksum: a second run finds every record unchanged",
)
def upsert_batch(self: RunTask, run_id: int, records: list[Any]) -> dict[str, int]:
    """Stores one batch of the run's records; returns counts: created, updated, unchanged, failed."""
    run = SyncRun.objects.select_related("source").filter(pk=run_id).first()
    if run is None:
        raise PermanentJobError(f"sync run {run_id} does not exist")
    with job_errors():
        return service.upsert_records(run.source, records).as_dict()


class FinishRunSchema(BaseModel):
    results: list[dict[str, Annotated[int, Field(ge=0, le=MAX_INTEGER)]]]
    run_id: RowId
    failed_before: int = Field(default=0, ge=0, le=MAX_INTEGER)


@app.task(
    bind=True,
    base=RunTask,
    name="data_sync.finish_run",
    schema=FinishRunSchema,
    autoretry_for=TRANSIENT,
    idempotency="sets the run's counts from the batch results; a second run finds it finished",
)
def finish_run(
    self: RunTask, results: list[dict[str, int]], run_id: int, failed_before: int = 0
) -> dict[str, Any]:
    """The chord callback: marks the run succeeded with the summed counts of its batches."""
    service.finish_run(run_id, results, failed_before=failed_before)
    run = SyncRun.objects.get(pk=run_id)
    return {
        "run_id": run_id,
        "status": run.status,
        **{name: getattr(run, name) for name in ("created", "updated", "unchanged", "failed")},
    }


class FailRunSchema(BaseModel):
    failed_task_id: str = Field(min_length=1, max_length=255)
    run_id: RowId


@app.task(
    bind=True,
    base=RunTask,
    name="data_sync.fail_run",
    schema=FailRunSchema,
    autoretry_for=TRANSIENT,
    idempotency="only a running run is marked failed; the first error recorded wins",
)
def fail_run(self: RunTask, failed_task_id: str, run_id: int) -> dict[str, Any]:
    """The error link of the chord callback: a batch or the callback failed for good.

    Celery calls it with the id of the failed callback. The batch that failed has
    usually written its own error on the run already (RunTask.on_failure).
    """
    error = f"a batch or the finishing step failed for good (task {failed_task_id}); see the dead letters"
    outcome: AsyncResult[Any] = AsyncResult(failed_task_id, app=app)
    # Celery sends this task just before it stores the chord's error: give it a moment.
    for _ in range(20):
        if outcome.state == "FAILURE":
            error = f"{error}: {outcome.result}"
            break
        time.sleep(0.05)
    marked = service.fail_run(run_id, error)
    return {"run_id": run_id, "marked_failed": marked}


def finishing_callback(run_id: int, failed_before: int = 0) -> Signature[Any]:
    """The chord callback: `finish_run`, with `fail_run` as its error link.

    Celery calls the error link when a header task (a batch) fails for good (the
    chord then errors instead of calling the callback) or when the callback
    itself fails, so the run is marked failed either way.
    """
    errback = fail_run.s(run_id=run_id)
    return finish_run.s(run_id=run_id, failed_before=failed_before).on_error(errback)


class ExportSchema(BaseModel):
    source_id: RowId | None = None


@app.task(
    bind=True,
    base=JobTask,
    name="data_sync.export",
    schema=ExportSchema,
    references={"source_id": "tasks.DataSource"},
    autoretry_for=TRANSIENT,
    idempotency=(
        "each export starts where the previous one's watermark ended; run again at once, it exports "
        "0 records and writes no file"
    ),
)
def export(self: JobTask, source_id: int | None = None) -> dict[str, Any]:
    """Writes records changed since the last export (of this source, or of all) to a JSON Lines file."""
    source = None
    if source_id is not None:
        source = DataSource.objects.filter(pk=source_id).first()
        if source is None:
            raise PermanentJobError(f"data source {source_id} does not exist")
    try:
        exported = service.export_changes(source)
    except OSError as exc:  # a full disk or a network mount that went away
        raise TransientJobError(f"could not write the export (DATA_SYNC_EXPORT_DIR): {exc}") from exc
    return {
        "export_id": exported.pk,
        "records": exported.records,
        "path": exported.path,
        "since": exported.since.isoformat() if exported.since else None,
        "until": exported.until.isoformat(),
    }
