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
