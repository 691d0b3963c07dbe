"""The API when the broker or the rate limiter's Redis is down or frozen: a JSON 503 with
Retry-After (or a 200 where what was asked is kept in the database), never a 500 and never a hang.

Real dead servers: a closed port (refused at once) and a server that accepts and never answers.
Each request's time is printed (run with -s); the bound asserted is only "not a hang".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery.utils import uuid
from django.utils import timezone

from config.celery_app import app
from jobs import ratelimit
from jobs.models import Job, QueuePause
from tasks.models import DeadLetter
from tests import pools
from tests.deadservers import FrozenServer, closed_url
from tests.jobs.conftest import ApiClient

pytestmark = pytest.mark.django_db

PING = {"type": "default.ping", "payload": {}}
HANG = 60  # seconds: anything longer is a hang, whatever the machine's load


def reset_broker_connections() -> None:
    """Drops every pooled broker connection of this process, so the next use opens a new one."""
    pools.reset(app)


@pytest.fixture(params=["closed", "frozen"])
def down_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "closed":
        yield closed_url()
    else:
        with FrozenServer() as server:
            yield server.url


@pytest.fixture
def broker_down(down_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every publisher of this process (the API's, the app's pools, control broadcasts) points there."""
    # Celery reads CELERY_BROKER_WRITE_URL before its settings: the connections for sending go there.
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", down_url)
    reset_broker_connections()
    yield down_url
    monkeypatch.delenv("CELERY_BROKER_WRITE_URL")
    reset_broker_connections()


@pytest.fixture
def limiter_down(down_url: str, settings: Any) -> Iterator[str]:
    settings.RATE_LIMIT_STORAGE_URL = down_url
    ratelimit._limiter.cache_clear()
    yield down_url
    ratelimit._limiter.cache_clear()


def timed(what: str, call: Callable[[], Any]) -> Any:
    started = time.monotonic()
    response = call()
    elapsed = time.monotonic() - started
    print(f"{what}: {response.status_code} in {elapsed:.1f} s")
    assert elapsed < HANG, f"{what} took {elapsed:.0f} s"
    return response


def assert_503(response: Any) -> None:
    assert response.status_code == 503, response.content
    assert response["Content-Type"].startswith("application/json")
    assert response["Retry-After"].isdigit()
    assert "127.0.0.1" not in response.json()["detail"]  # the broker's address is not the client's business


def dead_letter() -> DeadLetter:
    now = timezone.now() - timedelta(minutes=1)
    return DeadLetter.objects.create(
        task_id=uuid(),
        task_name="default.ping",
        exception_type="x.Boom",
        first_failed_at=now,
        last_failed_at=now,
    )


# --- the rate limiter's Redis ---------------------------------------------------------


def test_enqueue_answers_503_when_the_rate_limiters_redis_is_down(
    api_client: ApiClient, limiter_down: str
) -> None:
    assert_503(timed("POST /api/jobs (limiter down)", lambda: api_client.post("/api/jobs", PING)))
    batch = {"jobs": [PING, PING]}
    assert_503(
        timed("POST /api/jobs/batch (limiter down)", lambda: api_client.post("/api/jobs/batch", batch))
    )
    assert not Job.objects.exists()


# --- the broker ---------------------------------------------------------------------------


def test_enqueue_and_batch_answer_503_and_keep_nothing_when_the_broker_is_down(
    api_client: ApiClient, broker_down: str
) -> None:
    assert_503(timed("POST /api/jobs", lambda: api_client.post("/api/jobs", PING)))
    batch = {"jobs": [PING, PING]}
    assert_503(timed("POST /api/jobs/batch", lambda: api_client.post("/api/jobs/batch", batch)))
    assert not Job.objects.exists()


def test_retry_and_replay_answer_503_and_change_nothing_when_the_broker_is_down(
    staff_client: ApiClient, broker_down: str
) -> None:
    job = Job.objects.create(
        type="default.ping", queue="default", task_id=uuid(), status=Job.Status.FAILED, error_type="Boom"
    )
    assert_503(timed("POST /api/jobs/{id}/retry", lambda: staff_client.post(f"/api/jobs/{job.pk}/retry")))
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED

    letter = dead_letter()
    response = timed(
        "POST /api/dead-letters/{id}/replay",
        lambda: staff_client.post(f"/api/dead-letters/{letter.pk}/replay"),
    )
    assert_503(response)
    letter.refresh_from_db()
    assert (letter.replay_count, letter.replay_status) == (0, "")


def test_a_child_the_broker_would_not_take_leaves_the_jobs_above_it_as_they_were(
    staff_client: ApiClient, broker_down: str
) -> None:
    # They wait for the child before its message is sent; it was not sent: they settle again.
    top = Job.objects.create(
        type="analytics.backfill",
        queue="analytics",
        task_id=uuid(),
        status=Job.Status.PARTIALLY_FAILED,
        own_finished_at=timezone.now(),
    )
    middle = Job.objects.create(
        type="analytics.backfill",
        queue="analytics",
        task_id=uuid(),
        status=Job.Status.PARTIALLY_FAILED,
        own_finished_at=timezone.now(),
        parent=top,
    )
    done = Job.objects.create(
        type="default.ping", queue="default", task_id=uuid(), status=Job.Status.SUCCEEDED, parent=middle
    )
    child = Job.objects.create(
        type="default.ping", queue="default", task_id=uuid(), status=Job.Status.FAILED, parent=middle
    )

    assert_503(timed("POST /api/jobs/{id}/retry", lambda: staff_client.post(f"/api/jobs/{child.pk}/retry")))

    statuses = dict(Job.objects.values_list("pk", "status"))
    assert statuses == {
        top.pk: "partially_failed",
        middle.pk: "partially_failed",
        done.pk: "succeeded",
        child.pk: "failed",
    }
    assert Job.objects.get(pk=middle.pk).error_message.startswith("1 of 2 children did not succeed")


def test_cancel_pause_resume_and_queues_answer_from_the_database_when_the_broker_is_down(
    staff_client: ApiClient, broker_down: str
) -> None:
    # The row is the record: a cancel or a pause holds whatever the broker does; the workers are
    # told when it is back (default.release_jobs re-sends pauses every few seconds).
    job = Job.objects.create(type="default.ping", queue="default", task_id=uuid(), status=Job.Status.QUEUED)
    response = timed("DELETE /api/jobs/{id}", lambda: staff_client.delete(f"/api/jobs/{job.pk}"))
    assert response.status_code == 200 and response.json()["status"] == "cancelled"

    response = timed("POST /api/queues/email/pause", lambda: staff_client.post("/api/queues/email/pause"))
    assert response.status_code == 200 and QueuePause.objects.filter(queue="email").exists()
    response = timed("POST /api/queues/email/resume", lambda: staff_client.post("/api/queues/email/resume"))
    assert response.status_code == 200 and not QueuePause.objects.exists()


def test_the_queue_list_says_the_broker_did_not_answer(
    staff_client: ApiClient, monkeypatch: pytest.MonkeyPatch, down_url: str
) -> None:
    # The queue list reads the broker (depths) and the workers (inspect): point both there.
    monkeypatch.setenv("CELERY_BROKER_READ_URL", down_url)
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", down_url)
    reset_broker_connections()
    try:
        response = timed("GET /api/queues", lambda: staff_client.get("/api/queues"))
    finally:
        monkeypatch.undo()
        reset_broker_connections()
    assert response.status_code == 200
    assert response.json()["broker_error"] == "the broker did not answer"
