"""Jobs handed in over the REST API, the tokens that hand them in, and paused queues.

The Job row is the truth about a job: its status is what the API reports, and a
worker claims it (jobs.tracking.claim) before running it, so a cancelled job
never starts, whatever Celery's in-memory revoke list says.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class ApiToken(models.Model):
    """A bearer token for the REST API. Only its SHA-256 is stored; the token is shown once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True, help_text="What it is for, e.g. the calling service.")
    prefix = models.CharField(max_length=12, editable=False, help_text="The token's first characters.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or self.user})"

    @property
    def active(self) -> bool:
        return self.revoked_at is None and self.user.is_active


class Job(models.Model):
    class Status(models.TextChoices):
        # Waits for the jobs it depends on (JobDependency); no message is sent until they are final.
        WAITING = "waiting"
        QUEUED = "queued"
        SCHEDULED = "scheduled"
        RUNNING = "running"
        RETRYING = "retrying"
        SUCCEEDED = "succeeded"
        # Final: the job's work is done, and some of it (children, recipients, records) failed for good.
        PARTIALLY_FAILED = "partially_failed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    FINAL = (Status.SUCCEEDED, Status.PARTIALLY_FAILED, Status.FAILED, Status.CANCELLED)
    # A message for the job may start it only in these states (jobs.tracking.claim).
    STARTABLE = (Status.QUEUED, Status.SCHEDULED, Status.RETRYING)

    # What a job that waits for others needs of them (jobs.tree): that they succeed (`depends_on`),
    # or only that they are final (a batch's callback).
    class RunAfter(models.TextChoices):
        SUCCESS = "success"
        COMPLETION = "completion"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    type = models.CharField(max_length=200, db_index=True)
    queue = models.CharField(max_length=100)
    payload = models.JSONField(default=dict)
    priority = models.PositiveSmallIntegerField(null=True, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    # The Celery task id of the current run: retries keep it, a retry through the API gets a new one.
    task_id = models.CharField(max_length=255, unique=True)
    attempts = models.PositiveIntegerField(default=0)
    # Deliveries of the current attempt's message whose run claimed this row: 1, or more when the
    # broker delivered it again after its worker died. Counted here for the brokers that do not count
    # them (RabbitMQ's classic queues): JOBS_MAX_DELIVERIES then applies there too (jobs.tracking).
    deliveries = models.PositiveIntegerField(default=0, editable=False)
    result = models.JSONField(null=True, blank=True)
    error_type = models.CharField(max_length=255, blank=True)
    error_message = models.TextField(blank=True)
    run_at = models.DateTimeField(null=True, blank=True, help_text="When a delayed job is due.")
    # Headers every send of this run carries (jobs.publish.message_options): a retry's held in this
    # row (jobs.tracking.hold_retry), published with when due; a dead letter's replay's (its id).
    held_headers = models.JSONField(null=True, blank=True, editable=False)
    # Null until the message is with the broker (on Redis set as the row is written, for the publish that
    # follows: jobs.publish.marked_before_sending); the release task publishes jobs that stay unpublished.
    published_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    token = models.ForeignKey(ApiToken, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs")
    # The job whose task spawned this one (jobs.tree.spawn): a parent is final only once its
    # children are.
    parent = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="children",
        editable=False,
        db_index=False,  # jobs_job_parent_status (below) leads with it
    )
    # When the job's own task returned, for a job with children: from then on it is `running`
    # only while it waits for them, and jobs.tree.settle_parent finishes it.
    own_finished_at = models.DateTimeField(null=True, blank=True, editable=False)
    # When a cancel reached the job while its task ran (or while its children did): the job stays
    # `running` until its worker says how the run ended (jobs.services.cancel): `cancelled` when it was
    # stopped, or the outcome it reached before the cancel could stop it. A status is never a guess.
    cancel_requested_at = models.DateTimeField(null=True, blank=True, editable=False)
    # For a `waiting` job: what its prerequisites must have done before it runs.
    run_after = models.CharField(max_length=10, choices=RunAfter.choices, blank=True, editable=False)
    idempotency_key = models.CharField(max_length=255, blank=True)
    request_hash = models.CharField(max_length=64, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["token", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="jobs_job_one_job_per_idempotency_key",
            )
        ]
        indexes = [
            models.Index(
                fields=["run_at"],
                condition=Q(published_at__isnull=True),
                name="jobs_job_unpublished",
            ),
            # "Is any child of this parent not final yet?" (jobs.tree.settle_parent, per finishing
            # child) reads the few unfinished entries, not all of a parent's children.
            # Partial: jobs without a parent (most of them: every API job) cost it nothing.
            models.Index(
                fields=["parent", "status"], condition=Q(parent__isnull=False), name="jobs_job_parent_status"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.id} ({self.status})"


class JobDependency(models.Model):
    """`job` waits for `prerequisite` (a `depends_on` entry, or a batch job its callback waits for)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="dependencies")
    prerequisite = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="dependents")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["job", "prerequisite"], name="jobs_dependency_once"),
        ]

    def __str__(self) -> str:
        return f"{self.job_id} after {self.prerequisite_id}"


class QueuePause(models.Model):
    """A paused queue: no worker takes from it, including workers started later (jobs.worker)."""

    queue = models.CharField(max_length=100, unique=True)
    paused_at = models.DateTimeField(auto_now_add=True)
    paused_by = models.CharField(max_length=150, blank=True)

    def __str__(self) -> str:
        return self.queue
