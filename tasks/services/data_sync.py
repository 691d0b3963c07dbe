"""Data sync: pull records from a `DataSource` into `SyncedRecord`, and export what changed.

The flow (tasks/data_sync.py runs it):

1. `iter_pages(source, ...)` fetches page after page (JSON with a `next` link,
   or one CSV) through the guarded fetcher, retrying a page's transient failure
   in place (`PageRetry`: DATA_SYNC_PAGE_ATTEMPTS, honouring Retry-After);
   a `Feed` takes each external id once per run (the first copy; later copies
   and records without a usable id count as failed) and cuts the records into
   batches as the pages come, so a sync holds one batch of records, not all;
   its `Checkpoint` (saved in the SyncRun) is where a retry resumes;
2. each batch is upserted by
   `upsert_records(...)`: one SELECT of the existing checksums, then for the
   new and changed records one INSERT ... ON CONFLICT DO UPDATE on PostgreSQL
   (elsewhere bulk_create for new ids and bulk_update for changed ones). A record whose
   checksum (sha256 of its canonical JSON) is unchanged is not written, so
   `changed_at` moves only when the data does;
3. `finish_run(...)` adds up the batch counts; `fail_run(...)` records why a
   run failed.

`export_changes(...)` writes the records changed since the previous export's
watermark to a JSON Lines file, atomically.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from tasks.models import DataSource, SyncedRecord, SyncExport, SyncRun
from tasks.services import boundedjson
from tasks.services.fetch import FetchedPage, Fetcher, PermanentFetchError, TransientFetchError, redact_url

MAX_ERROR_LENGTH = 10_000
EXTERNAL_ID_MAX_LENGTH = 255  # SyncedRecord.external_id
# Arrays and objects in a JSON page nest at most this deep (the page's envelope included): deeper
# text is refused before it is parsed (json.loads, and json.dumps of the records, are recursive).
MAX_PAGE_DEPTH = 64


class SourceDataError(PermanentFetchError):
    """A page is not what the source's settings say it is: bad JSON or CSV, a missing key."""


class ConcurrentUpsertError(TransientFetchError):
    """Another sync of the same source inserted one of these records first; trying again resolves it."""


# --- records --------------------------------------------------------------------


def canonical_json(record: Any) -> str:
    """One text per value: sorted keys, no spaces, no NaN. Raises ValueError or TypeError."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def checksum_of(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def dig(value: Any, path: str) -> Any:
    """`dig({"a": {"b": 1}}, "a.b") == 1`; an empty path is the value itself. Raises KeyError."""
    for key in path.split(".") if path else ():
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(key)
        value = value[key]
    return value


def external_id_of(record: Any, id_field: str) -> str | None:
    """The record's id as text, or None when it has no usable one (counted as failed)."""
    if not isinstance(record, Mapping):
        return None
    if id_field in record:
        value = record[id_field]
    else:
        try:
            value = dig(record, id_field)
        except KeyError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = str(value).strip()
    if not text or len(text) > EXTERNAL_ID_MAX_LENGTH:
        return None
    return text


def _contains_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_contains_nul(key) or _contains_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_contains_nul(item) for item in value)
    return False


def prepare(record: Any, id_field: str) -> tuple[str, str] | None:
    """(external id, checksum) of a record that can be stored, else None.

    Not storable: no usable id, NaN/Infinity (not JSON), a lone surrogate (not
    UTF-8) or a NUL character (PostgreSQL's jsonb refuses it): any of them would
    fail the whole batch.
    """
    prepared = _prepare(record, id_field)
    return None if prepared is None else prepared[:2]


def _prepare(record: Any, id_field: str) -> tuple[str, str, str] | None:
    """(external id, checksum, canonical JSON) of a storable record, else None (see `prepare`)."""
    external_id = external_id_of(record, id_field)
    if external_id is None:
        return None
    try:
        canonical = canonical_json(record)
        checksum = checksum_of(canonical)  # UnicodeEncodeError (a ValueError) on a lone surrogate
    except (TypeError, ValueError):
        return None
    if "\\u0000" in canonical and _contains_nul(record):
        return None
    return external_id, checksum, canonical


# --- fetching pages -------------------------------------------------------------


