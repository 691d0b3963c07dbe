"""/api/dead-letters: tasks that failed for good; replay (staff).

A non-staff token sees the dead letters of its own jobs only (jobs.api.access), with personal
arguments masked and the traceback cut to its final exception line.
"""

from __future__ import annotations

from typing import Annotated, Any
from uuid import UUID

from django.http import HttpRequest
from ninja import Query, Router, Schema, Status
from pydantic import BeforeValidator, Field

from config.celery_app import app
from jobs import services, tree
from jobs.api import access
from jobs.api.auth import StaffTokenAuth, token_of
from jobs.api.common import (
    AUTH_ERRORS,
    DEAD_LETTER_CURSOR,
    NO_NUL,
    STAFF_ERRORS,
    STAFF_ONLY,
    ApiError,
    cursor_pattern,
    keyset_page,
)
from jobs.api.schemas import DeadLetterDetail, DeadLetterPage, Error, ReplayOut
from jobs.models import ApiToken
from jobs.publish import BrokerUnavailable
from tasks.base import PermanentJobError, mask_value
from tasks.models import DeadLetter

router = Router(tags=["dead letters"])

SUMMARY_FIELDS = (
    "id",
    "task_id",
    "task_name",
    "queue",
    "exception_type",
    "exception_message",
    "attempts",
    "first_failed_at",
    "last_failed_at",
    "replay_count",
    "replay_status",
)


class DeadLetterFilters(Schema):
    task: str | None = Field(default=None, max_length=255, pattern=NO_NUL, description="Only this task name.")
    queue: str | None = Field(default=None, max_length=100, pattern=NO_NUL)
    job: UUID | None = Field(
        default=None, description="Only the dead letters of this job and of the jobs below it (its children)."
    )
    limit: int = Field(default=50, ge=1, le=200)
    cursor: Annotated[str | None, BeforeValidator(cursor_pattern(DEAD_LETTER_CURSOR))] = Field(
        default=None,
        json_schema_extra={"pattern": DEAD_LETTER_CURSOR},
        description="`next_cursor` of the previous page.",
    )


def _letter_or_404(request: HttpRequest, letter_id: int) -> DeadLetter:
    # Another user's letter is "not found", as one that does not exist: a 403 would say it does.
    letter = access.visible_dead_letters(token_of(request)).filter(pk=letter_id).first()
    if letter is None:
        raise ApiError(404, f"dead letter {letter_id} not found")
    return letter


def _summary(letter: DeadLetter, viewer: ApiToken) -> dict[str, Any]:
    summary = {name: getattr(letter, name) for name in SUMMARY_FIELDS}
    if not access.is_staff(viewer):
        summary["exception_message"] = access.redact_paths(letter.exception_message)
    return summary


@router.get(
    "",
    response={200: DeadLetterPage, 400: Error, **AUTH_ERRORS},
    summary="Dead letters, newest failure first",
)
def list_dead_letters(request: HttpRequest, filters: Query[DeadLetterFilters]) -> dict[str, Any]:
    """Staff tokens see every dead letter; other tokens those of the jobs their user sent.
    `?job=<id>` lists a job's own and those of its children (a newsletter's failed batches)."""
    token = token_of(request)
    letters = access.visible_dead_letters(token)
    if filters.task:
        letters = letters.filter(task_name=filters.task)
    if filters.queue:
        letters = letters.filter(queue=filters.queue)
    if filters.job:
        letters = letters.filter(job_id__in=[filters.job, *tree.descendants(filters.job)])
    page = keyset_page(letters, by="last_failed_at", limit=filters.limit, cursor=filters.cursor, pk_type=int)
    return {**page, "items": [_summary(letter, token) for letter in page["items"]]}


@router.get(
    "/{letter_id}",
    response={200: DeadLetterDetail, 400: Error, 404: Error, **AUTH_ERRORS},
    summary="One dead letter, with its arguments and traceback",
)
def get_dead_letter(request: HttpRequest, letter_id: int) -> dict[str, Any]:
    """Staff tokens see any dead letter, as stored. Other tokens see those of their own jobs only
    (404 for the rest): arguments a task marks as personal (e.g. email recipients) masked, and the
    traceback cut to its final exception line, without file paths."""
    token = token_of(request)
    letter = _letter_or_404(request, letter_id)
    kwargs = dict(letter.kwargs or {})
    args = list(letter.args or [])
    traceback = letter.traceback
    if not access.is_staff(token):
        task = app.tasks.get(letter.task_name)
        masked: frozenset[str] = getattr(task, "masked", frozenset())
        if masked:
            kwargs = {key: mask_value(value) if key in masked else value for key, value in kwargs.items()}
            args = [mask_value(value) for value in args]
        traceback = access.final_exception_line(letter.exception_type, letter.exception_message)
    return {**_summary(letter, token), "args": args, "kwargs": kwargs, "traceback": traceback}


@router.post(
    "/{letter_id}/replay",
    auth=StaffTokenAuth(),
    response={202: ReplayOut, 400: Error, 404: Error, 409: Error, 503: Error, **STAFF_ERRORS},
    summary="Send the task again with the same arguments (staff)",
    openapi_extra=STAFF_ONLY,
)
def replay_dead_letter(request: HttpRequest, letter_id: int) -> Status:
    letter = _letter_or_404(request, letter_id)
    try:
        task_id = services.replay(letter)
    except (PermanentJobError, services.Conflict) as exc:
        raise ApiError(409, str(exc)) from None
    except (BrokerUnavailable, OSError) as exc:
        raise ApiError(
            503, f"the broker did not take the replay: {type(exc).__name__}", Retry_After="5"
        ) from None
    return Status(202, {"dead_letter": letter.pk, "task_id": task_id})
