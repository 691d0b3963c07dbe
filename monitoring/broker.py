"""What the broker and the workers say about the project's queues.

- `queue_depths()`: messages waiting in each queue, read from the broker itself (Redis or
  RabbitMQ). On Redis also the messages delivered to a worker and not acknowledged yet
  (running, prefetched, or held until their ETA/countdown), which kombu keeps in one hash.
  On RabbitMQ a passive queue.declare answers the ready count (quorum and classic queues
  alike); countdowns on quorum queues wait in Celery's `celery_delayed_*` queues, not counted.
- `inspect_workers()`: what the workers answer to a broadcast: which of them consume each queue,
  and how many messages each holds (running, reserved, scheduled). It waits its whole timeout
  for answers, so it is for an operator (`manage.py workers --ask`), never for a request path:
  those read the workers' own reports (monitoring.presence).

Both are bounded in time: a dead broker raises `BrokerError` (or flags the view as failed)
within seconds, it never hangs a page, a scrape or a health check.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from django.conf import settings
from kombu import Connection

from config import brokers
from config.celery_app import app as project_app

logger = logging.getLogger(__name__)

# Seconds to connect to the broker, and to wait for any one answer from it.
BROKER_TIMEOUT = 2.0
# Above this many unacknowledged messages on Redis, only their total is counted: reading every
# entry of kombu's `unacked` hash (each holds a whole message) would cost too much.
UNACKED_COUNT_LIMIT = 10_000

# The broadcasts `inspect_workers` sends, all at once.
_BROADCASTS = ("active_queues", "active", "reserved", "scheduled")


class BrokerError(Exception):
    """The broker could not be reached, or did not answer in time. The message names the broker
    (its URL without the password) and what went wrong."""


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    # Messages waiting in the broker for a worker to take them.
    ready: int
    # Redis only: messages of this queue delivered to a worker and not acknowledged yet (running,
    # prefetched, or held until their ETA). None when not known: RabbitMQ (the AMQP protocol does
    # not tell), or more than UNACKED_COUNT_LIMIT on the broker (then only the total is counted).
    unacked: int | None = None
    # Redis only: unacknowledged messages of every queue together (always counted on Redis).
    unacked_all_queues: int | None = None


@dataclass(frozen=True)
class QueueWorkers:
    # Node names (`name@host`) of the workers consuming the queue.
    workers: tuple[str, ...] = ()
    # Messages of the queue that workers hold: running, prefetched, waiting for their ETA/countdown.
    active: int = 0
    reserved: int = 0
    scheduled: int = 0


@dataclass(frozen=True)
class WorkerView:
    # Every queue asked about (settings.TASK_QUEUES by default), plus any other queue a worker
    # consumes or holds messages of.
    queues: dict[str, QueueWorkers]
    # Node names of every worker that answered.
    workers: tuple[str, ...] = ()
    # Broadcast ("active_queues", "active", "reserved", "scheduled") -> what went wrong. When not
    # empty the view is incomplete: a dead broker gives an empty view with all four here.
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.errors)

    def consumers(self, queue: str) -> tuple[str, ...]:
        """Node names of the workers consuming `queue` (empty: nobody takes its messages)."""
        return self.queues.get(queue, QueueWorkers()).workers

    def queues_without_workers(self) -> list[str]:
        return [name for name, queue in self.queues.items() if not queue.workers]


def broker_connection(timeout: float = BROKER_TIMEOUT, *, app: Celery | None = None) -> Connection:
    """A connected broker connection whose connects and reads give up after `timeout` seconds.

    Use it as a context manager (it closes the connection). Raises `BrokerError` when the broker
    does not answer; one attempt, no retries.
    """
    return _connect(app or project_app, connect_timeout=timeout, read_timeout=timeout)


def queue_depths(
    queues: Iterable[str] | None = None, *, timeout: float = BROKER_TIMEOUT, app: Celery | None = None
) -> dict[str, QueueDepth]:
    """Messages waiting in each of `queues` (default: settings.TASK_QUEUES), over one connection.

    A queue that does not exist yet (nothing ever declared it, or on Redis: it is empty) has 0.
    Raises `BrokerError` when the broker does not answer within about `timeout` seconds.
    """
    app = app or project_app
    names = list(settings.TASK_QUEUES if queues is None else queues)
    with _connect(app, connect_timeout=timeout, read_timeout=timeout) as conn:
        try:
            ready = _ready_counts(conn, names)
            if conn.transport.driver_type == "redis":
                unacked, unacked_total = _redis_unacked_counts(conn, _queue_names_by_routing_key(app))
            else:
                unacked, unacked_total = None, None
        except conn.connection_errors + conn.channel_errors + (OSError,) as exc:
            raise BrokerError(f"the broker at {conn.as_uri()} failed while counting messages: {exc}") from exc
    return {
        name: QueueDepth(
            queue=name,
            ready=ready[name],
            unacked=None if unacked is None else unacked.get(name, 0),
            unacked_all_queues=unacked_total,
        )
        for name in names
    }


def inspect_workers(
    timeout: float | None = None, *, queues: Iterable[str] | None = None, app: Celery | None = None
) -> WorkerView:
    """Which workers consume each queue and the messages they hold, as the workers answer.

    The four broadcasts run at once, each waiting `timeout` seconds (default:
    settings.METRICS_INSPECT_TIMEOUT) for answers, so the call takes about `timeout` seconds
    with or without workers, and at most `timeout + 2 * BROKER_TIMEOUT` when the broker is dead:
    then the view is empty and `failed`, with the reasons in `errors`.
    """
    app = app or project_app
    timeout = float(settings.METRICS_INSPECT_TIMEOUT if timeout is None else timeout)
    replies: dict[str, Mapping[str, Any]] = {}
    errors: dict[str, str] = {}

    done = {method: threading.Event() for method in _BROADCASTS}

    def ask(method: str) -> None:
        try:
            # One connection per thread: kombu connections are not thread-safe.
            with _connect(app, connect_timeout=BROKER_TIMEOUT, read_timeout=timeout + BROKER_TIMEOUT) as conn:
                inspect = app.control.inspect(timeout=timeout, connection=conn)
                replies[method] = getattr(inspect, method)() or {}
                # Answered: closing a Redis connection waits out its pending BRPOP (about 1 s),
                # which the caller need not wait for.
                done[method].set()
        except Exception as exc:  # reported in the view: a monitoring call must not raise on a bad answer
            if method not in replies:  # (not a failure while closing after the answer)
                errors[method] = str(exc) or type(exc).__name__
        finally:
            done[method].set()

    threads = [threading.Thread(target=ask, args=(m,), name=f"inspect-{m}", daemon=True) for m in _BROADCASTS]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout + 2 * BROKER_TIMEOUT
    for event in done.values():
        event.wait(max(0.0, deadline - time.monotonic()))
    # A thread still running after the deadline is left to finish on its own (it is a daemon);
    # what it writes later is not read.
    answered, failed = dict(replies), dict(errors)
    for method in _BROADCASTS:
        if method not in answered and method not in failed:
            failed[method] = f"no answer from the broker within {timeout + 2 * BROKER_TIMEOUT:g} s"
    if failed:
        logger.warning("asking the workers failed: %s", "; ".join(f"{m}: {e}" for m, e in failed.items()))
    names = list(settings.TASK_QUEUES if queues is None else queues)
    return _worker_view(names, answered, failed, _queue_names_by_routing_key(app))


# --- the broker ------------------------------------------------------------------------------


def _connect(app: Celery, *, connect_timeout: float, read_timeout: float) -> Connection:
    conn = app.connection_for_read(connect_timeout=connect_timeout)
    options = conn.transport_options if conn.transport_options is not None else {}
    # Socket timeouts, so a broker that stops answering mid-way cannot hang the caller either.
    if conn.transport.driver_type == "redis":
        options.update(socket_connect_timeout=connect_timeout, socket_timeout=read_timeout)
    elif conn.transport.driver_type == "amqp":
        options.update(read_timeout=read_timeout, write_timeout=read_timeout)
    conn.transport_options = options
    try:
        # One attempt, no retries (the default would retry for as long as the worker does).
        conn.ensure_connection(max_retries=0)
    except Exception as exc:
        where = conn.as_uri()  # the password masked
        conn.release()
        raise BrokerError(
            f"could not connect to the broker at {where} (timeout {connect_timeout:g} s): {exc}; "
            "is it running, and is CELERY_BROKER_URL right?"
        ) from exc
    return conn


def _ready_counts(conn: Connection, names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    channel: Any = conn.channel()  # kombu's stubs type it as the abstract StdChannel
    try:
        for name in names:
            try:
                # Passive: never creates a queue. On Redis kombu sums the priority sub-queues.
                counts[name] = channel.queue_declare(name, passive=True).message_count
            except conn.channel_errors as exc:
                if not _is_not_found(exc):
                    raise
                counts[name] = 0
                # RabbitMQ closes a channel after an error: carry on with a new one.
                _close_quietly(channel)
                channel = conn.channel()
    finally:
        _close_quietly(channel)
    return counts


def _is_not_found(exc: BaseException) -> bool:
    # RabbitMQ: amqp.exceptions.NotFound (reply code 404); Redis: kombu's "NOT_FOUND - no queue"
    # ChannelError, raised for a queue with no messages (Redis deletes an empty list).
    return getattr(exc, "code", None) == 404 or "NOT_FOUND" in str(exc)


def _close_quietly(channel: Any) -> None:
    try:
        channel.close()
    except Exception:  # closing a channel the broker already closed; nothing to do
        logger.debug("closing a broker channel failed", exc_info=True)


def _redis_unacked_counts(
    conn: Connection, queue_for: Mapping[str, str]
) -> tuple[dict[str, int] | None, int]:
    """Per queue (None when too many to count) and in total, the messages in kombu's `unacked` hash."""
    channel: Any = conn.default_channel
    client, key = channel.client, channel.unacked_key  # the client honours a global_keyprefix
    total = int(client.hlen(key))
    if total > UNACKED_COUNT_LIMIT:
        return None, total
    counts: Counter[str] = Counter()
    for seen, (_tag, value) in enumerate(client.hscan_iter(key, count=1000)):
        if seen > UNACKED_COUNT_LIMIT:  # the hash grew since HLEN: stop, the total stands
            break
        try:
            _message, _exchange, routing_key = json.loads(value)
        except (ValueError, TypeError):  # not kombu's [message, exchange, routing_key]
            continue
        counts[queue_for.get(routing_key, routing_key)] += 1
    return dict(counts), total


