"""The result backend: django-celery-results' database backend, with the job's record.

- A task's final state (success or failure) and its job's row are written in one
  transaction: a pool process killed after the result was stored cannot leave the row
  `running` (Celery then acknowledges the message as "succeeded before the worker was lost").
- When a worker cannot write a task's state because the database is away, the message is
  sent again for later (tasks.reliability.defer_for_outage) instead of being acknowledged
  with its outcome lost. Anywhere else (web, shell) errors are raised as before.
- A task that has a job's row (every JobTask run by a worker: the `x_job_id` header, or the row its
  claim just made) is recorded once per state change, in that row: `running` by its claim
  (JobTask does not store STARTED), `retrying` by JobTask.on_retry, `cancelled` by the API or the
  worker that terminated it (REVOKED is never stored for a task that has a row, header or not), and
  its success with its result by one UPDATE here. No django-celery-results row is written for
  those states. A failure, a result the row cannot hold as it is (tracking.storable: over
  64 KiB, or not JSON), the result of a job that spawned children (its row's result gains their
  counts later) and progress (PROGRESS) still get one as well, written with the row in one
  transaction. Tasks without a row (Celery's own) are stored as upstream stores them.
- Reads (AsyncResult, `celery result`) take a final state stored in django-celery-results' table
  when there is one, and otherwise the job's row: SUCCESS with the row's result, FAILURE,
  REVOKED for a cancelled job, STARTED while running (PROGRESS, with its meta, when the task
  reported progress), RETRY, or PENDING.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from celery import states
from celery._state import get_current_task
from django.db import transaction
from django_celery_results.backends.database import DatabaseBackend as _DatabaseBackend

from jobs import tracking
from jobs.models import Job
from jobs.protocol import JOB_HEADER, PARENT_HEADER, storable
from tasks.reliability import DATABASE_ERRORS, describe, in_worker, is_outage

logger = logging.getLogger(__name__)


def _header(request: Any, name: str) -> str | None:
    if request is None:
        return None
    value = getattr(request, name, None) or (getattr(request, "headers", None) or {}).get(name)
    return str(value) if value else None


def _job_of(request: Any) -> str | None:
    return _header(request, JOB_HEADER)


# States of a task with a job's row that the row records by itself (see the module docstring).
RECORDED_BY_THE_ROW = frozenset({states.STARTED, states.RETRY, states.REVOKED})
# A job's status as Celery's state (AsyncResult, the schedules' admin).
JOB_STATES: dict[str, str] = {
    Job.Status.WAITING: states.PENDING,
    Job.Status.QUEUED: states.PENDING,
    Job.Status.SCHEDULED: states.PENDING,
    Job.Status.RUNNING: states.STARTED,
    Job.Status.RETRYING: states.RETRY,
    Job.Status.SUCCEEDED: states.SUCCESS,
    Job.Status.PARTIALLY_FAILED: states.SUCCESS,
    Job.Status.FAILED: states.FAILURE,
    Job.Status.CANCELLED: states.REVOKED,
}


_JOB_FIELDS = ("type", "status", "result", "error_type", "error_message", "finished_at", "own_finished_at")


class DatabaseBackend(_DatabaseBackend):
    def store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **kwargs: Any
    ) -> Any:
        try:
            job_id = _job_of(request)
            if job_id is None and state == states.REVOKED and Job.objects.filter(task_id=task_id).exists():
                # A task sent without a job header has a row from its first claim on: a duplicate
                # delivery skipped by the claim (its job done), or Celery revoking a run it
                # terminated, must not store REVOKED over the row's outcome (reads take a stored
                # final state first: a job that succeeded would read REVOKED).
                return result
            if job_id is None:
                return super().store_result(task_id, result, state, traceback, request, **kwargs)
            if state in RECORDED_BY_THE_ROW:
                return result
            if state not in (states.SUCCESS, states.FAILURE):  # PROGRESS, or a task's own state
                return super().store_result(task_id, result, state, traceback, request, **kwargs)
            # The row alone when it holds the whole outcome: one UPDATE, nothing else to make atomic. Not
            # for a job that spawned children: its row's result gains their counts once they are final
            # (jobs.tree), and AsyncResult gives the task's own return value.
            spawned = bool(getattr(request, "spawned_children", False))
            row_only = state == states.SUCCESS and not spawned and storable(result) is result
            with contextlib.nullcontext() if row_only else transaction.atomic():
                if not row_only:
                    super().store_result(task_id, result, state, traceback, request, **kwargs)
                parent_id = _header(request, PARENT_HEADER)
                if state == states.SUCCESS:
                    task = self.app.tasks.get(getattr(request, "task", None) or "")
                    partial = getattr(task, "partially_failed_because", None)
                    tracking.succeeded(
                        job_id,
                        task_id,
                        result,
                        spawned=spawned,
                        partial=partial(result) if partial else None,
                        parent_id=parent_id,
                    )
                else:
                    tracking.failed(job_id, task_id, result, parent_id=parent_id)
            # JobTask.on_success / on_failure then leave the row alone.
            request.job_outcome_recorded = True
            return result
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

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        # The job's row first, then the task result: a result written with the row (one transaction)
        # is then visible too. The other way round, a read could miss the result, see the row
        # committed just after, and answer with the row's stand-in for a result too large for it.
        job = Job.objects.filter(task_id=task_id).values(*_JOB_FIELDS).first()
        stored: dict[str, Any] = super()._get_task_meta_for(task_id)
        if stored.get("status") in states.READY_STATES or job is None:
            return stored
        state = JOB_STATES.get(job["status"], states.PENDING)
        if job["own_finished_at"] is not None and state not in states.READY_STATES:
            state = states.SUCCESS  # its task returned; the job waits for its children (jobs.tree)
        if state not in states.READY_STATES and stored.get("status") not in (None, states.PENDING):
            return stored  # PROGRESS with its meta, while the job runs
        result: Any = None
        if state == states.SUCCESS:
            result = job["result"]
        elif state in states.EXCEPTION_STATES:
            default = {states.REVOKED: "TaskRevokedError", states.RETRY: "Retry"}.get(state, "Exception")
            result = {"exc_type": job["error_type"] or default, "exc_message": [job["error_message"]]}
        return self.meta_from_decoded(
            {
                "task_id": task_id,
                "status": state,
                "result": result,
                "date_done": job["finished_at"] or job["own_finished_at"],
                "traceback": None,
                "children": [],
                "name": job["type"],
            }
        )
