"""The result backend: django-celery-results' database backend, outage-aware in workers.

When a worker cannot write a task's state because the database is away, the message is
sent again for later (tasks.reliability.defer_for_outage) instead of being acknowledged
with its outcome lost. Anywhere else (web, shell) errors are raised as before.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states
from celery._state import get_current_task
from django_celery_results.backends.database import DatabaseBackend as _DatabaseBackend

from tasks.reliability import DATABASE_ERRORS, describe, in_worker, is_outage

logger = logging.getLogger(__name__)


class DatabaseBackend(_DatabaseBackend):
    def store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        try:
            return super().store_result(task_id, result, state, traceback, request, **kwargs)
        except DATABASE_ERRORS as exc:
            task = get_current_task()
            defer = getattr(task, "defer_for_outage", None)
            if not (defer and task.request is request and in_worker(request) and is_outage(exc)):
                raise
            if state == states.RETRY:
                # The retry's message is already with the broker: it carries the job on.
                logger.info("%s[%s]: retry not recorded (%s)", task_id, state, describe(exc))
                return result
            defer(exc)
            return result