def _queue_names_by_routing_key(app: Celery) -> dict[str, str]:
    # In this project a queue's routing key is its name; the map keeps that an assumption of settings only.
    return {queue.routing_key: name for name, queue in app.amqp.queues.items() if queue.routing_key}


# --- the workers' answers ----------------------------------------------------------------------


def _worker_view(
    names: list[str],
    replies: Mapping[str, Mapping[str, Any]],
    errors: dict[str, str],
    queue_for: Mapping[str, str],
) -> WorkerView:
    consumers: dict[str, set[str]] = {name: set() for name in names}
    held: dict[str, Counter[str]] = {kind: Counter() for kind in ("active", "reserved", "scheduled")}
    nodes: set[str] = set()

    for node, queues in replies.get("active_queues", {}).items():
        nodes.add(node)
        # A worker answers a list of its queues, or {"error": ...} when the command failed there.
        for queue in queues if isinstance(queues, list) else ():
            if isinstance(queue, dict) and queue.get("name"):
                consumers.setdefault(queue["name"], set()).add(node)
    for kind, counter in held.items():
        for node, entries in replies.get(kind, {}).items():
            nodes.add(node)
            for entry in entries if isinstance(entries, list) else ():
                if not isinstance(entry, dict):
                    continue
                # `scheduled` wraps each request in {"eta", "priority", "request"}.
                request = entry.get("request", entry) if kind == "scheduled" else entry
                info = request.get("delivery_info") if isinstance(request, dict) else None
                routing_key = brokers.queue_of((info or {}).get("routing_key"))
                counter[queue_for.get(routing_key, routing_key)] += 1

    every_queue = list(dict.fromkeys([*consumers, *(q for c in held.values() for q in c)]))
    return WorkerView(
        queues={
            name: QueueWorkers(
                workers=tuple(sorted(consumers.get(name, ()))),
                active=held["active"][name],
                reserved=held["reserved"][name],
                scheduled=held["scheduled"][name],
            )
            for name in every_queue
        },
        workers=tuple(sorted(nodes)),
        errors=errors,
    )
