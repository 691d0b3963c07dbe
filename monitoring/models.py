"""Task metrics per minute (the last day) and per hour (up to METRICS_RETENTION_DAYS)."""

from __future__ import annotations

from django.db import models

from monitoring import metrics


class TaskMetric(models.Model):
    """Counts and histograms of one task name on one queue over one minute or hour.

    Histogram buckets are columns (`rt_0` … `wt_14`, bounds in monitoring.metrics.BUCKETS)
    so a window's percentiles come from one SUM … GROUP BY in the database.
    """

    class Resolution(models.IntegerChoices):
        MINUTE = 60, "minute"
        HOUR = 3600, "hour"

    period_start = models.DateTimeField()
    resolution = models.PositiveIntegerField(choices=Resolution.choices, default=Resolution.MINUTE)
    task = models.CharField(max_length=200)
    queue = models.CharField(max_length=100)

    sent = models.PositiveBigIntegerField(default=0)
    succeeded = models.PositiveBigIntegerField(default=0)
    failed = models.PositiveBigIntegerField(default=0)
    retried = models.PositiveBigIntegerField(default=0)
    revoked = models.PositiveBigIntegerField(default=0)
    rejected = models.PositiveBigIntegerField(default=0)
    rt_sum = models.PositiveBigIntegerField(default=0, help_text="run time, microseconds")
    wt_sum = models.PositiveBigIntegerField(default=0, help_text="queue wait, microseconds")
    # Exception type name -> count, of failures and retries.
    exceptions = models.JSONField(default=dict, blank=True)

    # rt_0 … rt_14 and wt_0 … wt_14: one column per histogram bucket.
    for _histogram in metrics.HISTOGRAMS:
        for _index in range(len(metrics.BUCKETS)):
            locals()[f"{_histogram}_{_index}"] = models.PositiveBigIntegerField(default=0)
    del _histogram, _index

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["period_start", "resolution", "task", "queue"], name="task_metric_unique_period"
            )
        ]
        indexes = [models.Index(fields=["period_start", "resolution"], name="task_metric_period")]

    def __str__(self) -> str:
        return f"{self.task} on {self.queue} at {self.period_start:%Y-%m-%d %H:%M}"


def bucket_columns(histogram: str) -> list[str]:
    return [f"{histogram}_{index}" for index in range(len(metrics.BUCKETS))]


COUNT_COLUMNS = [*metrics.OUTCOMES, "rt_sum", "wt_sum", *bucket_columns("rt"), *bucket_columns("wt")]


class AlertRule(models.Model):
    """One kind of trouble to watch for; created from settings, then edited in the admin."""

    class Kind(models.TextChoices):
        FAILURE_RATE = "failure_rate", "failure rate of a task (%)"
        QUEUE_WAIT = "queue_wait_p95", "p95 queue wait of a queue (ms)"
        BACKLOG = "backlog", "messages waiting in a queue"
        NO_WORKER = "no_worker", "no worker consuming a queue"
        MISSED_RUN = "missed_run", "a periodic task missed its run"
        DEAD_LETTERS = "dead_letters", "new dead letters"

    kind = models.CharField(max_length=30, choices=Kind.choices, unique=True)
    enabled = models.BooleanField(default=True)
    threshold = models.FloatField(
        default=0, help_text="fires above this value (failure rate %, wait ms, messages, dead letters)"
    )
    window_minutes = models.PositiveIntegerField(default=15, help_text="the window rates are computed over")
    min_runs = models.PositiveIntegerField(
        default=20, help_text="rates and percentiles of fewer runs than this are not judged"
    )
    repeat_minutes = models.PositiveIntegerField(
        default=60, help_text="while it stays firing, notify again at most this often"
    )

    class Meta:
        ordering = ["kind"]

    def __str__(self) -> str:
        return self.get_kind_display()


class Alert(models.Model):
    """One firing of a rule for one subject (a task, a queue, a schedule), until it recovers."""

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    subject = models.CharField(max_length=200)
    value = models.FloatField(null=True, blank=True)
    message = models.TextField()
    started_at = models.DateTimeField()
    last_notified_at = models.DateTimeField()
    notifications = models.PositiveIntegerField(default=1)
    resolved_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-started_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["rule", "subject"],
                condition=models.Q(resolved_at=None),
                name="one_open_alert_per_subject",
            )
        ]

    def __str__(self) -> str:
        return f"{self.rule}: {self.subject}"

    @property
    def firing(self) -> bool:
        return self.resolved_at is None


class WorkerPresence(models.Model):
    """A worker as it reports itself every MONITORING_WORKER_HEARTBEAT_SECONDS (monitoring.heartbeat).

    One row per node name, written by the worker's main process: the queues it consumes now and
    the messages it holds. A row not written for three beats is a worker gone (killed, frozen, cut
    off from the database); a warm shutdown deletes its own row. The times are the database's clock,
    so workers on other machines are judged by the same clock.
    """

    node = models.CharField(max_length=255, unique=True, help_text="name@host, as Celery names it")
    pid = models.PositiveIntegerField()
    queues = models.JSONField(default=list, help_text="the queues it consumes now (a paused one is not)")
    # {queue: {"active": n, "reserved": n, "scheduled": n}}: messages of each queue the worker holds.
    held = models.JSONField(default=dict)
    started_at = models.DateTimeField()
    last_seen = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["node"]
        verbose_name_plural = "worker presences"

    def __str__(self) -> str:
        return self.node
