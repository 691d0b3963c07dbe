"""The `email` task family (queue `email`): templated messages over SMTP, and newsletters.

Recipients and template contexts (which may hold reset links or tokens) are
masked wherever Celery shows arguments: Flower, events, worker logs and the
result backend. The dead letter keeps them as given, so it can be replayed.
"""

from __future__ import annotations

from typing import Annotated, Any

from celery import group
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import validate_email
from django.utils import timezone
from pydantic import AfterValidator, BaseModel, Field, field_validator

from config.celery_app import app
from tasks.base import REPLAY_HEADER, JobTask
from tasks.services import email as service

MAX_NEWSLETTER_RECIPIENTS = 100_000


def _checked_address(value: str) -> str:
    try:
        validate_email(value)
    except DjangoValidationError:
        raise ValueError("is not a valid email address") from None
    return value


def _existing_template(name: str) -> str:
    missing = service.missing_template_parts(name)
    if len(missing) == len(service.TEMPLATE_PARTS):
        raise ValueError(f"there is no email template {name!r} (templates/email/{name}/)")
    if missing:
        raise ValueError(f"email template {name!r} has no {', '.join(missing)}")
    return name


# A template name that can be sent: checked when the job is sent (API, enqueue, schedule admin), not
# found missing by the worker.
Template = Annotated[
    str,
    Field(
        pattern=service.TEMPLATE_NAME.pattern,
        max_length=200,
        # The document lists the templates there are (read when it is first built).
        json_schema_extra=lambda schema: schema.update(enum=service.template_names()),
    ),
    AfterValidator(_existing_template),
]

# The addresses are checked by Django's validate_email; the document says `format: email`.
EMAIL_FORMAT: dict[str, Any] = {"format": "email"}
# A window longer than this would leave batches waiting past the Redis visibility timeout.
MAX_WINDOW_SECONDS = settings.CELERY_BROKER_VISIBILITY_TIMEOUT - settings.CELERY_TASK_TIME_LIMIT - 1


class SendSchema(BaseModel):
    to: str = Field(max_length=320, json_schema_extra=EMAIL_FORMAT)
    template: Template
    context: dict[str, Any] = Field(default_factory=dict)
    key: str | None = Field(default=None, min_length=1, max_length=200)

    _to = field_validator("to")(_checked_address)


@app.task(
    bind=True,
    base=JobTask,
    name="email.send",
    schema=SendSchema,
    masked=frozenset({"to", "context"}),
    idempotency="a log row per message key (default: the task id) records the send; a second run finds it",
)
def send(
    self: JobTask, to: str, template: str, context: dict[str, Any] | None = None, key: str | None = None
) -> dict[str, str]:
    """Renders `email/<template>/{subject.txt,body.txt,body.html}` with `context` and sends it to `to`.

    SMTP connection errors, timeouts and 4xx replies are retried; 5xx refusals fail at once.
    """
    key = key or f"task:{self.request.id}"
    outcome = service.send_logged(
        key=key,
        to=to,
        template=template,
        context=context or {},
        replay=self.request_header(REPLAY_HEADER) is not None,
    )
    return {"key": key, "outcome": outcome}


class NewsletterSchema(BaseModel):
    campaign: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$", max_length=100)
    template: Template
    recipients: list[Annotated[str, Field(json_schema_extra=EMAIL_FORMAT)]] = Field(
        min_length=1, max_length=MAX_NEWSLETTER_RECIPIENTS
    )
    context: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(default=100, ge=1, le=1000)
    window_seconds: int = Field(
        default=3600, ge=0, le=6 * 3600, json_schema_extra={"maximum": max(0, MAX_WINDOW_SECONDS)}
    )

    @field_validator("recipients")
    @classmethod
    def _addresses(cls, values: list[str]) -> list[str]:
        for index, value in enumerate(values):
            try:
                validate_email(value)
            except DjangoValidationError:
                raise ValueError(f"item {index} is not a valid email address") from None
        return values

    @field_validator("window_seconds")
    @classmethod
    def _within_visibility_timeout(cls, value: int) -> int:
        # A batch waiting longer than the Redis visibility timeout would be delivered twice.
        limit = settings.CELERY_BROKER_VISIBILITY_TIMEOUT - settings.CELERY_TASK_TIME_LIMIT
        if value >= limit:
            raise ValueError(
                f"must be under {limit}s (CELERY_BROKER_VISIBILITY_TIMEOUT minus the task time limit)"
            )
        return value


