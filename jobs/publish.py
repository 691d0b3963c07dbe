"""Sending jobs' messages to the broker: in one round trip, failing fast when it is away.

The web process publishes over its own connection pool whose socket timeouts
are JOBS_API_PUBLISH_TIMEOUT_SECONDS: an unreachable or silent broker costs a
request a few seconds and a 503, not minutes. Several jobs are sent in one
kombu publish batch (one Redis pipeline: 1,000 jobs, one round trip).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import TYPE_CHECKING, Any

from amqp.exceptions import MessageNacked, NotFound
from django.conf import settings
from kombu import Connection, Producer
from kombu.exceptions import LimitExceeded
from kombu.pools import producers

from config import brokers
from config.celery_app import app
from jobs.protocol import BROKER_ERRORS, JOB_HEADER, PARENT_HEADER

if TYPE_CHECKING:
    from jobs.models import Job


# The broker down or frozen, or every pooled connection busy; RabbitMQ: it refused the message
# (nack), or an exchange it needs is not there: the job was not taken.
_UNAVAILABLE: tuple[type[Exception], ...] = (*BROKER_ERRORS, LimitExceeded, MessageNacked, NotFound)

_lock = threading.Lock()
_connection: Connection | None = None
_topology_declared = False


class BrokerUnavailable(Exception):
    """The broker did not take the messages; nothing was queued for the caller to rely on."""


def _publish_connection() -> Connection:
    global _connection
    with _lock:
        if _connection is None:
            timeout = settings.JOBS_API_PUBLISH_TIMEOUT_SECONDS
            options = dict(app.conf.broker_transport_options or {})
            if app.conf.broker_url.startswith(("redis://", "rediss://")):
                options.update(socket_timeout=timeout, socket_connect_timeout=timeout)
            elif options.get("confirm_publish"):
                # RabbitMQ: every publish waits for its confirm (config/settings/base.py), at most this.
                options.update(read_timeout=timeout, write_timeout=timeout)
            _connection = app.connection_for_write(connect_timeout=timeout, transport_options=options)
        return _connection


def _declare_topology_once(connection: Connection) -> None:
    """RabbitMQ quorum queues: the queues and delayed-delivery exchanges exist before this
    process's first publish (config.brokers.declare_topology); tried again until it worked."""
    global _topology_declared
    if _topology_declared or not settings.RABBITMQ_QUORUM_QUEUES:
        return
    with _lock:
        if not _topology_declared:
            with connection.clone() as own:
                own.ensure_connection(max_retries=0)  # one attempt: a refused broker fails fast
                brokers.declare_topology(own, app.amqp.queues.values())
            _topology_declared = True


def queue_for(task_name: str) -> str:
    """The queue a task's messages go to (CELERY_TASK_ROUTES)."""
    route = app.amqp.router.route({}, task_name, (), {})
    return str(route["queue"].name)


def message_priority(priority: int | None) -> int:
    """A job's priority (0-9, 9 first; None: not given) as its message carries it.

    The same number on Redis and RabbitMQ (delivery.redis reads 9 first, as RabbitMQ does); a job
    without one gets task_default_priority, the middle, like a task sent with plain apply_async.
    """
    return int(app.conf.task_default_priority) if priority is None else priority


