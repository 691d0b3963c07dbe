"""/api/queues: depth, workers, pause state, statistics; pause and resume (staff)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from django.conf import settings
from django.db.models import Count
from django.http import HttpRequest
from django.utils import timezone
from ninja import Query, Router, Schema
from pydantic import Field

from jobs import queues
from jobs.api import access
from jobs.api.auth import StaffTokenAuth, token_of
from jobs.api.common import AUTH_ERRORS, STAFF_ERRORS, STAFF_ONLY, ApiError
from jobs.api.schemas import Error, QueuesOut, QueueStatsOut
from jobs.models import Job
from monitoring import presence, stats
from monitoring.stats import window_stats

router = Router(tags=["queues"])

# The metrics page's windows, and a short one for a client watching a deploy.
WINDOWS = {"5m": timedelta(minutes=5), **stats.WINDOWS}


def _queue(name: str) -> str:
    try:
        return queues.check_queue(name)
    except queues.UnknownQueue as exc:
        raise ApiError(404, str(exc)) from None


@router.get(
    "", response={200: QueuesOut, **AUTH_ERRORS}, summary="Every queue: depth, scheduled, workers, paused"
)
def list_queues(request: HttpRequest) -> dict[str, Any]:
    """Every token sees every queue (the service's state, not anyone's jobs); worker names are
    host names, so tokens of non-staff users get `worker-1`, `worker-2`, ... in their place."""
    staff = access.is_staff(token_of(request))
    # Depths from the broker, workers as they last reported themselves: no broadcast, milliseconds.
    live = presence.live_queues()
    held = dict(
        Job.objects.filter(published_at__isnull=True, status=Job.Status.SCHEDULED)
        .values_list("queue")
        .annotate(n=Count("id"))
    )
    paused = queues.paused()
    every_worker = sorted({name for row in live["rows"] for name in row["held"].workers})
    label = {name: name if staff else f"worker-{n}" for n, name in enumerate(every_worker, start=1)}
    items = []
    for row in live["rows"]:
        depth, workers, name = row["depth"], row["held"], row["name"]
        items.append(
            {
                "name": name,
                "depth": None if depth is None else depth.ready,
                "unacked": None if depth is None else depth.unacked,
                "scheduled": workers.scheduled + held.get(name, 0),
                "reserved": workers.reserved,
                "active": workers.active,
                "workers": [label[worker] for worker in workers.workers],
                "paused": name in paused,
            }
        )
    # Not the broker's error text: it names the broker's address.
    broker_error = "the broker did not answer" if live["depth_error"] else None
    rabbitmq = not settings.BROKER_IS_REDIS
    return {
        "queues": items,
        "broker_error": broker_error,
        "workers_unanswered": not live["workers"],
        "priorities_ordered": settings.BROKER_ORDERS_BY_PRIORITY,
        "broker": "rabbitmq" if rabbitmq else "redis",
        "queue_type": settings.RABBITMQ_QUEUE_TYPE if rabbitmq else None,
    }


class StatsQuery(Schema):
    window: Literal["5m", "1h", "24h", "7d"] = Field(default="1h", description="How far back to look.")


@router.get(
    "/{name}/stats",
    response={200: QueueStatsOut, 404: Error, 400: Error, **AUTH_ERRORS},
    summary="Throughput, failures, wait and run time",
)
def queue_stats(request: HttpRequest, name: str, query: Query[StatsQuery]) -> dict[str, Any]:
    token_of(request)
    name = _queue(name)
    until = timezone.now()
    since = until - WINDOWS[query.window]
    stats = window_stats(since, until, bins=1, queue=name)
    series = stats.total

    def ms(histogram: str, q: float) -> float | None:
        value = series.percentile(histogram, q)
        return None if value is None else round(value * 1000, 1)

    return {
        "queue": name,
        "since": since,
        "until": until,
        "succeeded": series.counts.get("succeeded", 0),
        "failed": series.counts.get("failed", 0),
        "retried": series.counts.get("retried", 0),
        "throughput_per_minute": round(stats.per_minute(series), 3),
        "failure_rate": series.failure_rate,
        "wait": {"p50_ms": ms("wt", 0.5), "p95_ms": ms("wt", 0.95)},
        "run": {"p50_ms": ms("rt", 0.5), "p95_ms": ms("rt", 0.95)},
    }


class PauseOut(Schema):
    name: str
    paused: bool
    changed: bool


@router.post(
    "/{name}/pause",
    auth=StaffTokenAuth(),
    response={200: PauseOut, 404: Error, **STAFF_ERRORS},
    summary="Stop every worker taking from the queue (staff)",
    openapi_extra=STAFF_ONLY,
)
def pause_queue(request: HttpRequest, name: str) -> dict[str, Any]:
    token = token_of(request)
    changed = queues.pause(_queue(name), by=token.user.get_username())
    return {"name": name, "paused": True, "changed": changed}


@router.post(
    "/{name}/resume",
    auth=StaffTokenAuth(),
    response={200: PauseOut, 404: Error, **STAFF_ERRORS},
    summary="Let workers take from the queue again (staff)",
    openapi_extra=STAFF_ONLY,
)
def resume_queue(request: HttpRequest, name: str) -> dict[str, Any]:
    changed = queues.resume(_queue(name))
    return {"name": name, "paused": False, "changed": changed}
