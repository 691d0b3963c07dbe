"""The jobs app's periodic task (queue `default`)."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

from config.celery_app import app
from jobs import queues, reconcile, services, tree
from tasks import dead_lettered
from tasks.base import JobTask

logger = logging.getLogger(__name__)


class ReleaseSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")


@app.task(
    bind=True,
    base=JobTask,
    name="default.release_jobs",
    schema=ReleaseSchema,
    idempotency="a job is published only while its row says unpublished; a duplicate message is "
    "skipped by the job claim",
)
def release_jobs(self: JobTask) -> dict[str, Any]:
    """Publishes delayed jobs that are due (or within the broker's safe delay) and jobs whose
    publish was interrupted; sends again jobs whose message the broker lost (jobs.reconcile);
    settles parents and waiting jobs a crash left unsettled (jobs.tree.sweep); re-sends queue
    pauses to workers that may have missed them; on RabbitMQ with quorum queues, records what
    RabbitMQ dead-lettered as dead letters (tasks.dead_lettered)."""
    released = services.release_due()
    # Finished first: a running job whose outcome is stored has no message left, and is not lost.
    finished = reconcile.finish_from_results() + reconcile.finish_cancel_requests()
    resent = reconcile.resend_lost()
    # Parents whose last child's worker died before settling them; jobs waiting on finished ones.
    settled = tree.sweep()
    queues.broadcast_pauses()
    try:
        dead = dead_lettered.drain()
    except Exception:  # the rest of this run's work stands; the next run drains again
        logger.exception("could not drain RabbitMQ's dead-letter queue")
        dead = 0
    return {"released": released, "resent": resent, "finished": finished, "settled": settled, "dead": dead}
