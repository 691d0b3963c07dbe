"""Task events only while someone watches them.

Workers start with task events off (CELERY_WORKER_SEND_TASK_EVENTS): nothing of ours reads them (the
metrics page, Prometheus, alerts and the API count through signals, monitoring/collect.py), and they
cost a PUBLISH per task state. Flower turns them on with Celery's `enable_events` broadcast, which it
repeats every 5 seconds while it runs (its `enable_events` option, on in config/flowerconfig.py).
Celery would then keep sending them until the worker restarts, watched or not: `TaskEventsLapse`, a
consumer bootstep, turns them off again once no `enable_events` has come for
MONITORING_TASK_EVENTS_LAPSE_SECONDS (a minute: a dozen of Flower's repeats; Flower has stopped).
A worker started with task events on keeps them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import bootsteps
from celery.worker import control
from django.conf import settings

logger = logging.getLogger(__name__)

_celery_enable_events = control.Panel.data["enable_events"]
_last_enabled_at: float | None = None


@control.control_command()
def enable_events(state: Any) -> Any:
    """Celery's `enable_events`, remembering when it came (replaces Celery's in this process)."""
    global _last_enabled_at
    _last_enabled_at = time.monotonic()
    return _celery_enable_events(state)


def lapse_task_events(consumer: Any, lapse: float) -> bool:
    """Turns task events off if they were turned on remotely and nobody asked again for `lapse` s."""
    dispatcher = consumer.event_dispatcher
    if dispatcher is None or "task" not in dispatcher.groups:
        return False
    if _last_enabled_at is not None and time.monotonic() - _last_enabled_at < lapse:
        return False
    dispatcher.groups.discard("task")
    logger.info("Task events off: no enable_events (Flower) for %.0f s", lapse)
    return True


class TaskEventsLapse(bootsteps.StartStopStep):
    """Consumer bootstep: task events that Flower turned on go off once it stops asking."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        self._timer: Any = None
        self.lapse = settings.MONITORING_TASK_EVENTS_LAPSE_SECONDS
        super().__init__(consumer, **kwargs)

    def start(self, consumer: Any) -> None:
        dispatcher = consumer.event_dispatcher
        # groups is empty when the worker sends every event (task events on from the start).
        if dispatcher is None or not dispatcher.groups or self._timer is not None:
            return
        self._timer = consumer.timer.call_repeatedly(self.lapse / 4, self._check, (consumer,), priority=10)

    def _check(self, consumer: Any) -> None:
        try:
            lapse_task_events(consumer, self.lapse)
        except Exception:  # a monitoring step must not break the consumer's loop
            logger.exception("could not check whether task events are still watched")

    def stop(self, consumer: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
