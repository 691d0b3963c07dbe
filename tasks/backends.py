"""The result backend: django-celery-results' database backend, with the job's record.

- A task's final state (success or failure) and its job's row are written in one
  transaction: a pool process killed after the result was stored cannot leave the row
  `running` (Celery then acknowledges the message as "succeeded before the worker was lost").
- When a worker cannot write a task's state because the database is away, the message is
  sent again for later (tasks.reliability.defer_for_outage) instead of being acknowledged
  with its outcome lost. Anywhere else (web, shell) errors are raised as before.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import states
from celery._state import get_current_task
from django.db import transaction
from django_celery_results.backends.database import DatabaseBackend as _DatabaseBackend

from jobs import tracking
from jobs.protocol import JOB_HEADER
from tasks.reliability import DATABASE_ERRORS, describe, in_worker, is_outage

logger = logging.getLogger(__name__)


def _job_of(request: Any) -> str | None:
    if request is None:
        return None
    job_id = getattr(request, JOB_HEADER, None) or (getattr(request, "headers", None) or {}).get(JOB_HEADER)
    return str(job_id) if job_id else None


class DatabaseBackend(_DatabaseBackend):
    def store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        try:
            job_id = _job_of(request) if state in (states.SUCCESS, states.FAILURE) else None
            if job_id is None:
                return super().store_result(task_id, result, state, traceback, request, **kwargs)
            with transaction.atomic():
                stored = super().store_result(task_id, result, state, traceback, request, **kwargs)
                if state == states.SUCCESS:
                    tracking.succeeded(job_id, task_id, result)
                else:
                    tracking.failed(job_id, task_id, result)
            return stored
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
