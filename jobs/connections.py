"""A worker's database connection: kept from one task to the next, as Django keeps it between requests.

Celery's Django fixup closes every database connection before and after each task unless
CELERY_DB_REUSE_MAX is set (celery/fixups/django.py), so CONN_MAX_AGE never applied in workers: each
job opened a PostgreSQL connection of its own. The settings set CELERY_DB_REUSE_MAX (the fixup then
closes them only every that many tasks), and this module does what Django does around a request:
`close_old_connections()` when a task starts and when it ends. A connection past CONN_MAX_AGE, or
left unusable by an error, is closed there; with CONN_HEALTH_CHECKS a kept connection answers
`SELECT 1` before the first query of each task, so one the database dropped (a restart, a failover,
terminated sessions) is replaced by a new one instead of failing the task's claim. A database that
does not answer at all is then an outage as before (tasks.reliability).
"""

from __future__ import annotations

from typing import Any

from celery.signals import task_postrun, task_prerun
from django.db import close_old_connections


def _tidy_connections(sender: Any = None, **kwargs: Any) -> None:
    request = getattr(sender, "request", None)
    if getattr(request, "is_eager", False):  # run in the caller's process: its connection, its business
        return
    close_old_connections()


task_prerun.connect(_tidy_connections, weak=False, dispatch_uid="jobs.connections.prerun")
task_postrun.connect(_tidy_connections, weak=False, dispatch_uid="jobs.connections.postrun")
