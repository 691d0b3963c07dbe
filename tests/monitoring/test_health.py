"""/healthz and /readyz against the real database, broker and worker processes."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from django.test import Client
from django.utils import timezone

from localdev.embedded_broker import free_port
from monitoring import health
from scheduling.lease import Lease
from scheduling.models import BeatLease
from tests.broadcasts import BroadcastRecorder
from tests.deadservers import FrozenServer
from tests.waiting import wait_for

ALL_QUEUES = "email,images,data_sync,analytics,default"


@pytest.fixture(autouse=True)
def fresh_readiness(settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts with no readiness results in this process, refreshed every 0.2 s, and
    workers beating every second (they read the environment). The first request waits for the
    first results however slow this machine is (in production, half a second at most)."""
    settings.READYZ_REFRESH_SECONDS = 0.2
    monkeypatch.setattr(health, "FIRST_ANSWER_WAIT", 30)
    settings.MONITORING_WORKER_HEARTBEAT_SECONDS = 1
    monkeypatch.setenv("MONITORING_WORKER_HEARTBEAT_SECONDS", "1")
    health.stop_refreshing()
    yield
    health.stop_refreshing()


def statuses(body: dict[str, Any]) -> dict[str, str]:
    return {name: check["status"] for name, check in body["checks"].items()}


def without_age(check: dict[str, Any]) -> dict[str, Any]:
    assert 0 <= check["checked_seconds_ago"] < 60
    return {key: value for key, value in check.items() if key != "checked_seconds_ago"}


def assert_reveals_no_host(body: str) -> None:
    assert socket.gethostname() not in body
    assert "@" not in body  # no worker node name (name@host), no URL with credentials
    assert "://" not in body


def test_healthz_answers_ok_without_touching_any_dependency(client: Client) -> None:
    # No django_db mark: pytest-django would fail the test if the view used the database.
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert "no-store" in response["Cache-Control"]


def test_health_endpoints_answer_get_and_head_only(client: Client) -> None:
    assert client.head("/healthz").status_code == 200
    assert client.post("/healthz").status_code == 405
    assert client.post("/readyz").status_code == 405


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_readyz_is_503_and_names_the_queues_no_worker_consumes(client: Client, worker_process) -> None:
    Lease(duration=60, renew_every=5).hold()
    worker_process("mailer", "-Q", "email", "--pool=solo")

    response = client.get("/readyz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert without_age(body["checks"]["workers"]) == {
        "status": "failing",
        "queues_without_workers": ["images", "data_sync", "analytics", "default"],
    }
    assert without_age(body["checks"]["database"]) == {"status": "ok"}
    assert without_age(body["checks"]["broker"]) == {"status": "ok"}
    assert body["checks"]["beat"]["status"] == "ok"
    assert "no-store" in response["Cache-Control"]
    assert_reveals_no_host(response.content.decode())


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_readyz_is_200_with_a_worker_for_every_queue_and_a_beat_holding_the_lease(
    client: Client, worker_process
) -> None:
    Lease(duration=60, renew_every=5).hold()  # the holder is "host:pid:...": it must not show
    worker_process("general", "-Q", ALL_QUEUES, "--pool=solo")

    response = client.get("/readyz")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert statuses(body) == {"database": "ok", "broker": "ok", "workers": "ok", "beat": "ok"}
    assert 0 < body["checks"]["beat"]["lease_expires_in_seconds"] <= 60
    assert_reveals_no_host(response.content.decode())


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_readyz_is_503_when_the_beat_lease_expired(client: Client) -> None:
    BeatLease.objects.create(
        name="beat", holder="somehost:123:abc", expires_at=timezone.now() - timedelta(seconds=30)
    )

    response = client.get("/readyz")

    assert response.status_code == 503
    beat = response.json()["checks"]["beat"]
    assert beat["status"] == "failing"
    assert beat["lease_expired_seconds_ago"] >= 29
    assert "somehost" not in response.content.decode()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_readyz_is_503_when_no_beat_ever_held_the_lease(client: Client) -> None:
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"]["beat"]["status"] == "failing"


