"""The broker fails under running workers: restarted (with and without its append-only file),
frozen, or its clients' connections killed. No accepted job is lost, stuck or done twice.

Each scenario runs a private Valkey (localdev.embedded_broker) that the workers and this process
use for the length of the test; the machine's shared Redis is never touched. Where the broker
forgets messages, the reconciler (jobs.reconcile, each minute in `default.release_jobs`) is what
sends them again: here the test runs it every 5 s with JOBS_RECONCILE_AFTER_SECONDS = 0.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from tests.faults import harness, oracle
from tests.waiting import wait_for

# RabbitMQ's counterparts: tests/faults/test_rabbitmq_faults.py.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.requires_redis_broker,
]


def _executions(effects: Path) -> int:
    return len(oracle._lines(effects / "executions.log"))


@pytest.mark.parametrize(
    "persist",
    [
        pytest.param(True, id="append-only file"),
        # The tasks running when the connection drops are cancelled (Celery's
        # worker_cancel_long_running_tasks_on_connection_loss) and their messages given back to a
        # broker that forgets them: the reconciler sends their `running` jobs again.
        pytest.param(False, id="no persistence"),
    ],
)
def test_jobs_survive_a_broker_restart(
    celery_app: Celery, worker_process, tmp_path: Path, settings, persist: bool
) -> None:
    settings.JOBS_RECONCILE_AFTER_SECONDS = 0
    effects = tmp_path / "effects"
    with harness.private_broker(celery_app, tmp_path / "broker", persist=persist) as broker:
        job_ids = oracle.accept_jobs(oracle.size(150), effects, seconds=0.1)
        worker = worker_process("restarted", *harness.WORKER_ARGS, broker_url=broker.url)
        wait_for(lambda: _executions(effects) >= 10, what="ten executions")

        broker.stop()  # SIGTERM: with an append-only file, what it holds is on disk
        time.sleep(3)
        broker.start()
        recovery = harness.wait_after_fault(job_ids, harness.patience(job_ids), reconcile_every=5)

        log = worker.log.read_text()
    kind = "with" if persist else "without"
    result = oracle.report(f"broker SIGTERM and restart {kind} AOF", job_ids, effects, recovery.final)
    result.record(recovery.note())
    assert worker.process.poll() is None, log[-3000:]
    assert result.perfect, result.line() + "\n" + log[-3000:]
    recovery.check(result.line())


def test_jobs_survive_a_frozen_broker(celery_app: Celery, worker_process, tmp_path: Path) -> None:
    """SIGSTOP for 10 s (a stalled VM, a swapping host): connections stay open but nothing answers."""
    effects = tmp_path / "effects"
    with harness.private_broker(celery_app, tmp_path / "broker", persist=True) as broker:
        job_ids = oracle.accept_jobs(oracle.size(150), effects, seconds=0.1)
        worker = worker_process("frozen", *harness.WORKER_ARGS, broker_url=broker.url)
        wait_for(lambda: _executions(effects) >= 10, what="ten executions")

        assert broker.process is not None
        os.kill(broker.process.pid, signal.SIGSTOP)
        time.sleep(10)
        os.kill(broker.process.pid, signal.SIGCONT)
        recovery = harness.wait_after_fault(job_ids, timeout=harness.patience(job_ids))

        log = worker.log.read_text()
    result = oracle.report("broker frozen (SIGSTOP) 10 s", job_ids, effects, recovery.final)
    result.record(recovery.note())
    assert worker.process.poll() is None, log[-3000:]
    assert result.perfect, result.line() + "\n" + log[-3000:]
    recovery.check(result.line())


def test_jobs_survive_the_broker_killing_worker_connections(
    celery_app: Celery, worker_process, tmp_path: Path
) -> None:
    """`CLIENT KILL TYPE normal` while 2 s tasks run: every worker connection drops at once."""
    effects = tmp_path / "effects"
    with harness.private_broker(celery_app, tmp_path / "broker", persist=True) as broker:
        job_ids = oracle.accept_jobs(oracle.size(12, most=40), effects, seconds=2)
        worker = worker_process("disconnected", *harness.WORKER_ARGS, broker_url=broker.url)
        wait_for(lambda: _executions(effects) >= 2, what="two tasks running")

        time.sleep(0.5)
        admin = redis.Redis(host=broker.host, port=broker.port)
        killed = int(admin.execute_command("CLIENT", "KILL", "TYPE", "normal"))
        admin.close()
        recovery = harness.wait_after_fault(job_ids, timeout=harness.patience(job_ids, per_job=2))

        log = worker.log.read_text()
    result = oracle.report("CLIENT KILL during 2 s tasks", job_ids, effects, recovery.final)
    result.record(f"{killed} connections killed; {recovery.note()}")
    assert worker.process.poll() is None, log[-3000:]
    assert result.perfect, result.line() + "\n" + log[-3000:]
    recovery.check(result.line())
