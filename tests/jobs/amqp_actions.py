"""What a web process, beat or an operator does, on the broker CELERY_BROKER_URL names (RabbitMQ):
`python -m tests.jobs.amqp_actions ACTION [ARGUMENT...]`; prints one JSON value on its last line.

Its own process, because the test process's Celery app is bound to the suite's Redis.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from typing import Any

import django

django.setup()

from django.conf import settings  # noqa: E402
from django.test import Client  # noqa: E402
from django.utils import timezone  # noqa: E402

from config.celery_app import app  # noqa: E402
from jobs import publish, queues, reconcile, services  # noqa: E402
from jobs.models import Job  # noqa: E402
from jobs.registry import JobRequest  # noqa: E402
from monitoring import broker  # noqa: E402
from tests.probes import probe_effect  # noqa: E402

TASK = "default.probe_effect"


def confirm_modes() -> dict[str, Any]:
    """Per publishing path: whether its channel waits for RabbitMQ's confirm, and what a publish
    RabbitMQ refuses does there."""
    from kombu.pools import producers

    paths = {
        # jobs.publish: the API, the outbox, releases, job retries, resends, replays.
        "api": lambda: producers[publish._publish_connection()].acquire(block=True, timeout=5),
        # apply_async, send_task, beat, Celery's retries.
        "apply_async": app.producer_or_acquire,
    }
    answers: dict[str, Any] = {}
    for name, acquire in paths.items():
        with acquire() as producer:
            producer.publish({"x": 1}, exchange="", routing_key="no-such-queue-is-fine")
            channel: Any = producer.channel
            confirmed = bool(channel._confirm_selected)
            try:
                # An exchange nobody declared: RabbitMQ closes the channel (404). Without confirms
                # the publish returns as if the message had been taken.
                producer.publish({"x": 1}, exchange="jobs.no-such-exchange", routing_key="default")
                refused = "returned normally"
            except Exception as exc:
                refused = type(exc).__name__
        answers[name] = {"confirmed": confirmed, "refused_publish": refused}
    return answers


# What a message that came through native delayed delivery once (1 s: the queue celery_delayed_0)
# carries, as a deferral or a replay would copy it on.
DELAYED_ONCE = {
    "x-death": [
        {
            "count": 1,
            "reason": "expired",
            "queue": "celery_delayed_0",
            "exchange": "celery_delayed_0",
            "routing-keys": ["0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.default"],
        }
    ],
    "x-first-death-queue": "celery_delayed_0",
    "x-first-death-reason": "expired",
    "x-first-death-exchange": "celery_delayed_0",
}


def send(directory: str, key: str, how: str, delay: str = "0", runs_for: str = "0") -> str:
    kwargs: dict[str, Any] = {"directory": directory, "key": key}
    if float(runs_for):
        kwargs["seconds"] = float(runs_for)
    seconds = int(delay)
    if how == "apply_async":
        return str(probe_effect.apply_async(kwargs=kwargs, countdown=seconds or None).id)
    if how == "again":  # sent on with the headers of a message that was delayed before
        return str(probe_effect.apply_async(kwargs=kwargs, countdown=seconds, headers=dict(DELAYED_ONCE)).id)
    request = JobRequest(
        type=TASK, queue="default", payload=kwargs, priority=None, delay_seconds=seconds, idempotency_key=""
    )
    (accepted,) = services.enqueue([request], token=None)
    assert isinstance(accepted, services.Accepted), accepted
    return str(accepted.job.id)


def depths() -> dict[str, int]:
    return {name: depth.ready for name, depth in broker.queue_depths().items()}


def consumers() -> dict[str, list[str]]:
    view = broker.inspect_workers(timeout=2.0)
    return {name: list(queue.workers) for name, queue in view.queues.items()}


def api_queues() -> dict[str, Any]:
    from django.contrib.auth import get_user_model

    from jobs.tokens import create_token

    user, _ = get_user_model().objects.get_or_create(username="amqp-actions", defaults={"is_staff": True})
    _token, secret = create_token(user)
    settings.ALLOWED_HOSTS.append("testserver")
    answer = Client().get("/api/queues", HTTP_AUTHORIZATION=f"Bearer {secret}")
    return {"status": answer.status_code, **answer.json()}


def metrics_page_depths() -> dict[str, Any]:
    """The admin metrics page as a superuser sees it: each queue's "Waiting" cell."""
    import re

    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(
        username="amqp-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    settings.ALLOWED_HOSTS.append("testserver")
    client = Client()
    client.force_login(user)
    page = client.get("/admin/metrics/")
    cells = re.findall(
        r'<tr data-queue="([^"]+)">\s*<td>[^<]*</td>\s*<td class="num depth">([^<]*)</td>', page.text
    )
    return {"status": page.status_code, "waiting": dict(cells)}


def lost_job_resent() -> dict[str, Any]:
    """A `queued` job published an hour ago whose message RabbitMQ does not hold: the reconciler
    leaves it to the broker (it does not read RabbitMQ's queues)."""
    job = Job.objects.create(
        type=TASK,
        queue="default",
        payload={"directory": "/nonexistent", "key": "lost"},
        task_id=f"lost-{timezone.now().timestamp()}",
        status=Job.Status.QUEUED,
        published_at=timezone.now() - timedelta(hours=1),
    )
    return {"resent": reconcile.resend_lost(), "job": str(job.pk)}


def main(action: str, *arguments: str) -> Any:
    if action == "confirm":
        return confirm_modes()
    if action == "send":
        return send(*arguments)
    if action == "depths":
        return depths()
    if action == "pause":
        return queues.pause(arguments[0], by="test")
    if action == "resume":
        return queues.resume(arguments[0])
    if action == "consumers":
        return consumers()
    if action == "api_queues":
        return api_queues()
    if action == "metrics_page":
        return metrics_page_depths()
    if action == "reconcile":
        return lost_job_resent()
    if action == "settings":
        return {
            "quorum": settings.RABBITMQ_QUORUM_QUEUES,
            "ordered": settings.BROKER_ORDERS_BY_PRIORITY,
            "rate_limit_store": settings.RATE_LIMIT_STORAGE_URL.split("://")[0],
        }
    raise SystemExit(f"unknown action {action!r}")


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
