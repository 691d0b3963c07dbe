"""Tasks for the `default` queue."""

from __future__ import annotations

from celery import Task
from django.utils import timezone

from config.celery_app import app


@app.task(name="default.ping", bind=True, ignore_result=False)
def ping(self: Task) -> dict[str, str]:
    """Proves the wiring end to end: broker, routing, a worker, the result backend.

    Answers with the node that ran it (`general@host`). Idempotent: no side effects.
    """
    return {"pong": self.request.hostname or "", "at": timezone.now().isoformat()}
