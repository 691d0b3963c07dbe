"""A queue on the Redis broker as delivery/redis.py keeps it: one list per priority, read 9 first.

A message sent without a priority waits in the list of priority 5, not under the queue's bare
name (which holds priority 0): count and read a queue through these, not with LLEN <name>.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

from delivery.redis import Channel


def keys(queue: str) -> list[str]:
    """`queue`'s lists, highest priority first (kombu's names: priority 0 is the bare name)."""
    options: dict[str, Any] = settings.CELERY_BROKER_TRANSPORT_OPTIONS
    steps = sorted(options["priority_steps"], reverse=True)
    return [f"{queue}{Channel.sep}{step}" if step else queue for step in steps]


def length(client: Any, queue: str) -> int:
    """How many messages wait in `queue` (`client`: a redis-py client of the broker)."""
    return sum(int(client.llen(key)) for key in keys(queue))


def messages(client: Any, queue: str) -> list[bytes]:
    """The raw messages waiting in `queue`, in the order a worker takes them."""
    return [raw for key in keys(queue) for raw in reversed(client.lrange(key, 0, -1))]


def depth(app: Any, queue: str) -> int:
    """How many messages wait in `queue` (not counting those delivered and not acknowledged yet),
    on either broker: Redis lists, or RabbitMQ's count from a passive declaration."""
    with app.connection_for_read() as connection:
        if connection.transport.driver_type == "redis":
            return length(connection.default_channel.client, queue)
        declared = connection.default_channel.queue_declare(queue=queue, passive=True)
        return int(declared.message_count)
