"""/api/jobs through Django's test client, a real broker, a real database and a real worker.

Every test is transactional: the in-process worker (module scoped) consumes every queue once a test
has started it, and it only sees committed rows. Jobs that must stay put are delayed (120 s: an ETA
message; over 300 s: held in the database) or written as rows with no message at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery.utils import uuid
from celery.worker import state as worker_state
from django.utils import timezone

from config.celery_app import app
from jobs import publish, ratelimit, reconcile, services, tracking
from jobs.models import Job
from tasks.models import DeadLetter, EmailLog
from tests.jobs.conftest import ApiClient
from tests.smtp import SmtpServer
from tests.tasks import images
from tests.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True)

PING = {"type": "default.ping", "payload": {}}
JOB_FIELDS = {
    "id",
    "type",
    "queue",
    "status",
    "priority",
    "parent",
    "cancel_requested_at",
    "children",
    "depends_on",
    "progress",
    "attempts",
    "result",
    "error",
    "created_at",
    "started_at",
    "finished_at",
    "run_at",
}


def email(to: str = "ann@example.com", **extra: Any) -> dict[str, Any]:
    return {
        "type": "email.send",
        "payload": {"to": to, "template": "welcome", "context": {"name": "Ann"}},
        **extra,
    }


def held(**extra: Any) -> dict[str, Any]:
    """A ping due in 400 s: longer than the broker may hold it, so it waits in the database."""
    return {**PING, "delay_seconds": 400, **extra}


def job_row(status: str = Job.Status.QUEUED, **fields: Any) -> Job:
    """A job's row with no message behind it: its state stays what the test says."""
    return Job.objects.create(type="default.ping", queue="default", task_id=uuid(), status=status, **fields)


def status_of(job_id: str) -> str:
    return Job.objects.get(pk=job_id).status


def make_due(job_id: str) -> None:
    """Moves a held job's due time and creation time into the past (past the publish grace too)."""
    past = timezone.now() - timedelta(minutes=5)
    Job.objects.filter(pk=job_id).update(run_at=past, created_at=past)


@pytest.fixture
def closed_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The publisher's connection points at a port where nothing listens (a real connection, refused)."""
    connection = app.connection_for_write(
        url="redis://127.0.0.1:1/0",
        connect_timeout=1,
        transport_options={"socket_timeout": 1, "socket_connect_timeout": 1},
    )
    monkeypatch.setattr(publish, "_connection", connection)
    yield
    connection.release()


@pytest.fixture
def tight_rate(settings: Any) -> Iterator[str]:
    settings.JOBS_API_ENQUEUE_RATE = "3/minute"
    ratelimit._limiter.cache_clear()
    yield "3/minute"
    ratelimit._limiter.cache_clear()


def fresh_window(client: ApiClient) -> ApiClient:
    """Token ids repeat across runs (and on SQLite across tests): start its window empty."""
    from jobs.tokens import authenticate

    token = authenticate(client.token)  # type: ignore[attr-defined]
    assert token is not None
    limiter, rate = ratelimit._limiter()
    limiter.clear(rate, "jobs-api", str(token.pk))
    return client


# --- authentication ------------------------------------------------------------------------


def test_it_refuses_a_request_without_a_token() -> None:
    response = ApiClient(None).post("/api/jobs", PING)

    assert response.status_code == 401
    assert not Job.objects.exists()


def test_it_refuses_an_unknown_token() -> None:
    client = ApiClient("jobs_not-a-token-anyone-was-given")

    assert client.post("/api/jobs", PING).status_code == 401
    assert client.get("/api/jobs").status_code == 401


