"""The `data_sync` task family (queue `data_sync`): pull records from HTTP sources, export changes.

`data_sync.sync` fetches the pages of a `DataSource` one after another (through
the SSRF-guarded fetcher, tasks/services/fetch.py) and fans the records out as
child jobs (jobs.tree) as they come: one `data_sync.upsert_batch` per
`batch_size` records. A page's transient failure is retried in place within
its own budget; past it, the run's checkpoint (in its `SyncRun`) names that
page and the task's retry resumes there. The sync's job stays `running` until
the last batch is final; then `_sync_outcome` adds up the batches' counts on
the `SyncRun` and the job: succeeded, partially failed (some records or
batches failed for good, or the source failed for good after some pages) or
failed.

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
from jobs import tree
from jobs.models import Job
from jobs.tree import Child, Outcome, children_path
from tasks.base import JOB_HEADER, InvalidArguments, JobTask, PermanentJobError, RowId, TransientJobError
from tasks.models import DataSource, SyncRun
from tasks.progress import throttled
from tasks.services import data_sync as service
from tasks.services.fetch import Fetcher, PermanentFetchError, TransientFetchError, redact_url

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 10_000


@contextmanager
def job_errors() -> Iterator[None]:
    """Service errors as the task policy's two kinds."""
    try:
        yield
    except TransientFetchError as exc:
        raise TransientJobError(str(exc), retry_after=exc.retry_after) from exc
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
    batch that failed for good count as failed; a sync that stopped before its last page (it
    failed for good after storing some batches: `incomplete`) is partially failed at best."""
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
    problems = []
    if own.get("incomplete"):
        problems.append(f"the sync stopped before the source's last page: {own['incomplete']}")
    if lost_batches:
        problems.append(
            f"{lost_batches} of {len(children)} batch(es) failed for good ({lost_records} records not "
            f"stored): see {children_path(job, 'failed')} and the dead letters"
        )
    error = "; ".join(problems)
    if isinstance(run_id, int):
        service.settle_run(run_id, stored, failed_before=failed_before + lost_records, error=error)
    totals = {name: sum(int(result.get(name, 0)) for result in stored) for name in COUNTS}
    totals["failed"] += failed_before + lost_records
    result = {**own, **totals, "failed_batches": lost_batches}
    if not totals["failed"] and not error:
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
        "the SyncRun is keyed by the task id, so a retry or redelivery reuses it and resumes at its "
        "checkpoint (and does nothing once it has finished); batches have stable positions, so a "
        "rerun finds those it spawned; records are upserted by external id and unchanged ones are "
        "not written"
    ),
)
def sync(self: RunTask, source_id: int) -> dict[str, Any]:
    """Fetches the source page after page, spawning an upsert batch whenever `batch_size` records
    are in; returns the run and its counts.

    A page's transient failure is retried in place (DATA_SYNC_PAGE_ATTEMPTS); past that budget
    the batches of the pages fetched so far are spawned, the run's checkpoint names the page that
    failed, and the task retries: the retry resumes at that page. A disabled source is skipped.
    """
    source = DataSource.objects.filter(pk=source_id).first()
    if source is None:
        raise PermanentJobError(f"data source {source_id} does not exist")
    if not source.enabled:
        return {"source": source.name, "skipped": "the source is disabled"}
    task_id = self.request.id or f"direct-{uuid.uuid4()}"
    run = service.start_run(source, task_id)
    if run.status != SyncRun.Status.RUNNING:
        return {"run_id": run.pk, "status": run.status}
    start = service.Checkpoint.of(run)
    if start.complete:  # a redelivery after the last page was in: its batches are spawned
        return _fetched(self, run.pk, start)
    seen = _ids_in_batches(task_id, start.batches, source.id_field)
    feed = service.Feed(source, start, seen, min(source.batch_size, MAX_BATCH_SIZE))

    def spawn(groups: Sequence[tuple[int, list[Any]]]) -> None:
        if groups:
            _spawn_batches(self, task_id, run.pk, groups)

    report = throttled(self.report_progress)

    def on_retry(exc: TransientFetchError, wait: float) -> None:
        service.note_page_retry(run.pk, f"page {feed.now.pages + 1}: {exc}; trying again in {wait:.3g} s")

    try:
        with Fetcher() as fetcher:
            pages = service.iter_pages(
                source,
                fetcher,
                start_url=start.next_url,
                pages_before=start.pages,
                retry=service.PageRetry.from_settings(),
                on_retry=on_retry,
            )
            for page in pages:
                spawn(feed.add(page))
                checkpoint = feed.checkpoint()
                if checkpoint is not None:
                    service.save_checkpoint(run.pk, checkpoint)
                report(0, f"fetched page {page.number} ({feed.now.fetched} records)")
    except (TransientFetchError, PermanentFetchError) as exc:
        # The pages fetched so far go to their batches; the checkpoint names the page that failed.
        last = feed.flush()
        spawn([last] if last else [])
        stopped = feed.checkpoint()
        assert stopped is not None
        service.save_checkpoint(run.pk, stopped)
        where = f"page {stopped.pages + 1} ({redact_url(stopped.next_url)})"
        final = isinstance(exc, PermanentFetchError) or _last_attempt(self)
        if final and stopped.batches:
            # Failing now would leave the stored batches uncounted: the job settles when they are
            # final, partially failed, and the run failed with this error and the counts. The dead
            # letter says what stopped it; replaying it syncs the source again.
            _dead_letter(self, f"{where}: {exc}", exc)
            return {**_fetched(self, run.pk, stopped), "incomplete": f"{where}: {exc}"}
        if isinstance(exc, PermanentFetchError):
            raise PermanentJobError(f"{where}: {exc}") from exc
        raise TransientJobError(f"{where}: {exc}", retry_after=exc.retry_after) from exc
    last = feed.flush()
    spawn([last] if last else [])
    done = feed.checkpoint()
    assert done is not None
    service.save_checkpoint(run.pk, done)
    return _fetched(self, run.pk, done)


def _fetched(task: RunTask, run_id: int, checkpoint: service.Checkpoint) -> dict[str, Any]:
    """The sync's own result once its fetching ended; a run without batches is finished here."""
    summary = {
        "run_id": run_id,
        "pages": checkpoint.pages,
        "batches": checkpoint.batches,
        "records": checkpoint.records,
        "failed_before": checkpoint.failed,
    }
    if not checkpoint.batches:
        service.finish_run(run_id, [], failed_before=checkpoint.failed)
        return summary
    # Batches spawned by an earlier attempt make this job a parent too (JobTask.spawn sets this).
    setattr(task.request, "spawned_children", True)  # noqa: B010
    return summary


