"""Which task types the API may enqueue, and how a job's body is checked.

Only types listed in JOBS_API_TYPES can be enqueued; each one's payload is the
task's keyword arguments, checked against the task's own pydantic schema in
strict JSON mode (`"priority": false` is not 0, `"1"` is not 1) before
anything is written or queued.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal
from uuid import UUID

from django.apps import apps as django_apps
from django.conf import settings
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model
from pydantic import ValidationError as PydanticValidationError

from config.celery_app import app, import_task_modules
from jobs.publish import queue_for
from tasks.base import JobTask

MAX_DELAY_SECONDS = 30 * 24 * 3600
MAX_BATCH = 1000
MAX_DEPENDENCIES = 100
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"  # printable ASCII, no spaces


class FieldError(Exception):
    """A job's body is wrong; `field` says where (`payload.to`, `priority`, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field '{field}': {message}")
        self.field, self.message = field, message

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class InvalidJob(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(error) for error in errors))
        self.errors = errors


class JobOptions(BaseModel):
    """What every job request has besides its payload."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: str = Field(min_length=1, max_length=200, description="The job type, e.g. `email.send`.")
    payload: dict[str, Any] = Field(default_factory=dict, description="The task's arguments, by name.")
    priority: int | None = Field(
        default=None,
        ge=0,
        le=9,
        description="0-9, higher runs sooner; none: 5, the middle (as any task sent without one).",
    )
    delay_seconds: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DELAY_SECONDS,
        description="Run no earlier than this many seconds from now.",
    )
    idempotency_key: str | None = Field(
        default=None,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="The same key with the same body returns the same job; with another body, 409.",
    )
    depends_on: list[UUID | Annotated[int, Field(ge=0, lt=MAX_BATCH)]] | None = Field(
        default=None,
        max_length=MAX_DEPENDENCIES,
        json_schema_extra={"x-references": "jobs.Job"},
        description=(
            "Jobs this one waits for (status `waiting`): ids of existing jobs, or in a batch the index "
            "of another entry. It runs once they have all succeeded; if one of them fails for good or "
            "is cancelled, this job is cancelled, with the reason. Unknown ids and cycles are a 400."
        ),
    )


@dataclass(frozen=True)
class JobRequest:
    type: str
    queue: str
    payload: dict[str, Any]
    priority: int | None
    delay_seconds: int
    idempotency_key: str
    # Ids of existing jobs, or positions of other requests sent in the same call (jobs.services).
    depends_on: tuple[UUID | int, ...] = ()
    # What the jobs it depends on must have done: succeeded ("success"), or only ended ("completion":
    # a batch's callback).
    run_after: str = "success"

    def fingerprint(self) -> str:
        """What must match for an idempotent replay: everything but the key itself."""
        body: dict[str, Any] = {
            "type": self.type,
            "payload": self.payload,
            "priority": self.priority,
            "delay_seconds": self.delay_seconds,
        }
        if self.depends_on:
            body["depends_on"] = [str(item) for item in self.depends_on]
            body["run_after"] = self.run_after
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def allowed_types() -> list[str]:
    """JOBS_API_TYPES that are tasks of ours (`manage.py check` reports the others: jobs.E001)."""
    _import_task_modules()
    return [name for name in settings.JOBS_API_TYPES if isinstance(app.tasks.get(name), JobTask)]


@cache
def _import_task_modules() -> None:
    # Web processes do not import CELERY_IMPORTS by themselves (workers do, at start-up).
    import_task_modules()


def task_for(job_type: str) -> JobTask:
    _import_task_modules()
    task = app.tasks.get(job_type)
    if job_type not in settings.JOBS_API_TYPES or not isinstance(task, JobTask):
        raise InvalidJob(
            [FieldError("type", f"unknown job type {job_type!r}; one of: {', '.join(allowed_types())}")]
        )
    return task


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes a job's body may take in the API, and the setting that says so."""

    bytes: int
    setting: str


def body_limit(job_type: Any) -> BodyLimit | None:
    """The limit for a job of `job_type`; None when it is not a type the API takes (parse_job says so)."""
    if not isinstance(job_type, str) or job_type not in allowed_types():
        return None
    return _limit_of(job_type)


def _limit_of(job_type: str) -> BodyLimit:
    name = task_for(job_type).body_limit_setting
    return BodyLimit(getattr(settings, name), name)


def largest_body_limit() -> BodyLimit:
    """What POST /api/jobs reads before it knows the type: the largest limit of any type it takes."""
    limits = [_limit_of(job_type) for job_type in allowed_types()]
    return max(limits, key=lambda limit: limit.bytes, default=None) or BodyLimit(
        settings.JOBS_API_MAX_BODY_BYTES, "JOBS_API_MAX_BODY_BYTES"
    )


def _field_errors(error: PydanticValidationError, prefix: str = "") -> list[FieldError]:
    found = []
    for item in error.errors():
        field = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "") or prefix or "(body)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "is not a known field"
        found.append(FieldError(field, message))
    return found


def _argument_errors(task: JobTask, payload: dict[str, Any]) -> list[FieldError]:
    """Names the payload keys the task does not take, and the arguments it needs that are missing."""
    run = task._orig_run if hasattr(task, "_orig_run") else task.run
    parameters = inspect.signature(run).parameters.values()
    errors = []
    if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        known = {parameter.name for parameter in parameters}
        errors += [
            FieldError(f"payload.{key}", "is not a known field") for key in payload if key not in known
        ]
    for parameter in parameters:
        keyword = parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        if keyword and parameter.default is inspect.Parameter.empty and parameter.name not in payload:
            errors.append(FieldError(f"payload.{parameter.name}", "Field required"))
    return errors


