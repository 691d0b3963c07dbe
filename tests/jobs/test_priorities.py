"""Priorities: 0-9, 9 first, on Redis and RabbitMQ; a message sent without one runs at 5, the middle.

Every path a message is sent by (plain apply_async and delay, by name, beat, the outbox, the API)
and sent again by (Celery's retry, a deferral while the database is away, a job's retry, a
dead letter's replay, the release of an unpublished job, the reconciler) is checked on the
real Redis broker: the priority the message carries and the list it waits in. Then real
worker processes, one at a time, prefetching one, started after the backlog is queued, show
the order they run a backlog in, on Redis and on RabbitMQ.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from amqp.exceptions import NotFound, PreconditionFailed
from celery.signals import before_task_publish
from celery.utils import uuid
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from kombu import Connection

from config.celery_app import app
from jobs import outbox, reconcile, services, tracking
from jobs.models import Job
from jobs.registry import JobRequest
from scheduling import beat
from tasks import deadletters, reliability
from tasks.models import DeadLetter
from tests import probes
from tests.conftest import ROOT, WorkerProcess, database_url_for_subprocess
from tests.rabbitmq import RABBITMQ_URL, rabbitmq_answers
from tests.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

TASK = "default.probe_effect"


def waiting(queue: str = "default") -> list[tuple[str, int]]:
    """(task id, priority) of each message waiting in `queue` on Redis, in the order a worker
    takes them; each one checked to wait in its own priority's list."""
    found = []
    with app.connection_for_read() as connection:
        if connection.transport.driver_type != "redis":
            return _waiting_on_rabbitmq(connection, queue)
        channel: Any = connection.default_channel
        for key in channel.fetch_order(queue):
            for raw in reversed(channel.client.lrange(key, 0, -1)):  # LPUSHed, RPOPped
                message = json.loads(raw)
                priority = message["properties"]["priority"]
                assert key == channel._q_for_pri(queue, priority), (key, priority)
                found.append((message["headers"]["id"], priority))
    return found


def _waiting_on_rabbitmq(connection: Any, queue: str) -> list[tuple[str, int]]:
    """RabbitMQ: taken without acknowledgement in the order it hands them out (a priority queue:
    highest first), then given back by closing the channel."""
    from tests import queues

    # A publish from another connection may still be on its way into the queue.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: queues.depth(app, queue) > 0, timeout=5, what="a message")
    channel = connection.channel()
    try:
        bound = app.amqp.queues[queue](channel)
        found: list[tuple[str, int]] = []
        while (message := bound.get(no_ack=False)) is not None:
            found.append((str(message.headers["id"]), int(message.properties["priority"])))
        return found
    finally:
        channel.close()  # unacknowledged: every message goes back to the queue


def effect(key: str) -> dict[str, Any]:
    return {"directory": "/nonexistent", "key": key}


def api(priority: int | None) -> str:
    request = JobRequest(
        type=TASK,
        queue="default",
        payload=effect("api"),
        priority=priority,
        delay_seconds=0,
        idempotency_key="",
    )
    (accepted,) = services.enqueue([request], token=None)
    assert isinstance(accepted, services.Accepted)
    return accepted.job.task_id


def through_outbox(priority: int | None) -> str:
    with transaction.atomic():
        job = outbox.enqueue(TASK, priority=priority, **effect("outbox"))
    return job.task_id


def by_beat(priority: int | None) -> str:
    every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.HOURS)
    model = PeriodicTask.objects.create(
        name=f"priority {priority}",
        task=TASK,
        interval=every,
        kwargs=json.dumps(effect("beat")),
        priority=priority,
    )
    return beat.run_now(app, model).task_id


def given(priority: int | None) -> dict[str, Any]:
    """The options of a call that names a priority, or does not mention one."""
    return {} if priority is None else {"priority": priority}