def _dead_letter(task: RunTask, message: str, exc: BaseException) -> None:
    """A dead letter for a sync that stopped for good before the source's last page (its job ends
    partially failed, not failed: no on_failure stores one)."""
    import traceback
    from types import SimpleNamespace

    from tasks import deadletters

    kind = PermanentJobError if isinstance(exc, PermanentFetchError) else TransientJobError
    details = SimpleNamespace(traceback="".join(traceback.format_exception(exc)))
    try:
        request = task.request
        task_id = request.id or ""
        deadletters.record_failure(task, kind(message), task_id, request.args, request.kwargs, details)
    except Exception:  # bookkeeping never hides the outcome
        logger.exception("could not store the dead letter of %s[%s]", task.name, task.request.id)


def _last_attempt(task: RunTask) -> bool:
    return task.max_retries is not None and (task.request.retries or 0) >= task.max_retries


def _spawn_batches(task: RunTask, task_id: str, run_id: int, groups: Sequence[tuple[int, list[Any]]]) -> None:
    """Spawns upsert batches at their positions among the sync's children (as JobTask.spawn, which
    numbers from 0 on every call): a rerun finds the ones an earlier attempt spawned."""
    specs = []
    for _, records in groups:
        arguments = {"run_id": run_id, "records": records}
        upsert_batch.validate_arguments((), arguments)
        specs.append(tree.ChildSpec(upsert_batch.name, arguments))
    setattr(task.request, "spawned_children", True)  # noqa: B010 (Context declares no such field)
    job_id = task.request_header(JOB_HEADER)
    tree.spawn(None if job_id is None else str(job_id), task_id, specs, first_index=groups[0][0])


def _ids_in_batches(task_id: str, count: int, id_field: str) -> set[str]:
    """The external ids taken by the first `count` batches of a sync (spawned by its earlier
    attempts): read back from the batches' arguments, so a resumed run keeps "first copy wins"."""
    ids: set[str] = set()
    if not count:
        return ids
    positions = [tree.child_id(task_id, index) for index in range(count)]
    for start in range(0, count, 1000):
        chunk = positions[start : start + 1000]
        payloads = Job.objects.filter(pk__in=chunk).values_list("payload", flat=True)
        for payload in payloads.iterator(chunk_size=20):
            records = payload.get("records", []) if isinstance(payload, dict) else []
            for record in records:
                external_id = service.external_id_of(record, id_field)
                if external_id is not None:
                    ids.add(external_id)
    return ids


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