@pytest.mark.parametrize(
    "header",
    [
        "Token jobs_secret-looking-value-123",
        "Bearer",
        "Bearer ",
        "jobs_secret-looking-value-123",
        "Basic am9ic19zZWNyZXQtbG9va2luZy12YWx1ZS0xMjM=",
        "Bearer " + "x" * 500,
    ],
)
def test_it_refuses_a_malformed_authorization_header_and_never_logs_it(
    api_client: ApiClient, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    response = ApiClient(None).post("/api/jobs", PING, Authorization=header)

    assert response.status_code == 401
    logged = " ".join(record.getMessage() + (record.exc_text or "") for record in caplog.records)
    assert "secret-looking-value" not in logged
    assert "am9ic19" not in logged
    assert "x" * 50 not in logged


def test_it_refuses_a_token_of_a_deactivated_user(make_client: Callable[..., ApiClient]) -> None:
    from django.contrib.auth import get_user_model

    client = make_client("leaver")
    get_user_model().objects.filter(username="leaver").update(is_active=False)

    assert client.post("/api/jobs", PING).status_code == 401


def test_it_refuses_staff_operations_to_a_token_of_a_non_staff_user(api_client: ApiClient) -> None:
    job = job_row(Job.Status.FAILED)

    assert api_client.post(f"/api/jobs/{job.pk}/retry").status_code == 403
    assert api_client.delete(f"/api/jobs/{job.pk}").status_code == 403
    job.refresh_from_db()
    assert job.status == Job.Status.FAILED


# --- enqueue ------------------------------------------------------------------------------


def test_it_accepts_a_job_and_answers_with_its_id_type_status_and_queue(api_client: ApiClient) -> None:
    response = api_client.post("/api/jobs", email(priority=7, delay_seconds=120))

    assert response.status_code == 202, response.content
    body = response.json()
    assert set(body) == JOB_FIELDS
    assert (body["type"], body["queue"], body["priority"]) == ("email.send", "email", 7)
    job = Job.objects.get(pk=body["id"])
    assert job.payload == {"to": "ann@example.com", "template": "welcome", "context": {"name": "Ann"}}
    assert job.published_at is not None
    assert job.token is not None and job.token.user.username == "service"


def test_it_answers_queued_for_a_job_without_delay(api_client: ApiClient) -> None:
    response = api_client.post("/api/jobs", PING)

    assert response.status_code == 202
    body = response.json()
    assert (body["status"], body["queue"], body["run_at"]) == ("queued", "default", None)
    assert body["attempts"] == 0 and body["error"] is None and body["result"] is None


def test_it_returns_the_same_job_for_the_same_idempotency_key_and_body(api_client: ApiClient) -> None:
    first = api_client.post("/api/jobs", held(idempotency_key="order-1"))
    again = api_client.post("/api/jobs", held(idempotency_key="order-1"))

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"]
    assert Job.objects.count() == 1


def test_it_takes_the_idempotency_key_from_the_header(api_client: ApiClient) -> None:
    first = api_client.post("/api/jobs", held(), **{"Idempotency-Key": "order-2"})
    in_body = api_client.post("/api/jobs", held(idempotency_key="order-2"))
    both_equal = api_client.post(
        "/api/jobs", held(idempotency_key="order-2"), **{"Idempotency-Key": "order-2"}
    )

    assert first.status_code == 202
    assert (in_body.status_code, both_equal.status_code) == (200, 200)
    assert in_body.json()["id"] == both_equal.json()["id"] == first.json()["id"]
    assert Job.objects.get().idempotency_key == "order-2"


def test_it_refuses_a_reused_idempotency_key_with_another_body(api_client: ApiClient) -> None:
    first = api_client.post("/api/jobs", held(idempotency_key="order-3"))
    other = api_client.post("/api/jobs", held(idempotency_key="order-3", priority=5))

    assert first.status_code == 202
    assert other.status_code == 409
    assert "order-3" in other.json()["detail"]
    assert Job.objects.count() == 1


def test_it_keeps_idempotency_keys_apart_between_users(make_client: Callable[..., ApiClient]) -> None:
    ann, bob = make_client("key-ann"), make_client("key-bob")

    first = ann.post("/api/jobs", held(idempotency_key="shared"))
    second = bob.post("/api/jobs", held(idempotency_key="shared", priority=1))

    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["id"] != second.json()["id"]


def test_it_refuses_a_body_key_that_differs_from_the_header(api_client: ApiClient) -> None:
    response = api_client.post("/api/jobs", held(idempotency_key="a"), **{"Idempotency-Key": "b"})

    assert response.status_code == 400
    assert [error["field"] for error in response.json()["errors"]] == ["idempotency_key"]
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "nope.nothing", "payload": {}}, "type"),
        ({"type": "default.release_jobs", "payload": {}}, "type"),  # a task, but not one the API offers
        ({"payload": {}}, "type"),
        (email(to="not-an-address"), "payload.to"),
        ({"type": "email.send", "payload": {"to": 42, "template": "welcome"}}, "payload.to"),
        ({**PING, "priority": 10}, "priority"),
        ({**PING, "priority": -1}, "priority"),
        ({**PING, "priority": False}, "priority"),
        ({**PING, "priority": "1"}, "priority"),
        ({**PING, "priority": 1.5}, "priority"),
        ({**PING, "delay_seconds": -1}, "delay_seconds"),
        ({**PING, "delay_seconds": 30 * 24 * 3600 + 1}, "delay_seconds"),
        ({**PING, "delay_seconds": True}, "delay_seconds"),
        ({**PING, "idempotency_key": "has space"}, "idempotency_key"),
        ({**PING, "idempotency_key": ""}, "idempotency_key"),
        ({**PING, "colour": "red"}, "colour"),
        ({"type": "default.ping", "payload": []}, "payload"),
        ({"type": "default.ping", "payload": {"unexpected": 1}}, "payload.unexpected"),
        ({"type": "email.send", "payload": {**email()["payload"], "cc": "x"}}, "payload.cc"),
        (
            {"type": "images.process", "payload": {"asset_id": "7", "operations": [{"op": "save"}]}},
            "payload.asset_id",
        ),
        ({"type": "images.process", "payload": {"asset_id": 7, "operations": []}}, "payload.operations"),
    ],
)
def test_it_refuses_an_invalid_job_naming_the_field(api_client: ApiClient, body: Any, field: str) -> None:
    response = api_client.post("/api/jobs", body)

    assert response.status_code == 400, response.content
    errors = response.json()["errors"]
    assert field in [error["field"] for error in errors], errors
    assert all(error["message"] for error in errors)
    assert not Job.objects.exists()


