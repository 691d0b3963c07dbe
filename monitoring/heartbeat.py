"""Workers report their own presence, so nobody has to broadcast a question to find them.

`WorkerHeartbeat`, a consumer bootstep in each worker's main process (registered by
monitoring.apps): every MONITORING_WORKER_HEARTBEAT_SECONDS the consumer's timer takes a
snapshot of what the worker does (the queues it consumes now, so a paused queue drops out and
comes back on resume; the messages it holds, by queue: running, reserved, waiting for their
ETA), and a thread of its own writes it to the worker's WorkerPresence row in one UPDATE, with
the database's clock. The loop never waits on the database; the thread never raises into the
worker: while the database gate is closed it skips, and a failed write is logged once per
outage. A warm shutdown deletes the row; a worker killed or frozen simply stops writing and
counts as gone after three beats (monitoring.presence).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter, defaultdict
from datetime import timedelta
from typing import Any

from celery import bootsteps
from celery.worker import state as worker_state
from celery.worker.request import Request
from django.conf import settings
from django.db import connection
from django.db.models.functions import Now

from config import brokers
from jobs.gate import gate
from monitoring.models import WorkerPresence

logger = logging.getLogger(__name__)

# Rows of workers gone this long are deleted when any worker starts (their node names are gone
# for good: a container's host name, a renamed worker).
FORGET_AFTER = timedelta(days=1)


def snapshot(consumer: Any) -> dict[str, Any]:
    """What the worker consumes and holds now. Runs in the consumer's event loop: no I/O."""
    task_consumer = consumer.task_consumer
    queues = sorted({queue.name for queue in task_consumer.queues}) if task_consumer else []
    queue_for = {q.routing_key: name for name, q in consumer.app.amqp.queues.items() if q.routing_key}
    held: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def count(request: Request, kind: str) -> None:
        routing_key = brokers.queue_of((request.delivery_info or {}).get("routing_key"))
        held[queue_for.get(routing_key, routing_key)][kind] += 1

    active = list(worker_state.active_requests)
    for request in active:
        count(request, "active")
    for request in set(worker_state.reserved_requests).difference(active):
        count(request, "reserved")
    for waiting in consumer.timer.schedule.queue:  # messages held until their ETA or countdown
        args = getattr(waiting.entry, "args", None) or ()
        if args and isinstance(args[0], Request):
            count(args[0], "scheduled")
    return {"queues": queues, "held": {queue: dict(kinds) for queue, kinds in sorted(held.items())}}


class Presence:
    """The thread that writes one worker's presence row."""

    def __init__(self, node: str, every: float) -> None:
        self.node, self.every = node, every
        self.latest: dict[str, Any] = {"queues": [], "held": {}}
        self._stop = threading.Event()
        self._started = False  # the row's started_at is set by this process's first write
        self._failing = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="worker-presence", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.write()

    def write(self) -> bool:
        """Writes the latest snapshot; never raises. False when it could not."""
        if gate.closed:  # the database does not answer: the gate's probe says when it does again
            return False
        try:
            self._write()
        except Exception:
            if not self._failing:
                logger.warning("could not write this worker's presence; trying every beat", exc_info=True)
            self._failing = True
            return False
        finally:
            # A connection per beat, as the gate's probe: none is left open for a pool process
            # forked meanwhile to inherit (its copy would keep the server's session alive).
            connection.close()
        if self._failing:
            logger.warning("this worker's presence is written again")
        self._failing = False
        return True

    def _write(self) -> None:
        values = {"pid": os.getpid(), "last_seen": Now(), **self.latest}
        # One UPDATE per beat; the row is created by the first (or again if somebody deleted it).
        if self._started and WorkerPresence.objects.filter(node=self.node).update(**values):
            return
        WorkerPresence.objects.update_or_create(node=self.node, defaults={**values, "started_at": Now()})
        if not self._started:
            WorkerPresence.objects.filter(last_seen__lt=Now() - FORGET_AFTER).delete()
        self._started = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)  # a write hung on a frozen database does not hold the shutdown

    def remove(self, timeout: float = 3.0) -> None:
        """Deletes the row (a warm shutdown); never raises, and never holds the shutdown longer
        than `timeout` seconds (a frozen database): the row then lapses by itself."""
        if gate.closed:
            return

        def delete() -> None:
            try:
                WorkerPresence.objects.filter(node=self.node, pid=os.getpid()).delete()
            except Exception:
                logger.warning("could not remove this worker's presence; it lapses by itself", exc_info=True)
            finally:
                connection.close()

        thread = threading.Thread(target=delete, name="worker-presence-remove", daemon=True)
        thread.start()
        thread.join(timeout)


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Consumer bootstep: report this worker's presence (see the module docstring)."""

    requires = ("celery.worker.consumer.tasks:Tasks", "jobs.gate:DatabaseGate")

    def __init__(self, consumer: Any, **kwargs: Any) -> None:
        self._timer: Any = None
        self.presence = Presence(consumer.hostname, settings.MONITORING_WORKER_HEARTBEAT_SECONDS)
        super().__init__(consumer, **kwargs)

    def start(self, consumer: Any) -> None:
        # Also after a broker reconnection: the consumer (and its queues) is new.
        self.take_snapshot(consumer)
        self.presence.write()  # the first beat before the worker says it is ready
        self.presence.start()
        self._timer = consumer.timer.call_repeatedly(
            self.presence.every, self.take_snapshot, (consumer,), priority=10
        )

    def take_snapshot(self, consumer: Any) -> None:
        try:
            self.presence.latest = snapshot(consumer)
        except RuntimeError:
            # Without an event loop (the solo pool) the timer is a thread of its own, and a set of
            # requests can change while it is read: the next beat takes the snapshot.
            logger.debug("this worker's snapshot changed while taken", exc_info=True)
        except Exception:  # a monitoring step must not break the consumer's loop
            logger.exception("could not take this worker's snapshot")

    def stop(self, consumer: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Not consuming until start() again (the broker connection was lost, or shutting down).
        self.presence.latest = {"queues": [], "held": {}}

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)
        self.presence.stop()
        self.presence.remove()
