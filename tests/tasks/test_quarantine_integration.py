"""Poison messages through a real worker and broker: kept, counted, acked; the worker goes on."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from monitoring import rollup
from monitoring.models import TaskMetric
from tasks.models import QuarantinedMessage
from tests import queues
from tests.monitoring.conftest import clean_metrics, flush_here  # noqa: F401  (a fixture)
from tests.probes import probe_flaky
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SECRET = "reset-link-token-5f1e"  # stands for personal data in a body: it must never be logged


def publish_raw(celery_app: Celery, body: Any, *, content_type: str, headers: dict[str, Any] | None) -> None:
    """A message on the `default` queue exactly as given: no Celery envelope is added or checked."""
    queue = celery_app.amqp.queues["default"]
    with celery_app.connection_for_write() as connection:
        producer = connection.Producer()
        producer.publish(
            body,
            content_type=content_type,
            content_encoding="binary" if isinstance(body, bytes) else "utf-8",
            headers=headers,
            exchange=queue.exchange,
            routing_key="default",
            declare=[queue],
        )


def task_headers(name: str, task_id: str, **more: Any) -> dict[str, Any]:
    return {"lang": "py", "task": name, "id": task_id, "root_id": task_id, "argsrepr": "()", **more}


@pytest.mark.usefixtures("clean_metrics")
@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_poison_messages_are_quarantined_counted_and_acked_and_the_worker_goes_on(
    celery_app: Celery, empty_queues: None, worker_process, tmp_path: Path, pool: str
) -> None:
    # prefork as the Procfile runs it: the consumer (main process) writes the rows, children run tasks.
    worker = worker_process("poison", "-Q", "default", "-I", "tests.probes", f"--pool={pool}", "-c", "1")
    good_body = '[[], {"fail_times": 0}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    flaky = "default.probe_flaky"
    pickled = pickle.dumps(((), {"fail_times": 0, "note": SECRET}, {}))
    poison = [
        # an unknown task
        ("unknown_task", good_body, "application/json", task_headers("default.no_such_task", "t-unknown")),
        # pickle for a known task: refused (JSON only), never unpickled
        ("content_type", pickled, "application/x-python-serialize", task_headers(flaky, "t-pkl")),
        # YAML likewise
        ("content_type", "- 1\n- 2\n", "application/x-yaml", task_headers(flaky, "t-yaml")),
        # a JSON content type with a body that is not JSON
        ("undecodable", f"this is {{not json {SECRET}", "application/json", task_headers(flaky, "t-x")),
        # JSON, but not protocol 2's [args, kwargs, embed]
        ("envelope", f'{{"hello": "{SECRET}"}}', "application/json", task_headers(flaky, "t-obj")),
        ("envelope", "42", "application/json", task_headers(flaky, "t-int")),
        # headers without an id, or without a task name, or none at all
        ("envelope", good_body, "application/json", {"task": "default.probe_flaky"}),
        ("envelope", good_body, "application/json", {"task": ["not", "a", "name"], "id": "t-list"}),
        ("envelope", f'["{SECRET}"]', "application/json", None),
    ]
    for _, body, content_type, headers in poison:
        publish_raw(celery_app, body, content_type=content_type, headers=headers)

    # The worker is still there and takes the next message.
    assert probe_flaky.delay(fail_times=0).get(timeout=30) == {"attempts": 1}
    wait_for(
        lambda: QuarantinedMessage.objects.count() >= len(poison),
        timeout=30,
        what="every poison message in the quarantine",
    )
    rows = list(QuarantinedMessage.objects.order_by("id"))
    assert [row.kind for row in rows] == [kind for kind, *_ in poison], [(r.kind, r.reason) for r in rows]
    assert {row.queue for row in rows} == {"default"}
    by_id = {row.task_id: row for row in rows}
    assert by_id["t-unknown"].reason == "no worker knows the task 'default.no_such_task'"
    assert by_id["t-pkl"].body_encoding == "base64" and by_id["t-pkl"].size == len(pickled)
    assert "application/x-python-serialize" in by_id["t-pkl"].reason
    assert by_id["t-x"].body == f"this is {{not json {SECRET}" and by_id["t-x"].body_encoding == "utf-8"
    assert "protocol 2" in by_id["t-obj"].reason
    assert all(row.size > 0 and row.reason for row in rows)

    # Nothing is left in the queue or waiting to be redelivered: every bad message was acked.
    assert queues.depth(celery_app, "default") == 0
    with celery_app.connection_for_write() as connection:
        if connection.transport.driver_type == "redis":
            client = connection.default_channel.client  # type: ignore[attr-defined]  # Redis channel
            assert client.zcard("unacked_index") == 0 and client.hlen("unacked") == 0

    # The log says what and why, never the body.
    log = worker.log.read_text()
    assert log.count("quarantined a message from queue 'default'") == len(poison)
    assert SECRET not in log

    # Counted: `rejected` under the task it named (or "unknown"), and the kind of quarantine.
    flush_here()
    worker.stop()
    # On RabbitMQ a message left unacknowledged goes back to the queue once its consumer is gone.
    assert queues.depth(celery_app, "default") == 0
    rollup.roll_up()
    unknown = TaskMetric.objects.get(task="default.no_such_task")
    assert unknown.rejected == 1 and unknown.exceptions == {"quarantined:unknown_task": 1}
    flaky_rows = TaskMetric.objects.filter(task=flaky)
    assert sum(row.rejected for row in flaky_rows) == 6
    exceptions: dict[str, int] = {}
    for row in flaky_rows:
        for name, count in row.exceptions.items():
            exceptions[name] = exceptions.get(name, 0) + count
    assert exceptions == {
        "quarantined:content_type": 2,
        "quarantined:undecodable": 1,
        "quarantined:envelope": 3,
    }
