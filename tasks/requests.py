"""The worker's request for a job's task: a run terminated by a cancel records that it was.

`DELETE /api/jobs/<id>` on a running job asks for the run to stop (jobs.services.cancel): the row
keeps `running` with `cancel_requested_at`, and the worker's pool process running it is sent
SIGTERM (Celery's revoke with `terminate=True`). Whether the run was stopped or reached its own
outcome first is known here, in the worker's main process: billiard reports a job whose process
it terminated as `Terminated` once that process is gone and only if it never returned (a run that
returned first recorded its own outcome, which stands). Celery itself then only marks the result
REVOKED; this writes `cancelled` to the job's row (jobs.tracking.cancelled_while_running).
A pool process lost another way (SIGKILL, out of memory) while its run's cancel was requested ends
that run the same way: when the loss came first, the revoke found no process to terminate and
acknowledged the message all the same, so no redelivery would.

If that write fails (the database away at that moment), the row stays `running` with its cancel
requested and nothing to deliver it: the reconciler settles it (jobs.reconcile).
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.exceptions import Terminated, WorkerLostError
from celery.signals import task_revoked
from celery.worker.request import Request

logger = logging.getLogger(__name__)


class JobRequest(Request):
    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        exc = getattr(exc_info, "exception", None)
        exc = getattr(exc, "exc", exc)  # celery's ExceptionWithTraceback wraps what the pool raised
        if isinstance(exc, Terminated):
            record_terminated(self.id)
        elif isinstance(exc, (WorkerLostError, SystemExit, KeyboardInterrupt)):
            # The pool process went another way (SIGKILL, OOM) before it returned. When that came
            # first, the revoke found no process to terminate, and acknowledged the message all the
            # same: no redelivery will end a run whose cancel was requested. It is over: recorded.
            record_stopped(self.id, "its pool process was lost after the cancel was requested")


@task_revoked.connect(weak=False, dispatch_uid="tasks.requests.discarded")
def _discarded(
    sender: Any = None, request: Any = None, terminated: bool = False, expired: bool = False, **kwargs: Any
) -> None:
    """A worker told to revoke a task id discards its messages unrun (Celery's revoke list): one
    delivered again after its run was asked to stop (its worker died) ends that run here, as the
    claim would have (jobs.tracking.claim). The `terminated` case is JobRequest's, once the process
    is gone: this signal comes as the signal is sent."""
    from tasks.base import JobTask

    task_id = getattr(request, "id", None)
    if terminated or expired or not isinstance(sender, JobTask) or not task_id:
        return
    record_stopped(str(task_id), "its worker was lost after the cancel was requested")


def record_terminated(task_id: str) -> None:
    record_stopped(task_id, "terminated by the cancel while it ran")


def record_stopped(task_id: str, why: str) -> None:
    from django.db import connection

    from jobs import tracking
    from tasks.reliability import DATABASE_ERRORS

    try:
        tracking.cancelled_while_running(task_id, why)
    except DATABASE_ERRORS:
        logger.warning(
            "task %s was stopped by a cancel; its job's row could not be written (the reconciler will)",
            task_id,
            exc_info=True,
        )
    finally:
        # The main process writes seldom (a cancel): no connection is kept open in it between
        # them, nor handed to the pool processes it forks next (the one replacing the terminated).
        connection.close()
