"""RabbitMQ fails under running workers: their connections closed (once, and again and again), the
node restarted, poison messages among good jobs. No accepted job is lost, stuck or done twice.

The counterparts of test_broker_faults.py and test_poison_messages.py (which fault a private
Valkey) for a suite run on RabbitMQ (CELERY_BROKER_URL=amqp://...). The server may be shared
with other users: the connections closed are those of the suite's vhost only (`rabbitmqctl
close_connection`), and the node is restarted (`stop_app`/`start_app`) only where
RABBITMQ_MAY_RESTART=1 says it is the test run's own, as in CI.

RabbitMQ gives a message back to its queue when the channel that took it closes unacknowledged;
a task cut off by the lost connection is cancelled (worker_cancel_long_running_tasks_on_connection_loss)
and runs again from the redelivery; the probe's marker keeps its effect single.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
from celery import Celery
from django.conf import settings

from tests import rabbitmq
from tests.faults import harness, oracle
from tests.waiting import wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.requires_amqp_broker,
]


def _executions(effects: Path) -> int:
    return len(oracle._lines(effects / "executions.log"))


@pytest.fixture
def vhost() -> str:
    """The suite's vhost, whose connections a test may close."""
    rabbitmq.skip_unless_rabbitmqctl()
    return rabbitmq.vhost_of(settings.CELERY_BROKER_URL)


def test_jobs_survive_rabbitmq_closing_the_worker_connections_during_long_tasks(
    celery_app: Celery, empty_queues: None, worker_process, tmp_path: Path, vhost: str
) -> None:
    """The counterpart of `CLIENT KILL`: every connection of the vhost closed while 2 s tasks run."""
    effects = tmp_path / "effects"
    job_ids = oracle.accept_jobs(oracle.size(12, most=40), effects, seconds=2)
    worker = worker_process("disconnected", *harness.WORKER_ARGS)
    wait_for(lambda: _executions(effects) >= 2, what="two tasks running")

    time.sleep(0.5)
    closed = rabbitmq.close_connections(vhost)
    harness.forget_broker_connections(celery_app)  # this process's were closed too
    recovery = harness.wait_after_fault(job_ids, timeout=harness.patience(job_ids, per_job=2))

    log = worker.log.read_text()
    result = oracle.report(
        "connections closed (rabbitmqctl) during 2 s tasks", job_ids, effects, recovery.final
    )
    result.record(f"{closed} connections closed; {recovery.note()}")
    assert closed > 0
    assert worker.process.poll() is None, log[-3000:]
    assert result.perfect, result.line() + "\n" + log[-3000:]
    recovery.check(result.line())


def test_jobs_survive_rabbitmq_closing_the_worker_connections_again_and_again(
    celery_app: Celery, empty_queues: None, worker_process, tmp_path: Path, vhost: str
) -> None:
    """Every connection of the vhost closed every 3 s while a backlog drains (a flapping network,
    a node failing over): the workers reconnect each time and nothing is lost or done twice."""
    effects = tmp_path / "effects"
    job_ids = oracle.accept_jobs(oracle.size(150), effects, seconds=0.1)
    worker = worker_process("flapping", *harness.WORKER_ARGS)
    wait_for(lambda: _executions(effects) >= 10, what="ten executions")

    rounds = closed = 0
    while rounds < 3 and oracle.final_count(job_ids) < len(job_ids):
        closed += rabbitmq.close_connections(vhost)
        harness.forget_broker_connections(celery_app)
        rounds += 1
        time.sleep(3)
    recovery = harness.wait_after_fault(job_ids, timeout=harness.patience(job_ids))

    log = worker.log.read_text()
    result = oracle.report("connections closed (rabbitmqctl) every 3 s", job_ids, effects, recovery.final)
    result.record(f"{rounds} rounds, {closed} connections closed; {recovery.note()}")
    assert worker.process.poll() is None, log[-3000:]
    assert result.perfect, result.line() + "\n" + log[-3000:]
    recovery.check(result.line())


def test_jobs_survive_a_rabbitmq_restart(
    celery_app: Celery, empty_queues: None, worker_process, tmp_path: Path, vhost: str
) -> None:
    """`rabbitmqctl stop_app`, 3 s, `start_app`: durable queues and persistent messages come back."""
    if not rabbitmq.may_restart():
        pytest.skip("restarts the whole RabbitMQ node: set RABBITMQ_MAY_RESTART=1 where it is the run's own")
    effects = tmp_path / "effects"
    job_ids = oracle.accept_jobs(oracle.size(150), effects, seconds=0.1)
    worker = worker_process("restarted", *harness.WORKER_ARGS)
    wait_for(lambda: _executions(effects) >= 10, what="ten executions")

    rabbitmq.restart_app(down_seconds=3)
    harness.forget_broker_connections(celery_app)
    recovery = harness.wait_after_fault(job_ids, harness.patience(job_ids))

    log = worker.log.read_text()
    result = oracle.report("RabbitMQ stop_app and start_app", job_ids, effects, recovery.final)
    result.record(recovery.note())
    assert worker.process.poll() is None, log[-3000:]
    assert result.perfect, result.line() + "\n" + log[-3000:]
    recovery.check(result.line())


def poison_messages() -> dict[str, tuple[bytes, str, dict | None]]:
    """One of each kind a broken or hostile AMQP producer could send: (body, content type, headers)."""
    good_body = b'[[], {}, {"callbacks": null, "errbacks": null, "chain": null}]'
    return {
        "not JSON": (b"this is {not json", "application/json", _celery_headers("default.ping")),
        "not UTF-8": (b"\xff\xfe\xfa not text", "application/json", _celery_headers("default.ping")),
        "no Celery headers": (good_body, "application/json", None),
        "unknown task": (good_body, "application/json", _celery_headers("no.such.task")),
        "pickle": (
            pickle.dumps(([], {}, {})),
            "application/x-python-serialize",
            _celery_headers("default.ping"),
        ),
    }


def _celery_headers(task: str) -> dict:
    from celery.utils import uuid

    task_id = uuid()
    return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "retries": 0}


def test_workers_outlive_poison_messages_on_rabbitmq_and_every_good_job_completes(
    celery_app: Celery, empty_queues: None, worker_process, tmp_path: Path
) -> None:
    effects = tmp_path / "effects"
    workers = [worker_process(f"poisoned-{n}", *harness.WORKER_ARGS) for n in (1, 2)]
    half = oracle.size(100) // 2
    job_ids = oracle.accept_jobs(half, effects, seconds=0.05)
    wait_for(lambda: (effects / "executions.log").exists(), what="the first execution")

    poisons = poison_messages()
    queue = celery_app.amqp.queues["default"]
    with celery_app.connection_for_write() as connection:
        producer = connection.Producer()
        for body, content_type, headers in poisons.values():
            producer.publish(
                body,
                content_type=content_type,
                content_encoding="binary",
                headers=headers,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
            )
    job_ids += oracle.accept_jobs(half, effects, seconds=0.05, first=half)  # more good ones behind them
    recovered = oracle.wait_until_final(job_ids, harness.patience(job_ids), workers)

    alive = [worker.process.poll() is None for worker in workers]
    logs = harness.tail(*workers)
    result = oracle.report("poison messages among good jobs", job_ids, effects, recovered)
    result.record(f"{len(poisons)} kinds: {', '.join(poisons)}; workers alive: {sum(alive)} of {len(alive)}")
    assert all(alive), logs
    assert result.perfect, result.line() + "\n" + logs
    logs = "".join(worker.log.read_text() for worker in workers)
    assert logs.count("quarantined a message from queue 'default'") == len(poisons), logs[-3000:]