@app.task(
    bind=True,
    base=JobTask,
    name="email.newsletter",
    schema=NewsletterSchema,
    body_limit_setting="JOBS_API_MAX_BULK_BODY_BYTES",
    masked=frozenset({"recipients", "context"}),
    idempotency="fans out batches whose messages are keyed campaign:recipient; a rerun skips the sent",
)
def newsletter(
    self: JobTask,
    campaign: str,
    template: str,
    recipients: list[str],
    context: dict[str, Any] | None = None,
    batch_size: int = 100,
    window_seconds: int = 3600,
) -> dict[str, Any]:
    """Sends one campaign to many recipients, in batches spread evenly over `window_seconds`."""
    service.render(template, context or {})  # a broken template fails here, not in 1,000 batches
    plan = service.plan_batches(recipients, batch_size, window_seconds)
    group(
        send_batch.signature(
            kwargs={
                "campaign": campaign,
                "template": template,
                "recipients": batch,
                "context": context or {},
            },
            countdown=offset,
        )
        for offset, batch in plan
    ).apply_async()
    return {"campaign": campaign, "recipients": sum(len(batch) for _, batch in plan), "batches": len(plan)}


class BatchSchema(BaseModel):
    campaign: str = Field(max_length=100)
    template: Template
    recipients: list[Annotated[str, Field(json_schema_extra=EMAIL_FORMAT)]] = Field(
        min_length=1, max_length=1000
    )
    context: dict[str, Any] = Field(default_factory=dict)


@app.task(
    bind=True,
    base=JobTask,
    name="email.send_batch",
    schema=BatchSchema,
    masked=frozenset({"recipients", "context"}),
    idempotency="each message is keyed campaign:recipient in the email log; a retry skips the sent",
)
def send_batch(
    self: JobTask, campaign: str, template: str, recipients: list[str], context: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One newsletter batch over one SMTP connection, at the global EMAIL_SEND_RATE."""
    outcome = service.send_batch(
        campaign=campaign,
        template=template,
        recipients=recipients,
        context=context or {},
        on_progress=self.report_progress,
    )
    return {"campaign": campaign, **outcome.as_dict()}


class WeeklyNewsletterSchema(BaseModel):
    group: str = Field(default="newsletter", min_length=1, max_length=150)
    template: Template = "newsletter"
    context: dict[str, Any] = Field(default_factory=dict)
    window_seconds: int = Field(
        default=3600, ge=0, le=6 * 3600, json_schema_extra={"maximum": max(0, MAX_WINDOW_SECONDS)}
    )


@app.task(
    bind=True,
    base=JobTask,
    name="email.weekly_newsletter",
    schema=WeeklyNewsletterSchema,
    idempotency="the campaign is keyed by ISO week (weekly-2026-W48): a rerun that week sends nothing twice",
)
def weekly_newsletter(
    self: JobTask,
    group: str = "newsletter",
    template: str = "newsletter",
    context: dict[str, Any] | None = None,
    window_seconds: int = 3600,
) -> dict[str, Any]:
    """This week's newsletter to the active members of a user group (the Friday schedule sends it)."""
    year, week, _ = timezone.localdate().isocalendar()
    campaign = f"weekly-{year}-W{week:02d}"
    recipients = sorted(
        set(
            get_user_model()
            .objects.filter(groups__name=group, is_active=True)
            .exclude(email="")
            .values_list("email", flat=True)
        )
    )
    if not recipients:
        return {"campaign": campaign, "recipients": 0, "batches": 0}
    newsletter.apply_async(
        kwargs={
            "campaign": campaign,
            "template": template,
            "recipients": recipients,
            "context": context or {},
            "window_seconds": window_seconds,
        }
    )
    return {"campaign": campaign, "recipients": len(recipients)}
