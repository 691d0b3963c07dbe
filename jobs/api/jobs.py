"""/api/jobs: enqueue (one or a batch), follow, list, retry, cancel."""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest
from django_celery_results.models import TaskResult
from ninja import Header, Query, Router, Schema, Status
from pydantic import BeforeValidator, Field, field_validator
from pydantic_core import PydanticCustomError

from jobs import ratelimit, services, tree
from jobs.api import access
from jobs.api.auth import StaffTokenAuth, token_of
from jobs.api.body import MAX_DEPTH, read_json, too_large
from jobs.api.common import (
    AUTH_ERRORS,
    JOB_CURSOR,
    NO_NUL,
    STAFF_ERRORS,
    STAFF_ONLY,
    ApiError,
    cursor_pattern,
    keyset_page,
)
from jobs.api.schemas import BatchOut, Error, JobOut
from jobs.api.schemas import JobPage as JobPageOut
from jobs.models import ApiToken, Job, JobDependency
from jobs.publish import BrokerUnavailable
from jobs.registry import (
    IDEMPOTENCY_KEY_PATTERN,
    MAX_BATCH,
    FieldError,
    InvalidJob,
    JobRequest,
    body_limit,
    largest_body_limit,
    parse_job,
)

router = Router(tags=["jobs"])

JOB_BODY = {"$ref": "#/components/schemas/JobRequest"}
DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


# --- helpers -------------------------------------------------------------------------


def _progress(job: Job, children: tree.Summary | None = None) -> dict[str, Any]:
    if job.status == Job.Status.SUCCEEDED:
        return {"percent": 100.0, "message": ""}
    if children is not None and children.total and (job.own_finished_at or job.status in Job.FINAL):
        waiting = children.total - children.final
        message = f"waiting for {waiting} of {children.total} children" if waiting else ""
        return {"percent": round(100.0 * children.final / children.total, 1), "message": message}
    if job.status not in (Job.Status.RUNNING, Job.Status.RETRYING):
        return {"percent": 0.0, "message": ""}
    row = (
        TaskResult.objects.filter(task_id=job.task_id, status="PROGRESS")
        .values_list("result", flat=True)
        .first()
    )
    try:
        meta = json.loads(row) if row else {}
        return {"percent": float(meta.get("percent", 0)), "message": str(meta.get("message", ""))}
    except (TypeError, ValueError, AttributeError):
        return {"percent": 0.0, "message": ""}


class TreeInfo:
    """Children per status and dependencies per status of a page of jobs: two queries for the page."""

    def __init__(self, jobs: list[Job], *, fresh: frozenset[Any] = frozenset()) -> None:
        # Jobs just created (`fresh`) have no children yet: not looked for.
        ids = [job.pk for job in jobs if job.pk not in fresh]
        self.children = tree.summaries(ids) if ids else {}
        self.dependencies: dict[Any, dict[str, int]] = {}
        waiting = [job.pk for job in jobs if job.run_after]
        if waiting:
            rows = (
                JobDependency.objects.filter(job_id__in=waiting)
                .values_list("job_id", "prerequisite__status")
                .annotate(n=Count("id"))
                .order_by()
            )
            for job_id, status, n in rows:
                self.dependencies.setdefault(job_id, {})[status] = n

    def of(self, job: Job) -> dict[str, Any]:
        summary = self.children.get(job.pk)
        counts = self.dependencies.get(job.pk)
        return {
            "children": summary.as_dict() if summary else None,
            "depends_on": None
            if counts is None
            else {
                "total": sum(counts.values()),
                "counts": dict(sorted(counts.items())),
                "run_after": job.run_after,
            },
        }


