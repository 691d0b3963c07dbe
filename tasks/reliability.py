"""A message is acknowledged only once its outcome is in the database.

The database holds every job's record (claim, result, dead letter); the broker only
delivers. While the database is away, workers take nothing new (jobs.gate). A message that
was already taken when the outage began, and whose claim, result, or dead letter cannot be
written, is sent again to its queue (same task id, same attempt, same headers) by the
process running it, before this delivery is acknowledged; it runs once the database
answers. A database error is treated as an outage only when a fresh connection cannot run
`SELECT 1` either: a task's own bad query is its own failure, not an outage.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

from jobs.gate import DATABASE_ERRORS, database_reachable
from jobs.protocol import DEFERRED_HEADER

__all__ = ["DATABASE_ERRORS", "defer_for_outage", "describe", "in_worker", "is_outage"]

logger = logging.getLogger(__name__)


def in_worker(request: Any) -> bool:
    """True for a task run by a worker from a message (not called directly, not eager)."""
    return request is not None and not request.called_directly and not getattr(request, "is_eager", False)


def is_outage(exc: BaseException) -> bool:
    """A database error that comes from the database being away (not from the query itself)."""
    if not isinstance(exc, DATABASE_ERRORS):
        return False
    # The failed connection is no use to the next task either.
    with contextlib.suppress(Exception):  # closing a dead connection may fail; it is gone either way
        connections[DEFAULT_DB_ALIAS].close()
    return not database_reachable(timeout=settings.JOBS_DATABASE_PROBE_TIMEOUT_SECONDS)


def describe(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line[:200]}"


def defer_for_outage(task: Any, exc: BaseException, carried_headers: dict[str, Any]) -> None:
    """Sends the current message again (same id, attempt and headers), once per delivery.

    Raises the original error when the copy cannot be sent either (the broker is away too):
    then nothing better than Celery's own handling is possible.
    """
    request = task.request
    if getattr(request, "_deferred", False):
        return
    deferred = int(carried_headers.get(DEFERRED_HEADER) or 0) + 1
    headers = {**carried_headers, DEFERRED_HEADER: deferred}
    countdown = min(float(settings.JOBS_DATABASE_PROBE_SECONDS) * deferred, 30.0)
    signature = task.signature_from_request(request, countdown=countdown, headers=headers)
    try:
        signature.apply_async()
    except Exception:
        logger.exception("%s[%s]: database away, and the broker refused the copy", task.name, request.id)
        raise exc from None
    request._deferred = True
    logger.info(
        "%s[%s]: database unreachable (%s); message sent again for %.0f s from now",
        task.name,
        request.id,
        describe(exc),
        countdown,
    )