def parse_json_page(page: FetchedPage, source: DataSource) -> tuple[list[Any], str | None]:
    """The records of one JSON page and the absolute URL of the next page (None on the last)."""
    where = redact_url(page.url)
    try:
        # NaN and Infinity are taken here and refused record by record (prepare).
        payload = boundedjson.loads(page.body, max_depth=MAX_PAGE_DEPTH, allow_nan=True)
    except boundedjson.TooDeep as exc:
        raise SourceDataError(f"{where} is refused: {exc}") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise SourceDataError(f"{where} is not valid JSON: {exc}") from None
    try:
        records = dig(payload, source.records_path)
    except KeyError:
        raise SourceDataError(
            f"{where}: no '{source.records_path}' in the page (records_path of source '{source.name}')"
        ) from None
    if not isinstance(records, list):
        raise SourceDataError(
            f"{where}: '{source.records_path or '(the page)'}' is a {type(records).__name__}, not a list "
            f"(records_path of source '{source.name}')"
        )
    try:
        next_url = dig(payload, source.next_path) if source.next_path else None
    except KeyError:
        next_url = None
    if next_url in (None, ""):
        return records, None
    if not isinstance(next_url, str):
        raise SourceDataError(
            f"{where}: '{source.next_path}' is a {type(next_url).__name__}, not a URL "
            f"(next_path of source '{source.name}')"
        )
    return records, urljoin(page.url, next_url)


def parse_csv_page(page: FetchedPage, source: DataSource) -> list[Any]:
    """Rows as dicts keyed by the header; a row with the wrong number of cells becomes None (failed)."""
    where = redact_url(page.url)
    try:
        text = page.body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceDataError(f"{where} is not UTF-8 text: {exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return []
        if len(set(header)) != len(header):
            raise SourceDataError(f"{where}: the CSV header repeats a column name: {header}")
        rows: list[Any] = []
        for row in reader:
            if not row:
                continue
            rows.append(dict(zip(header, row, strict=True)) if len(row) == len(header) else None)
    except csv.Error as exc:
        raise SourceDataError(f"{where}: bad CSV at line {reader.line_num}: {exc}") from None
    return rows


@dataclass(frozen=True)
class PageRetry:
    """A page's own retry budget: a transient failure retries that page in place, up to `attempts`
    tries in all, waiting `base * 2**n` seconds (with jitter), or what the server's Retry-After
    asks, never more than `maximum`. A Retry-After over `maximum` is not waited out in the worker:
    the page gives up at once and the task's retry waits instead."""

    attempts: int = 3
    base: float = 1.0
    maximum: float = 30.0

    @classmethod
    def from_settings(cls) -> PageRetry:
        return cls(
            attempts=settings.DATA_SYNC_PAGE_ATTEMPTS,
            base=settings.DATA_SYNC_PAGE_RETRY_SECONDS,
            maximum=settings.DATA_SYNC_PAGE_RETRY_MAX_SECONDS,
        )

    def delay(self, attempt: int, error: TransientFetchError) -> float | None:
        """Seconds to wait before try `attempt + 1` of a page that failed with `error`; None: give up."""
        if attempt >= self.attempts:
            return None
        if error.retry_after is not None:
            return None if error.retry_after > self.maximum else error.retry_after
        backoff = min(self.maximum, self.base * 2 ** (attempt - 1))
        return random.uniform(backoff / 2, backoff)  # noqa: S311 (jitter, not a secret)


@dataclass(frozen=True)
class Page:
    number: int  # 1 for the source's first page, counted across the run's attempts
    url: str
    records: list[Any]
    next_url: str | None  # None on the last page


def fetch_page(
    fetcher: Fetcher,
    url: str,
    retry: PageRetry,
    *,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[TransientFetchError, float], None] | None = None,
) -> FetchedPage:
    """GET one page, retrying a transient failure in place within `retry`'s budget; the last
    failure is raised (its `retry_after` is what the server asked for, if it did)."""
    attempt = 1
    while True:
        try:
            return fetcher.get(url)
        except TransientFetchError as exc:
            wait = retry.delay(attempt, exc)
            if wait is None:
                raise
            if on_retry is not None:
                on_retry(exc, wait)
            sleep(wait)
            attempt += 1


