"""RabbitMQ as the broker (CELERY_BROKER_URL=amqp://...), against the real RabbitMQ at RABBITMQ_URL:
quorum queues with a delivery limit and a dead-letter exchange, publisher confirms on every path,
what RabbitMQ dead-letters turned into dead letters, countdowns through native delayed delivery,
depths and pause/resume, the reconciler leaving redelivery to the broker.

Publishing runs in processes of their own (tests/jobs/amqp_actions.py): this process's Celery app
is bound to the suite's Redis. Give RABBITMQ_URL a vhost of its own: the tests delete the project's
queues there when they are empty and unused, and skip when they are in use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from amqp.exceptions import NotFound, PreconditionFailed
from django.conf import settings
from kombu import Connection, Queue

from config import brokers
from jobs.models import Job
from tasks import dead_lettered
from tasks.models import DeadLetter, QuarantinedMessage
from tests.conftest import ROOT, WorkerProcess, database_url_for_subprocess
from tests.rabbitmq import RABBITMQ_URL, rabbitmq_answers
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.integration,
    pytest.mark.skipif(not rabbitmq_answers(), reason=f"no RabbitMQ at {RABBITMQ_URL} (RABBITMQ_URL)"),
]

OUR_QUEUES = (*settings.TASK_QUEUES, brokers.DEAD_LETTER_QUEUE)


def quorum_queues() -> tuple[Queue, ...]:
    return brokers.task_queues(
        settings.TASK_QUEUES,
        broker_url=RABBITMQ_URL,
        queue_type=brokers.QUORUM,
        delivery_limit=settings.RABBITMQ_DELIVERY_LIMIT,
    )


@pytest.fixture
def rabbitmq() -> Iterator[str]:
    """RABBITMQ_URL with none of the project's queues there: those left empty and unused by an
    earlier run (of either type) are deleted; one in use belongs to someone else: skipped."""
    with Connection(RABBITMQ_URL) as connection:
        for name in OUR_QUEUES:
            channel: Any = connection.channel()
            try:
                _, _messages, consumers = channel.queue_declare(name, passive=True)
            except NotFound:
                continue
            if consumers:
                pytest.skip(f"queue {name} at {RABBITMQ_URL} is in use; give RABBITMQ_URL a vhost of its own")
            # (Quorum queues refuse if_unused: no consumer was checked above.)
            channel.queue_delete(name)
            channel.close()
    yield RABBITMQ_URL


def action(*arguments: str, **env: str) -> Any:
    """tests/jobs/amqp_actions.py in a process of its own, on RabbitMQ."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.jobs.amqp_actions", *arguments],
        cwd=ROOT,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "config.settings.test",
            "DATABASE_URL": database_url_for_subprocess(),
            "CELERY_BROKER_URL": RABBITMQ_URL,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def amqp_worker(rabbitmq: str, worker_process: Callable[..., WorkerProcess]) -> Callable[..., WorkerProcess]:
    def start(*queues: str) -> WorkerProcess:
        return worker_process(
            "rabbit",
            "-Q",
            ",".join(queues or settings.TASK_QUEUES),
            "-P",
            "solo",
            "-I",
            "tests.probes",
            broker_url=rabbitmq,
        )

    return start


def ran(directory: Path) -> list[str]:
    log = directory / "executions.log"
    return [line.split()[0] for line in log.read_text().splitlines()] if log.exists() else []


# --- the queues as declared --------------------------------------------------------------------


def test_a_worker_declares_every_task_queue_as_a_quorum_queue_with_a_delivery_limit_and_a_dlx(
    amqp_worker: Callable[..., WorkerProcess],
) -> None:
    amqp_worker()

    with Connection(RABBITMQ_URL) as connection:
        for queue in quorum_queues():
            # Declaring with the same arguments is accepted, with any other refused: these are them.
            queue.bind(connection.channel()).declare()
            classic: Any = connection.channel()
            with pytest.raises(PreconditionFailed):
                classic.queue_declare(queue.name, durable=True, arguments={"x-max-priority": 9})
        brokers.dead_letter_queue().bind(connection.channel()).declare()
        # Native delayed delivery's exchanges, declared by the worker (countdowns go through them).
        delayed: Any = connection.channel()
        delayed.exchange_declare("celery_delayed_27", type="topic", durable=True, passive=True)
    assert queue.queue_arguments is not None
    assert queue.queue_arguments["x-delivery-limit"] == settings.JOBS_MAX_DELIVERIES + 2
    assert queue.queue_arguments["x-dead-letter-exchange"] == brokers.DEAD_LETTER_EXCHANGE


