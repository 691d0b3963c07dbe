"""The pieces behind the access matrix: path redaction, a dead letter's job, the back-fill."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import uuid4

import pytest
from django.apps import apps
from django.utils import timezone

from jobs.api.access import final_exception_line, redact_in, redact_paths
from jobs.models import Job
from jobs.protocol import JOB_HEADER
from tasks import deadletters
from tasks.models import DeadLetter

ELLIPSIS = "\N{HORIZONTAL ELLIPSIS}"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('File "/srv/app/tasks/images.py", line 3', f'File "{ELLIPSIS}/images.py", line 3'),
        (
            "[Errno 13] Permission denied: '/var/exports/all.jsonl'",
            f"[Errno 13] Permission denied: '{ELLIPSIS}/all.jsonl'",
        ),
        ("cannot write /data/exports/", f"cannot write {ELLIPSIS}/"),
        ("GET https://api.example.com/v1/items: 503", "GET https://api.example.com/v1/items: 503"),
        ("stored images/outputs/5/abc-0.png", "stored images/outputs/5/abc-0.png"),
        ("due 2026/11/23, 3/4 done, /healthz", "due 2026/11/23, 3/4 done, /healthz"),
        ("no path here", "no path here"),
        (
            "3 failed: see /api/jobs/0b6f5c1e-0000-4000-8000-000000000000/children",
            "3 failed: see /api/jobs/0b6f5c1e-0000-4000-8000-000000000000/children",
        ),
    ],
)
def test_absolute_paths_are_cut_to_their_file_name(text: str, shown: str) -> None:
    assert redact_paths(text) == shown


def test_paths_are_cut_everywhere_in_a_result() -> None:
    result = {"export": "/srv/x/a.jsonl", "files": ["/srv/y/b.png", 3], "n": None}

    assert redact_in(result) == {
        "export": f"{ELLIPSIS}/a.jsonl",
        "files": [f"{ELLIPSIS}/b.png", 3],
        "n": None,
    }


def test_the_final_exception_line_names_the_type_as_python_does() -> None:
    assert (
        final_exception_line("builtins.ValueError", "bad /etc/app/conf.toml")
        == f"ValueError: bad {ELLIPSIS}/conf.toml"
    )
    assert final_exception_line("tasks.errors.PermanentJobError", "") == "tasks.errors.PermanentJobError"


# --- a dead letter knows its job -----------------------------------------------------------------


@dataclass
class Request:
    headers: dict[str, Any] = field(default_factory=dict)
    retries: int = 0
    delivery_info: dict[str, Any] = field(default_factory=lambda: {"routing_key": "default"})


@dataclass
class FailedTask:
    """What record_failure reads of a task (tasks.deadletters.JobTask): no Celery needed."""

    request: Request
    name: str = "default.ping"

    def request_header(self, name: str) -> Any:
        return self.request.headers.get(name)


def job(task_id: str | None = None) -> Job:
    return Job.objects.create(type="default.ping", queue="default", task_id=task_id or uuid4().hex)


@pytest.mark.django_db
@pytest.mark.parametrize("header", ["the job's id", "a job that is gone", "not an id", None])
def test_a_dead_letter_is_linked_to_the_job_its_message_was_for(header: str | None) -> None:
    mine = job()
    value = {"the job's id": str(mine.pk), "a job that is gone": str(uuid4()), "not an id": "x"}.get(
        header or ""
    )
    task = FailedTask(Request(headers={JOB_HEADER: value} if value else {}))

    deadletters.record_failure(task, ValueError("no"), "t-1", [], {}, None)

    letter = DeadLetter.objects.get(task_id="t-1")
    assert letter.job_id == (mine.pk if header == "the job's id" else None)


@pytest.mark.django_db
def test_the_migration_links_existing_letters_to_the_job_of_their_task_id() -> None:
    migration = importlib.import_module("tasks.migrations.0003_deadletter_job")
    now = timezone.now() - timedelta(minutes=1)
    common = {
        "task_name": "default.ping",
        "exception_type": "E",
        "first_failed_at": now,
        "last_failed_at": now,
    }
    found = job("task-found")
    linked = DeadLetter.objects.create(task_id="task-found", **common)
    unknown = DeadLetter.objects.create(task_id="task-of-no-job", **common)

    migration.link_existing_letters(apps, None)

    assert DeadLetter.objects.get(pk=linked.pk).job_id == found.pk
    assert DeadLetter.objects.get(pk=unknown.pk).job_id is None