def iter_pages(
    source: DataSource,
    fetcher: Fetcher,
    *,
    start_url: str | None = None,
    pages_before: int = 0,
    max_pages: int | None = None,
    retry: PageRetry | None = None,
    on_retry: Callable[[TransientFetchError, float], None] | None = None,
) -> Iterator[Page]:
    """Yields each page, following `next` links (JSON) or one page (CSV), from `start_url` (a
    checkpoint's) or the source's first page. `pages_before`: pages fetched by earlier attempts,
    counted against DATA_SYNC_MAX_PAGES."""
    retry = retry or PageRetry(attempts=1)
    if source.kind == DataSource.Kind.CSV:
        page = fetch_page(fetcher, source.url, retry, on_retry=on_retry)
        yield Page(1, source.url, parse_csv_page(page, source), None)
        return
    limit = max_pages or settings.DATA_SYNC_MAX_PAGES
    url: str | None = start_url or source.url
    number = pages_before
    seen: set[str] = set()  # this attempt's pages: a loop is found within one attempt
    while url is not None:
        if number >= limit:
            raise SourceDataError(
                f"source '{source.name}' has more than {limit} pages (DATA_SYNC_MAX_PAGES); "
                "raise the setting or check its next links"
            )
        seen.add(url)
        number += 1
        fetched = fetch_page(fetcher, url, retry, on_retry=on_retry)
        records, next_url = parse_json_page(fetched, source)
        if next_url is not None and next_url in seen:
            raise SourceDataError(f"{redact_url(fetched.url)}: the next link points back to an earlier page")
        yield Page(number, url, records, next_url)
        url = next_url


@dataclass
class Checkpoint:
    """How far a run's fetching got. Every record of the pages before `next_url` is in one of
    the run's first `batches` batches (spawned), or counted in `failed`: a retry resumes at
    `next_url` with these counts and loses or counts twice nothing."""

    next_url: str = ""  # "" before the first page
    pages: int = 0
    fetched: int = 0
    failed: int = 0  # no usable id, or a repeat of an id an earlier record of the run took
    records: int = 0  # records in the spawned batches
    batches: int = 0
    complete: bool = False  # the last page is in

    @classmethod
    def of(cls, run: SyncRun) -> Checkpoint:
        return cls(
            next_url=run.next_url,
            pages=run.pages,
            fetched=run.fetched,
            failed=run.failed_before,
            records=run.records,
            batches=run.batches,
            complete=run.fetch_complete,
        )


class Feed:
    """Turns a run's pages into upsert batches of `size` records, for one attempt of the sync.

    Each external id is taken once per run: the first record carrying it is stored, later ones
    (on the same page or any later one, in this attempt or an earlier one) count as failed, as
    records without a usable id do. `seen` holds the ids the run's earlier batches took (empty on
    a first attempt). Records wait in a buffer until a batch is full; `flush()` empties it."""

    def __init__(self, source: DataSource, start: Checkpoint, seen: set[str], size: int) -> None:
        self.source = source
        self.saved = replace(start)
        self.now = replace(start)
        self.seen = seen
        self.size = max(1, size)
        self._buffer: list[Any] = []
        if not self.now.next_url:
            self.now.next_url = source.url

    def add(self, page: Page) -> list[tuple[int, list[Any]]]:
        """Takes a page; returns the batches it filled as (position, records)."""
        now = self.now
        now.pages += 1
        for record in page.records:
            now.fetched += 1
            external_id = external_id_of(record, self.source.id_field)
            if external_id is None or external_id in self.seen:
                now.failed += 1
                continue
            self.seen.add(external_id)
            self._buffer.append(record)
        now.next_url = page.next_url or ""
        now.complete = page.next_url is None
        full: list[tuple[int, list[Any]]] = []
        while len(self._buffer) >= self.size:
            full.append(self._take(self.size))
        return full

    def flush(self) -> tuple[int, list[Any]] | None:
        """The buffered records as a last (smaller) batch, or None when there are none."""
        return self._take(len(self._buffer)) if self._buffer else None

    def _take(self, count: int) -> tuple[int, list[Any]]:
        group, self._buffer = self._buffer[:count], self._buffer[count:]
        position = self.now.batches
        self.now.batches += 1
        self.now.records += len(group)
        return position, group

    def checkpoint(self) -> Checkpoint | None:
        """Where a retry may resume, once every record taken so far is in a batch; else None."""
        if self._buffer:
            return None
        self.saved = replace(self.now)
        return self.saved


@dataclass
class Collected:
    records: list[Any] = field(default_factory=list)  # one per external id (the first), upstream order
    pages: int = 0
    fetched: int = 0
    failed: int = 0  # no usable id, or a later copy of a repeated id


