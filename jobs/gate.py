"""Workers consume only while the database that holds every job's record answers.

`DatabaseGate`, a consumer bootstep in each worker's main process (loaded by
config/celery_app.py): a thread asks the database `SELECT 1` every
JOBS_DATABASE_PROBE_SECONDS over a connection of its own; while it does not answer, the
worker consumes from none of its queues, and it logs one error when the outage starts and
one line when it ends. A worker started while the database is down waits in this state and
takes nothing. A message taken just before the outage began is sent again by the process
running it (tasks.reliability), so nothing is acknowledged with its outcome unwritten.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections

logger = logging.getLogger(__name__)

DATABASE_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)


def database_reachable(timeout: float | None = None) -> bool:
    """True when a new connection to the default database can run `SELECT 1`.

    Uses a connection of its own (not the caller's, which may be broken), closed afterwards.
    """
    alias = DEFAULT_DB_ALIAS
    probe = connections.create_connection(alias)
    try:
        if timeout is not None and probe.vendor == "postgresql":
            options = {**probe.settings_dict.get("OPTIONS", {}), "connect_timeout": max(1, int(timeout))}
            probe.settings_dict = {**probe.settings_dict, "OPTIONS": options}
        with probe.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):  # a probe that could not connect has nothing to close
            probe.close()


class _Gate:
    """Process-wide state of the worker's gate: open (consuming) or closed (database away)."""

    def __init__(self) -> None:
        self.closed_since: float | None = None
        self.cancelled: list[str] = []
        # Hooks that may keep a queue closed when the gate opens (jobs.worker: paused queues).
        self.keep_closed: list[Callable[[set[str]], set[str]]] = []
        # Called with the consumer when it starts, after its task consumer exists and before the
        # event loop's basic.consume (jobs.worker: queues paused before this worker started).
        self.before_consuming: list[Callable[[Any], None]] = []
        self._reachable = True
        self._stop = threading.Event()

    @property
    def closed(self) -> bool:
        return self.closed_since is not None

    def probe_forever(self, every: float) -> None:
        timeout = settings.JOBS_DATABASE_PROBE_TIMEOUT_SECONDS
        while not self._stop.wait(every):
            self._reachable = database_reachable(timeout=timeout)

    def apply(self, consumer: Any) -> None:
        """Runs in the consumer's event loop: closes or opens the gate to match the last probe."""
        if not self._reachable and not self.closed:
            self.close(consumer)
        elif self._reachable and self.closed:
            self.open(consumer)

    def close(self, consumer: Any) -> None:
        self.closed_since = time.monotonic()
        task_consumer = consumer.task_consumer
        self.cancelled = sorted(q.name for q in task_consumer.queues) if task_consumer else []
        for queue in self.cancelled:
            consumer.cancel_task_queue(queue)
        logger.error(
            "database unreachable: not taking messages from %s until it answers again "
            "(messages already taken go back to their queues)",
            ", ".join(self.cancelled) or "any queue",
        )

    def open(self, consumer: Any) -> None:
        assert self.closed_since is not None
        down_for = time.monotonic() - self.closed_since
        queues = set(self.cancelled)
        for hook in self.keep_closed:
            try:
                queues -= hook(queues)
            except Exception:
                logger.exception("a keep-closed hook failed; opening every queue")
        for queue in sorted(queues):
            consumer.add_task_queue(queue)
        self.closed_since, self.cancelled = None, []
        logger.warning("database answers again after %.1f s: consuming from %s", down_for, ", ".join(queues))

    def stop(self) -> None:
        self._stop.set()


gate = _Gate()


class DatabaseGate(bootsteps.StartStopStep):
    """Consumer bootstep: consume only while the database answers (see the module docstring)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        self._timer: Any = None
        self._thread: threading.Thread | None = None
        super().__init__(consumer, **kwargs)

    def start(self, consumer: Any) -> None:
        # The first probe is made here, before the event loop takes anything. The consumer also
        # restarts here after a broker reconnection: a gate closed before stays closed (its queues
        # are deselected, so the new consumer takes nothing) and opens them when the database answers.
        gate._reachable = database_reachable(timeout=settings.JOBS_DATABASE_PROBE_TIMEOUT_SECONDS)
        gate.apply(consumer)
        for hook in gate.before_consuming:
            try:
                hook(consumer)
            except Exception:
                logger.exception("a before-consuming hook failed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=gate.probe_forever,
                args=(settings.JOBS_DATABASE_PROBE_SECONDS,),
                name="database-gate",
                daemon=True,
            )
            self._thread.start()
        self._timer = consumer.timer.call_repeatedly(
            min(1.0, settings.JOBS_DATABASE_PROBE_SECONDS), gate.apply, (consumer,), priority=10
        )

    def stop(self, consumer: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)
        gate.stop()
