"""The largest documented bodies, and bodies the API cannot take, through gunicorn as the Procfile runs it.

Django's test client skips the WSGI server: this checks that neither gunicorn nor Django's own
DATA_UPLOAD_MAX_MEMORY_SIZE cuts a body the API promises to take, that a chunked body is a 411
rather than an empty one, and that a body nested 100,000 deep is a 400 with no traceback in the
server's log. Production settings, the test database, the test broker.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from config.celery_app import app
from jobs.models import Job
from localdev.embedded_broker import free_port
from tasks.analytics import MAX_INGEST_EVENTS
from tasks.email import MAX_NEWSLETTER_RECIPIENTS

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    database = settings.DATABASES["default"]
    if database["ENGINE"] != "django.db.backends.postgresql":
        pytest.skip("gunicorn's worker needs a database it can share with the test: PostgreSQL")
    port, log = free_port(), tmp_path / "gunicorn.log"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DJANGO_SECRET_KEY": "test-only-not-a-secret",
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "CELERY_BROKER_URL": app.conf.broker_url,
        "JOBS_API_ENQUEUE_RATE": "100000/minute",
    }
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "config.wsgi",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                "1",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
            yield port, log
        finally:
            process.terminate()
            process.wait(timeout=30)
            app.control.purge()


def post(port: int, token: str, path: str, raw: bytes, chunked: bool = False) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if chunked:
        connection.request("POST", path, body=iter([raw]), headers=headers, encode_chunked=True)
    else:
        connection.request("POST", path, body=raw, headers=headers)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_documented_maxima_pass_gunicorn_and_bad_bodies_are_clear_refusals(
    gunicorn: tuple[int, Path], make_client: Callable[..., Any]
) -> None:
    port, log = gunicorn
    token = make_client("service").token
    events = [
        {"name": "page_view", "user_id": str(i), "timestamp": "2026-11-23T10:00:00Z", "properties": {"n": i}}
        for i in range(MAX_INGEST_EVENTS)
    ]
    recipients = [f"reader{i}@example.com" for i in range(MAX_NEWSLETTER_RECIPIENTS)]
    ingest = {"type": "analytics.ingest", "payload": {"events": events}, "delay_seconds": 400}
    newsletter = {
        "type": "email.newsletter",
        "payload": {"campaign": "autumn", "template": "newsletter", "recipients": recipients},
        "delay_seconds": 400,
    }

    assert post(port, token, "/api/jobs", json.dumps(ingest).encode())[0] == 202
    assert post(port, token, "/api/jobs", json.dumps(newsletter).encode())[0] == 202
    status, body = post(port, token, "/api/jobs/batch", json.dumps({"jobs": [ingest, newsletter]}).encode())
    assert status == 200 and body["accepted"] == 2, body
    assert Job.objects.count() == 4

    status, body = post(port, token, "/api/jobs", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "100000 levels deep; at most 32" in body["detail"]
    status, body = post(port, token, "/api/jobs", json.dumps({"type": "default.ping"}).encode(), chunked=True)
    assert status == 411 and "Content-Length" in body["detail"]
    assert "Traceback" not in log.read_text()