def test_it_refuses_a_job_missing_a_required_payload_field(api_client: ApiClient) -> None:
    response = api_client.post("/api/jobs", {"type": "email.send", "payload": {"template": "welcome"}})

    assert response.status_code == 400
    assert response.json()["errors"] == [{"field": "payload.to", "message": "Field required"}]


@pytest.mark.parametrize("key", ["k" * 256, "has space", "tab\there"])
def test_it_refuses_an_invalid_idempotency_key_header(api_client: ApiClient, key: str) -> None:
    response = api_client.post("/api/jobs", held(), **{"Idempotency-Key": key})

    assert response.status_code == 400, response.content
    assert [error["field"] for error in response.json()["errors"]] == ["Idempotency-Key"]
    assert not Job.objects.exists()


def test_it_refuses_a_body_over_64_kb(api_client: ApiClient) -> None:
    body = email()
    body["payload"]["context"]["filler"] = "x" * (64 * 1024)

    response = api_client.post("/api/jobs", body)

    assert response.status_code == 413
    assert not Job.objects.exists()


def test_it_accepts_a_body_just_under_64_kb(api_client: ApiClient) -> None:
    body = email(delay_seconds=400)
    body["payload"]["context"]["filler"] = ""
    body["payload"]["context"]["filler"] = "x" * (64 * 1024 - len(json.dumps(body)) - 10)

    assert api_client.post("/api/jobs", body).status_code == 202


@pytest.mark.parametrize("raw", ["{not json", '{"type": "default.ping",', "", b"\xff\xfe{}"])
def test_it_refuses_a_body_that_is_not_json(api_client: ApiClient, raw: str | bytes) -> None:
    response = api_client.post("/api/jobs", raw)

    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "(body)"


@pytest.mark.parametrize("raw", ["[]", '"default.ping"', "42", "null", '[{"type": "default.ping"}]'])
def test_it_refuses_json_that_is_not_an_object(api_client: ApiClient, raw: str) -> None:
    response = api_client.post("/api/jobs", raw)

    assert response.status_code == 400
    assert response.json()["errors"] == [{"field": "(body)", "message": "must be a JSON object"}]


def test_it_answers_503_and_keeps_nothing_when_the_broker_is_unreachable(
    api_client: ApiClient, closed_broker: None
) -> None:
    response = api_client.post("/api/jobs", PING)

    assert response.status_code == 503
    assert response.headers["Retry-After"].isdigit()
    assert not Job.objects.exists()


def test_it_keeps_a_held_job_when_the_broker_is_unreachable(
    api_client: ApiClient, closed_broker: None
) -> None:
    # A job held in the database needs no broker now: it is published when it is due.
    response = api_client.post("/api/jobs", held())

    assert response.status_code == 202
    assert Job.objects.get().published_at is None


# --- delayed and held jobs -------------------------------------------------------------------


def test_it_publishes_a_short_delay_with_an_eta(api_client: ApiClient) -> None:
    before = timezone.now()
    response = api_client.post("/api/jobs", {**PING, "delay_seconds": 120})

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "scheduled"
    job = Job.objects.get(pk=body["id"])
    assert job.published_at is not None
    assert job.run_at is not None
    assert before + timedelta(seconds=119) <= job.run_at <= timezone.now() + timedelta(seconds=121)


def test_it_holds_a_long_delay_in_the_database_until_it_is_released(
    celery_worker: object, api_client: ApiClient
) -> None:
    response = api_client.post("/api/jobs", held())

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "scheduled"
    assert body["run_at"] is not None
    job = Job.objects.get(pk=body["id"])
    assert job.published_at is None
    assert services.release_due() == 0  # not due yet

    make_due(body["id"])
    assert services.release_due() == 1

    wait_for(lambda: status_of(body["id"]) == "succeeded", timeout=30, what="the released job to run")
    job.refresh_from_db()
    assert job.published_at is not None
    assert api_client.get(f"/api/jobs/{job.pk}").json()["result"]["pong"]


# --- following jobs ---------------------------------------------------------------------------