def test_on_rabbitmq_priorities_are_accepted_but_not_ordered_unless_queues_are_classic(rabbitmq: str) -> None:
    assert action("settings") == {"quorum": True, "ordered": False, "rate_limit_store": "redis"}
    classic = action("settings", RABBITMQ_QUEUE_TYPE="classic")
    assert classic["quorum"] is False and classic["ordered"] is True


# --- publisher confirms ----------------------------------------------------------------------------


def test_every_publishing_path_waits_for_rabbitmqs_confirm_and_a_refused_publish_raises(
    rabbitmq: str,
) -> None:
    answer = action("confirm")

    # jobs.publish (the API, the outbox, releases, retries, resends, replays) and the app's
    # producers (apply_async, send_task, beat, Celery's retries).
    assert answer == {
        path: {"confirmed": True, "refused_publish": "NotFound"} for path in ("api", "apply_async")
    }


# --- dead-lettered by RabbitMQ -> our dead letters -----------------------------------------------


def test_a_message_returned_past_the_delivery_limit_becomes_a_dead_letter_and_fails_its_job(
    rabbitmq: str, tmp_path: Path
) -> None:
    job = Job.objects.get(pk=action("send", str(tmp_path), "poison", "api"))
    returns = 0
    with Connection(RABBITMQ_URL) as connection:
        queue = quorum_queues()[-1].bind(connection.channel())
        # A worker that dies on the message over and over: each time it goes back to the queue.
        while (message := queue.get(no_ack=False)) is not None:
            assert returns <= settings.RABBITMQ_DELIVERY_LIMIT, "RabbitMQ never dead-lettered it"
            message.requeue()
            returns += 1
        assert returns == settings.RABBITMQ_DELIVERY_LIMIT + 1

        assert dead_lettered.drain(connection) == 1
        assert dead_lettered.drain(connection) == 0

    letter = DeadLetter.objects.get(task_id=job.task_id)
    assert (letter.task_name, letter.queue, letter.kwargs) == ("default.probe_effect", "default", job.payload)
    assert letter.exception_type == "rabbitmq.DeadLettered"
    assert "RABBITMQ_DELIVERY_LIMIT" in letter.exception_message
    assert letter.job_id == job.pk
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED
    assert job.error_type == "rabbitmq.DeadLettered"


