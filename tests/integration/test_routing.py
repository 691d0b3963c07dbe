"""Worker processes started as a user starts them (`celery -A config worker -Q ...`).

No in-process worker runs in this module: only the processes each test starts consume.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_a_worker_process_started_with_q_email_takes_email_tasks_only(
    celery_app: Celery, empty_queues: None, worker_process
) -> None:
    worker_process("email", "-Q", "email", "-I", "tests.probes", "--pool=solo")

    images = celery_app.send_task("images.probe")
    email = celery_app.send_task("email.probe")

    assert email.get(timeout=30)["routing_key"] == "email"
    with celery_app.connection_for_read() as conn:
        channel: Any = conn.default_channel  # kombu's stubs type it as the abstract StdChannel
        waiting = channel.queue_declare("images", passive=True).message_count
    assert waiting == 1
    assert images.state == "PENDING"


def test_the_general_worker_takes_what_the_email_worker_left(
    celery_app: Celery, empty_queues: None, worker_process
) -> None:
    images = celery_app.send_task("images.probe")
    worker_process("general", "-Q", "default,images,data_sync,analytics", "-I", "tests.probes", "--pool=solo")

    assert images.get(timeout=30)["routing_key"] == "images"


def test_a_worker_asked_for_an_unknown_queue_refuses_to_start(worker_process) -> None:
    worker = worker_process("typo", "-Q", "emial", wait=False)

    assert worker.process.wait(timeout=60) != 0
    assert "emial" in worker.log.read_text()
