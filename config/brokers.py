"""How the task queues are declared on each broker (read by config/settings/base.py).

Redis: as before (kombu ignores queue arguments there; `x-max-priority` is harmless).

RabbitMQ, RABBITMQ_QUEUE_TYPE=quorum (the default): every task queue is a quorum queue
(replicated, on disk) bound to the topic exchange `jobs` (Celery's native delayed delivery routes
countdowns through its `celery_delayed_*` topic exchanges, and skips direct ones), with
- `x-delivery-limit`: RabbitMQ's poison cap, a backstop behind ours (JOBS_MAX_DELIVERIES, checked
  by tasks/base.py before_start, which leaves a dead letter with arguments and traceback);
- `x-dead-letter-exchange` `jobs.dead` (fanout) into the quorum queue `jobs.dead_letters`, at
  least once: whatever RabbitMQ dead-letters (delivery limit exceeded, rejected without requeue)
  waits there until `default.release_jobs` turns it into a dead letter (tasks/dead_lettered.py).
Quorum queues in RabbitMQ 3.10 have no priorities: messages still carry one, RabbitMQ ignores it.

RabbitMQ, RABBITMQ_QUEUE_TYPE=classic: classic queues on the direct exchange `default`, with
`x-max-priority` 9 unless RABBITMQ_PRIORITY_QUEUES=false; priorities apply, nothing is replicated.
"""

from __future__ import annotations

import re
from typing import Any

from kombu import Exchange, Queue

QUORUM, CLASSIC = "quorum", "classic"
QUEUE_TYPES = (QUORUM, CLASSIC)

# Quorum queues' exchange: topic, so Celery's native delayed delivery can route to the queues.
QUORUM_EXCHANGE = "jobs"
# What RabbitMQ dead-letters from a task queue goes through this exchange into this queue.
DEAD_LETTER_EXCHANGE = "jobs.dead"
DEAD_LETTER_QUEUE = "jobs.dead_letters"
MAX_PRIORITY = 9


# Celery's native delayed delivery (quorum queues) routes a countdown through celery_delayed_*
# with 28 binary digits before the queue's routing key: "0.0.….1.default".
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


def queue_of(routing_key: Any) -> str:
    """The queue a message's routing key names, without a delayed-delivery prefix ("" for None)."""
    return _DELAY_PREFIX.sub("", str(routing_key or ""))


def is_amqp(broker_url: str) -> bool:
    return broker_url.split("://", 1)[0] in {"amqp", "amqps", "pyamqp"}


def quorum_arguments(delivery_limit: int) -> dict[str, Any]:
    return {
        "x-queue-type": QUORUM,
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        # At least once: a dead-lettered message leaves its queue only once the dead-letter
        # queue has confirmed it (RabbitMQ 3.10+; it needs x-overflow reject-publish).
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def uses_quorum_queues(broker_url: str, queue_type: str) -> bool:
    return is_amqp(broker_url) and queue_type == QUORUM


class QuorumQueue(Queue):
    """A task queue that declares its dead-letter exchange and queue before itself, wherever it is
    declared (a worker, or a publisher the first time it sends to it): RabbitMQ drops a message
    dead-lettered to an exchange that does not exist."""

    def declare(self, nowait: bool = False, channel: Any = None) -> Any:
        dead_letter_queue().bind(channel or self.channel).declare()
        return super().declare(nowait=nowait, channel=channel)


def task_queues(
    names: tuple[str, ...], *, broker_url: str, queue_type: str, delivery_limit: int
) -> tuple[Queue, ...]:
    """The task queues as the broker declares them."""
    if uses_quorum_queues(broker_url, queue_type):
        exchange = Exchange(QUORUM_EXCHANGE, type="topic", durable=True)
        arguments = quorum_arguments(delivery_limit)
        return tuple(
            QuorumQueue(name, exchange, routing_key=name, durable=True, queue_arguments=dict(arguments))
            for name in names
        )
    return tuple(Queue(name, routing_key=name) for name in names)


def dead_letter_exchange() -> Exchange:
    return Exchange(DEAD_LETTER_EXCHANGE, type="fanout", durable=True)


def dead_letter_queue() -> Queue:
    """Where RabbitMQ's dead-lettered task messages wait for `default.release_jobs`."""
    return Queue(
        DEAD_LETTER_QUEUE,
        dead_letter_exchange(),
        routing_key="#",
        durable=True,
        queue_arguments={"x-queue-type": QUORUM},
    )


def declare(connection: Any, queues: Any = ()) -> None:
    """Declares the dead-letter exchange and queue, and `queues` (idempotent), over a connection."""
    channel: Any = connection.channel()
    try:
        dead_letter_queue().bind(channel).declare()
        for queue in queues:
            queue.bind(channel).declare()
    finally:
        channel.close()


def declare_topology(connection: Any, queues: Any) -> None:
    """Quorum queues: the dead-letter queue, every task queue in `queues`, and Celery's native
    delayed delivery (the `celery_delayed_*` exchanges and queues, each task queue bound to them).

    Workers declare it at start-up (Celery binds only queues that exist); a publishing process
    declares it before its first publish, so that a countdown sent before any worker ever ran
    is not refused for want of the `celery_delayed_27` exchange. Idempotent.
    """
    from kombu.transport.native_delayed_delivery import (
        bind_queue_to_native_delayed_delivery_exchange,
        declare_native_delayed_delivery_exchanges_and_queues,
    )

    queues = list(queues)
    declare(connection, queues)
    declare_native_delayed_delivery_exchanges_and_queues(connection, QUORUM)
    for queue in queues:
        bind_queue_to_native_delayed_delivery_exchange(connection, queue)