def test_it_shows_a_job_with_every_field(api_client: ApiClient) -> None:
    job_id = api_client.post("/api/jobs", held()).json()["id"]

    response = api_client.get(f"/api/jobs/{job_id}")

    assert response.status_code == 200
    body = response.json()
    assert set(body) == JOB_FIELDS
    assert body["id"] == job_id
    assert body["status"] == "scheduled"
    assert body["progress"] == {"percent": 0.0, "message": ""}
    assert body["error"] is None
    assert body["started_at"] is None and body["finished_at"] is None
    assert body["created_at"] and body["run_at"]


def test_it_answers_404_for_an_unknown_job(api_client: ApiClient) -> None:
    assert api_client.get(f"/api/jobs/{uuid()}").status_code == 404
    assert api_client.get("/api/jobs/not-a-uuid").status_code in (400, 404)


def test_it_hides_other_users_jobs_from_non_staff_tokens(
    make_client: Callable[..., ApiClient], staff_client: ApiClient
) -> None:
    ann, bob = make_client("ann"), make_client("bob")
    anns_second_token = make_client("ann")
    job_id = ann.post("/api/jobs", held()).json()["id"]
    bob.post("/api/jobs", held())

    assert bob.get(f"/api/jobs/{job_id}").status_code == 404
    assert anns_second_token.get(f"/api/jobs/{job_id}").status_code == 200
    assert staff_client.get(f"/api/jobs/{job_id}").status_code == 200
    assert [item["id"] for item in ann.get("/api/jobs").json()["items"]] == [job_id]
    assert len(staff_client.get("/api/jobs").json()["items"]) == 2


def test_it_lists_jobs_newest_first_filtered_by_type_status_and_since(api_client: ApiClient) -> None:
    old = job_row(Job.Status.FAILED, token=None)
    Job.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=2))
    # Rows made with the API token so that the non-staff user sees them.
    ping_id = api_client.post("/api/jobs", held()).json()["id"]
    mail_id = api_client.post("/api/jobs", email(delay_seconds=400)).json()["id"]
    from jobs.models import ApiToken

    Job.objects.filter(pk=old.pk).update(token=ApiToken.objects.get(user__username="service"))

    def ids(**params: Any) -> list[str]:
        response = api_client.get("/api/jobs", **params)
        assert response.status_code == 200, response.content
        return [item["id"] for item in response.json()["items"]]

    assert ids() == [mail_id, ping_id, str(old.pk)]
    assert ids(type="email.send") == [mail_id]
    assert ids(status="failed") == [str(old.pk)]
    assert ids(status="scheduled") == [mail_id, ping_id]
    assert ids(since=(timezone.now() - timedelta(days=1)).isoformat()) == [mail_id, ping_id]
    assert ids(type="default.ping", status="scheduled") == [ping_id]
    assert ids(type="nothing.here") == []
    assert ids(since="2000-01-01T00:00:00Z") == [mail_id, ping_id, str(old.pk)]


def test_it_walks_every_job_once_through_the_pages(staff_client: ApiClient) -> None:
    response = staff_client.post("/api/jobs/batch", {"jobs": [held() for _ in range(11)]})
    assert response.json()["accepted"] == 11
    made = set(Job.objects.values_list("pk", flat=True))
    # Ties on created_at must not lose or repeat a job at a page boundary.
    some = list(made)[:5]
    Job.objects.filter(pk__in=some).update(created_at=timezone.now() - timedelta(minutes=1))

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = staff_client.get("/api/jobs", **params)
        assert page.status_code == 200, page.content
        body = page.json()
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10

    assert pages == 4
    assert len(seen) == len(set(seen)) == 11
    assert {str(pk) for pk in made} == set(seen)


def test_it_gives_no_next_cursor_on_an_exactly_full_last_page(staff_client: ApiClient) -> None:
    staff_client.post("/api/jobs/batch", {"jobs": [held() for _ in range(4)]})

    first = staff_client.get("/api/jobs", limit=2).json()
    second = staff_client.get("/api/jobs", limit=2, cursor=first["next_cursor"]).json()

    assert len(second["items"]) == 2
    assert second["next_cursor"] is None


@pytest.mark.parametrize(
    "params",
    [
        {"status": "done"},
        {"since": "yesterday"},
        {"since": "2026-01-01T00:00:00"},  # no time zone: whose midnight?
        {"since": "1700000000"},
        {"cursor": "garbage"},
        {"cursor": "MjAyNi0wMS0wMVQwMDowMDowMCswMDowMHxub3QtYS11dWlk"},  # a date, then not a uuid
        {"limit": 0},
        {"limit": 201},
        {"limit": "ten"},
    ],
)
def test_it_refuses_a_bad_list_parameter(api_client: ApiClient, params: dict[str, Any]) -> None:
    response = api_client.get("/api/jobs", **params)

    assert response.status_code == 400, response.content
    assert response.json()["detail"]


# --- jobs that run --------------------------------------------------------------------------


