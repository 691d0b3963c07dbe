"""Pausing and resuming queues across every worker (see jobs.worker for the worker side)."""

from __future__ import annotations

import logging

from django.conf import settings

from config.celery_app import app
from jobs.models import QueuePause

logger = logging.getLogger(__name__)


class UnknownQueue(Exception):
    pass


def check_queue(name: str) -> str:
    if name not in settings.TASK_QUEUES:
        raise UnknownQueue(f"unknown queue {name!r}; one of: {', '.join(settings.TASK_QUEUES)}")
    return name


def pause(name: str, by: str = "") -> bool:
    """Stops every worker taking from the queue (now, and those started later); True if newly paused."""
    _, created = QueuePause.objects.get_or_create(queue=check_queue(name), defaults={"paused_by": by[:150]})
    broadcast_pauses([name])
    if created:
        logger.warning("queue %s paused", name)
    return created


def resume(name: str) -> bool:
    """Lets the workers started with the queue take from it again; True if it was paused."""
    deleted, _ = QueuePause.objects.filter(queue=check_queue(name)).delete()
    try:
        app.control.broadcast("jobs_resume_queue", arguments={"queue": name})
    except Exception:
        logger.exception("could not tell the workers to resume %s", name)
    if deleted:
        logger.warning("queue %s resumed", name)
    return bool(deleted)


def broadcast_pauses(names: list[str] | None = None) -> None:
    """Tells every connected worker to stop consuming from the paused queues.

    Also run by `default.release_jobs` every few seconds, so a worker that missed a
    broadcast (it was reconnecting) catches up.
    """
    names = list(QueuePause.objects.values_list("queue", flat=True)) if names is None else names
    for name in names:
        try:
            app.control.cancel_consumer(name)
        except Exception:
            logger.exception("could not tell the workers to pause %s", name)


def paused() -> set[str]:
    return set(QueuePause.objects.values_list("queue", flat=True))