def test_a_503_from_readyz_is_not_logged_as_an_error_but_other_5xx_still_are(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from django.http import HttpResponse
    from django.utils.log import log_response

    with caplog.at_level(logging.WARNING, logger="django.request"):
        assert client.get("/readyz").status_code == 503
        assert not [r for r in caplog.records if r.name == "django.request"]
        # The same 503 for any other path is still an error in the log.
        request = client.get("/healthz").wsgi_request
        from django.http import HttpResponse

        log_response(
            "Service Unavailable: %s", request.path, response=HttpResponse(status=503), request=request
        )
    assert [r.levelname for r in caplog.records if r.name == "django.request"] == ["ERROR"]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_readyz_with_the_broker_down_is_503_quickly_and_shows_no_url(
    client: Client, celery_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The monitoring reads through broker_read_url; pointing it at a closed port is a dead broker.
    monkeypatch.setattr(celery_app.conf, "broker_read_url", f"redis://:secret@127.0.0.1:{free_port()}/0")

    response = client.get("/readyz")

    assert response.status_code == 503
    checks = response.json()["checks"]
    assert without_age(checks["broker"]) == {"status": "failing"}
    assert checks["workers"]["status"] == "failing"  # no worker runs
    assert without_age(checks["database"]) == {"status": "ok"}
    assert_reveals_no_host(response.content.decode())
    assert "secret" not in response.content.decode()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_readyz_with_a_frozen_broker_answers_from_the_last_results_and_says_the_broker_fails(
    client: Client, celery_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A broker that accepts connections and never answers (a SIGSTOPped Redis) holds the broker
    # check's own thread for its timeouts; requests answer meanwhile (bench/readyz.py measures how fast).
    monkeypatch.setattr(health, "FIRST_ANSWER_WAIT", 0.5)  # as in production
    with FrozenServer() as frozen:
        monkeypatch.setattr(celery_app.conf, "broker_read_url", frozen.url)

        def answered_with_the_database_checked() -> dict[str, Any] | None:
            response = client.get("/readyz")
            assert response.status_code == 503
            checks: dict[str, Any] = response.json()["checks"]
            return checks if checks["database"]["status"] == "ok" else None

        checks = wait_for(answered_with_the_database_checked, what="the database side's first results")
        assert checks["broker"]["status"] == "failing"
        assert frozen.accepted  # the broker check did connect, and is still waiting for an answer


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_readyz_sends_no_broadcast_however_often_it_is_asked(
    client: Client, celery_app: Celery, worker_process
) -> None:
    url = str(celery_app.conf.broker_url)
    if not url.startswith(("redis://", "rediss://")):
        pytest.skip("broadcasts are observed on a Redis broker")
    Lease(duration=60, renew_every=5).hold()
    worker_process("general", "-Q", ALL_QUEUES, "--pool=solo")  # its start-up broadcasts are over

    with BroadcastRecorder(url) as recorder:
        answers = [client.get("/readyz") for _ in range(50)]
        assert recorder.broadcasts() == []

        celery_app.control.ping(timeout=0.1)  # the recorder does see a broadcast when one is sent
        assert len(recorder.broadcasts()) == 1

    assert {response.status_code for response in answers} == {200}


@pytest.mark.django_db(transaction=True)
def test_readyz_checks_once_per_interval_in_a_process_however_many_callers_ask(
    client: Client, settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.READYZ_REFRESH_SECONDS = 60
    calls: list[str] = []

    def counted(name: str, compute: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            calls.append(name)
            return compute()

        return run

    for _, refresher in health.REFRESHERS:
        monkeypatch.setattr(refresher, "compute", counted(refresher.name, refresher.compute))

    answers = [client.get("/readyz") for _ in range(30)]

    assert sorted(calls) == ["readyz-broker", "readyz-database"]
    assert {response.status_code for response in answers} == {503}  # no worker, no beat here
    assert {response.json()["checks"]["database"]["status"] for response in answers} == {"ok"}
    ages = [response.json()["checks"]["database"]["checked_seconds_ago"] for response in answers]
    assert ages == sorted(ages)  # the same result, answered again and again


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_readyz_stops_counting_a_sigkilled_worker_once_it_misses_three_beats(
    client: Client, worker_process
) -> None:
    Lease(duration=60, renew_every=5).hold()
    worker = worker_process("doomed", "-Q", ALL_QUEUES, "--pool=solo")
    assert client.get("/readyz").status_code == 200

    worker.process.kill()  # no warm shutdown: its presence row stays, and ages

    def failing() -> dict[str, Any] | None:
        response = client.get("/readyz")
        checks: dict[str, Any] = response.json()["checks"]
        return checks if response.status_code == 503 else None

    checks = wait_for(failing, what="readiness to notice the killed worker")
    assert without_age(checks["workers"]) == {
        "status": "failing",
        "queues_without_workers": ["email", "images", "data_sync", "analytics", "default"],
    }
    assert statuses({"checks": checks}) == {
        "database": "ok",
        "broker": "ok",
        "workers": "failing",
        "beat": "ok",
    }
