"""Workers report their own presence (monitoring.heartbeat); pages and the API read it without
asking the workers anything (monitoring.presence). Real worker processes, real database and broker."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from django.contrib.auth.models import User
from django.test import Client

from jobs import queues
from jobs.gate import gate
from jobs.models import QueuePause
from jobs.tokens import create_token
from monitoring import presence
from monitoring.heartbeat import Presence
from monitoring.models import WorkerPresence
from tests.broadcasts import BroadcastRecorder
from tests.waiting import wait_for

HOST = socket.gethostname()


@pytest.fixture
def quick_beats(settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started by the test beat every second (they read the environment), and this
    process judges them by the same beat."""
    monkeypatch.setenv("MONITORING_WORKER_HEARTBEAT_SECONDS", "1")
    settings.MONITORING_WORKER_HEARTBEAT_SECONDS = 1


@pytest.fixture
def on_redis(celery_app: Celery) -> str:
    url = str(celery_app.conf.broker_url)
    if not url.startswith(("redis://", "rediss://")):
        pytest.skip("broadcasts are observed on a Redis broker")
    return url


def row(node: str) -> WorkerPresence | None:
    return WorkerPresence.objects.filter(node=f"{node}@{HOST}").first()


def reported(node: str, field: str) -> Any:
    """A field of the worker's presence row, None while it has none."""
    return getattr(row(node), field, None)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_started_worker_reports_its_queues_and_removes_itself_on_a_warm_shutdown(
    quick_beats: None, worker_process
) -> None:
    worker = worker_process("reporter", "-Q", "email,images", "--pool=solo")

    # Written before the worker said it was ready.
    first = row("reporter")
    assert first is not None
    assert (first.queues, first.pid) == (["email", "images"], worker.process.pid)
    view = presence.worker_view()
    assert view.consumers("email") == view.consumers("images") == (f"reporter@{HOST}",)
    assert view.queues_without_workers() == ["data_sync", "analytics", "default"]

    # It keeps writing: last_seen moves on.
    wait_for(lambda: reported("reporter", "last_seen") > first.last_seen, what="a second heartbeat")

    worker.stop()
    assert row("reporter") is None
    assert presence.worker_view().queues_without_workers() == [
        "email",
        "images",
        "data_sync",
        "analytics",
        "default",
    ]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_paused_queue_leaves_the_workers_reported_queues_and_comes_back_on_resume(
    quick_beats: None, worker_process
) -> None:
    worker_process("pausable", "-Q", "email,analytics", "--pool=solo")
    try:
        queues.pause("analytics", by="test")
        wait_for(lambda: reported("pausable", "queues") == ["email"], what="the paused queue to drop out")
        assert presence.worker_view().consumers("analytics") == ()

        queues.resume("analytics")
        wait_for(
            lambda: reported("pausable", "queues") == ["analytics", "email"],
            what="the resumed queue to come back",
        )
    finally:
        QueuePause.objects.filter(queue="analytics").delete()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_countdown_message_the_worker_holds_is_reported_as_scheduled_on_its_queue(
    celery_app: Celery, empty_queues: None, quick_beats: None, worker_process
) -> None:
    worker = worker_process("holder", "-Q", "analytics", "--pool=solo")
    try:
        celery_app.send_task("default.ping", queue="analytics", countdown=60)

        wait_for(
            lambda: reported("holder", "held") == {"analytics": {"scheduled": 1}},
            what="the worker to report the countdown message",
        )
        held = presence.worker_view().queues["analytics"]
        assert (held.scheduled, held.reserved, held.active) == (1, 0, 0)
    finally:
        worker.stop()  # a warm shutdown gives the message back to the broker
        celery_app.control.purge()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_sigkilled_worker_counts_as_gone_after_three_missed_beats(
    quick_beats: None, worker_process
) -> None:
    worker = worker_process("doomed", "-Q", "email", "--pool=solo")
    assert presence.worker_view().consumers("email") == (f"doomed@{HOST}",)

    worker.process.kill()
    worker.process.wait()

    wait_for(lambda: not presence.worker_view().consumers("email"), what="the killed worker to lapse")
    # Its row stays (nobody removed it), judged gone by its age.
    left = row("doomed")
    assert left is not None and left.pid == worker.process.pid
    assert f"doomed@{HOST}" not in presence.worker_view().workers


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_skips_while_the_database_gate_is_closed() -> None:
    beat = Presence("gated@nowhere", every=1)
    gate.closed_since = time.monotonic()
    try:
        assert beat.write() is False
    finally:
        gate.closed_since = None
    assert not WorkerPresence.objects.filter(node="gated@nowhere").exists()

    assert beat.write() is True
    assert WorkerPresence.objects.get(node="gated@nowhere").pid == os.getpid()


def test_the_heartbeat_never_raises_when_the_database_refuses_it(caplog: pytest.LogCaptureFixture) -> None:
    # No django_db mark: pytest-django refuses every database access here, as a dead server would.
    beat = Presence("refused@nowhere", every=1)

    with caplog.at_level(logging.WARNING, logger="monitoring.heartbeat"):
        assert beat.write() is False
        assert beat.write() is False

    # One warning for the outage, not one per beat.
    assert [r.getMessage() for r in caplog.records if r.name == "monitoring.heartbeat"] == [
        "could not write this worker's presence; trying every beat"
    ]


# --- the readers: no broadcast --------------------------------------------------------------


@pytest.fixture
def staff_user() -> Iterator[User]:
    yield User.objects.create_user("ops", password="pw", is_staff=True)


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_the_queue_list_and_the_metrics_page_list_workers_without_sending_a_broadcast(
    on_redis: str, celery_app: Celery, quick_beats: None, worker_process, staff_user: User
) -> None:
    worker_process("listed", "-Q", "email,default", "--pool=solo")  # its start-up broadcasts are over
    _, token = create_token(staff_user, name="test")
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    page = Client()
    page.force_login(staff_user)

    with BroadcastRecorder(on_redis) as recorder:
        for _ in range(5):
            response = api.get("/api/queues")
            assert response.status_code == 200
            body: dict[str, Any] = response.json()
            html = page.get("/admin/metrics/").content.decode()
        assert recorder.broadcasts() == []

        # The recorder does see a broadcast when one is sent.
        celery_app.control.ping(timeout=0.1)
        assert len(recorder.broadcasts()) == 1

    workers = {queue["name"]: queue["workers"] for queue in body["queues"]}
    assert workers["email"] == workers["default"] == [f"listed@{HOST}"]
    assert workers["images"] == []
    assert body["workers_unanswered"] is False
    assert f"listed@{HOST}" in html