SENDERS: dict[str, Callable[[int | None], str]] = {
    "apply_async": lambda p: probes.probe_effect.apply_async(kwargs=effect("a"), **given(p)).id,
    "signature": lambda p: probes.probe_effect.signature(kwargs=effect("s"), **given(p)).apply_async().id,
    "send_task by name": lambda p: app.send_task(TASK, kwargs=effect("n"), **given(p)).id,
    "beat": by_beat,
    "outbox": through_outbox,
    "API": api,
}


@pytest.mark.parametrize("sender", SENDERS)
def test_a_message_sent_without_a_priority_waits_in_the_middle(sender: str, empty_queues: None) -> None:
    task_id = SENDERS[sender](None)

    assert waiting() == [(task_id, 5)]


def test_delay_sends_at_the_middle_too(empty_queues: None) -> None:
    result = probes.probe_effect.delay(**effect("d"))

    assert waiting() == [(result.id, 5)]


@pytest.mark.parametrize("priority", [9, 0])
@pytest.mark.parametrize("sender", SENDERS)
def test_a_message_sent_with_a_priority_keeps_it(sender: str, priority: int, empty_queues: None) -> None:
    # 0 too: kombu's virtual transport writes `priority or default`, which would make it 5.
    task_id = SENDERS[sender](priority)

    assert waiting() == [(task_id, priority)]


@pytest.mark.requires_ordered_priorities
def test_a_worker_takes_9_first_then_the_unprioritised_with_5_then_lower(empty_queues: None) -> None:
    sent = [(SENDERS["API"](p), p) for p in (None, 0, 9, 5)]
    sent.append((probes.probe_effect.apply_async(kwargs=effect("x")).id, None))

    order = [task_id for task_id, _ in waiting()]

    assert order == [sent[2][0], sent[0][0], sent[3][0], sent[4][0], sent[1][0]]


def test_every_message_sent_by_name_gets_a_priority_before_it_is_published(empty_queues: None) -> None:
    # Celery publishes through kombu's Producer, which sends 0, the lowest, when it is given no
    # priority (and RabbitMQ takes a message without one as 0): the default is set on the message.
    seen: list[Any] = []

    def look(properties: dict[str, Any] | None = None, **kwargs: Any) -> None:
        seen.append((properties or {}).get("priority"))

    before_task_publish.connect(look, weak=False)
    try:
        app.send_task("default.no_such_task")
        app.send_task("default.no_such_task", priority=0)
    finally:
        before_task_publish.disconnect(look)
    assert seen == [5, 0]


# --- sent again: the same priority --------------------------------------------------------


def job_row(priority: int | None, **fields: Any) -> Job:
    return Job.objects.create(
        type=TASK, queue="default", payload=effect("job"), priority=priority, task_id=uuid(), **fields
    )


@pytest.mark.parametrize("priority, sent_with", [(3, 3), (None, 5)])
def test_a_retried_job_is_sent_with_its_priority(
    priority: int | None, sent_with: int, empty_queues: None
) -> None:
    job = services.retry(job_row(priority, status=Job.Status.FAILED))

    assert waiting() == [(job.task_id, sent_with)]


def test_an_unpublished_job_is_released_with_its_priority(empty_queues: None) -> None:
    job = job_row(8, status=Job.Status.QUEUED)
    Job.objects.filter(pk=job.pk).update(created_at=timezone.now() - timedelta(hours=1))

    assert services.release_due() == 1
    assert waiting() == [(job.task_id, 8)]


@pytest.mark.requires_redis_broker  # the reconciler resends lost messages on Redis only
def test_a_lost_job_is_sent_again_with_its_priority(empty_queues: None) -> None:
    job = job_row(2, status=Job.Status.QUEUED, published_at=timezone.now() - timedelta(hours=1))

    assert reconcile.resend_lost() == 1
    assert waiting() == [(job.task_id, 2)]


