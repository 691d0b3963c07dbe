"""Sentry (config/sentry.py): what a real worker and a real beat send, read off the wire.

SENTRY_DSN points at an HTTP server on loopback that records every envelope, so
the SDK, its transport and our before_send run exactly as in production.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import uuid
import zlib
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from config.sentry import beat_check_in_headers, before_send, monitor_config
from scheduling.defaults import crontab_for
from tests import probes
from tests.conftest import BeatProcess
from tests.waiting import wait_for

ADDRESS = "alice@example.com"


# --- a Sentry that only listens --------------------------------------------------


def decode_body(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]  # only there if the SDK could use it

        return bytes(brotli.decompress(body))
    return body


def parse_envelope(body: bytes) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(item header, payload) pairs: a header line, then per item a header line and its payload."""
    _, _, rest = body.partition(b"\n")
    items = []
    while rest.strip():
        line, _, rest = rest.partition(b"\n")
        header = json.loads(line)
        length = header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length + 1 :]
        items.append((header, json.loads(payload) if payload.strip() else {}))
    return items


class SentryRecorder:
    """An HTTP server on 127.0.0.1 that answers 200 to every envelope and keeps it, decompressed."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = decode_body(body, self.headers.get("Content-Encoding", "").strip().lower())
                if self.path.rstrip("/").endswith(("/envelope", "/store")):
                    recorder.paths.append(self.path)
                    recorder.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"

    def items(self, kind: str) -> list[dict[str, Any]]:
        return [
            payload
            for body in list(self.bodies)
            for header, payload in parse_envelope(body)
            if header.get("type") == kind
        ]

    def raw(self) -> bytes:
        return b"\n".join(self.bodies)

    def __enter__(self) -> SentryRecorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sentry(monkeypatch: pytest.MonkeyPatch) -> Iterator[SentryRecorder]:
    """The recorder, with SENTRY_DSN pointing at it for every process the test starts."""
    with SentryRecorder() as recorder:
        monkeypatch.setenv("SENTRY_DSN", recorder.dsn)
        monkeypatch.setenv("SENTRY_ENVIRONMENT", "test")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        yield recorder


# --- workers -----------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_failing_task_reaches_sentry_tagged_with_task_queue_and_attempt_and_without_the_address(
    sentry: SentryRecorder, empty_queues: None, worker_process
) -> None:
    worker = worker_process("sentry", "-Q", "email", "-I", "tests.probes", "--pool=prefork", "-c", "1")

    # Attempt 1 fails transiently (a retry: no event), attempt 2 for good.
    token = f"tok-{uuid.uuid4().hex}"
    probes.probe_fail.apply_async(kwargs={"address": ADDRESS, "api_token": token, "transient_failures": 1})

    def failures() -> list[dict[str, Any]]:
        events = sentry.items("event")
        return [e for e in events if e["exception"]["values"][-1]["type"] == "PermanentJobError"]

    event = wait_for(failures, timeout=20, what="the task's error event")[0]
    assert event["exception"]["values"][-1]["value"].startswith("mailbox [email] does not exist")
    tags = event["tags"]
    assert tags["celery_task"] == "email.probe_fail"
    assert tags["celery_queue"] == "email"
    assert tags["celery_attempt"] == "2"
    assert tags["celery_task_id"]  # sentry-sdk's own
    frames = event["exception"]["values"][-1]["stacktrace"]["frames"]
    probe_frame = next(frame for frame in frames if frame["function"] == "probe_fail")
    assert probe_frame["vars"]["smtp_password"] == "[Filtered]"
    assert probe_frame["vars"]["address"] == "'[email]'"
    worker.stop()  # a warm shutdown flushes whatever else the worker had to send
    raw = sentry.raw()
    assert ADDRESS.encode() not in raw and b"alice@" not in raw
    assert token.encode() not in raw


# --- beat ---------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_beat_checks_in_each_scheduled_run_and_the_worker_reports_it_done(
    sentry: SentryRecorder, empty_queues: None, worker_process, tmp_path: Path
) -> None:
    PeriodicTask.objects.create(
        name="sentry-heartbeat",
        task="default.ping",
        crontab=crontab_for("* * * * *", "Europe/Berlin"),
        last_run_at=timezone.now() - timedelta(minutes=10),  # due at once (missed runs: run once)
    )
    worker_process("pinger", "-Q", "default", "--pool=solo", wait=False)
    beat = BeatProcess("beat", tmp_path / "beat.log")
    try:

        def check_ins(status: str) -> list[dict[str, Any]]:
            return [
                item
                for item in sentry.items("check_in")
                if item["monitor_slug"] == "sentry-heartbeat" and item["status"] == status
            ]

        started = wait_for(lambda: check_ins("in_progress"), timeout=25, what="beat's check-in")
        done = wait_for(lambda: check_ins("ok"), timeout=25, what="the worker's check-in")
    finally:
        beat.stop()
        print(beat.log.read_text()[-3000:])  # shown when the test fails

    assert started[0]["monitor_config"] == {
        "schedule": {"type": "crontab", "value": "* * * * *"},
        "timezone": "Europe/Berlin",
    }
    assert done[0]["check_in_id"] == started[0]["check_in_id"]
    assert done[0]["duration"] is not None


def test_an_alert_notice_reaches_sentry_as_an_event_without_the_address(sentry: SentryRecorder) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = (
        "import django; django.setup()\n"
        "from monitoring.alerts import notify\n"
        f"notify('FIRING: queue email: mail to {ADDRESS} keeps failing', 'body', firing=True)\n"
        "notify('RECOVERED: queue email', 'body', firing=False)\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", "DJANGO_ADMINS": ""}
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=60)

    events = wait_for(lambda: sentry.items("event") if len(sentry.items("event")) >= 2 else None, timeout=10)
    levels = {
        event["level"]: (event.get("logentry") or {}).get("message") or event.get("message")
        for event in events
    }
    assert levels["error"] == "FIRING: queue email: mail to [email] keeps failing"
    assert levels["info"] == "RECOVERED: queue email"
    assert ADDRESS.encode() not in sentry.raw()


# --- units ------------------------------------------------------------------------


def test_the_scrubber_takes_every_address_and_secret_out_of_an_event() -> None:
    event: Any = {
        "message": f"could not mail {ADDRESS}",
        "logentry": {"message": "could not mail %s", "params": [ADDRESS], "formatted": f"mail {ADDRESS}"},
        "exception": {
            "values": [
                {
                    "type": "SMTPRecipientsRefused",
                    "value": f"{{'{ADDRESS}': (550, b'no such user')}}",
                    "stacktrace": {
                        "frames": [
                            {
                                "function": "send",
                                "vars": {
                                    "to": f"['{ADDRESS}', 'Bob <bob.smith+news@mail.example.co.uk>']",
                                    "smtp_password": "'hunter2'",
                                    "API_TOKEN": "'tok-123'",
                                    "broker": "'redis://:s3cret@cache.internal:6379/0'",
                                    "recipients_by_address": {f"'{ADDRESS}'": "1"},
                                    "decorator": "'@shared_task'",
                                },
                            }
                        ]
                    },
                }
            ]
        },
        "breadcrumbs": {"values": [{"message": f"sent to {ADDRESS}", "data": {"to": ADDRESS}}]},
        "extra": {"celery-job": {"args": [ADDRESS]}, "SENTRY_DSN": "https://key@o1.ingest.sentry.io/2"},
        "request": {
            "url": "https://app.example.com/unsubscribe",
            "query_string": f"email={ADDRESS}",
            "headers": {"Authorization": "Bearer abc.def"},
        },
        "tags": {"recipient": ADDRESS},
    }

    scrubbed = before_send(event, {})
    text = json.dumps(scrubbed)

    for secret in (ADDRESS, "bob.smith", "hunter2", "tok-123", "s3cret", "abc.def", "key@o1"):
        assert secret not in text
    frame_vars = scrubbed["exception"]["values"][0]["stacktrace"]["frames"][0]["vars"]
    assert frame_vars["to"] == "['[email]', 'Bob <[email]>']"
    assert frame_vars["smtp_password"] == "[Filtered]"
    assert frame_vars["broker"] == "'redis://:[Filtered]@cache.internal:6379/0'"
    assert frame_vars["decorator"] == "'@shared_task'"  # an @ is not an address
    assert scrubbed["message"] == "could not mail [email]"
    assert scrubbed["request"]["url"] == "https://app.example.com/unsubscribe"
    assert "celery_task" not in scrubbed["tags"]  # not sent from a task


def test_check_ins_are_off_without_a_sentry_client() -> None:
    assert beat_check_in_headers("nightly", object()) == {}


def test_intervals_become_sentry_intervals_in_the_largest_whole_unit() -> None:
    class Every:
        def __init__(self, seconds: float) -> None:
            self.every = seconds

    def schedule(seconds: float) -> Any:
        config = monitor_config(Every(seconds))
        return config and config["schedule"]

    assert schedule(300) == {"type": "interval", "value": 5, "unit": "minute"}
    assert schedule(7200) == {"type": "interval", "value": 2, "unit": "hour"}
    assert schedule(3 * 86400) == {"type": "interval", "value": 3, "unit": "day"}
    assert schedule(14 * 86400) == {"type": "interval", "value": 2, "unit": "week"}
    assert schedule(30) is None  # Sentry Crons has nothing shorter than a minute
    assert schedule(90) is None  # nor fractions of one