def job_out(
    job: Job, viewer: ApiToken, *, with_progress: bool = True, info: TreeInfo | None = None
) -> dict[str, Any]:
    """The job as `viewer` may see it: to non-staff tokens, file paths in its error and result are
    cut to their file name (jobs.api.access)."""
    staff = access.is_staff(viewer)
    error_message = job.error_message if staff else access.redact_paths(job.error_message)
    info = info or TreeInfo([job])
    relatives = info.of(job)
    summary = info.children.get(job.pk)
    return {
        "id": job.id,
        "type": job.type,
        "queue": job.queue,
        "status": job.status,
        "priority": job.priority,
        "progress": _progress(job, summary) if with_progress else {"percent": 0.0, "message": ""},
        "attempts": job.attempts,
        "result": job.result if staff else access.redact_in(job.result),
        "error": {"type": job.error_type, "message": error_message} if job.error_type else None,
        "created_at": job.created_at,
        "run_at": job.run_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "cancel_requested_at": job.cancel_requested_at,
        "parent": job.parent_id,
        **relatives,
    }


def _job_or_404(request: HttpRequest, job_id: UUID) -> Job:
    job = access.visible_jobs(token_of(request)).filter(pk=job_id).first()
    if job is None:
        raise ApiError(404, f"job {job_id} not found")
    return job


def _invalid(error: InvalidJob) -> ApiError:
    return ApiError(400, str(error), [item.as_dict() for item in error.errors])


def _rate_limit(token: ApiToken, cost: int) -> None:
    try:
        wait = ratelimit.take(token.pk, cost)
    except ratelimit.LimiterUnavailable as exc:
        raise ApiError(503, f"{exc}; nothing was queued, try again", Retry_After="5") from None
    if wait is not None:
        raise ApiError(
            429,
            f"too many jobs for this token (limit {settings.JOBS_API_ENQUEUE_RATE}); "
            f"try again in {wait:.0f} s",
            Retry_After=str(int(wait)),
        )


def _enqueue(requests: list[JobRequest], token: ApiToken) -> list[services.Accepted | services.Conflict]:
    try:
        return services.enqueue_with_key_retry(requests, token)
    except BrokerUnavailable as exc:
        raise ApiError(503, f"{exc}; nothing was queued, try again", Retry_After="5") from None


def _dependency_errors(
    entries: dict[int, JobRequest], token: ApiToken, *, in_batch: bool, count: int
) -> dict[int, list[FieldError]]:
    """Per entry, what is wrong with its `depends_on`: an id the token cannot see (or that does not
    exist), an index outside the batch or of itself, a cycle."""
    ids = {item for request in entries.values() for item in request.depends_on if isinstance(item, UUID)}
    known = set(access.visible_jobs(token).filter(pk__in=ids).values_list("pk", flat=True)) if ids else set()
    errors: dict[int, list[FieldError]] = {}
    for index, request in entries.items():
        for item in request.depends_on:
            problem = None
            if isinstance(item, UUID):
                problem = None if item in known else f"there is no job {item}"
            elif not in_batch:
                problem = (
                    f"{item} is an index: only an entry of a batch can name another entry; give a job id"
                )
            elif item == index:
                problem = "a job cannot depend on itself"
            elif item >= count:
                problem = f"there is no entry {item} in this batch (it has {count})"
            if problem:
                errors.setdefault(index, []).append(FieldError("depends_on", problem))
    graph = {i: [d for d in r.depends_on if isinstance(d, int) and d != i] for i, r in entries.items()}
    for cycle in _cycles(graph):
        path = " -> ".join(map(str, [*cycle, cycle[0]]))
        for index in cycle:
            errors.setdefault(index, []).append(FieldError("depends_on", f"forms a cycle: entries {path}"))
    return errors


def _cycles(graph: dict[int, list[int]]) -> list[list[int]]:
    """The cycles of a dependency graph between batch entries (iterative depth-first search)."""
    state: dict[int, int] = {}  # 1: on the current path, 2: done
    found: list[list[int]] = []
    for start in graph:
        if state.get(start):
            continue
        path: list[int] = []
        stack: list[tuple[int, int]] = [(start, 0)]
        while stack:
            node, position = stack.pop()
            if position == 0:
                state[node] = 1
                path.append(node)
            targets = graph.get(node, [])
            if position < len(targets):
                stack.append((node, position + 1))
                target = targets[position]
                if state.get(target) == 1:
                    found.append(path[path.index(target) :])
                elif not state.get(target) and target in graph:
                    stack.append((target, 0))
            else:
                state[node] = 2
                path.pop()
    return found