@pytest.mark.parametrize("priority, sent_with", [(9, 9), (0, 0), (None, 5)])
def test_a_dead_letter_is_replayed_with_the_priority_it_failed_with(
    priority: int | None, sent_with: int, empty_queues: None
) -> None:
    now = timezone.now()
    letter = DeadLetter.objects.create(
        task_id=uuid(),
        task_name=TASK,
        kwargs=effect("dl"),
        exception_type="tests.Failure",
        priority=priority,
        first_failed_at=now,
        last_failed_at=now,
    )

    task_id = deadletters.replay(letter)

    assert waiting() == [(task_id, sent_with)]


@pytest.fixture
def running(empty_queues: None) -> Iterator[Callable[[int], Any]]:
    """Makes probe_effect look as it does inside a worker running a message of that priority."""
    task = probes.probe_effect

    def run(priority: int) -> Any:
        task.push_request(
            id=uuid(),
            args=(),
            kwargs=effect("running"),
            retries=0,
            headers={},
            called_directly=False,
            delivery_info={
                "exchange": "",
                "routing_key": "default",
                "priority": priority,
                "redelivered": False,
            },
        )
        return task

    yield run
    while task.request_stack.top is not None:
        task.pop_request()


def test_celerys_retry_sends_the_message_with_its_priority(running: Callable[[int], Any]) -> None:
    task = running(8)

    task.retry(exc=RuntimeError("again"), throw=False)

    assert waiting() == [(task.request.id, 8)]


def test_a_message_sent_again_while_the_database_is_away_keeps_its_priority(
    running: Callable[[int], Any],
) -> None:
    task = running(1)

    reliability.defer_for_outage(task, RuntimeError("database away"), {})

    assert waiting() == [(task.request.id, 1)]


def test_the_record_of_a_task_sent_with_apply_async_keeps_its_priority(running: Callable[[int], Any]) -> None:
    task = running(7)

    task.before_start(task.request.id, (), effect("running"))
    job = Job.objects.get(task_id=task.request.id)
    assert job.priority == 7
    # ...so that retrying it through the API sends it at 7 again.
    Job.objects.filter(pk=job.pk).update(status=Job.Status.FAILED)
    retried = services.retry(job)
    assert waiting() == [(retried.task_id, 7)]


def test_a_dead_letter_keeps_the_priority_of_the_message_that_failed(running: Callable[[int], Any]) -> None:
    task = running(9)

    deadletters.record_failure(task, RuntimeError("no"), task.request.id, (), effect("running"), None)

    assert DeadLetter.objects.get(task_id=task.request.id).priority == 9


def test_a_priority_out_of_range_is_recorded_as_the_broker_applies_it() -> None:
    task_id = uuid()
    tracking.record_and_claim(TASK, task_id, "default", effect("x"), 1, False, priority=200)

    assert Job.objects.get(task_id=task_id).priority == 9


# --- the settings that make it so ------------------------------------------------------


@pytest.mark.requires_ordered_priorities
def test_every_queue_is_declared_with_priorities_for_rabbitmq() -> None:
    arguments = {name: queue.queue_arguments for name, queue in app.amqp.queues.items()}

    assert arguments == {name: {"x-max-priority": 9} for name in settings.TASK_QUEUES}


