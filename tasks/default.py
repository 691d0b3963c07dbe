"""Tasks for the `default` queue."""

from __future__ import annotations

import socket

from django.utils import timezone

from config.celery_app import app


@app.task(name="default.ping", ignore_result=False)
def ping() -> dict[str, str]:
    """Proves the wiring end to end: broker, routing, a worker, the result backend.

    Idempotent: it has no side effects.
    """
    return {"pong": socket.gethostname(), "at": timezone.now().isoformat()}