# --- enqueue --------------------------------------------------------------------------


@router.post(
    "",
    response={
        202: JobOut,
        200: JobOut,
        400: Error,
        409: Error,
        411: Error,
        413: Error,
        429: Error,
        503: Error,
        **AUTH_ERRORS,
    },
    summary="Enqueue a job",
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": JOB_BODY}}}},
)
def create_job(
    request: HttpRequest,
    idempotency_key: str | None = Header(
        default=None,
        alias="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,  # as parse_job checks it; declared so the document says so
    ),
) -> Status:
    """Validates the job against its type's schema, stores it, then queues it.

    202: queued (or scheduled, with `delay_seconds`). 200: an earlier request with the same
    idempotency key and the same body made this job. 409: the key was used for another body.
    503: the broker did not take it; nothing was kept.
    """
    token = token_of(request)
    # The type is in the body: read up to the largest type's limit, then hold it to its own.
    largest = largest_body_limit()
    body = read_json(request, limit=largest.bytes, setting=largest.setting)
    data = body.data
    limit = body_limit(data.get("type")) if isinstance(data, dict) else None
    if limit is not None and body.size > limit.bytes:
        raise too_large(body.size, limit.bytes, limit.setting, job_type=data["type"])
    try:
        job_request = parse_job(data, header_key=idempotency_key)
        problems = _dependency_errors({0: job_request}, token, in_batch=False, count=1).get(0)
        if problems:
            raise InvalidJob(problems)
    except InvalidJob as exc:
        raise _invalid(exc) from None
    _rate_limit(token, 1)
    [outcome] = _enqueue([job_request], token)
    if isinstance(outcome, services.Conflict):
        raise ApiError(409, str(outcome))
    info = TreeInfo([outcome.job], fresh=frozenset([outcome.job.pk] if outcome.created else []))
    return Status(
        202 if outcome.created else 200, job_out(outcome.job, token, with_progress=False, info=info)
    )