def message_options(job: Job, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """How a job's message is sent, every time it is (first publish, release, retry, resend)."""
    options: dict[str, Any] = {
        "task_id": job.task_id,
        "queue": job.queue,
        "headers": {**(job.held_headers or {}), **(headers or {}), JOB_HEADER: str(job.id)},
        "priority": message_priority(job.priority),
    }
    # The attempt the message is for: a retry (held in the row, or sent again by the reconciler)
    # keeps counting where its job is, a running job's lost message is the same attempt again.
    if job.status == "retrying" and job.attempts:
        options["retries"] = job.attempts
    elif job.status == "running" and job.attempts > 1:
        options["retries"] = job.attempts - 1
    if job.parent_id is not None:
        options["headers"][PARENT_HEADER] = str(job.parent_id)
    if job.run_at is not None:
        options["eta"] = job.run_at
    return options


def publish(jobs: Sequence[Job], headers: dict[str, Any] | None = None) -> None:
    """Sends one message per job, in one batch; raises BrokerUnavailable if the broker failed.

    Redis: one pipeline (kombu's producer batch). RabbitMQ with publisher confirms: the messages
    go out on a channel of their own without waiting, and their confirms are collected at the end
    (one wait for the lot, not a round trip per message); a nack or a missing confirm fails it all.
    """
    if not jobs:
        return
    timeout = settings.JOBS_API_PUBLISH_TIMEOUT_SECONDS
    retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
    try:
        connection = _publish_connection()
        _declare_topology_once(connection)
        with producers[connection].acquire(block=True, timeout=timeout) as producer:
            if len(jobs) > 1 and _confirms(producer):
                with _collected_confirms(producer, timeout) as own:
                    _send_all(jobs, headers, own, None)  # no retry: a reconnection would lose the channel
            else:
                # Each message is an LPUSH (+ nothing else with our queues): 2 per job leaves headroom.
                with producer.batch(max_size=2 * len(jobs) + 8):
                    _send_all(jobs, headers, producer, retry_policy)
    except _UNAVAILABLE as exc:  # down, frozen, or every connection busy
        raise BrokerUnavailable(f"the broker did not take the job(s): {type(exc).__name__}") from exc


def _send_all(
    jobs: Sequence[Job], headers: dict[str, Any] | None, producer: Any, retry_policy: dict[str, Any] | None
) -> None:
    declared: set[str] = set()
    for job in jobs:
        task = app.tasks[job.type]
        options: dict[str, Any] = message_options(job, headers)
        if job.queue in declared:
            # Declared (kombu's maybe_declare, cached per connection) with this batch's first message
            # for the queue: checking again cost a copy of the queue bound to the channel a message
            # (a quarter of a batch's publishing, issue 18).
            options["declare"] = []
        declared.add(job.queue)
        if hasattr(task, "validate_arguments"):
            # Checked when the job was recorded (API, enqueue, spawn): not again per message.
            options["arguments_checked"] = True
        if retry_policy is None:
            task.apply_async(kwargs=job.payload, producer=producer, retry=False, **options)
        else:
            task.apply_async(
                kwargs=job.payload, producer=producer, retry=True, retry_policy=retry_policy, **options
            )


def _confirms(producer: Any) -> bool:
    """RabbitMQ (py-amqp) with publisher confirms on: each publish would wait for its own confirm."""
    return bool(getattr(producer.connection.connection, "confirm_publish", False))


@contextmanager
def _collected_confirms(producer: Any, timeout: float) -> Iterator[Any]:
    """A producer on a channel of its own, in confirm mode, whose publishes do not wait: on leaving,
    waits (at most `timeout`) until RabbitMQ has confirmed every message published through it."""
    from amqp import spec

    channel: Any = producer.connection.channel()
    try:
        channel._confirm_selected = True
        channel.confirm_select()
        confirmed: dict[str, Any] = {"upto": 0, "single": set(), "nacked": False}

        def on_ack(tag: int, multiple: bool) -> None:
            if multiple:
                confirmed["upto"] = max(confirmed["upto"], tag)
            else:
                confirmed["single"].add(tag)

        def on_nack(tag: int, multiple: bool) -> None:
            confirmed["nacked"] = True

        channel.events["basic_ack"].add(on_ack)
        channel.events["basic_nack"].add(on_nack)
        own = Producer(channel, exchange=producer.exchange, auto_declare=False)
        counted: list[int] = []
        original = channel._basic_publish

        def counting_publish(*args: Any, **kwargs: Any) -> Any:  # the publish that does not wait
            counted.append(1)
            return original(*args, **kwargs)

        channel.basic_publish = counting_publish
        yield own
        published = len(counted)

        def all_confirmed() -> bool:
            upto, single = confirmed["upto"], confirmed["single"]
            return upto >= published or all(tag in single for tag in range(upto + 1, published + 1))

        deadline = time.monotonic() + timeout
        while not confirmed["nacked"] and not all_confirmed():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"RabbitMQ confirmed {published} messages only in part within {timeout} s")
            channel.wait([spec.Basic.Ack, spec.Basic.Nack], timeout=remaining)
        if confirmed["nacked"]:
            raise MessageNacked()
    finally:
        with suppress(Exception):
            channel.close()


def marked_before_sending() -> bool:
    """Whether a job's row is marked published as it is written, before its message is sent (Redis).

    There, a row marked published whose message is in no queue is sent again by the reconciler
    (jobs.reconcile.resend_lost): a web process that dies between its INSERT and its publish leaves
    such a row, as a broker that loses a message does. The mark then costs no UPDATE after the
    publish (a round trip of each of the API's four, issue 18). RabbitMQ: a row is marked once
    RabbitMQ has confirmed the message (`mark_published`); the reconciler sends nothing again there,
    and `default.release_jobs` sends the rows never marked.
    """
    return str(app.conf.broker_url).startswith(("redis://", "rediss://"))


def mark_published(pks: Sequence[Any], using: str | None = None) -> datetime | None:
    """Records that the jobs `pks` were published (returns when): one UPDATE, whatever their number.

    Outside a transaction (after an API request's or enqueue()'s commit) it commits without waiting
    for PostgreSQL's WAL flush (synchronous_commit off, for this transaction only): the mark is lost
    only if PostgreSQL itself crashes within the next few hundred milliseconds, and a lost mark costs
    a second message from default.release_jobs (JOBS_PUBLISH_GRACE_SECONDS later), which the job's
    claim makes harmless (jobs.commits). It saves a disk flush per publish (a millisecond or more each).
    """
    from django.db import connections
    from django.utils import timezone

    from jobs import commits, sql
    from jobs.models import Job

    if not pks:
        return None
    now = timezone.now()
    alias = using or "default"
    conn = connections[alias]
    if conn.vendor != "postgresql":
        rows = Job.objects.using(alias).filter(pk__in=list(pks), published_at__isnull=True)
        rows.update(published_at=now)
        return now
    # In SQL of its own (jobs.sql): the ORM's building of it cost more than PostgreSQL's running it.
    no_flush = commits.applies(conn)

    def build() -> str:
        published, pk = sql.column(Job, "published_at", conn), sql.column(Job, "id", conn)
        text = (
            f"UPDATE {sql.table(Job, conn)} SET {published} = %s "  # noqa: S608 (names from the model)
            f"WHERE {pk} = ANY(%s) AND {published} IS NULL"
        )
        return f"{text} AND {commits.NO_FLUSH_CONDITION}" if no_flush else text

    pk_field = Job._meta.pk
    assert pk_field is not None
    params = [
        sql.field(Job, "published_at").get_db_prep_value(now, conn),
        [pk_field.get_db_prep_value(pk, conn) for pk in pks],
    ]
    with conn.cursor() as cursor:
        cursor.execute(sql.statement(("mark published", no_flush), build, conn), params)
    return now
