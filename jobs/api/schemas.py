"""Response bodies of the API (request bodies: jobs.registry)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from ninja import Schema
from pydantic import Field


class Error(Schema):
    detail: str = Field(description="What was wrong, for a person to read.")
    errors: list[dict[str, str]] = Field(
        default_factory=list, description="For 400: one `{field, message}` per bad field."
    )


class Progress(Schema):
    percent: float = Field(ge=0, le=100)
    message: str = ""


class JobError(Schema):
    type: str
    message: str


class ChildrenOut(Schema):
    total: int
    final: int = Field(description="How many are final (succeeded, partially_failed, failed, cancelled).")
    counts: dict[str, int] = Field(description="How many are in each status.")


class DependenciesOut(Schema):
    total: int
    counts: dict[str, int] = Field(description="How many of the jobs waited for are in each status.")
    run_after: str = Field(
        description="`success`: runs once they all succeeded (`depends_on`); `completion`: once they "
        "are all final, whatever the outcome (a batch's callback)."
    )


class JobOut(Schema):
    id: UUID
    type: str
    queue: str
    status: str = Field(
        description="waiting, queued, scheduled, running, retrying (not final); succeeded, "
        "partially_failed, failed or cancelled (final). A job with children is final only once they are."
    )
    priority: int | None
    progress: Progress
    attempts: int
    result: Any = None
    error: JobError | None
    created_at: datetime
    run_at: datetime | None = Field(description="For a delayed job: when it is due.")
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None = Field(
        default=None,
        description="When a cancel reached the job while it ran. It stays `running` until its worker says "
        "how the run ended: `cancelled` when it was stopped, or the outcome it reached first.",
    )
    parent: UUID | None = Field(default=None, description="The job whose task spawned this one.")
    children: ChildrenOut | None = Field(
        default=None, description="The jobs this one spawned, per status (GET /api/jobs/{id}/children)."
    )
    depends_on: DependenciesOut | None = Field(default=None, description="The jobs this one waits for.")


class JobPage(Schema):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class BatchEntry(Schema):
    index: int
    accepted: bool
    status_code: int = Field(description="202 queued, 200 same idempotency key, 400 invalid, 409 key reused")
    job: JobOut | None = None
    error: Error | None = None


class BatchOut(Schema):
    accepted: int
    refused: int
    results: list[BatchEntry]
    callback: BatchEntry | None = Field(
        default=None, description="The batch's callback job, when the request named one."
    )


class QueueOut(Schema):
    name: str
    depth: int | None = Field(description="Messages waiting in the broker (null: broker unreachable).")
    unacked: int | None = Field(description="Delivered to a worker, not yet acknowledged (Redis only).")
    scheduled: int = Field(
        description="Jobs held for later: ETA messages at workers + delayed jobs held here."
    )
    reserved: int
    active: int
    workers: list[str]
    paused: bool


class QueuesOut(Schema):
    queues: list[QueueOut]
    broker_error: str | None = None
    workers_unanswered: bool = Field(
        description="True when no worker has reported itself (each does every few seconds)."
    )
    priorities_ordered: bool = Field(
        description="True when the broker runs each queue's backlog highest priority first (Redis; "
        "RabbitMQ classic queues). False on RabbitMQ quorum queues (the default there): a job's "
        "`priority` is accepted, recorded and sent, but RabbitMQ 3.10 does not order by it."
    )
    broker: str = Field(description="`redis` or `rabbitmq`.")
    queue_type: str | None = Field(
        default=None, description="RabbitMQ: `quorum` or `classic` (RABBITMQ_QUEUE_TYPE); Redis: null."
    )


class Latency(Schema):
    p50_ms: float | None
    p95_ms: float | None


class QueueStatsOut(Schema):
    queue: str
    since: datetime
    until: datetime
    succeeded: int
    failed: int
    retried: int
    throughput_per_minute: float
    failure_rate: float | None
    wait: Latency
    run: Latency


class DeadLetterOut(Schema):
    id: int
    task_id: str
    task_name: str
    queue: str
    exception_type: str
    exception_message: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    replay_count: int
    replay_status: str


class DeadLetterDetail(DeadLetterOut):
    args: list[Any]
    kwargs: dict[str, Any]
    traceback: str


class DeadLetterPage(Schema):
    items: list[DeadLetterOut]
    next_cursor: str | None


class ReplayOut(Schema):
    dead_letter: int
    task_id: str