@router.post(
    "/batch",
    response={200: BatchOut, 400: Error, 411: Error, 413: Error, 429: Error, 503: Error, **AUTH_ERRORS},
    summary="Enqueue up to 1,000 jobs",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["jobs"],
                        "properties": {
                            "jobs": {
                                "type": "array",
                                "items": JOB_BODY,
                                "minItems": 1,
                                "maxItems": MAX_BATCH,
                            },
                            "callback": {
                                **JOB_BODY,
                                "description": "A job to run once, when every accepted job of the batch "
                                "is final, whatever their outcome (its `depends_on` shows the counts). "
                                "It may not have a `depends_on` of its own.",
                            },
                        },
                    }
                }
            },
        }
    },
)
def create_batch(request: HttpRequest) -> dict[str, Any]:
    """Checks every job; the valid ones are stored and queued in one round trip to the broker.

    The answer has one entry per job, in order: accepted (202, or 200 for a known idempotency
    key) or refused with its reason (400, 409, 413 over its type's limit). One bad job does not
    sink the others (but a job that depends on a refused entry is refused too). A `callback` job
    waits for every accepted job of the batch and runs once when they are all final.
    """
    token = token_of(request)
    # Each entry may nest as deep as a job's body does on its own.
    batch_limit = settings.JOBS_API_MAX_BATCH_BYTES
    data = read_json(
        request, limit=batch_limit, setting="JOBS_API_MAX_BATCH_BYTES", max_depth=MAX_DEPTH + 2
    ).data
    entries = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ApiError(
            400,
            "field 'jobs': must be a non-empty list of jobs",
            [{"field": "jobs", "message": "must be a non-empty list"}],
        )
    if len(entries) > MAX_BATCH:
        raise ApiError(
            400,
            f"field 'jobs': at most {MAX_BATCH} jobs per batch, got {len(entries)}",
            [{"field": "jobs", "message": f"at most {MAX_BATCH} items"}],
        )
    callback_entry = data.get("callback")
    callback: JobRequest | None = None
    callback_result: dict[str, Any] | None = None
    if callback_entry is not None:
        try:
            callback = parse_job(callback_entry)
        except InvalidJob as exc:
            raise ApiError(
                400, f"callback: {exc}", [_prefixed(item, "callback") for item in exc.errors]
            ) from None
        if callback.depends_on:
            message = "a batch's callback waits for the batch; it has no depends_on of its own"
            raise ApiError(
                400,
                f"field 'callback.depends_on': {message}",
                [{"field": "callback.depends_on", "message": message}],
            )
    results: list[dict[str, Any] | None] = [None] * len(entries)
    valid: list[tuple[int, JobRequest]] = []
    for index, entry in enumerate(entries):
        limit = body_limit(entry.get("type")) if isinstance(entry, dict) else None
        if limit is not None and (size := _compact_size(entry)) > limit.bytes:
            error = too_large(
                size, limit.bytes, limit.setting, what="the job (as compact JSON)", job_type=entry["type"]
            )
            results[index] = _refused(index, 413, error.detail, error.errors)
            continue
        try:
            valid.append((index, parse_job(entry)))
        except InvalidJob as exc:
            results[index] = _refused(index, 400, str(exc), [item.as_dict() for item in exc.errors])
    valid = _with_dependencies(valid, results, token, len(entries))
    _rate_limit(token, len(valid) + (callback is not None))
    requests = [job_request for _, job_request in valid]
    if callback is not None and requests:
        requests.append(
            dataclasses.replace(
                callback, depends_on=tuple(range(len(valid))), run_after=Job.RunAfter.COMPLETION
            )
        )
    elif callback is not None:
        callback_result = _refused(-1, 400, "callback: no job of the batch was accepted")
    outcomes = _enqueue(requests, token) if requests else []
    # Children and dependencies of every accepted job in two queries, not two per job.
    taken = [outcome for outcome in outcomes if isinstance(outcome, services.Accepted)]
    info = TreeInfo(
        [outcome.job for outcome in taken],
        fresh=frozenset(outcome.job.pk for outcome in taken if outcome.created),
    )
    if callback is not None and valid:
        last = outcomes.pop()
        callback_result = (
            _refused(-1, 409, str(last))
            if isinstance(last, services.Conflict)
            else _accepted(-1, last, token, info)
        )
    for (index, _), outcome in zip(valid, outcomes, strict=True):
        if isinstance(outcome, services.Conflict):
            results[index] = _refused(index, 409, str(outcome))
        else:
            results[index] = _accepted(index, outcome, token, info)
    accepted = sum(1 for item in results if item and item["accepted"])
    return {
        "accepted": accepted,
        "refused": len(entries) - accepted,
        "results": results,
        "callback": callback_result,
    }


def _accepted(index: int, outcome: services.Accepted, token: ApiToken, info: TreeInfo) -> dict[str, Any]:
    return {
        "index": index,
        "accepted": True,
        "status_code": 202 if outcome.created else 200,
        "job": job_out(outcome.job, token, with_progress=False, info=info),
        "error": None,
    }


def _prefixed(error: FieldError, prefix: str) -> dict[str, str]:
    return {"field": f"{prefix}.{error.field}", "message": error.message}


