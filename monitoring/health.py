"""Health endpoints for load balancers and orchestrators.

- `GET /healthz`: the web process is alive; touches no dependency.
- `GET /readyz`: the system can do its work: the database answers, the broker answers, every
  queue in settings.TASK_QUEUES has a worker consuming it (as the workers report themselves:
  monitoring.presence), and a beat holds the schedule lease. 200 when all pass, 503 otherwise.

`/readyz` never checks anything itself: each web process refreshes the checks in threads of its
own every READYZ_REFRESH_SECONDS while it is asked (monitoring.refresher), one for the database
side and one for the broker, so a dead or frozen dependency holds only its thread; a request
answers the last results at once, each with its age. A result older than `stale_after()`
counts as failing. However often anonymous callers ask, a process checks once per interval.

Neither asks for authentication, so the answers name nothing but queue names and ok/failing: no
host or worker names, URLs or exception text. Why a check failed goes to the log instead.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import connection, connections
from django.db.models.functions import Now
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from monitoring import presence
from monitoring.broker import BROKER_TIMEOUT, broker_connection
from monitoring.refresher import Refresher
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
    missing = presence.worker_view().queues_without_workers()
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


def database_side() -> dict[str, CheckResult]:
    """The database's checks, over one connection: the database itself, the workers' presence
    and the beat's lease (both rows in it). Never raises."""
    try:
        results = {"database": _run("database", check_database)}
        if results["database"]["status"] == "ok":
            results["workers"] = _run("workers", check_workers)
            results["beat"] = _run("beat", check_beat)
        else:
            results["workers"] = results["beat"] = {"status": "failing", "detail": "no database"}
        return results
    finally:
        connections.close_all()  # this thread's connection; each refresh starts afresh


def broker_side() -> dict[str, CheckResult]:
    return {"broker": _run("broker", check_broker)}


# Checks whose last run raised: each outage is logged once when it starts and once when it ends,
# not at every refresh.
_failing: set[str] = set()


def _run(name: str, check: Any) -> CheckResult:
    try:
        result: CheckResult = check()
    except Exception:  # the reason is logged, never shown: these answers are public
        if name not in _failing:
            logger.warning("readiness check %s failed", name, exc_info=True)
        _failing.add(name)
        return {"status": "failing"}
    if name in _failing:
        logger.warning("readiness check %s answers again", name)
        _failing.discard(name)
    return result


def _every() -> float:
    return float(settings.READYZ_REFRESH_SECONDS)


REFRESHERS = (
    (("database", "workers", "beat"), Refresher("readyz-database", database_side, _every)),
    (("broker",), Refresher("readyz-broker", broker_side, _every)),
)
# A request that finds the refresh threads not running (the first since start-up, or after a
# minute nobody asked) waits this long at most for their first results.
FIRST_ANSWER_WAIT = 0.5


def stale_after() -> float:
    """Results older than this count as failing: three refreshes missed, and a broker timeout."""
    return 3 * _every() + BROKER_TIMEOUT


@never_cache
@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    checks = current_checks()
    ready = all(result["status"] == "ok" for result in checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503
    )


def current_checks(wait: float | None = None) -> dict[str, CheckResult]:
    """The last results of every check, each with `checked_seconds_ago`; never waits, except
    (up to `wait` seconds, default FIRST_ANSWER_WAIT) for the first results of threads it starts."""
    wait = FIRST_ANSWER_WAIT if wait is None else wait
    for _, refresher in REFRESHERS:
        refresher.latest()  # starts every thread before waiting for any
    checks: dict[str, CheckResult] = {}
    for names, refresher in REFRESHERS:
        results, age = refresher.latest(wait)
        age = None if age is None else round(age, 1)
        for name in names:
            # Nothing is logged here: anonymous callers must not be able to flood the log.
            if results is None or age is None:
                checks[name] = {"status": "failing", "detail": "not checked yet"}
            elif age > stale_after():  # the check hangs (a frozen dependency past its timeouts)
                checks[name] = {"status": "failing", "detail": "no recent result", "checked_seconds_ago": age}
            else:
                checks[name] = {**results[name], "checked_seconds_ago": age}
    return {name: checks[name] for name in ("database", "broker", "workers", "beat")}


def stop_refreshing() -> None:
    """Stops this process's refresh threads and forgets their results (tests start afresh)."""
    for _, refresher in REFRESHERS:
        refresher.stop()
