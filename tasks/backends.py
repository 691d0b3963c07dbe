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
from jobs.protocol import JOB_HEADER, PARENT_HEADER
from tasks.reliability import DATABASE_ERRORS, describe, in_worker, is_outage

logger = logging.getLogger(__name__)


def _header(request: Any, name: str) -> str | None:
    if request is None:
        return None
    value = getattr(request, name, None) or (getattr(request, "headers", None) or {}).get(name)
    return str(value) if value else None


def _job_of(request: Any) -> str | None:
    return _header(request, JOB_HEADER)


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
                parent_id = _header(request, PARENT_HEADER)
                if state == states.SUCCESS:
                    task = self.app.tasks.get(getattr(request, "task", None) or "")
                    partial = getattr(task, "partially_failed_because", None)
                    tracking.succeeded(
                        job_id,
                        task_id,
                        result,
                        spawned=bool(getattr(request, "spawned_children", False)),
                        partial=partial(result) if partial else None,
                        parent_id=parent_id,
                    )
                else:
                    tracking.failed(job_id, task_id, result, parent_id=parent_id)
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
