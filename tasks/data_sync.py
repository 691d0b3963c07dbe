"""The `data_sync` task family (queue `data_sync`): pull records from HTTP sources, export changes.

`data_sync.sync` fetches every page of a `DataSource` (through the SSRF-guarded
fetcher, tasks/services/fetch.py), then fans the records out as child jobs
(jobs.tree): one `data_sync.upsert_batch` per `batch_size` records. The sync's
job stays `running` until the last batch is final; then `_sync_outcome` adds up
the batches' counts on the `SyncRun` and the job: succeeded, partially failed
(some records or batches failed for good) or failed.

`data_sync.export` writes the records changed since the previous export to a
JSON Lines file (the hourly backup).

The work lives in tasks/services/data_sync.py; these tasks load rows, call it,
and translate its errors: network trouble, timeouts, 408/429/5xx and database
hiccups are transient (retried with backoff); a refused address, another 4xx,
bad JSON or CSV, a page over the size cap are permanent (dead letter at once).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from django.db import OperationalError
from pydantic import BaseModel, Field

from config.celery_app import app
from jobs.models import Job
from jobs.tree import Child, Outcome, children_path
from tasks.base import InvalidArguments, JobTask, PermanentJobError, RowId, TransientJobError
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
    """A task working for a `SyncRun`. `data_sync.sync` failing for good (or cancelled) marks its run
    failed with the error; a batch failing for good is counted when the sync's job settles.

    The run is the `run_id` argument, or for `data_sync.sync` the run its task id owns.
    """

    abstract = True
    # Failing for good ends the run (the sync itself); a batch's failure is one child's outcome.
    ends_run: ClassVar[bool] = True

    def run_id_of(self, task_id: str, args: Any, kwargs: Any) -> int | None:
        try:
            run_id = self.bind_arguments(args or (), kwargs or {}).get("run_id")
        except InvalidArguments:
            run_id = None
        return run_id if isinstance(run_id, int) else service.run_id_for_task(task_id)

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        super().on_failure(exc, task_id, args, kwargs, einfo)
        if not self.ends_run:
            return
        try:
            run_id = self.run_id_of(task_id, args, kwargs)
            if run_id is not None:
                service.fail_run(run_id, f"{self.name} failed: {exc}")
        except Exception:  # never let bookkeeping hide the task's own failure
            logger.exception("could not mark the sync run of %s[%s] failed", self.name, task_id)

    def on_cancelled(self, task_id: str, args: Any, kwargs: Any) -> None:
        if not self.ends_run:
            return
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


def _sync_outcome(task: JobTask, job: Job, children: Sequence[Child]) -> Outcome:
    """The last batch is final: the run gets the summed counts, the job its outcome. Records of a
    batch that failed for good count as failed."""
    own = job.result if isinstance(job.result, dict) else {}
    run_id = own.get("run_id")
    stored = [
        child.result
        for child in children
        if child.status == Job.Status.SUCCEEDED and isinstance(child.result, dict)
    ]
    lost_batches = len(children) - len(stored)
    counted = sum(sum(int(result.get(name, 0)) for name in COUNTS) for result in stored)
    lost_records = max(0, int(own.get("records", 0)) - counted)
    failed_before = int(own.get("failed_before", 0))
    error = ""
    if lost_batches:
        error = (
            f"{lost_batches} of {len(children)} batch(es) failed for good ({lost_records} records not "
            f"stored): see {children_path(job, 'failed')} and the dead letters"
        )
    if isinstance(run_id, int):
        service.settle_run(run_id, stored, failed_before=failed_before + lost_records, error=error)
    totals = {name: sum(int(result.get(name, 0)) for result in stored) for name in COUNTS}
    totals["failed"] += failed_before + lost_records
    result = {**own, **totals, "failed_batches": lost_batches}
    if not totals["failed"]:
        return Outcome(Job.Status.SUCCEEDED, result)
    result["failures"] = children_path(job)
    if not stored:
        return Outcome(Job.Status.FAILED, result, "SyncFailed", error)
    message = error or f"{totals['failed']} record(s) failed (no id, repeated, or refused by the database)"
    return Outcome(Job.Status.PARTIALLY_FAILED, result, "RecordsFailed", message)


COUNTS = ("created", "updated", "unchanged", "failed")


@app.task(
    bind=True,
    base=RunTask,
    name="data_sync.sync",
    schema=SyncSchema,
    finish_tree=_sync_outcome,
    references={"source_id": "tasks.DataSource"},
    autoretry_for=TRANSIENT,
    idempotency=(
        "the SyncRun is keyed by the task id, so a retry or redelivery reuses it (and does nothing once "
        "it has finished); records are upserted by external id and unchanged ones are not written"
    ),
)
def sync(self: RunTask, source_id: int) -> dict[str, Any]:
    """Fetches every page of the source and spawns the upsert batches; returns the run and batch count.

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

    self.spawn((upsert_batch, {"run_id": run.pk, "records": records}) for records in groups)
    return {
        "run_id": run.pk,
        "batches": len(groups),
        "records": len(collected.records),
        "failed_before": collected.failed,
    }


class UpsertBatchSchema(BaseModel):
    run_id: RowId
    records: list[Any] = Field(max_length=MAX_BATCH_SIZE)


@app.task(
    bind=True,
    base=RunTask,
    name="data_sync.upsert_batch",
    schema=UpsertBatchSchema,
    ends_run=False,
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
