"""/api/queues and /api/dead-letters against a real broker, database and (where it matters) worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from celery import Celery
from django.conf import settings
from django.utils import timezone

from jobs.models import ApiToken, Job, QueuePause
from jobs.tokens import hash_token
from monitoring.models import TaskMetric
from tasks.models import DeadLetter
from tests.jobs.conftest import ApiClient
from tests.monitoring.conftest import add_metric_row
from tests.tasks import images
from tests.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def job_of(client: ApiClient) -> Job:
    """A finished job sent with `client`'s token (its owner is that token's user)."""
    token = ApiToken.objects.get(key_hash=hash_token(client.token))  # type: ignore[attr-defined]
    return Job.objects.create(
        type="email.send", queue="email", task_id=uuid4().hex, status=Job.Status.FAILED, token=token
    )


def queues_by_name(client: ApiClient) -> dict[str, dict[str, Any]]:
    response = client.get("/api/queues")
    assert response.status_code == 200, response.content
    return {queue["name"]: queue for queue in response.json()["queues"]}


def letter(task_name: str = "default.ping", *, minutes_ago: float = 1, **fields: Any) -> DeadLetter:
    failed_at = timezone.now() - timedelta(minutes=minutes_ago)
    values: dict[str, Any] = {
        "task_id": f"task-{DeadLetter.objects.count()}-{failed_at.timestamp()}",
        "task_name": task_name,
        "queue": task_name.split(".")[0],
        "exception_type": "tasks.errors.PermanentJobError",
        "exception_message": "it broke",
        "traceback": 'Traceback (most recent call last):\n  File "x.py", line 1\nPermanentJobError: it broke',
        "attempts": 1,
        "first_failed_at": failed_at,
        "last_failed_at": failed_at,
        **fields,
    }
    return DeadLetter.objects.create(**values)


@pytest.fixture
def pausable(celery_app: Celery) -> Iterator[str]:
    """A queue the test may pause; afterwards any worker of this module consumes it again.

    The in-process worker is not started by `celery worker`, so jobs.worker does not know the
    queues it was started with and a resume alone would not give it the queue back.
    """
    yield "analytics"
    QueuePause.objects.filter(queue="analytics").delete()
    celery_app.control.add_consumer("analytics", reply=True, timeout=1)


# --- queues ---------------------------------------------------------------------------------


def test_it_lists_every_queue_with_its_depth_scheduled_workers_and_pause(
    empty_queues: None, api_client: ApiClient
) -> None:
    for _ in range(2):
        assert api_client.post("/api/jobs", {"type": "default.ping", "payload": {}}).status_code == 202
    api_client.post("/api/jobs", {"type": "default.ping", "payload": {}, "delay_seconds": 400})

    response = api_client.get("/api/queues")

    assert response.status_code == 200
    body = response.json()
    assert body["broker_error"] is None
    queues = {queue["name"]: queue for queue in body["queues"]}
    assert list(queues) == list(settings.TASK_QUEUES)
    for queue in queues.values():
        assert set(queue) >= {
            "name",
            "depth",
            "scheduled",
            "workers",
            "paused",
            "reserved",
            "active",
            "unacked",
        }
        assert isinstance(queue["depth"], int) and isinstance(queue["workers"], list)
        assert queue["paused"] is False
    assert queues["default"]["depth"] == 2
    assert queues["default"]["scheduled"] == 1  # the held job
    assert queues["email"]["scheduled"] == 0


def test_it_lists_the_worker_that_consumes_each_queue(
    celery_worker: Any, celery_app: Celery, staff_client: ApiClient
) -> None:
    hostname = celery_worker.hostname

    def listed_everywhere() -> dict[str, dict[str, Any]] | None:
        queues = queues_by_name(staff_client)
        return queues if all(hostname in queue["workers"] for queue in queues.values()) else None

    queues = wait_for(listed_everywhere, timeout=20, what="every queue to list the in-process worker")

    assert set(queues) == set(settings.TASK_QUEUES)
    assert all(queue["paused"] is False for queue in queues.values())


def test_it_shows_non_staff_tokens_numbered_workers_instead_of_host_names(
    celery_worker: Any, api_client: ApiClient
) -> None:
    def listed_everywhere() -> dict[str, dict[str, Any]] | None:
        queues = queues_by_name(api_client)
        return queues if all(queue["workers"] for queue in queues.values()) else None

    queues = wait_for(listed_everywhere, timeout=20, what="every queue to list a worker")

    assert {worker for queue in queues.values() for worker in queue["workers"]} == {"worker-1"}
    assert celery_worker.hostname.split("@")[-1] not in str(queues)


def test_it_answers_401_for_queues_without_a_token() -> None:
    client = ApiClient(None)

    assert client.get("/api/queues").status_code == 401
    assert client.get("/api/queues/email/stats").status_code == 401
    assert client.post("/api/queues/email/pause").status_code == 401


def test_it_counts_a_queues_runs_in_the_window(api_client: ApiClient) -> None:
    TaskMetric.objects.all().delete()
    add_metric_row("email.send", minutes_ago=2, succeeded=6, failed=2, run=0.2, wait=0.02)
    add_metric_row("email.newsletter", minutes_ago=30, succeeded=2)
    add_metric_row("email.send", minutes_ago=3 * 60, succeeded=100)  # outside the hour
    add_metric_row("images.process", minutes_ago=2, succeeded=50, failed=50)  # another queue

    response = api_client.get("/api/queues/email/stats", window="1h")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["queue"] == "email"
    assert (body["succeeded"], body["failed"]) == (8, 2)
    assert body["failure_rate"] == pytest.approx(0.2)
    assert body["throughput_per_minute"] == pytest.approx(10 / 60, abs=0.01)
    assert body["run"]["p50_ms"] is not None and body["wait"]["p95_ms"] is not None

    day = api_client.get("/api/queues/email/stats", window="24h").json()
    assert (day["succeeded"], day["failed"]) == (108, 2)
    five = api_client.get("/api/queues/email/stats", window="5m").json()
    assert (five["succeeded"], five["failed"]) == (6, 2)


def test_it_answers_empty_stats_for_a_quiet_queue(api_client: ApiClient) -> None:
    TaskMetric.objects.all().delete()

    body = api_client.get("/api/queues/data_sync/stats").json()

    assert (body["succeeded"], body["failed"], body["retried"]) == (0, 0, 0)
    assert body["failure_rate"] is None
    assert body["run"] == {"p50_ms": None, "p95_ms": None}


def test_it_answers_404_for_an_unknown_queue(api_client: ApiClient, staff_client: ApiClient) -> None:
    assert api_client.get("/api/queues/nope/stats").status_code == 404
    assert staff_client.post("/api/queues/nope/pause").status_code == 404
    assert staff_client.post("/api/queues/nope/resume").status_code == 404
    assert not QueuePause.objects.exists()


@pytest.mark.parametrize("window", ["2h", "1d", "", "1H"])
def test_it_refuses_a_bad_stats_window(api_client: ApiClient, window: str) -> None:
    response = api_client.get("/api/queues/email/stats", window=window)

    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "window"


def test_it_pauses_and_resumes_a_queue(pausable: str, api_client: ApiClient, staff_client: ApiClient) -> None:
    paused = staff_client.post(f"/api/queues/{pausable}/pause")

    assert paused.status_code == 200, paused.content
    assert paused.json() == {"name": pausable, "paused": True, "changed": True}
    assert QueuePause.objects.get(queue=pausable).paused_by == "operator"
    assert queues_by_name(api_client)[pausable]["paused"] is True
    assert queues_by_name(api_client)["email"]["paused"] is False
    assert staff_client.post(f"/api/queues/{pausable}/pause").json()["changed"] is False
    assert QueuePause.objects.count() == 1

    resumed = staff_client.post(f"/api/queues/{pausable}/resume")

    assert resumed.status_code == 200
    assert resumed.json() == {"name": pausable, "paused": False, "changed": True}
    assert not QueuePause.objects.exists()
    assert queues_by_name(api_client)[pausable]["paused"] is False
    assert staff_client.post(f"/api/queues/{pausable}/resume").json()["changed"] is False


def test_it_refuses_pause_and_resume_to_non_staff_tokens(pausable: str, api_client: ApiClient) -> None:
    assert api_client.post(f"/api/queues/{pausable}/pause").status_code == 403
    assert not QueuePause.objects.exists()
    QueuePause.objects.create(queue=pausable)
    assert api_client.post(f"/api/queues/{pausable}/resume").status_code == 403
    assert QueuePause.objects.filter(queue=pausable).exists()


# --- dead letters ------------------------------------------------------------------------------


def test_it_lists_dead_letters_newest_failure_first(staff_client: ApiClient) -> None:
    old = letter("default.ping", minutes_ago=60)
    new = letter("email.send", minutes_ago=1, kwargs={"to": "ann@example.com", "template": "welcome"})

    response = staff_client.get("/api/dead-letters")

    assert response.status_code == 200
    body = response.json()
    assert [item["id"] for item in body["items"]] == [new.pk, old.pk]
    assert body["next_cursor"] is None
    item = body["items"][0]
    assert (item["task_name"], item["queue"], item["exception_type"]) == (
        "email.send",
        "email",
        "tasks.errors.PermanentJobError",
    )
    assert "kwargs" not in item and "traceback" not in item


def test_it_filters_dead_letters_by_task_and_queue(staff_client: ApiClient) -> None:
    ping = letter("default.ping")
    mail = letter("email.send", kwargs={"to": "x@example.com", "template": "welcome"})

    def ids(**params: Any) -> list[int]:
        return [item["id"] for item in staff_client.get("/api/dead-letters", **params).json()["items"]]

    assert ids(task="default.ping") == [ping.pk]
    assert ids(queue="email") == [mail.pk]
    assert ids(task="email.send", queue="default") == []


def test_it_walks_every_dead_letter_once_through_the_pages(staff_client: ApiClient) -> None:
    made = [letter(minutes_ago=i % 4) for i in range(10)]  # several share a failure time
    same = timezone.now() - timedelta(minutes=30)
    DeadLetter.objects.filter(pk__in=[m.pk for m in made[:4]]).update(last_failed_at=same)

    seen: list[int] = []
    cursor = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = staff_client.get("/api/dead-letters", **params).json()
        seen += [item["id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break

    assert cursor is None
    assert sorted(seen) == sorted(m.pk for m in made)
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "garbage"},
        {"cursor": "MjAyNi0wMS0wMVQwMDowMDowMCswMDowMHxhYmM"},  # a date, then not a number
        {"limit": 0},
        {"limit": 500},
    ],
)
def test_it_refuses_a_bad_dead_letter_list_parameter(api_client: ApiClient, params: dict[str, Any]) -> None:
    letter()

    assert api_client.get("/api/dead-letters", **params).status_code == 400


def test_it_shows_a_dead_letter_with_arguments_and_traceback(staff_client: ApiClient) -> None:
    dead = letter("images.process", kwargs={"asset_id": 5, "operations": [{"op": "save"}]})

    response = staff_client.get(f"/api/dead-letters/{dead.pk}")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == dead.pk
    assert body["args"] == []
    assert body["kwargs"] == {"asset_id": 5, "operations": [{"op": "save"}]}
    assert body["traceback"].startswith("Traceback")
    assert body["exception_message"] == "it broke"


def test_it_masks_email_recipients_for_non_staff_tokens_and_shows_them_to_staff(
    api_client: ApiClient, staff_client: ApiClient
) -> None:
    kwargs = {"to": "ann.lee@example.com", "template": "welcome", "context": {"link": "https://x/reset/abc"}}
    dead = letter("email.send", kwargs=kwargs, job=job_of(api_client))

    masked = api_client.get(f"/api/dead-letters/{dead.pk}").json()["kwargs"]
    shown = staff_client.get(f"/api/dead-letters/{dead.pk}").json()["kwargs"]

    assert masked["to"] == "a***@e***.com"
    assert "ann.lee" not in str(masked)
    assert "abc" not in str(masked["context"])
    assert masked["template"] == "welcome"
    assert shown == kwargs


def test_it_answers_404_for_an_unknown_dead_letter(api_client: ApiClient, staff_client: ApiClient) -> None:
    assert api_client.get("/api/dead-letters/999999").status_code == 404
    assert staff_client.post("/api/dead-letters/999999/replay").status_code == 404


def test_it_refuses_replay_to_non_staff_tokens(api_client: ApiClient) -> None:
    dead = letter()

    assert api_client.post(f"/api/dead-letters/{dead.pk}/replay").status_code == 403
    dead.refresh_from_db()
    assert dead.replay_count == 0


def test_it_replays_a_dead_letter_and_records_its_success(
    celery_worker: object, staff_client: ApiClient
) -> None:
    dead = letter("default.ping")

    response = staff_client.post(f"/api/dead-letters/{dead.pk}/replay")

    assert response.status_code == 202, response.content
    body = response.json()
    assert body["dead_letter"] == dead.pk
    assert body["task_id"]
    wait_for(
        lambda: DeadLetter.objects.get(pk=dead.pk).replay_status == "succeeded",
        timeout=30,
        what="the replay to succeed",
    )
    dead.refresh_from_db()
    assert (dead.replay_count, dead.replay_task_id) == (1, body["task_id"])


def test_it_refuses_to_replay_a_task_that_no_longer_exists(staff_client: ApiClient) -> None:
    dead = letter("gone.task")

    response = staff_client.post(f"/api/dead-letters/{dead.pk}/replay")

    assert response.status_code == 409
    dead.refresh_from_db()
    assert dead.replay_count == 0


def test_it_lists_the_dead_letter_of_a_job_that_failed_for_good(
    celery_worker: object,
    api_client: ApiClient,
    staff_client: ApiClient,
    make_client: Callable[..., ApiClient],
) -> None:
    asset = images.asset(b"GIF89a not really", "fake.gif")  # there, but not an image
    payload = {"asset_id": asset.pk, "operations": [{"op": "save"}]}
    job_id = api_client.post("/api/jobs", {"type": "images.process", "payload": payload}).json()["id"]
    wait_for(lambda: Job.objects.get(pk=job_id).status == "failed", timeout=30, what="the job to fail")
    task_id = Job.objects.get(pk=job_id).task_id

    item = wait_for(
        lambda: next(
            (i for i in api_client.get("/api/dead-letters").json()["items"] if i["task_id"] == task_id), None
        ),
        timeout=10,
        what="the dead letter to be listed",
    )

    assert (item["task_name"], item["queue"], item["attempts"]) == ("images.process", "images", 1)
    assert DeadLetter.objects.get(pk=item["id"]).job_id == UUID(job_id)
    detail = api_client.get(f"/api/dead-letters/{item['id']}").json()
    assert detail["kwargs"] == payload
    assert f"image asset {asset.pk}: not an image" in detail["exception_message"]
    # The owner sees the exception, not the stack: no frames, no server paths.
    assert detail["traceback"] == f"{detail['exception_type']}: {detail['exception_message']}"
    assert "File " not in detail["traceback"] and "/" not in detail["traceback"]
    assert "File " in staff_client.get(f"/api/dead-letters/{item['id']}").json()["traceback"]
    # Another non-staff user does not see it at all.
    stranger = make_client("stranger")
    assert item["id"] not in [i["id"] for i in stranger.get("/api/dead-letters").json()["items"]]
    assert stranger.get(f"/api/dead-letters/{item['id']}").status_code == 404
