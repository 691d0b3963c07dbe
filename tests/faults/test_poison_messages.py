"""Poison messages of every kind while good jobs flow: the workers stay up, every good job completes.

Pushed straight into the queue's Redis list, as a broken or hostile producer would: bytes that
are not JSON, an envelope whose body is not base64, an envelope without Celery's headers, a
task no worker knows, and a pickled body (the project accepts JSON only). Kombu's Redis
transport raises out of its read loop on the first two and the worker exits; the reliable
transport (delivery/redis.py) and the Celery-level quarantine (tasks/poison.py) set them aside.
"""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.utils import uuid

from tests.faults import harness, oracle
from tests.waiting import wait_for

# RabbitMQ's counterpart: tests/faults/test_rabbitmq_faults.py.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.requires_redis_broker,
]


def _envelope(body: bytes | str, headers: dict, content_type: str = "application/json") -> str:
    encoded = body if isinstance(body, str) else base64.b64encode(body).decode()
    return json.dumps(
        {
            "body": encoded,
            "content-encoding": "utf-8" if content_type == "application/json" else "binary",
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "correlation_id": headers.get("id", uuid()),
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "default", "routing_key": "default"},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": uuid(),
            },
        }
    )


def _celery_headers(task: str) -> dict:
    task_id = uuid()
    return {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "retries": 0}


def poison_messages() -> dict[str, str]:
    """One of each kind the "nothing lost" issue lists, as the bytes a Redis list would hold."""
    good_body = json.dumps([[], {}, {"callbacks": None, "errbacks": None, "chain": None}]).encode()
    return {
        "not JSON": "this is {not json",
        "body not base64": _envelope("%%% not base64 %%%", _celery_headers("default.ping")),
        "no Celery headers": _envelope(good_body, {}),
        "unknown task": _envelope(good_body, _celery_headers("no.such.task")),
        "pickle": _envelope(
            pickle.dumps(([], {}, {})), _celery_headers("default.ping"), "application/x-python-serialize"
        ),
    }


def test_workers_outlive_poison_messages_and_every_good_job_completes(
    celery_app: Celery, worker_process, tmp_path: Path
) -> None:
    effects = tmp_path / "effects"
    with harness.private_broker(celery_app, tmp_path / "broker", persist=False) as broker:
        workers = [
            worker_process(f"poisoned-{n}", *harness.WORKER_ARGS, broker_url=broker.url) for n in (1, 2)
        ]
        half = oracle.size(100) // 2
        job_ids = oracle.accept_jobs(half, effects, seconds=0.05)
        wait_for(lambda: (effects / "executions.log").exists(), what="the first execution")

        client = redis.Redis(host=broker.host, port=broker.port)
        poisons = poison_messages()
        for raw in poisons.values():
            client.lpush("default", raw)
        client.close()
        job_ids += oracle.accept_jobs(half, effects, seconds=0.05, first=half)  # more good ones behind them
        recovered = oracle.wait_until_final(job_ids, harness.patience(job_ids), workers)

        alive = [worker.process.poll() is None for worker in workers]
        logs = harness.tail(*workers)
    result = oracle.report("poison messages among good jobs", job_ids, effects, recovered)
    result.record(f"{len(poisons)} kinds: {', '.join(poisons)}; workers alive: {sum(alive)} of {len(alive)}")
    assert all(alive), logs
    assert result.perfect, result.line() + "\n" + logs