def _nul_at(value: Any, path: str) -> str | None:
    """Where the first NUL character is, in a key or a string: PostgreSQL cannot store it (jsonb)."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        where = f"{path}.{key}".replace("\x00", "\\u0000")
        if "\x00" in str(key):
            return where
        found = _nul_at(item, where)
        if found is not None:
            return found
    return None


def parse_job(data: Any, *, header_key: str | None = None) -> JobRequest:
    """Checks one job's body (already decoded from JSON); raises InvalidJob naming each bad field."""
    if not isinstance(data, dict):
        raise InvalidJob([FieldError("(body)", "must be a JSON object")])
    try:
        options = JobOptions.model_validate_json(json.dumps(data))
    except PydanticValidationError as exc:
        raise InvalidJob(_field_errors(exc)) from None
    task = task_for(options.type)
    payload = options.payload
    try:
        task.bind_arguments((), payload)
    except Exception as exc:
        errors = _argument_errors(task, payload) or [FieldError("payload", str(exc).split(": ", 1)[-1])]
        raise InvalidJob(errors) from None
    if task.schema is not None:
        try:
            task.schema.model_validate_json(json.dumps(payload), strict=True)
        except PydanticValidationError as exc:
            raise InvalidJob(_field_errors(exc, "payload")) from None
    missing = task.missing_references(payload)
    if missing:
        raise InvalidJob([FieldError(f"payload.{name}", message) for name, message in missing.items()])
    nul = _nul_at(payload, "payload")
    if nul is not None:
        raise InvalidJob([FieldError(nul, "must not contain the NUL character (U+0000)")])
    if header_key is not None and not re.fullmatch(IDEMPOTENCY_KEY_PATTERN, header_key):
        raise InvalidJob(
            [FieldError("Idempotency-Key", "must be 1-255 printable ASCII characters, no spaces")]
        )
    key = options.idempotency_key or header_key or ""
    if key and options.idempotency_key and header_key and key != header_key:
        raise InvalidJob([FieldError("idempotency_key", "differs from the Idempotency-Key header")])
    return JobRequest(
        type=options.type,
        queue=queue_for(options.type),
        payload=payload,
        priority=options.priority,
        delay_seconds=options.delay_seconds or 0,
        idempotency_key=key,
        depends_on=tuple(dict.fromkeys(options.depends_on or ())),
    )


@cache
def request_body_schema() -> dict[str, Any]:
    """The JSON schema of one job request: one variant per allowed type, told apart by `type`.

    It is what the OpenAPI document shows; parse_job is what enforces it.
    """
    variants: list[Any] = []
    tasks: dict[str, JobTask] = {}
    for job_type in allowed_types():
        task = task_for(job_type)
        literal: Any = Literal[job_type]
        model_name = "".join(part.title() for part in job_type.replace("_", ".").split(".")) + "Job"
        payload_model: Any = task.schema or _signature_model(task, model_name + "Payload")
        tasks[model_name] = task
        # parse_job reads a missing payload as {}: it is required only where that would not do.
        needs_payload = (
            isinstance(payload_model, type)
            and issubclass(payload_model, BaseModel)
            and any(field.is_required() for field in payload_model.model_fields.values())
        )
        payload_field: Any = ... if needs_payload else Field(default_factory=dict)
        variants.append(
            create_model(
                model_name,
                __base__=JobOptions,
                type=(literal, Field(description=f"`{job_type}` (queue `{queue_for(job_type)}`)")),
                payload=(payload_model, payload_field),
            )
        )
    one_of = variants[0] if len(variants) == 1 else _union(variants)
    union: Any = Annotated[one_of, Field(discriminator="type")]
    document = TypeAdapter(union).json_schema(ref_template="#/components/schemas/{model}")
    # parse_job binds the payload to the task's arguments: a key that is not one of them is refused.
    defs = document.get("$defs", {})
    for variant in variants:
        ref = defs[variant.__name__]["properties"]["payload"].get("$ref", "")
        payload_def = defs.get(ref.rsplit("/", 1)[-1])
        if payload_def is not None and not _takes_any_keyword(tasks[variant.__name__]):
            payload_def.setdefault("additionalProperties", False)
        # A row the argument names must exist (JobTask.references): no JSON schema keyword says that.
        for name, label in tasks[variant.__name__].references.items():
            field = (payload_def or {}).get("properties", {}).get(name)
            if field is not None:
                model = django_apps.get_model(label)
                field["x-references"] = model._meta.label
                field["description"] = f"The id of an existing {model._meta.verbose_name} (else 400)."
    return document


def _takes_any_keyword(task: JobTask) -> bool:
    run = task._orig_run if hasattr(task, "_orig_run") else task.run
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(run).parameters.values())


def _signature_model(task: JobTask, name: str) -> Any:
    """For a task without a schema, the keyword arguments its function takes (what bind_arguments checks)."""
    run = task._orig_run if hasattr(task, "_orig_run") else task.run
    parameters = inspect.signature(run).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return dict[str, Any]
    fields: dict[str, Any] = {
        parameter.name: (Any, ... if parameter.default is inspect.Parameter.empty else None)
        for parameter in parameters
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return create_model(name, __config__=ConfigDict(extra="forbid"), **fields)


def _union(variants: list[Any]) -> Any:
    from typing import Union

    return Union[tuple(variants)]  # noqa: UP007  (built from a runtime list)