def test_our_delivery_cap_fires_before_rabbitmqs_and_leaves_a_dead_letter_with_the_traceback(
    amqp_worker: Callable[..., WorkerProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One delivery allowed (RabbitMQ's limit follows: 1 + 2), for the publisher and the workers.
    monkeypatch.setenv("JOBS_MAX_DELIVERIES", "1")
    worker = amqp_worker("default")
    job = Job.objects.get(pk=action("send", str(tmp_path), "killer", "api", "0", "60"))
    wait_for(lambda: ran(tmp_path) == ["killer"], timeout=60, what="the task to start")

    worker.process.kill()  # its connection drops: RabbitMQ requeues the message (x-delivery-count 1)
    worker.process.wait()
    amqp_worker("default")

    letter = wait_for(
        lambda: DeadLetter.objects.filter(task_id=job.task_id).first(), timeout=60, what="the dead letter"
    )
    assert letter.exception_type == "tasks.errors.DeliveryLimitExceeded"
    assert "delivered 2 times" in letter.exception_message
    assert "Traceback" in letter.traceback
    assert letter.kwargs == job.payload
    assert ran(tmp_path) == ["killer"]  # not run again
    wait_for(lambda: Job.objects.get(pk=job.pk).status == Job.Status.FAILED, what="the job to fail")
    with Connection(RABBITMQ_URL) as connection:
        assert dead_lettered.drain(connection) == 0  # acknowledged by us, not dead-lettered by RabbitMQ


def test_a_message_rejected_without_requeue_becomes_a_dead_letter(rabbitmq: str, tmp_path: Path) -> None:
    job = Job.objects.get(pk=action("send", str(tmp_path), "rejected", "api"))
    with Connection(RABBITMQ_URL) as connection:
        message = quorum_queues()[-1].bind(connection.channel()).get(no_ack=False)
        assert message is not None
        message.reject(requeue=False)
        # Anything else RabbitMQ dead-letters (not a Celery task) is kept in the quarantine.
        channel: Any = connection.default_channel
        channel.basic_publish(channel.prepare_message(b"not a task"), exchange=brokers.DEAD_LETTER_EXCHANGE)

        def both_recorded() -> bool:
            dead_lettered.drain(connection)
            return DeadLetter.objects.exists() and QuarantinedMessage.objects.exists()

        wait_for(both_recorded, what="the dead-lettered messages to be recorded")

    letter = DeadLetter.objects.get(task_id=job.task_id)
    assert "rejected it without requeue" in letter.exception_message
    assert QuarantinedMessage.objects.get().body == "not a task"


# --- countdowns, depths, pause and resume, the reconciler --------------------------------------


def test_countdowns_go_through_native_delayed_delivery_and_run(
    amqp_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    worker = amqp_worker("default")

    action("send", str(tmp_path), "countdown", "apply_async", "2")
    job_id = action("send", str(tmp_path), "delayed-job", "api", "2")
    # Sent on with the x-death of an earlier trip through celery_delayed_0, and delayed through it
    # again (some RabbitMQ versions before 4.0.1 take that for a dead-letter cycle and drop it:
    # config.celery_app strips the history; 3.10 itself delivers it either way).
    action("send", str(tmp_path), "delayed-again", "again", "1")

    wait_for(lambda: len(ran(tmp_path)) == 3, timeout=60, what="the three delayed tasks to run")
    assert sorted(ran(tmp_path)) == ["countdown", "delayed-again", "delayed-job"]
    wait_for(lambda: Job.objects.get(pk=job_id).status == Job.Status.SUCCEEDED, what="the job to succeed")
    log = worker.log.read_text()
    assert "Failed to setup delayed delivery" not in log
    assert "Direct exchanges are not supported" not in log


def test_a_countdown_sent_before_any_worker_ever_ran_is_delivered_once_one_does(
    rabbitmq: str, worker_process: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    with Connection(RABBITMQ_URL) as connection:  # no delayed-delivery exchanges or queues either
        for level in range(28):
            channel: Any = connection.channel()
            try:
                _, messages, consumers = channel.queue_declare(f"celery_delayed_{level}", passive=True)
            except NotFound:
                continue
            if messages or consumers:
                pytest.skip(
                    f"delayed delivery at {RABBITMQ_URL} is in use; give RABBITMQ_URL a vhost of its own"
                )
            channel.queue_delete(f"celery_delayed_{level}")
            channel.exchange_delete(f"celery_delayed_{level}")
        last: Any = connection.channel()
        last.exchange_delete("celery_delayed_delivery")

    job_id = action("send", str(tmp_path), "early", "api", "2")

    assert Job.objects.get(pk=job_id).published_at is not None  # taken by RabbitMQ, not refused
    worker_process("rabbit", "-Q", "default", "-P", "solo", "-I", "tests.probes", broker_url=rabbitmq)
    wait_for(lambda: ran(tmp_path) == ["early"], timeout=60, what="the countdown to run")


def test_depths_pause_and_resume_work_on_rabbitmq(
    amqp_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    amqp_worker("default")
    assert action("pause", "default") is True
    wait_for(lambda: not action("consumers").get("default"), what="the worker to stop consuming default")
    for key in ("a", "b", "c"):
        action("send", str(tmp_path), key, "api")

    assert action("depths")["default"] == 3
    listed = action("api_queues")
    assert listed["status"] == 200
    assert listed["broker"] == "rabbitmq" and listed["queue_type"] == "quorum"
    assert listed["priorities_ordered"] is False
    assert {q["name"]: q["depth"] for q in listed["queues"]}["default"] == 3
    page = action("metrics_page")
    assert page["status"] == 200
    assert page["waiting"]["default"] == "3"

    assert action("resume", "default") is True
    wait_for(lambda: len(ran(tmp_path)) == 3, timeout=60, what="the backlog to run once resumed")
    assert action("depths")["default"] == 0


def test_the_reconciler_leaves_redelivery_to_rabbitmq(rabbitmq: str) -> None:
    answer = action("reconcile")

    assert answer["resent"] == 0
    assert Job.objects.get(pk=answer["job"]).status == Job.Status.QUEUED
