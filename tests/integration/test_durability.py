"""No accepted job is lost when the process running it dies (acks_late + reject_on_worker_lost)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from celery import Celery

from tests import probes

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def wait_for_lines(path: Path, count: int, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} has fewer than {count} lines")


def test_a_task_whose_worker_process_is_killed_runs_again(
    celery_app: Celery, empty_queues: None, worker_process, tmp_path: Path
) -> None:
    worker_process("durable", "-Q", "default", "-I", "tests.probes", "--pool=prefork", "--concurrency=1")
    marker = tmp_path / "runs.txt"

    result = probes.probe_sleep.delay(path=str(marker), seconds=2)
    first_pid = int(wait_for_lines(marker, 1)[0])
    os.kill(first_pid, signal.SIGKILL)  # the pool process dies mid-task, as in an OOM kill

    assert result.get(timeout=60) == 2  # redelivered and run again, to completion
    assert int(marker.read_text().splitlines()[1]) != first_pid


@pytest.mark.requires_redis_broker  # RabbitMQ restarts: tests/faults/test_rabbitmq_faults.py
def test_a_job_accepted_before_a_broker_restart_runs_after_it(
    celery_app: Celery, worker_process, tmp_path: Path
) -> None:
    """A broker that keeps an append-only file (the embedded one does) gives back what it accepted."""
    from localdev.embedded_broker import EmbeddedBroker, free_port

    broker = EmbeddedBroker(free_port(), tmp_path / "broker", persist=True)
    broker.start()
    try:
        with celery_app.connection_for_write(broker.url) as connection:
            result = probes.probe_flaky.apply_async(kwargs={"fail_times": 0}, connection=connection)
        broker.stop()  # nothing consumed it yet
        broker.start()

        worker_process(
            "after-restart", "-Q", "default", "-I", "tests.probes", "--pool=solo", broker_url=broker.url
        )

        assert result.get(timeout=30) == {"attempts": 1}
    finally:
        broker.stop()
