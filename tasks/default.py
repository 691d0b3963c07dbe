"""Tasks for the `default` queue."""

from __future__ import annotations

from django.utils import timezone
from pydantic import BaseModel, ConfigDict

from config.celery_app import app
from tasks.base import JobTask


class PingSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")


@app.task(
    name="default.ping",
    bind=True,
    base=JobTask,
    schema=PingSchema,
    ignore_result=False,
    idempotency="no side effects",
)
def ping(self: JobTask) -> dict[str, str]:
    """Proves the wiring end to end: broker, routing, a worker, the result backend.

    Answers with the node that ran it (`general@host`). Idempotent: no side effects.
    """
    return {"pong": self.request.hostname or "", "at": timezone.now().isoformat()}
