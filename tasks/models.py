"""The rows the task families read and write.

One section per family; the dead-letter store is shared by all of them.
"""

from __future__ import annotations

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

# --- Dead letters ---------------------------------------------------------------


class DeadLetter(models.Model):
    """A task that failed for good: a permanent error, or every attempt used up."""

    class ReplayStatus(models.TextChoices):
        NONE = "", "not replayed"
        SENT = "sent", "replay queued"
        SUCCEEDED = "succeeded", "replay succeeded"
        FAILED = "failed", "replay failed"

    task_id = models.CharField(max_length=255, db_index=True)
    task_name = models.CharField(max_length=255, db_index=True)
    queue = models.CharField(max_length=100, db_index=True, blank=True)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    exception_type = models.CharField(max_length=255, db_index=True)
    exception_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    attempts = models.PositiveIntegerField(default=1)
    # The failed message's priority (0-9, 9 first): a replay is sent with it. Null: not known
    # (dead letters stored before it was kept); the replay then gets the default.
    priority = models.PositiveSmallIntegerField(null=True, blank=True)
    first_failed_at = models.DateTimeField()
    last_failed_at = models.DateTimeField(db_index=True)
    replay_count = models.PositiveIntegerField(default=0)
    replayed_at = models.DateTimeField(null=True, blank=True)
    replay_task_id = models.CharField(max_length=255, blank=True)
    replay_status = models.CharField(max_length=20, choices=ReplayStatus.choices, default="", blank=True)
    # The job whose task this was (the message's x_job_id), set when the letter is written. Through
    # it the API shows a non-staff token the dead letters of its own jobs and no others.
    job = models.ForeignKey(
        "jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="dead_letters"
    )

    class Meta:
        ordering = ["-last_failed_at"]

    def __str__(self) -> str:
        return f"{self.task_name} [{self.task_id}] {self.exception_type}"


# --- Quarantine -------------------------------------------------------------------


class QuarantinedMessage(models.Model):
    """A broker message no worker could run (unknown task, bad envelope, refused content type,
    undecodable body), kept as received so a person can see what it was; the worker went on."""

    class Kind(models.TextChoices):
        UNKNOWN_TASK = "unknown_task", "unknown task"
        CONTENT_TYPE = "content_type", "content type not accepted"
        ENVELOPE = "envelope", "not a Celery message"
        UNDECODABLE = "undecodable", "undecodable body"
        TRANSPORT = "transport", "refused by the transport"

    class BodyEncoding(models.TextChoices):
        TEXT = "utf-8", "text (UTF-8)"
        BASE64 = "base64", "base64 (the body is not UTF-8 text)"

    quarantined_at = models.DateTimeField(default=timezone.now, db_index=True)
    queue = models.CharField(max_length=200, blank=True, db_index=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, db_index=True)
    reason = models.CharField(max_length=500)
    # From the message's headers, when it had readable ones.
    task_name = models.CharField(max_length=255, blank=True)
    task_id = models.CharField(max_length=255, blank=True)
    content_type = models.CharField(max_length=100, blank=True)
    content_encoding = models.CharField(max_length=50, blank=True)
    headers = models.TextField(blank=True)
    # Bytes of the body as received; `body` holds at most the first 64 KiB of it.
    size = models.PositiveBigIntegerField(default=0)
    body = models.TextField(blank=True)
    body_encoding = models.CharField(max_length=10, choices=BodyEncoding.choices, default=BodyEncoding.TEXT)
    truncated = models.BooleanField(default=False)

    class Meta:
        ordering = ["-quarantined_at", "-id"]

    def __str__(self) -> str:
        return f"{self.queue or '?'}: {self.reason[:80]}"


# --- Email ------------------------------------------------------------------------


