"""Monitoring's periodic tasks (queue `default`), scheduled by scheduling/defaults.py."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from django.db import OperationalError
from pydantic import BaseModel, ConfigDict
from redis.exceptions import RedisError

from config.celery_app import app
from monitoring import alerts, rollup
from tasks import quarantine
from tasks.base import JobTask, TransientJobError


class NoArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


@app.task(
    bind=True,
    base=JobTask,
    name="default.metrics_rollup",
    schema=NoArguments,
    autoretry_for=(TransientJobError, OperationalError, RedisError),
    max_attempts=3,
    idempotency="each minute's row is replaced by the minute's full counts; compaction is per hour, atomic; "
    "a quarantine entry is popped by one drain only",
)
def metrics_rollup(self: JobTask) -> dict[str, Any]:
    """Moves the per-minute counters from Redis into TaskMetric rows; compacts and prunes old rows.

    Also moves what the transport quarantined (the Redis list `jobs:quarantine:raw`) into
    QuarantinedMessage rows, so the admin lists it within a minute."""
    report = asdict(rollup.roll_up())
    report["quarantined"] = quarantine.drain_transport_quarantine()
    return report


@app.task(
    bind=True,
    base=JobTask,
    name="default.check_alerts",
    schema=NoArguments,
    autoretry_for=(TransientJobError, OperationalError),
    max_attempts=2,
    idempotency="an alert opens once per subject (unique while open); repeats are spaced by the rule",
)
def check_alerts(self: JobTask) -> dict[str, Any]:
    """Evaluates every alert rule; notifies what starts firing, keeps firing, or recovers."""
    return asdict(alerts.evaluate())