def collect(
    source: DataSource,
    fetcher: Fetcher | None = None,
    on_page: Callable[[int, int], None] | None = None,
) -> Collected:
    """Fetches every page of `source` into memory (the sync streams them instead: `Feed`);
    `on_page(pages, records)` is called after each one."""
    result = Collected()
    feed = Feed(source, Checkpoint(), set(), size=1)
    own_fetcher = fetcher is None
    fetcher = fetcher or Fetcher()
    try:
        for page in iter_pages(source, fetcher):
            for _, group in feed.add(page):
                result.records.extend(group)
            if on_page is not None:
                on_page(feed.now.pages, feed.now.fetched)
    finally:
        if own_fetcher:
            fetcher.close()
    result.pages, result.fetched, result.failed = feed.now.pages, feed.now.fetched, feed.now.failed
    return result


def batches(records: Sequence[Any], size: int) -> list[list[Any]]:
    size = max(1, size)
    return [list(records[start : start + size]) for start in range(0, len(records), size)]


# --- storing --------------------------------------------------------------------


@dataclass
class BatchCounts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def upsert_records(source: DataSource, records: Sequence[Any], *, now: datetime | None = None) -> BatchCounts:
    """Creates new records, updates changed ones, leaves unchanged ones alone; returns the counts.

    One SELECT of the existing (id, checksum) pairs for the whole batch; then, for the new and
    changed records only, on PostgreSQL one INSERT ... ON CONFLICT DO UPDATE (exact counts from
    its RETURNING, and another sync storing the same ids meanwhile is taken in), elsewhere
    (SQLite in development) one bulk INSERT and one bulk UPDATE, which raise
    ConcurrentUpsertError in that case. An unchanged batch writes nothing (and locks nothing:
    ON CONFLICT would lock every row it finds, which made a no-op re-sync twice as slow).
    """
    counts = BatchCounts()
    prepared: dict[str, tuple[Any, str, str]] = {}
    for record in records:
        key = _prepare(record, source.id_field)
        if key is None:
            counts.failed += 1
            continue
        if key[0] in prepared:  # the earlier copy is dropped
            counts.failed += 1
        prepared[key[0]] = (record, key[1], key[2])
    if not prepared:
        return counts
    now = now or timezone.now()
    try:
        with transaction.atomic():
            existing = _existing_checksums(source, list(prepared))
            to_write = {
                external_id: values
                for external_id, values in prepared.items()
                if existing.get(external_id, (None, None))[1] != values[1]
            }
            if connection.vendor == "postgresql":
                counts.created, counts.updated = _upsert_on_conflict(source, to_write, now)
            else:
                counts.created, counts.updated = _insert_and_update(source, to_write, existing, now)
    except IntegrityError as exc:
        raise ConcurrentUpsertError(
            f"source '{source.name}': another sync stored some of these records at the same time ({exc})"
        ) from exc
    counts.unchanged = len(prepared) - counts.created - counts.updated
    return counts


def _existing_checksums(source: DataSource, external_ids: list[str]) -> dict[str, tuple[int, str]]:
    """{external id: (pk, checksum)} of the ids already stored for the source.

    On PostgreSQL `external_id = ANY(array)`: one parameter instead of an IN list of one per id
    (quoting 500 parameters cost the client more than the database took to answer).
    """
    if connection.vendor != "postgresql":
        rows = SyncedRecord.objects.filter(source=source, external_id__in=external_ids).values_list(
            "external_id", "pk", "checksum"
        )
        return {external_id: (pk, checksum) for external_id, pk, checksum in rows}
    quote = connection.ops.quote_name
    meta = SyncedRecord._meta
    column = {field.name: quote(str(field.column)) for field in meta.concrete_fields}
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {column['external_id']}, {column['id']}, {column['checksum']} "  # noqa: S608
            f"FROM {quote(meta.db_table)} WHERE {column['external_id']} = ANY(%s::varchar[]) "
            f"AND {column['source']} = %s",
            [external_ids, source.pk],
        )
        return {external_id: (pk, checksum) for external_id, pk, checksum in cursor.fetchall()}