def test_it_runs_a_ping_job_to_succeeded(celery_worker: object, api_client: ApiClient) -> None:
    job_id = api_client.post("/api/jobs", {**PING, "priority": 9}).json()["id"]

    wait_for(lambda: status_of(job_id) == "succeeded", timeout=30, what="the ping to succeed")

    body = api_client.get(f"/api/jobs/{job_id}").json()
    assert body["status"] == "succeeded"
    assert body["attempts"] == 1
    assert body["result"]["pong"]
    assert body["progress"]["percent"] == 100.0
    assert body["error"] is None
    assert body["started_at"] <= body["finished_at"]


@pytest.fixture
def quiet_smtp_server(smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture) -> SmtpServer:
    """The test SMTP server logs envelopes (addresses) by design: it plays the outside world, not us."""
    caplog.set_level(logging.WARNING, logger="mail.log")
    return smtp_server


def test_it_sends_an_email_job_to_the_smtp_server(
    celery_worker: object, quiet_smtp_server: SmtpServer, api_client: ApiClient
) -> None:
    job_id = api_client.post("/api/jobs", email(to="ann.lee@example.com")).json()["id"]

    wait_for(lambda: status_of(job_id) == "succeeded", timeout=30, what="the email job to succeed")

    [message] = quiet_smtp_server.wait_for_messages(1)
    assert message.envelope_to == ["ann.lee@example.com"]
    assert message.subject == "Welcome to Jobs, Ann"
    body = api_client.get(f"/api/jobs/{job_id}").json()
    assert body["result"]["outcome"] == "sent"
    assert body["attempts"] == 1


def test_it_retries_a_transient_failure_and_counts_the_attempts(
    celery_worker: object, quiet_smtp_server: SmtpServer, api_client: ApiClient
) -> None:
    quiet_smtp_server.set_failure(rcpt=(451, "4.3.2 try again later"), times=2)

    job_id = api_client.post("/api/jobs", email(to="bob@example.com")).json()["id"]

    wait_for(lambda: status_of(job_id) == "succeeded", timeout=30, what="the email job to succeed")
    body = api_client.get(f"/api/jobs/{job_id}").json()
    assert body["attempts"] == 3
    assert body["error"] is None
    assert len(quiet_smtp_server.wait_for_messages(1)) == 1
    assert not DeadLetter.objects.exists()


def test_it_marks_a_permanently_failing_job_failed_with_its_error_and_a_dead_letter(
    celery_worker: object, api_client: ApiClient
) -> None:
    asset = images.asset(b"GIF89a not really", "fake.gif")  # there, but not an image
    job_id = api_client.post(
        "/api/jobs",
        {"type": "images.process", "payload": {"asset_id": asset.pk, "operations": [{"op": "save"}]}},
    ).json()["id"]

    wait_for(lambda: status_of(job_id) == "failed", timeout=30, what="the job to fail")

    body = api_client.get(f"/api/jobs/{job_id}").json()
    assert body["error"]["type"] == "PermanentJobError"
    assert f"image asset {asset.pk}: not an image" in body["error"]["message"]
    assert body["attempts"] == 1
    assert body["result"] is None
    assert body["finished_at"] is not None
    job = Job.objects.get(pk=job_id)
    letter = wait_for(lambda: DeadLetter.objects.filter(task_id=job.task_id).first(), what="the dead letter")
    assert letter.task_name == "images.process"
    assert letter.kwargs["asset_id"] == asset.pk
    assert letter.attempts == 1


# --- retry --------------------------------------------------------------------------------------


def test_it_retries_a_failed_job_as_a_new_run_with_fresh_attempts(
    celery_worker: object, quiet_smtp_server: SmtpServer, api_client: ApiClient, staff_client: ApiClient
) -> None:
    quiet_smtp_server.set_failure(rcpt=(550, "5.1.1 no such user"), times=1)
    job_id = api_client.post("/api/jobs", email(to="carl@example.com")).json()["id"]
    wait_for(lambda: status_of(job_id) == "failed", timeout=30, what="the first run to fail")
    first_task_id = Job.objects.get(pk=job_id).task_id

    response = staff_client.post(f"/api/jobs/{job_id}/retry")

    assert response.status_code == 202, response.content
    body = response.json()
    assert body["id"] == job_id
    # The answer is the row as it is now: a worker may already have taken the new run (RabbitMQ hands
    # it over before the response is written), but the failed run's error is gone either way.
    assert body["status"] in {"queued", "running", "succeeded"}
    assert body["error"] is None
    assert body["attempts"] <= 1
    wait_for(lambda: status_of(job_id) == "succeeded", timeout=30, what="the retried run to succeed")
    job = Job.objects.get(pk=job_id)
    assert job.task_id != first_task_id
    assert job.attempts == 1
    assert (job.error_type, job.error_message) == ("", "")
    assert len(quiet_smtp_server.wait_for_messages(1)) == 1
    assert EmailLog.objects.filter(recipient="carl@example.com", status="sent").count() == 1


