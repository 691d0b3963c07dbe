"""This process's broker connection pools, for tests that close them or move the app to another broker.

Celery and kombu keep pooled connections in several places, each caching the one before it:

- kombu.pools.connections / kombu.pools.producers: one pool per broker URL for the whole process;
- the app's own `_pool` and `amqp._producer_pool`, taken from those groups on first use;
- the control mailbox (`app.control.mailbox.producer_pool`, a cached property): every broadcast,
  inspect and ping publishes through it, and it keeps the pool it first saw for ever;
- jobs.publish's own publishing connection.

Forgetting only some of them leaves a closed pool (or one for another broker) in the others: the
next control broadcast then raises "Acquire on closed pool" (CI, tests/monitoring, in whatever
module ran after an outage test in the same process).
"""

from __future__ import annotations

from typing import Any

import kombu.pools
from celery import Celery

from jobs import publish


def forget(app: Celery) -> None:
    """Drops (without closing) every pool the app and jobs.publish hold: the next use opens new ones
    for the app's broker URL as it is now."""
    celery: Any = app  # Celery keeps its pools in private attributes; the stubs do not list them
    celery._pool = None
    celery.amqp._producer_pool = None
    celery.control.mailbox.__dict__.pop("producer_pool", None)
    with publish._lock:
        publish._connection = None


def reset(app: Celery) -> None:
    """After the broker closed this process's connections: every kombu pool of the process is closed
    and emptied, and the app forgets the ones it held."""
    kombu.pools.reset()
    with publish._lock:
        if publish._connection is not None:
            publish._connection.release()
    forget(app)


def _closed(pool: Any) -> bool:
    connections = getattr(pool, "connections", None)
    return bool(getattr(pool, "_closed", False) or getattr(connections, "_closed", False))


def drop_closed(app: Celery) -> None:
    """Drops every closed pool from kombu's groups and from the app's caches, leaving open ones."""
    celery: Any = app
    for holder, name in ((celery, "_pool"), (celery.amqp, "_producer_pool")):
        pool = getattr(holder, name, None)
        if pool is not None and _closed(pool):
            setattr(holder, name, None)
    mailbox_pool = celery.control.mailbox.__dict__.get("producer_pool")
    if mailbox_pool is not None and _closed(mailbox_pool):
        del celery.control.mailbox.__dict__["producer_pool"]
    for group in (kombu.pools.producers, kombu.pools.connections):
        for key, pool in list(group.items()):
            if _closed(pool):
                dict.__delitem__(group, key)  # the stored key (EqualityDict hashes its keys again)