def _insert_and_update(
    source: DataSource,
    rows: Mapping[str, tuple[Any, str, str]],
    existing: Mapping[str, tuple[int, str]],
    now: datetime,
) -> tuple[int, int]:
    """(created, updated) by one bulk INSERT of the new rows and one bulk UPDATE of the changed."""
    new_rows: list[SyncedRecord] = []
    changed_rows: list[SyncedRecord] = []
    for external_id, (record, checksum, _) in rows.items():
        found = existing.get(external_id)
        if found is None:
            new_rows.append(
                SyncedRecord(
                    source=source, external_id=external_id, data=record, checksum=checksum, changed_at=now
                )
            )
        else:
            changed_rows.append(SyncedRecord(pk=found[0], data=record, checksum=checksum, changed_at=now))
    SyncedRecord.objects.bulk_create(new_rows, batch_size=1000)
    if changed_rows:
        SyncedRecord.objects.bulk_update(changed_rows, ["data", "checksum", "changed_at"], batch_size=500)
    return len(new_rows), len(changed_rows)


def _upsert_on_conflict(
    source: DataSource, prepared: Mapping[str, tuple[Any, str, str]], now: datetime
) -> tuple[int, int]:
    """(created, updated) by one INSERT ... ON CONFLICT DO UPDATE ... WHERE the checksum differs.

    Not bulk_create(update_conflicts=True): it cannot leave unchanged rows alone (their
    `changed_at` must not move) nor say which rows it inserted. The rows come in as one JSON
    array (`jsonb_array_elements`): the statement is the same text for every batch size, and
    the client sends one string (arrays of JSON texts cost more to quote than the database took
    to store them); `xmax = 0` in RETURNING marks a row this statement inserted (an updated row
    carries the updating transaction's id).
    """
    if not prepared:
        return 0, 0
    quote = connection.ops.quote_name
    meta = SyncedRecord._meta
    column = {field.name: quote(str(field.column)) for field in meta.concrete_fields}
    statement = (  # names come from the model, values are parameters
        f"INSERT INTO {quote(meta.db_table)} AS r ({column['source']}, {column['external_id']}, "  # noqa: S608
        f"{column['data']}, {column['checksum']}, {column['created_at']}, {column['changed_at']}) "
        "SELECT %s, v.value ->> 0, v.value -> 2, v.value ->> 1, %s, %s "
        "FROM jsonb_array_elements(%s::jsonb) AS v "
        f"ON CONFLICT ({column['external_id']}, {column['source']}) DO UPDATE SET "
        f"{column['data']} = EXCLUDED.{column['data']}, "
        f"{column['checksum']} = EXCLUDED.{column['checksum']}, "
        f"{column['changed_at']} = EXCLUDED.{column['changed_at']} "
        f"WHERE r.{column['checksum']} IS DISTINCT FROM EXCLUDED.{column['checksum']} "
        "RETURNING (xmax = 0)"
    )
    with connection.cursor() as cursor:
        cursor.execute(
            statement,
            [
                source.pk,
                now,
                now,
                # [[external id, checksum, record], ...] built from the canonical texts at hand
                "["
                + ",".join(
                    f"[{json.dumps(external_id)},{json.dumps(checksum)},{canonical}]"
                    for external_id, (_, checksum, canonical) in prepared.items()
                )
                + "]",
            ],
        )
        inserted = [row[0] for row in cursor.fetchall()]
    created = sum(inserted)
    return created, len(inserted) - created


# --- runs -----------------------------------------------------------------------


def start_run(source: DataSource, task_id: str) -> SyncRun:
    """The run of sync task `task_id`: created on its first attempt, found again on a retry."""
    run, _ = SyncRun.objects.get_or_create(task_id=task_id, defaults={"source": source})
    return run


def save_checkpoint(run_id: int, checkpoint: Checkpoint) -> None:
    """Records how far the run's fetching got (one UPDATE, after the batches it names are spawned)."""
    SyncRun.objects.filter(pk=run_id, status=SyncRun.Status.RUNNING).update(
        next_url=checkpoint.next_url,
        pages=checkpoint.pages,
        fetched=checkpoint.fetched,
        failed_before=checkpoint.failed,
        failed=checkpoint.failed,
        records=checkpoint.records,
        batches=checkpoint.batches,
        fetch_complete=checkpoint.complete,
    )


def note_page_retry(run_id: int, message: str) -> None:
    """A page failed for now and is tried again in place: counted and shown on the run."""
    SyncRun.objects.filter(pk=run_id, status=SyncRun.Status.RUNNING).update(
        page_retries=F("page_retries") + 1, error=message[:MAX_ERROR_LENGTH]
    )