@pytest.mark.parametrize("status", [Job.Status.QUEUED, Job.Status.SUCCEEDED, Job.Status.RUNNING])
def test_it_refuses_to_retry_a_job_that_has_not_failed(staff_client: ApiClient, status: str) -> None:
    job = job_row(status)

    response = staff_client.post(f"/api/jobs/{job.pk}/retry")

    assert response.status_code == 409
    job.refresh_from_db()
    assert job.status == status


def test_it_answers_404_when_retrying_an_unknown_job(staff_client: ApiClient) -> None:
    assert staff_client.post(f"/api/jobs/{uuid()}/retry").status_code == 404


def test_it_leaves_a_failed_job_as_it_was_when_the_broker_takes_no_retry(
    staff_client: ApiClient, closed_broker: None
) -> None:
    job = job_row(Job.Status.FAILED, attempts=3, error_type="Boom", error_message="it broke")
    before = job.task_id

    response = staff_client.post(f"/api/jobs/{job.pk}/retry")

    assert response.status_code == 503
    job.refresh_from_db()
    assert (job.status, job.task_id, job.attempts, job.error_type) == ("failed", before, 3, "Boom")


# --- cancel ------------------------------------------------------------------------------------


def test_it_cancels_a_delayed_job_once(api_client: ApiClient, staff_client: ApiClient) -> None:
    job_id = api_client.post("/api/jobs", {**PING, "delay_seconds": 120}).json()["id"]

    response = staff_client.delete(f"/api/jobs/{job_id}")
    again = staff_client.delete(f"/api/jobs/{job_id}")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert again.status_code == 409
    assert api_client.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled"


def test_it_cancels_a_queued_job(staff_client: ApiClient) -> None:
    job = job_row(Job.Status.QUEUED)

    response = staff_client.delete(f"/api/jobs/{job.pk}")

    assert response.status_code == 200
    assert status_of(str(job.pk)) == "cancelled"


@pytest.mark.parametrize("status", [Job.Status.SUCCEEDED, Job.Status.FAILED])
def test_it_refuses_to_cancel_a_finished_job(staff_client: ApiClient, status: str) -> None:
    job = job_row(status)

    assert staff_client.delete(f"/api/jobs/{job.pk}").status_code == 409
    assert status_of(str(job.pk)) == status


def test_it_answers_404_when_cancelling_an_unknown_job(staff_client: ApiClient) -> None:
    assert staff_client.delete(f"/api/jobs/{uuid()}").status_code == 404