def _with_dependencies(
    valid: list[tuple[int, JobRequest]], results: list[dict[str, Any] | None], token: ApiToken, count: int
) -> list[tuple[int, JobRequest]]:
    """The valid entries whose `depends_on` holds too (others get their 400 in `results`), with
    indexes of entries turned into positions among them (what jobs.services.enqueue reads)."""
    errors = _dependency_errors(dict(valid), token, in_batch=True, count=count)
    refused = {index for index, result in enumerate(results) if result is not None} | set(errors)
    changed = True
    while changed:  # depending on a refused entry (directly or not) refuses this one too
        changed = False
        for index, job_request in valid:
            if index in refused:
                continue
            bad = [item for item in job_request.depends_on if isinstance(item, int) and item in refused]
            if bad:
                message = f"depends on entry {bad[0]}, which was refused"
                errors.setdefault(index, []).append(FieldError("depends_on", message))
                refused.add(index)
                changed = True
    for index, problems in errors.items():
        results[index] = _refused(
            index, 400, str(InvalidJob(problems)), [item.as_dict() for item in problems]
        )
    kept = [(index, job_request) for index, job_request in valid if index not in errors]
    position = {index: n for n, (index, _) in enumerate(kept)}
    return [
        (
            index,
            dataclasses.replace(
                job_request,
                depends_on=tuple(position[d] if isinstance(d, int) else d for d in job_request.depends_on),
            )
            if any(isinstance(d, int) for d in job_request.depends_on)
            else job_request,
        )
        for index, job_request in kept
    ]


def _compact_size(entry: Any) -> int:
    """An entry's bytes as its own body, written compactly (what a client sending it alone would send)."""
    return len(json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode(errors="surrogatepass"))


def _refused(
    index: int, status: int, detail: str, errors: list[dict[str, str]] | None = None
) -> dict[str, Any]:
    return {
        "index": index,
        "accepted": False,
        "status_code": status,
        "job": None,
        "error": {"detail": detail, "errors": errors or []},
    }


# --- follow -----------------------------------------------------------------------------


class JobFilters(Schema):
    type: str | None = Field(
        default=None, max_length=200, pattern=NO_NUL, description="Only jobs of this type."
    )
    status: Job.Status | None = Field(default=None, description="Only jobs in this status.")
    since: datetime | None = Field(
        default=None, description="Only jobs created at or after this time (ISO 8601)."
    )
    limit: int = Field(default=50, ge=1, le=200)
    cursor: Annotated[str | None, BeforeValidator(cursor_pattern(JOB_CURSOR))] = Field(
        default=None,
        json_schema_extra={"pattern": JOB_CURSOR},
        description="`next_cursor` of the previous page.",
    )

    @field_validator("since", mode="before")
    @classmethod
    def _date_time(cls, value: Any) -> Any:
        # pydantic alone also takes a number (Unix time) and a time without zone; the document
        # promises `format: date-time` (RFC 3339), and a naive time would be read in the server's zone.
        if value is not None and not (isinstance(value, str) and DATE_TIME.fullmatch(value)):
            raise PydanticCustomError(
                "date_time", "must be an ISO 8601 date-time with a time zone, e.g. 2026-11-23T00:00:00Z"
            )
        return value

    @field_validator("since")
    @classmethod
    def _in_utc(cls, value: datetime | None) -> datetime | None:
        # PostgreSQL takes offsets up to 15:59 only (RFC 3339 allows 23:59): compare in UTC.
        try:
            return None if value is None else value.astimezone(UTC)
        except OverflowError:
            raise PydanticCustomError("date_time", "is out of range") from None


@router.get("", response={200: JobPageOut, 400: Error, **AUTH_ERRORS}, summary="List jobs, newest first")
def list_jobs(request: HttpRequest, filters: Query[JobFilters]) -> dict[str, Any]:
    token = token_of(request)
    jobs = access.visible_jobs(token)
    if filters.type:
        jobs = jobs.filter(type=filters.type)
    if filters.status:
        jobs = jobs.filter(status=filters.status)
    if filters.since:
        jobs = jobs.filter(created_at__gte=filters.since)
    page = keyset_page(jobs, by="created_at", limit=filters.limit, cursor=filters.cursor, pk_type=UUID)
    info = TreeInfo(page["items"])
    return {**page, "items": [job_out(job, token, info=info) for job in page["items"]]}


