"""A worker's database connection: kept from one task to the next, as Django keeps it between requests.

Celery's Django fixup closes every database connection before and after each task unless
CELERY_DB_REUSE_MAX is set (celery/fixups/django.py), so CONN_MAX_AGE never applied in workers: each
job opened a PostgreSQL connection of its own. The settings set CELERY_DB_REUSE_MAX (the fixup then
closes them only every that many tasks), and this module does what Django does around a request:
`close_old_connections()` when a task starts and when it ends. A connection past CONN_MAX_AGE, or
left unusable by an error, is closed there.

With CONN_HEALTH_CHECKS, Django has a kept connection answer `SELECT 1` before the first query of
each request, so one the database dropped (a restart, a failover, terminated sessions) is replaced
instead of failing the request. A worker's tasks follow each other closely: a connection that served
the previous task less than `TRUSTED_FOR` seconds ago is not asked again (the `SELECT 1` was a
round trip on every job, a sixth of a short job's database time). The first statement of a task,
its claim, goes through `claiming()`: should that connection turn out to have been dropped in the
meantime, it is replaced and the claim sent again, once, as the health check would have done (as a
redelivery's claim, which may find the row running from its own first try). A
database that does not answer at all is then an outage as before (tasks.reliability).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery.signals import task_postrun, task_prerun
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, close_old_connections, connections

T = TypeVar("T")

# Seconds after a task ended during which its connection is trusted by the next task without a check.
TRUSTED_FOR = 1.0
_ENDED_AT = "_jobs_task_ended_at"  # on each connection wrapper (one per thread, as Django's)
_TRUSTED = "_jobs_trusted_unchecked"


def _eager(sender: Any) -> bool:
    # Run in the caller's process: its connection, its business.
    return bool(getattr(getattr(sender, "request", None), "is_eager", False))


def _task_starts(sender: Any = None, **kwargs: Any) -> None:
    if _eager(sender):
        return
    now = time.monotonic()
    for conn in connections.all(initialized_only=True):
        recent = now - getattr(conn, _ENDED_AT, -TRUSTED_FOR) < TRUSTED_FOR
        conn.close_if_unusable_or_obsolete()  # past CONN_MAX_AGE, left by an error: closed, as Django does
        trusted = recent and conn.connection is not None
        if trusted:  # no SELECT 1 before its next query
            conn.health_check_done = True  # type: ignore[attr-defined]
        setattr(conn, _TRUSTED, trusted)


def _task_ends(sender: Any = None, **kwargs: Any) -> None:
    if _eager(sender):
        return
    close_old_connections()
    now = time.monotonic()
    for conn in connections.all(initialized_only=True):
        setattr(conn, _ENDED_AT, now if conn.connection is not None else -TRUSTED_FOR)


def claiming(write: Callable[[bool], T]) -> T:
    """`write(False)`, the task's first statement. When the kept connection, trusted without a health
    check, turns out to have been dropped by the database, `write(True)` on a new one: True says the
    first may have reached the database before it went (a crash in mid-statement), so the row may
    already hold this delivery's own claim."""
    conn = connections[DEFAULT_DB_ALIAS]
    try:
        return write(False)
    except (OperationalError, InterfaceError):
        if not getattr(conn, _TRUSTED, False) or conn.in_atomic_block:
            raise
        setattr(conn, _TRUSTED, False)
        conn.close()  # what the health check would have done; the next statement opens a new one
        return write(True)
    finally:
        setattr(conn, _TRUSTED, False)


task_prerun.connect(_task_starts, weak=False, dispatch_uid="jobs.connections.prerun")
task_postrun.connect(_task_ends, weak=False, dispatch_uid="jobs.connections.postrun")