def test_it_never_runs_a_cancelled_job_even_when_its_message_arrives(
    celery_worker: object, api_client: ApiClient, staff_client: ApiClient, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = api_client.post("/api/jobs", {**PING, "delay_seconds": 120}).json()["id"]
    assert staff_client.delete(f"/api/jobs/{job_id}").status_code == 200
    job = Job.objects.get(pk=job_id)
    # As after a worker restart: the worker no longer remembers the revoke, only the row says cancelled.
    # The revoke is a broadcast: forgotten once it has arrived, or it would arrive after the clear.
    wait_for(lambda: job.task_id in worker_state.revoked, timeout=30, what="the revoke to reach the worker")
    worker_state.revoked.clear()
    Job.objects.filter(pk=job_id).update(run_at=timezone.now() - timedelta(seconds=1))
    job.refresh_from_db()
    publish.publish([job])  # the message comes (again), now due

    wait_for(
        lambda: any(
            f"job {job_id} not started" in record.getMessage() and "cancelled" in record.getMessage()
            for record in caplog.records
        ),
        timeout=30,
        what="the worker to skip the cancelled job",
    )
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert (job.started_at, job.attempts, job.result) == (None, 0, None)


def test_it_never_releases_a_cancelled_held_job(api_client: ApiClient, staff_client: ApiClient) -> None:
    job_id = api_client.post("/api/jobs", held()).json()["id"]
    assert staff_client.delete(f"/api/jobs/{job_id}").status_code == 200

    make_due(job_id)

    assert services.release_due() == 0
    job = Job.objects.get(pk=job_id)
    assert (job.status, job.published_at, job.started_at) == ("cancelled", None, None)


def test_it_cancels_a_retry_held_in_the_database_and_never_releases_it(
    staff_client: ApiClient, settings
) -> None:
    settings.JOBS_RECONCILE_AFTER_SECONDS = 0
    job = job_row(Job.Status.RUNNING, attempts=1, published_at=timezone.now(), started_at=timezone.now())
    # What a worker does for a retry that waits longer than JOBS_BROKER_MAX_DELAY_SECONDS.
    assert tracking.hold_retry(str(job.pk), job.task_id, 3600, {"x_first_failure_at": "t"}, OSError("away"))
    job.refresh_from_db()
    assert (job.status, job.published_at, job.error_type) == ("retrying", None, "OSError")
    assert staff_client.get(f"/api/jobs/{job.pk}").json()["run_at"] is not None
    assert reconcile.resend_lost() == 0  # held, not lost: nothing is sent

    assert staff_client.delete(f"/api/jobs/{job.pk}").status_code == 200
    make_due(str(job.pk))

    assert services.release_due() == 0
    assert status_of(str(job.pk)) == "cancelled"


def test_a_retry_sent_from_its_row_is_the_next_attempt_with_the_headers_it_carried() -> None:
    def row(status: str, attempts: int) -> Job:
        return Job(
            type="default.ping",
            queue="default",
            task_id=uuid(),
            status=status,
            attempts=attempts,
            held_headers={"x_first_failure_at": "2026-11-29T05:00:00+00:00"},
        )

    # Released by release_jobs, or sent again by the reconciler: attempt 3 after 2 failed ones.
    retry = publish.message_options(row("retrying", 2))
    assert retry["retries"] == 2
    assert retry["headers"]["x_first_failure_at"] == "2026-11-29T05:00:00+00:00"
    # A running job's lost message is the same attempt again; a new job's, the first.
    assert publish.message_options(row("running", 3))["retries"] == 2
    assert "retries" not in publish.message_options(row("queued", 0))


def test_it_runs_a_cancelled_job_again_when_it_is_retried(
    celery_worker: object, api_client: ApiClient, staff_client: ApiClient
) -> None:
    job_id = api_client.post("/api/jobs", held()).json()["id"]
    staff_client.delete(f"/api/jobs/{job_id}")

    response = staff_client.post(f"/api/jobs/{job_id}/retry")

    assert response.status_code == 202
    assert response.json()["run_at"] is None
    wait_for(lambda: status_of(job_id) == "succeeded", timeout=30, what="the retried job to run")


# --- batch ----------------------------------------------------------------------------------------


def test_it_accepts_the_good_jobs_of_a_batch_and_refuses_the_bad_ones_in_order(api_client: ApiClient) -> None:
    api_client.post("/api/jobs", held(idempotency_key="known"))
    entries = [
        held(),
        {"type": "nope.nothing", "payload": {}},
        email(to="nobody", delay_seconds=400),
        held(idempotency_key="known"),  # same body as before: the same job
        held(idempotency_key="known", priority=2),  # another body: refused
        "not an object",
        email(delay_seconds=400),
    ]

    response = api_client.post("/api/jobs/batch", {"jobs": entries})

    assert response.status_code == 200, response.content
    body = response.json()
    results = body["results"]
    assert [r["index"] for r in results] == list(range(7))
    assert [r["status_code"] for r in results] == [202, 400, 400, 200, 409, 400, 202]
    assert [r["accepted"] for r in results] == [True, False, False, True, False, False, True]
    assert (body["accepted"], body["refused"]) == (3, 4)
    assert results[1]["error"]["errors"][0]["field"] == "type"
    assert results[2]["error"]["errors"][0]["field"] == "payload.to"
    assert results[5]["error"]["errors"][0]["field"] == "(body)"
    assert "known" in results[4]["error"]["detail"]
    assert results[3]["job"]["id"] == Job.objects.get(idempotency_key="known").pk.__str__()
    assert results[6]["job"]["type"] == "email.send"
    assert all(r["job"] is None for r in results if not r["accepted"])
    assert Job.objects.count() == 3


def test_it_treats_a_key_repeated_within_a_batch_like_a_repeated_request(api_client: ApiClient) -> None:
    entries = [held(idempotency_key="k1"), held(idempotency_key="k1"), held(idempotency_key="k1", priority=3)]

    results = api_client.post("/api/jobs/batch", {"jobs": entries}).json()["results"]

    assert [r["status_code"] for r in results] == [202, 200, 409]
    assert results[0]["job"]["id"] == results[1]["job"]["id"]
    assert Job.objects.count() == 1


def test_it_accepts_a_batch_of_a_thousand_jobs(api_client: ApiClient) -> None:
    response = api_client.post("/api/jobs/batch", {"jobs": [held() for _ in range(1000)]})

    assert response.status_code == 200
    assert response.json()["accepted"] == 1000
    assert Job.objects.count() == 1000


def test_it_publishes_a_batch_of_jobs_that_run(celery_worker: object, api_client: ApiClient) -> None:
    results = api_client.post("/api/jobs/batch", {"jobs": [PING, PING, PING]}).json()["results"]
    ids = [r["job"]["id"] for r in results]

    wait_for(
        lambda: Job.objects.filter(pk__in=ids, status="succeeded").count() == 3,
        timeout=30,
        what="the batch's jobs to run",
    )


@pytest.mark.parametrize(
    "body",
    [{"jobs": []}, {"jobs": [PING] * 1001}, {}, {"jobs": PING}, [PING], {"jobs": "x"}],
)
def test_it_refuses_a_batch_that_is_empty_too_long_or_not_a_list(api_client: ApiClient, body: Any) -> None:
    response = api_client.post("/api/jobs/batch", body)

    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "jobs"
    assert not Job.objects.exists()


def test_it_refuses_a_batch_that_is_not_json(api_client: ApiClient) -> None:
    assert api_client.post("/api/jobs/batch", "{jobs: [").status_code == 400


def test_it_refuses_a_batch_entry_over_64_kb(api_client: ApiClient) -> None:
    big = email(delay_seconds=400)
    big["payload"]["context"]["filler"] = "x" * (64 * 1024)

    results = api_client.post("/api/jobs/batch", {"jobs": [big, held()]}).json()["results"]

    assert [r["status_code"] for r in results] == [413, 202]
    assert "at most 65536 are accepted for email.send" in results[0]["error"]["detail"]


def test_it_answers_503_for_a_batch_and_keeps_nothing_when_the_broker_is_unreachable(
    api_client: ApiClient, closed_broker: None
) -> None:
    response = api_client.post("/api/jobs/batch", {"jobs": [PING, held()]})

    assert response.status_code == 503
    assert not Job.objects.exists()


def test_it_refuses_a_batch_without_a_token() -> None:
    assert ApiClient(None).post("/api/jobs/batch", {"jobs": [PING]}).status_code == 401


# --- rate limit -------------------------------------------------------------------------------------


def test_it_refuses_the_fourth_job_in_a_minute_with_retry_after(
    tight_rate: str, make_client: Callable[..., ApiClient]
) -> None:
    client = fresh_window(make_client("rate-single"))

    codes = [client.post("/api/jobs", held()).status_code for _ in range(3)]
    fourth = client.post("/api/jobs", held())

    assert codes == [202, 202, 202]
    assert fourth.status_code == 429
    retry_after = fourth.headers["Retry-After"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 60
    assert Job.objects.count() == 3


def test_it_counts_each_job_of_a_batch_against_the_rate(
    tight_rate: str, make_client: Callable[..., ApiClient]
) -> None:
    client = fresh_window(make_client("rate-batch"))

    first = client.post("/api/jobs/batch", {"jobs": [held(), held()]})
    too_many = client.post("/api/jobs/batch", {"jobs": [held(), held()]})
    last = client.post("/api/jobs", held())
    over = client.post("/api/jobs", held())

    assert first.status_code == 200 and first.json()["accepted"] == 2
    assert too_many.status_code == 429
    assert int(too_many.headers["Retry-After"]) >= 1
    assert last.status_code == 202
    assert over.status_code == 429
    assert Job.objects.count() == 3


def test_it_refuses_a_batch_larger_than_the_rate_allows(
    tight_rate: str, make_client: Callable[..., ApiClient]
) -> None:
    client = fresh_window(make_client("rate-huge"))

    response = client.post("/api/jobs/batch", {"jobs": [held() for _ in range(4)]})

    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert client.post("/api/jobs", held()).status_code == 202


def test_it_keeps_each_tokens_rate_apart(tight_rate: str, make_client: Callable[..., ApiClient]) -> None:
    ann = fresh_window(make_client("rate-ann"))
    bob = fresh_window(make_client("rate-bob"))

    for _ in range(3):
        ann.post("/api/jobs", held())

    assert ann.post("/api/jobs", held()).status_code == 429
    assert bob.post("/api/jobs", held()).status_code == 202


def test_it_does_not_charge_the_rate_for_invalid_jobs(
    tight_rate: str, make_client: Callable[..., ApiClient]
) -> None:
    client = fresh_window(make_client("rate-invalid"))

    for _ in range(4):
        assert client.post("/api/jobs", {"type": "nope"}).status_code == 400

    assert client.post("/api/jobs", held()).status_code == 202


# --- the OpenAPI document ------------------------------------------------------------------------------


def test_it_serves_the_openapi_document_only_with_a_token(api_client: ApiClient) -> None:
    assert ApiClient(None).get("/api/schema").status_code == 401

    response = api_client.get("/api/schema")

    assert response.status_code == 200
    schema = json.loads(response.content)
    assert schema["openapi"].startswith("3.")
    for path in (
        "/api/jobs",
        "/api/jobs/batch",
        "/api/jobs/{job_id}",
        "/api/jobs/{job_id}/retry",
        "/api/queues",
        "/api/queues/{name}/stats",
        "/api/queues/{name}/pause",
        "/api/queues/{name}/resume",
        "/api/dead-letters",
        "/api/dead-letters/{letter_id}",
        "/api/dead-letters/{letter_id}/replay",
    ):
        assert path in schema["paths"], path
    assert "JobRequest" in schema["components"]["schemas"]