@router.get(
    "/{job_id}",
    response={200: JobOut, 400: Error, 404: Error, **AUTH_ERRORS},
    summary="A job's status, progress, result",
)
def get_job(request: HttpRequest, job_id: UUID) -> dict[str, Any]:
    return job_out(_job_or_404(request, job_id), token_of(request))


class ChildFilters(Schema):
    status: Job.Status | None = Field(default=None, description="Only children in this status.")
    limit: int = Field(default=50, ge=1, le=200)
    cursor: Annotated[str | None, BeforeValidator(cursor_pattern(JOB_CURSOR))] = Field(
        default=None,
        json_schema_extra={"pattern": JOB_CURSOR},
        description="`next_cursor` of the previous page.",
    )


@router.get(
    "/{job_id}/children",
    response={200: JobPageOut, 400: Error, 404: Error, **AUTH_ERRORS},
    summary="The jobs a job spawned, newest first",
)
def list_children(request: HttpRequest, job_id: UUID, filters: Query[ChildFilters]) -> dict[str, Any]:
    """A newsletter's batches, a sync's upserts, a backfill's days: each a job with its own status,
    attempts, error and result. `?status=failed` lists the ones that failed for good (their dead
    letters: GET /api/dead-letters?job=<child id>)."""
    token = token_of(request)
    parent = _job_or_404(request, job_id)
    children = Job.objects.filter(parent=parent)
    if filters.status:
        children = children.filter(status=filters.status)
    page = keyset_page(children, by="created_at", limit=filters.limit, cursor=filters.cursor, pk_type=UUID)
    info = TreeInfo(page["items"])
    return {**page, "items": [job_out(job, token, info=info) for job in page["items"]]}


# --- control (staff) ----------------------------------------------------------------------


@router.post(
    "/{job_id}/retry",
    auth=StaffTokenAuth(),
    response={202: JobOut, 400: Error, 404: Error, 409: Error, 503: Error, **STAFF_ERRORS},
    summary="Run a failed, cancelled or partially failed job again (staff)",
    openapi_extra=STAFF_ONLY,
)
def retry_job(request: HttpRequest, job_id: UUID) -> Status:
    """A job with children whose own task had finished (a newsletter, a sync) runs again only the
    children that did not succeed, and waits for them; any other job runs again as a whole."""
    job = _job_or_404(request, job_id)
    try:
        job = services.retry(job)
    except services.Conflict as exc:
        raise ApiError(409, str(exc)) from None
    except BrokerUnavailable as exc:
        raise ApiError(503, f"{exc}; the job was left as it was", Retry_After="5") from None
    return Status(202, job_out(job, token_of(request), with_progress=False))


@router.delete(
    "/{job_id}",
    auth=StaffTokenAuth(),
    response={200: JobOut, 202: JobOut, 400: Error, 404: Error, 409: Error, **STAFF_ERRORS},
    summary="Cancel a job and every job below it not final yet (staff)",
    openapi_extra=STAFF_ONLY,
)
def cancel_job(request: HttpRequest, job_id: UUID) -> Status:
    """Waiting, queued, scheduled, retrying or running jobs can be cancelled; so are the job's children
    (and theirs) that are not final yet. A cancelled job never starts later, even after a worker
    restart: the job's row says so and every worker checks it before running.

    `200`: the job is final now (`cancelled`). `202`: it was running (its task, or children of it):
    the run is terminated where it runs, and the job stays `running` with `cancel_requested_at` until
    its worker says how the run ended: `cancelled` when it was stopped, or the outcome it reached
    before the cancel could stop it (a run that finished first; the solo pool, which cannot
    interrupt a task)."""
    job = _job_or_404(request, job_id)
    try:
        job = services.cancel(job)
    except services.Conflict as exc:
        raise ApiError(409, str(exc)) from None
    final = job.status in Job.FINAL
    return Status(200 if final else 202, job_out(job, token_of(request), with_progress=False))
