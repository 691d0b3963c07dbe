"""A worker SIGKILLed in the middle of a fan-out: the parent says `running`, never `succeeded`, until
another worker has finished its children (jobs.tree). In a module of its own: no in-process worker
of another test may take the batches."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest
from celery import Celery

from tests.faults.harness import kill_whole_worker
from tests.jobs.conftest import ApiClient
from tests.jobs.test_job_trees import delivered, enqueue, final, newsletter, readers
from tests.smtp import SmtpServer
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def quiet_smtp_server(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.WARNING, logger="mail.log")


def test_a_worker_killed_mid_fan_out_leaves_the_parent_running_until_another_worker_finishes_it(
    celery_app: Celery,
    smtp_server: SmtpServer,
    api_client: ApiClient,
    worker_process: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Worker processes (prefork, as deployed) that send through this test's SMTP server.
    monkeypatch.setenv("EMAIL_URL", f"smtp://127.0.0.1:{smtp_server.port}")
    first = worker_process("trees-1", "-Q", "email", "--pool=prefork", "--concurrency=1")
    job_id = enqueue(api_client, newsletter(readers(30), window_seconds=10))  # batches at 0, 3.3, 6.7 s
    wait_for(lambda: sum(delivered(smtp_server).values()) >= 10, what="the first batch")

    kill_whole_worker(first)

    for _ in range(20):  # the parent says what is true: not done
        assert api_client.get(f"/api/jobs/{job_id}").json()["status"] == "running"
        time.sleep(0.1)
    worker_process("trees-2", "-Q", "email", "--pool=prefork", "--concurrency=1")
    body = final(api_client, job_id, timeout=120)

    assert body["status"] == "succeeded", body["error"]
    assert delivered(smtp_server) == Counter(readers(30))