class EmailLog(models.Model):
    """One row per message: a retry or a redelivery finds it and never sends twice."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"  # handed to SMTP; a crash here leaves the outcome unknown
        SENT = "sent"
        FAILED = "failed"
        UNKNOWN = "unknown"

    key = models.CharField(max_length=255, unique=True)
    recipient = models.CharField(max_length=320)
    template = models.CharField(max_length=200)
    subject = models.CharField(max_length=255, blank=True)
    campaign = models.CharField(max_length=200, blank=True, db_index=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    message_id = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"


# --- Images -----------------------------------------------------------------------


class ImageAsset(models.Model):
    """An uploaded image; its outputs are produced by `images.process`."""

    file = models.FileField(upload_to="images/originals/%Y/%m/")
    original_name = models.CharField(max_length=255, blank=True)
    uploaded_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.original_name or self.file.name or ""


class ImageOutput(models.Model):
    """One stored result of an operation list applied to an asset."""

    asset = models.ForeignKey(ImageAsset, on_delete=models.CASCADE, related_name="outputs")
    # A digest of the operation list: the same asset and operations give the same row and file.
    operations_key = models.CharField(max_length=64)
    step = models.PositiveIntegerField(default=0)
    operations = models.JSONField(default=list)
    file = models.FileField(upload_to="images/outputs/%Y/%m/")
    format = models.CharField(max_length=10)
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["asset", "operations_key", "step"], name="image_output_unique_step"
            )
        ]

    def __str__(self) -> str:
        return self.file.name or ""


# --- Data sync --------------------------------------------------------------------


class DataSource(models.Model):
    """Where records come from; defined by staff in the admin."""

    class Kind(models.TextChoices):
        JSON = "json", "HTTP JSON (paged)"
        CSV = "csv", "HTTP CSV"

    name = models.SlugField(max_length=100, unique=True)
    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.JSON)
    url = models.URLField(max_length=2000)
    id_field = models.CharField(max_length=100, default="id", help_text="The field holding each record's id.")
    records_path = models.CharField(
        max_length=200, blank=True, default="results", help_text="JSON: the key holding the list of records."
    )
    next_path = models.CharField(
        max_length=200, blank=True, default="next", help_text="JSON: the key holding the next page's URL."
    )
    batch_size = models.PositiveIntegerField(
        default=500,
        validators=[MinValueValidator(1), MaxValueValidator(10_000)],
        help_text="Records per upsert task (1-10000).",
    )
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return self.name


class SyncRun(models.Model):
    class Status(models.TextChoices):
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    source = models.ForeignKey(DataSource, on_delete=models.CASCADE, related_name="runs")
    # The `data_sync.sync` task that owns this run: its retries and redeliveries find the same row.
    task_id = models.CharField(max_length=255, unique=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.RUNNING)
    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    pages = models.PositiveIntegerField(default=0)
    batches = models.PositiveIntegerField(default=0)
    fetched = models.PositiveIntegerField(default=0)
    created = models.PositiveIntegerField(default=0)
    updated = models.PositiveIntegerField(default=0)
    unchanged = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    # The checkpoint (tasks.services.data_sync.Checkpoint): the records of the first `pages` pages
    # are in the first `batches` batches (`records` of them) or counted in `failed_before` (no id,
    # repeated); a retry of the sync resumes at `next_url` ("" before the first page).
    next_url = models.TextField(blank=True)
    fetch_complete = models.BooleanField(default=False)
    records = models.PositiveIntegerField(default=0)
    failed_before = models.PositiveIntegerField(default=0)
    # Transient page failures retried in place (DATA_SYNC_PAGE_ATTEMPTS), over all attempts.
    page_retries = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-started_at"]

    def __str__(self) -> str:
        return f"{self.source} at {self.started_at:%Y-%m-%d %H:%M} ({self.status})"


class SyncedRecord(models.Model):
    # No index on `source` alone, and the unique index leads with external_id: a batch looks up
    # `external_id IN (...) AND source = x`. During a first bulk load PostgreSQL's statistics
    # still say the table is tiny; given an index that leads with `source` it scanned every row
    # of the source and filtered, for every batch (quadratic). This index is the only way in.
    source = models.ForeignKey(DataSource, on_delete=models.CASCADE, related_name="records", db_index=False)
    external_id = models.CharField(max_length=255)
    data = models.JSONField()
    # sha256 of the canonical JSON: an unchanged record is recognised without comparing JSON.
    checksum = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    changed_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["external_id", "source"], name="synced_record_unique_external_id")
        ]

    def __str__(self) -> str:
        return f"{self.source}:{self.external_id}"


class SyncExport(models.Model):
    """An incremental export: records changed in (since, until]."""

    source = models.ForeignKey(DataSource, on_delete=models.CASCADE, null=True, blank=True)
    since = models.DateTimeField(null=True, blank=True)
    until = models.DateTimeField()
    # Blank when nothing changed: no file is written, but the watermark still moves.
    path = models.CharField(max_length=500, blank=True)
    records = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-until"]

    def __str__(self) -> str:
        return self.path


# --- Analytics --------------------------------------------------------------------


class Event(models.Model):
    name = models.CharField(max_length=100)
    user_id = models.CharField(max_length=100, blank=True)
    properties = models.JSONField(default=dict, blank=True)
    timestamp = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["timestamp", "name"], name="event_time_name")]

    def __str__(self) -> str:
        return f"{self.name} at {self.timestamp:%Y-%m-%d %H:%M:%S}"


class EventBatch(models.Model):
    """A batch of events taken in by `analytics.ingest`, written in the same transaction as its events.

    A retry or a redelivery of the same batch (same key: the producer's batch key,
    else the task id) finds this row and inserts nothing.
    """

    key = models.CharField(max_length=255, unique=True)
    events = models.PositiveIntegerField()
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"{self.key} ({self.events} events)"


class DailyMetric(models.Model):
    day = models.DateField()
    event_name = models.CharField(max_length=100)
    count = models.PositiveBigIntegerField()
    distinct_users = models.PositiveBigIntegerField()
    computed_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-day", "event_name"]
        constraints = [models.UniqueConstraint(fields=["day", "event_name"], name="daily_metric_unique")]

    def __str__(self) -> str:
        return f"{self.day} {self.event_name}: {self.count}"
