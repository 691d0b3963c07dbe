"""The `email` task family (queue `email`): templated messages over SMTP, and newsletters.

Recipients and template contexts (which may hold reset links or tokens) are
masked wherever Celery shows arguments: Flower, events, worker logs and the
result backend. The dead letter keeps them as given, so it can be replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import validate_email
from django.utils import timezone
from pydantic import AfterValidator, BaseModel, Field, field_validator

from config.celery_app import app
from jobs.models import Job
from jobs.tree import Child, Outcome, children_path
from tasks.base import REPLAY_HEADER, JobTask
from tasks.progress import throttled
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


def _newsletter_outcome(task: JobTask, job: Job, children: Sequence[Child]) -> Outcome:
    """A newsletter is done when its last batch is: succeeded when every recipient got the message,
    partially failed when some were refused (5xx) or their batch failed for good, failed when none
    got it."""
    own = job.result if isinstance(job.result, dict) else {}
    sent = already_sent = refused = 0
    for child in children:
        if child.status in (Job.Status.SUCCEEDED, Job.Status.PARTIALLY_FAILED) and isinstance(
            child.result, dict
        ):
            sent += int(child.result.get("sent", 0))
            already_sent += int(child.result.get("already_sent", 0))
            refused += int(child.result.get("failed", 0))
    lost_batches = [
        child.id for child in children if child.status in (Job.Status.FAILED, Job.Status.CANCELLED)
    ]
    undelivered = sum(
        len(payload.get("recipients") or [])
        for payload in Job.objects.filter(pk__in=lost_batches).values_list("payload", flat=True)
    )
    result = {
        **own,
        "sent": sent,
        "already_sent": already_sent,
        "refused": refused,
        "undelivered": undelivered,
        "failed_batches": len(lost_batches),
    }
    if not refused and not undelivered:
        return Outcome(Job.Status.SUCCEEDED, result)
    problems = []
    if refused:
        problems.append(f"{refused} recipient(s) refused for good")
    if undelivered:
        problems.append(f"{undelivered} not sent: {len(lost_batches)} batch(es) failed for good")
    result["failures"] = children_path(job)
    message = f"{'; '.join(problems)} (of {own.get('recipients', '?')}); see {children_path(job)}"
    if sent + already_sent == 0:
        return Outcome(Job.Status.FAILED, result, "NewsletterFailed", message)
    return Outcome(Job.Status.PARTIALLY_FAILED, result, "RecipientsFailed", message)


@app.task(
    bind=True,
    base=JobTask,
    name="email.newsletter",
    schema=NewsletterSchema,
    body_limit_setting="JOBS_API_MAX_BULK_BODY_BYTES",
    masked=frozenset({"recipients", "context"}),
    finish_tree=_newsletter_outcome,
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
    """Sends one campaign to many recipients, in batches spread evenly over `window_seconds`.

    Each batch is a child job (jobs.tree): the newsletter's job stays `running` until the last
    batch is final, then counts what was sent, refused and not sent.
    """
    service.render(template, context or {})  # a broken template fails here, not in 1,000 batches
    plan = service.plan_batches(recipients, batch_size, window_seconds)
    self.spawn(
        (
            send_batch,
            {"campaign": campaign, "template": template, "recipients": batch, "context": context or {}},
            offset,
        )
        for offset, batch in plan
    )
    return {"campaign": campaign, "recipients": sum(len(batch) for _, batch in plan), "batches": len(plan)}


class BatchSchema(BaseModel):
    campaign: str = Field(max_length=100)
    template: Template
    recipients: list[Annotated[str, Field(json_schema_extra=EMAIL_FORMAT)]] = Field(
        min_length=1, max_length=1000
    )
    context: dict[str, Any] = Field(default_factory=dict)


def _refused(task: JobTask, result: Any) -> str | None:
    failed = result.get("failed", 0) if isinstance(result, dict) else 0
    if not failed:
        return None
    total = failed + result.get("sent", 0) + result.get("already_sent", 0)
    return f"{failed} of {total} recipient(s) refused for good (5xx); the email log has each reply"


@app.task(
    bind=True,
    base=JobTask,
    name="email.send_batch",
    schema=BatchSchema,
    masked=frozenset({"recipients", "context"}),
    partially_failed_because=_refused,
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
        on_progress=throttled(self.report_progress),
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
    self.spawn(
        [
            (
                newsletter,
                {
                    "campaign": campaign,
                    "template": template,
                    "recipients": recipients,
                    "context": context or {},
                    "window_seconds": window_seconds,
                },
            )
        ]
    )
    return {"campaign": campaign, "recipients": len(recipients)}
