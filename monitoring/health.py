"""Health endpoints for load balancers and orchestrators.

- `GET /healthz`: the web process is alive; touches no dependency.
- `GET /readyz`: the system can do its work: the database answers, the broker answers, every
  queue in settings.TASK_QUEUES has a worker consuming it, and a beat holds the schedule lease.
  200 when all pass, 503 otherwise.

Neither asks for authentication, so the answers name nothing but queue names and ok/failing: no
host or worker names, URLs or exception text. Why a check failed goes to the log instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connection, connections
from django.db.models.functions import Now
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from monitoring.broker import BROKER_TIMEOUT, broker_connection, inspect_workers
from scheduling.models import BeatLease

logger = logging.getLogger(__name__)

# The lease the dispatching beat holds (scheduling.lease.Lease's default name).
BEAT_LEASE_NAME = "beat"

CheckResult = dict[str, Any]  # {"status": "ok" | "failing", ...details safe to show anyone}


def check_database() -> CheckResult:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {"status": "ok"}


def check_broker() -> CheckResult:
    with broker_connection(BROKER_TIMEOUT):
        return {"status": "ok"}


def check_workers() -> CheckResult:
    view = inspect_workers(settings.METRICS_INSPECT_TIMEOUT)
    if view.failed:
        return {"status": "failing", "detail": "the workers could not be asked"}
    missing = view.queues_without_workers()
    if missing:
        return {"status": "failing", "queues_without_workers": missing}
    return {"status": "ok"}


def check_beat() -> CheckResult:
    # Expiry is compared with the database's clock, as the lease itself does (scheduling.lease).
    lease = BeatLease.objects.filter(name=BEAT_LEASE_NAME).values("holder", "expires_at", now=Now()).first()
    if lease is None:
        return {"status": "failing", "detail": "no beat has held the lease yet"}
    remaining = round((lease["expires_at"] - lease["now"]).total_seconds(), 1)
    if lease["holder"] and remaining > 0:
        return {"status": "ok", "lease_expires_in_seconds": remaining}
    return {"status": "failing", "lease_expired_seconds_ago": max(0.0, -remaining)}


CHECKS: dict[str, Callable[[], CheckResult]] = {
    "database": check_database,
    "broker": check_broker,
    "workers": check_workers,
    "beat": check_beat,
}


@never_cache
@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    checks = run_checks()
    ready = all(result["status"] == "ok" for result in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


def run_checks(timeout: float | None = None) -> dict[str, CheckResult]:
    """Runs every check at once, each in its own thread, and waits at most `timeout` seconds
    (default: the worker inspect's timeout plus two broker timeouts) for all of them."""
    if timeout is None:
        timeout = settings.METRICS_INSPECT_TIMEOUT + 2 * BROKER_TIMEOUT + 1
    results: dict[str, CheckResult] = {}
    threads = [
        threading.Thread(target=_run, args=(name, check, results), name=f"readyz-{name}", daemon=True)
        for name, check in CHECKS.items()
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    finished = dict(results)  # a check still running after the deadline writes here unread
    for name in CHECKS:
        if name not in finished:
            logger.warning("readiness check %s: no answer within %g s", name, timeout)
    return {name: finished.get(name, {"status": "failing", "detail": "timed out"}) for name in CHECKS}


def _run(name: str, check: Callable[[], CheckResult], results: dict[str, CheckResult]) -> None:
    try:
        results[name] = check()
    except Exception:  # the reason is logged, never shown: these answers are public
        logger.warning("readiness check %s failed", name, exc_info=True)
        results[name] = {"status": "failing"}
    finally:
        connections.close_all()  # this thread's own database connections; they would linger otherwise