@pytest.mark.requires_ordered_priorities
def test_rabbitmq_priority_queues_can_be_turned_off_for_queues_declared_without_them() -> None:
    probe = (
        "import json, django; django.setup(); from config.celery_app import app; "
        "print(json.dumps({name: queue.queue_arguments for name, queue in app.amqp.queues.items()}))"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "RABBITMQ_PRIORITY_QUEUES": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {name: None for name in settings.TASK_QUEUES}


def test_the_default_priority_is_the_middle_for_tasks_and_for_the_redis_transport() -> None:
    assert app.conf.task_default_priority == 5
    assert app.conf.broker_transport_options["default_priority"] == 5
    assert probes.probe_effect.priority == 5


# --- the order a real worker runs a backlog in ----------------------------------------


@pytest.fixture
def rabbitmq_default_queue() -> Iterator[str]:
    """RABBITMQ_URL, with no `default` queue there before the test, and none left after it.

    An empty, unused one left by an earlier run (perhaps declared without priorities) is deleted;
    one that holds messages or has consumers belongs to someone else: the test is skipped.
    """
    with Connection(RABBITMQ_URL) as connection:
        channel: Any = connection.channel()
        try:
            _, messages, consumers = channel.queue_declare("default", passive=True)
        except NotFound:  # there is none (and the channel is closed)
            messages = consumers = None
        if messages or consumers:
            pytest.skip(
                f"queue `default` at {RABBITMQ_URL} is in use; set RABBITMQ_URL to a vhost of its own"
            )
        if messages is not None:
            # Checked unused and empty above (a quorum queue, the default, refuses the flags).
            channel.queue_delete("default")
    yield RABBITMQ_URL
    with Connection(RABBITMQ_URL) as connection, contextlib.suppress(PreconditionFailed):
        # Refused while a worker still consumes it (a failed test): the next run deletes it.
        leftover: Any = connection.channel()
        leftover.queue_delete("default", if_unused=True, if_empty=True)


def send_backlog(broker_url: str, directory: Path) -> list[tuple[str, int]]:
    """tests/jobs/priority_backlog.py in a process of its own, publishing to `broker_url`."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": database_url_for_subprocess(),
        "CELERY_BROKER_URL": broker_url,
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.jobs.priority_backlog", str(directory)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [(key, priority) for key, priority in json.loads(done.stdout.strip().splitlines()[-1])]


@pytest.mark.integration
@pytest.mark.parametrize(
    "broker",
    [
        pytest.param("redis", marks=pytest.mark.requires_redis_broker),  # on RabbitMQ: the next one
        pytest.param(
            "rabbitmq",
            marks=pytest.mark.skipif(
                not rabbitmq_answers(), reason=f"no RabbitMQ at {RABBITMQ_URL} (RABBITMQ_URL)"
            ),
        ),
    ],
)
def test_a_worker_runs_a_backlog_highest_priority_first_and_the_unprioritised_in_the_middle(
    broker: str,
    request: pytest.FixtureRequest,
    empty_queues: None,
    worker_process: Callable[..., WorkerProcess],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # RabbitMQ orders by priority only in classic queues (RABBITMQ_QUEUE_TYPE=classic); quorum
    # queues, its default, have none. The sender and the worker below read it from the environment.
    monkeypatch.setenv("RABBITMQ_QUEUE_TYPE", "classic")
    url = (
        settings.CELERY_BROKER_URL if broker == "redis" else request.getfixturevalue("rabbitmq_default_queue")
    )
    sent = send_backlog(url, tmp_path)
    # Started after the backlog is queued, one task at a time, one message prefetched: the order it
    # runs them in is the order the broker hands them out.
    worker = worker_process(
        "prio",
        "-Q",
        "default",
        "-P",
        "solo",
        "-c",
        "1",
        "--prefetch-multiplier",
        "1",
        "-I",
        "tests.probes",
        broker_url=url,
    )
    log = tmp_path / "executions.log"

    def ran() -> list[str]:
        return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []

    wait_for(
        lambda: len(ran()) >= len(sent), timeout=120, what=f"{len(sent)} tasks to run ({len(ran())} ran)"
    )

    worker.stop()

    # Highest priority first; in one priority, the order they were sent in.
    expected = [key for key, _ in sorted(sent, key=lambda entry: -entry[1])]
    assert ran() == expected
    assert ran()[:2] == ["api-9", "plain-9"]  # 20 unprioritised messages were waiting before them
    # A task sent with plain apply_async is recorded with the priority its message had.
    assert Job.objects.get(payload__key="plain-0").priority == 0
    assert Job.objects.get(payload__key="bulk-0").priority == 5
