"""Worker side of paused queues: honoured at start-up, and on command from the API.

Pausing a queue (jobs.queues.pause) stores a QueuePause row and broadcasts
Celery's `cancel_consumer`, so every running worker stops taking from it. A
worker started later reads the rows before it starts consuming
(`celeryd_after_setup`) and again once ready, so it respects the pause too.
Resuming broadcasts `jobs_resume_queue`, which adds the queue back only on the
workers started with it (`-Q email` never starts taking `images`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready
from celery.worker.control import control_command

from config import brokers
from jobs.gate import gate

logger = logging.getLogger(__name__)

# The queues this worker process was started with (-Q), before any pause took some away.
configured_queues: set[str] = set()


def paused_queues() -> set[str]:
    from jobs.models import QueuePause

    return set(QueuePause.objects.values_list("queue", flat=True))


@celeryd_after_setup.connect
def _declare_every_task_queue(sender: str, instance: Any, **kwargs: Any) -> None:
    """Quorum queues: every task queue (not only this worker's) and the dead-letter queue exist
    before the worker binds them to Celery's native delayed delivery exchanges. A queue missing
    then is left unbound, and a countdown sent to it would be dropped when due."""
    from django.conf import settings

    if not settings.RABBITMQ_QUORUM_QUEUES:
        return
    try:
        with instance.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3)
            brokers.declare_topology(connection, instance.app.amqp.queues.values())
    except Exception:  # the broker is away: the worker's own start-up will say so, loudly
        logger.exception("could not declare the task queues on RabbitMQ at start-up")


@celeryd_after_setup.connect
def _drop_paused_queues_before_consuming(sender: str, instance: Any, **kwargs: Any) -> None:
    queues = instance.app.amqp.queues
    configured_queues.update(queues.consume_from.keys())
    try:
        paused = paused_queues() & configured_queues
    except Exception:  # the database is down: start anyway, worker_ready tries again
        logger.exception("could not read paused queues at start-up")
        return
    if paused and paused < configured_queues:
        queues.deselect(sorted(paused))
        logger.warning("queues %s are paused: not consuming from them", ", ".join(sorted(paused)))
    elif paused:
        # Celery refuses to start with no queue at all: start, then cancel them once ready.
        logger.warning("every queue of this worker is paused (%s)", ", ".join(sorted(paused)))


def _cancel_paused_before_consuming(consumer: Any) -> None:
    """Every queue of this worker paused: Celery would not start without one, so they stay
    selected until here, where they are cancelled before the event loop consumes. (Cancelled only
    once ready, RabbitMQ pushed a waiting message in between, and the worker ran it.)"""
    paused = paused_queues() & configured_queues
    consuming = {queue.name for queue in consumer.task_consumer.queues} if consumer.task_consumer else set()
    for queue in sorted(paused & consuming):
        consumer.cancel_task_queue(queue)
        logger.warning("queue %s is paused: not consuming from it", queue)


gate.before_consuming.append(_cancel_paused_before_consuming)


@worker_ready.connect
def _cancel_queues_paused_while_starting(sender: Any, **kwargs: Any) -> None:
    try:
        paused = paused_queues() & configured_queues
    except Exception:
        logger.exception("could not read paused queues")
        return
    consuming = {queue.name for queue in sender.task_consumer.queues} if sender.task_consumer else set()
    for queue in sorted(paused & consuming):
        sender.cancel_task_queue(queue)
        logger.warning("queue %s is paused: not consuming from it", queue)


def _paused_among(queues: set[str]) -> set[str]:
    """Queues paused during a database outage stay closed when the database gate opens."""
    return paused_queues() & queues


gate.keep_closed.append(_paused_among)


@control_command(args=[("queue", str)], signature="<queue>")
def jobs_resume_queue(state: Any, queue: str, **kwargs: Any) -> dict[str, str]:
    """Consumes from `queue` again, if this worker was started with it."""
    if queue not in configured_queues:
        return {"ok": f"not configured for {queue}"}
    consumer = state.consumer
    consumer.call_soon(consumer.add_task_queue, queue)
    return {"ok": f"resumed {queue}"}
