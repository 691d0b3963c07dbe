"""Which workers are there, and what they consume and hold, as they last reported it.

Read from the WorkerPresence rows the workers write (monitoring.heartbeat): one query, no
broadcast, so any page, API call or health check may ask. A worker counts while its row was
written within the last three heartbeats, by the database's clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models.functions import Now

from monitoring.broker import BrokerError, QueueDepth, QueueWorkers, WorkerView, queue_depths
from monitoring.models import WorkerPresence

# Heartbeats a worker may miss before it counts as gone.
MISSED_BEATS = 3


def lapse() -> timedelta:
    """How long a worker stays present after its last heartbeat."""
    return timedelta(seconds=MISSED_BEATS * settings.MONITORING_WORKER_HEARTBEAT_SECONDS)


def present_workers() -> list[WorkerPresence]:
    """Every worker seen within the lapse, by node name."""
    return list(WorkerPresence.objects.filter(last_seen__gte=Now() - lapse()).order_by("node"))


def worker_view(queues: Iterable[str] | None = None) -> WorkerView:
    """Per queue (default: settings.TASK_QUEUES, plus any other a worker consumes or holds): the
    present workers consuming it and the messages they hold."""
    names = list(settings.TASK_QUEUES if queues is None else queues)
    consumers: dict[str, set[str]] = {name: set() for name in names}
    held: dict[str, Counter[str]] = {}
    workers = present_workers()
    for worker in workers:
        for queue in worker.queues:
            consumers.setdefault(queue, set()).add(worker.node)
        for queue, kinds in worker.held.items():
            held.setdefault(queue, Counter()).update(kinds)
    every_queue = list(dict.fromkeys([*consumers, *held]))
    return WorkerView(
        queues={
            name: QueueWorkers(
                workers=tuple(sorted(consumers.get(name, ()))),
                active=held.get(name, Counter())["active"],
                reserved=held.get(name, Counter())["reserved"],
                scheduled=held.get(name, Counter())["scheduled"],
            )
            for name in every_queue
        },
        workers=tuple(worker.node for worker in workers),
    )


def live_queues() -> dict[str, Any]:
    """Depth of every queue (from the broker, bounded by its timeout) and who consumes it (from
    the workers' presence), never raising for the broker."""
    depths: dict[str, QueueDepth] = {}
    depth_error = ""
    try:
        depths = queue_depths()
    except BrokerError as exc:
        depth_error = str(exc)
    view = worker_view()
    rows = []
    for name in settings.TASK_QUEUES:
        held = view.queues.get(name, QueueWorkers())
        rows.append({"name": name, "depth": depths.get(name), "held": held, "workers": held.workers})
    return {"rows": rows, "depth_error": depth_error, "worker_errors": view.errors, "workers": view.workers}
