"""The broker settings: what RabbitMQ's queues are declared with, and what a RabbitMQ setup must name.

Each case loads `config.settings.base` in a fresh interpreter with a controlled environment, as
a process starting up would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
AMQP = "amqp://guest:guest@rabbitmq.internal:5672/jobs"
PROBE = """
import json
from config.settings import base as s
queue = s.CELERY_TASK_QUEUES[0]
print(json.dumps({
    "arguments": queue.queue_arguments, "exchange": [queue.exchange.name, queue.exchange.type],
    "max_priority": s.CELERY_TASK_QUEUE_MAX_PRIORITY, "ordered": s.BROKER_ORDERS_BY_PRIORITY,
    "rate_limit_store": s.RATE_LIMIT_STORAGE_URL, "options": sorted(s.CELERY_BROKER_TRANSPORT_OPTIONS),
}))
"""
OURS = ("CELERY_BROKER_URL", "METRICS_REDIS_URL", "RATE_LIMIT_STORAGE_URL", "JOBS_MAX_DELIVERIES")


def load(**variables: str) -> subprocess.CompletedProcess[str]:
    env = {
        key: value for key, value in os.environ.items() if key not in OURS and not key.startswith("RABBITMQ_")
    }
    env.update(DJANGO_SECRET_KEY="s" * 50, **variables)
    return subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def loaded(**variables: str) -> dict[str, Any]:
    result = load(**variables)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def refused(**variables: str) -> str:
    result = load(**variables)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    return result.stderr


def test_rabbitmq_gets_quorum_queues_with_a_delivery_limit_a_dlx_and_publisher_confirms() -> None:
    settings = loaded(CELERY_BROKER_URL=AMQP, METRICS_REDIS_URL="redis://metrics.internal:6379/0")

    assert settings["arguments"] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,  # JOBS_MAX_DELIVERIES (5) + 2: our cap fires first
        "x-dead-letter-exchange": "jobs.dead",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    # Topic, so that Celery's native delayed delivery routes countdowns to it.
    assert settings["exchange"] == ["jobs", "topic"]
    assert settings["max_priority"] is None  # quorum queues refuse x-max-priority
    assert settings["ordered"] is False
    assert {"confirm_publish", "read_timeout", "write_timeout"} <= set(settings["options"])
    # The shared rate limits live in the metrics Redis.
    assert settings["rate_limit_store"] == "redis://metrics.internal:6379/0"


def test_classic_rabbitmq_queues_keep_priorities_and_the_direct_exchange() -> None:
    settings = loaded(
        CELERY_BROKER_URL=AMQP, RATE_LIMIT_STORAGE_URL="memory://", RABBITMQ_QUEUE_TYPE="classic"
    )

    assert settings["arguments"] is None  # Celery adds x-max-priority from max_priority
    assert settings["exchange"] == ["", "direct"]  # Celery's default exchange, `default`, is filled in
    assert settings["max_priority"] == 9
    assert settings["ordered"] is True
    assert settings["rate_limit_store"] == "memory://"  # named explicitly: accepted


def test_on_redis_nothing_changes() -> None:
    settings = loaded(CELERY_BROKER_URL="redis://broker.internal:6379/0")

    assert settings["arguments"] is None
    assert settings["max_priority"] == 9
    assert settings["ordered"] is True
    assert "confirm_publish" not in settings["options"]
    assert settings["rate_limit_store"] == "redis://broker.internal:6379/0"


def test_rabbitmq_without_a_redis_for_the_shared_rate_limits_refuses_to_start() -> None:
    error = refused(CELERY_BROKER_URL=AMQP)

    assert "RATE_LIMIT_STORAGE_URL" in error and "METRICS_REDIS_URL" in error


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"RABBITMQ_QUEUE_TYPE": "stream"}, "RABBITMQ_QUEUE_TYPE='stream' is not one of quorum, classic"),
        # Below our own cap RabbitMQ would drop a message before we recorded its dead letter.
        ({"RABBITMQ_DELIVERY_LIMIT": "4"}, "RABBITMQ_DELIVERY_LIMIT=4 is too small"),
    ],
)
def test_a_bad_rabbitmq_setting_fails_at_start_up_naming_the_variable(
    variables: dict[str, str], message: str
) -> None:
    assert message in refused(CELERY_BROKER_URL=AMQP, METRICS_REDIS_URL="redis://m:6379/0", **variables)


@pytest.mark.django_db
def test_no_message_is_published_with_rabbitmqs_dead_lettering_history(empty_queues: None) -> None:
    # A deferral or replay copies the headers of the message it carries on; one that came through
    # native delayed delivery has an `x-death`, which must not travel on (celery/celery#9867).
    from celery.signals import before_task_publish

    from config.celery_app import app

    published: list[dict[str, Any]] = []

    def look(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:  # runs after ours
        published.append(dict(headers or {}))

    before_task_publish.connect(look, weak=False)
    try:
        app.send_task(
            "default.no_such_task",
            headers={"x-death": [{"queue": "celery_delayed_0"}], "x-first-death-queue": "q", "x_job_id": "1"},
        )
    finally:
        before_task_publish.disconnect(look)
        app.control.purge()
    (headers,) = published
    assert not [name for name in headers if name.startswith("x-")]
    assert headers["x_job_id"] == "1"  # our own headers travel on


def test_the_queue_of_a_delayed_message_is_its_routing_key_without_the_delay_prefix() -> None:
    from kombu.transport.native_delayed_delivery import calculate_routing_key

    from config.brokers import queue_of

    assert queue_of(calculate_routing_key(5, "default")) == "default"
    assert queue_of(calculate_routing_key(3600, "data_sync")) == "data_sync"
    assert queue_of("email") == "email" and queue_of(None) == ""
    assert queue_of("0.1.email") == "0.1.email"  # not 28 digits: a queue's own name
