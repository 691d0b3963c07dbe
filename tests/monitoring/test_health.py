"""/healthz and /readyz against the real database, broker and worker processes."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest
from celery import Celery
from django.test import Client
from django.utils import timezone

from localdev.embedded_broker import free_port
from scheduling.lease import Lease
from scheduling.models import BeatLease

ALL_QUEUES = "email,images,data_sync,analytics,default"


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
    assert body["checks"]["workers"] == {
        "status": "failing",
        "queues_without_workers": ["images", "data_sync", "analytics", "default"],
    }
    assert body["checks"]["database"] == {"status": "ok"}
    assert body["checks"]["broker"] == {"status": "ok"}
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

    started = time.monotonic()
    response = client.get("/readyz")
    elapsed = time.monotonic() - started

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert {name: check["status"] for name, check in body["checks"].items()} == {
        "database": "ok",
        "broker": "ok",
        "workers": "ok",
        "beat": "ok",
    }
    assert 0 < body["checks"]["beat"]["lease_expires_in_seconds"] <= 60
    assert elapsed < 1.0 + 2  # the checks run at once: about one inspect timeout
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

    started = time.monotonic()
    response = client.get("/readyz")

    assert time.monotonic() - started < 1.0 + 2
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"] == {"status": "failing"}
    assert checks["workers"]["status"] == "failing"
    assert checks["database"] == {"status": "ok"}
    assert_reveals_no_host(response.content.decode())
    assert "secret" not in response.content.decode()