def finish_run(run_id: int, results: Sequence[Mapping[str, int]], failed_before: int = 0) -> bool:
    """Marks a running run succeeded with the summed batch counts; False if it was not running.

    `failed_before` counts the records dropped while collecting (no id, repeats).
    """
    totals = _summed(results, failed_before)
    updated = SyncRun.objects.filter(pk=run_id, status=SyncRun.Status.RUNNING).update(
        status=SyncRun.Status.SUCCEEDED, finished_at=timezone.now(), error="", **totals.as_dict()
    )
    return bool(updated)


def settle_run(
    run_id: int, results: Sequence[Mapping[str, int]], failed_before: int = 0, error: str = ""
) -> None:
    """Sets a run's counts from its stored batches once every batch is final: succeeded, or failed
    with `error` when batches failed for good. Whatever the run said before (its batches may have
    been retried since)."""
    totals = _summed(results, failed_before)
    SyncRun.objects.filter(pk=run_id).update(
        status=SyncRun.Status.FAILED if error else SyncRun.Status.SUCCEEDED,
        finished_at=timezone.now(),
        error=error[:MAX_ERROR_LENGTH],
        **totals.as_dict(),
    )


def _summed(results: Sequence[Mapping[str, int]], failed_before: int) -> BatchCounts:
    totals = BatchCounts(failed=failed_before)
    for result in results:
        totals.created += int(result.get("created", 0))
        totals.updated += int(result.get("updated", 0))
        totals.unchanged += int(result.get("unchanged", 0))
        totals.failed += int(result.get("failed", 0))
    return totals


def fail_run(run_id: int, error: str) -> bool:
    """Marks a running run failed with `error`; the first error wins. False if it was not running."""
    updated = SyncRun.objects.filter(pk=run_id, status=SyncRun.Status.RUNNING).update(
        status=SyncRun.Status.FAILED, finished_at=timezone.now(), error=error[:MAX_ERROR_LENGTH]
    )
    return bool(updated)


def note_retry(run_id: int, message: str) -> None:
    """Shows on a running run why an attempt failed and is being retried."""
    SyncRun.objects.filter(pk=run_id, status=SyncRun.Status.RUNNING).update(error=message[:MAX_ERROR_LENGTH])


def run_id_for_task(task_id: str) -> int | None:
    return SyncRun.objects.filter(task_id=task_id).values_list("pk", flat=True).first()


# --- export ---------------------------------------------------------------------


def export_changes(
    source: DataSource | None,
    *,
    export_dir: Path | None = None,
    lag: timedelta | None = None,
    now: datetime | None = None,
) -> SyncExport:
    """Writes the records changed since the last export (of the same source, or of all) to JSON Lines.

    The window is (previous until, now - lag]. The file is written to a
    temporary name in the same directory, synced, then renamed, so a reader
    never sees half a file. When nothing changed no file is written; the
    SyncExport row (records=0, path "") still moves the watermark.
    """
    export_dir = Path(export_dir or settings.DATA_SYNC_EXPORT_DIR)
    lag = timedelta(seconds=settings.DATA_SYNC_EXPORT_LAG_SECONDS) if lag is None else lag
    until = (now or timezone.now()) - lag
    previous = SyncExport.objects.filter(source=source).order_by("-until").first()
    since = previous.until if previous else None
    if since is not None and until < since:
        until = since
    changed = SyncedRecord.objects.filter(changed_at__lte=until)
    if source is not None:
        changed = changed.filter(source=source)
    if since is not None:
        changed = changed.filter(changed_at__gt=since)
    rows = changed.order_by("changed_at", "pk").values_list(
        "source__name", "external_id", "checksum", "changed_at", "data"
    )

    export_dir.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=export_dir, prefix=".export-", suffix=".jsonl.tmp")
    count = 0
    path = ""
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as output:
            for source_name, external_id, checksum, changed_at, data in rows.iterator(chunk_size=2000):
                line = {
                    "source": source_name,
                    "external_id": external_id,
                    "checksum": checksum,
                    "changed_at": changed_at.isoformat(),
                    "data": data,
                }
                output.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
                count += 1
            output.flush()
            os.fsync(output.fileno())
        if count:
            scope = source.name if source is not None else "all"
            final = export_dir / f"{scope}-{until.astimezone(UTC):%Y%m%dT%H%M%S%fZ}.jsonl"
            os.replace(temporary, final)
            _fsync_directory(export_dir)
            path = str(final)
        else:
            os.unlink(temporary)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return SyncExport.objects.create(source=source, since=since, until=until, path=path, records=count)


def _fsync_directory(directory: Path) -> None:
    """Makes the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
