"""What can be checked when a job is sent is checked then, at every edge a job comes in by.

The API, `jobs.outbox.enqueue` and the schedule admin refuse, naming the field: an integer out of
the database's range, an email template that does not exist, a row that does not exist. Before,
each of these was accepted (202) and then dead-lettered by the worker.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django_celery_beat.models import PeriodicTask

from config.celery_app import app
from jobs.models import Job
from jobs.outbox import InvalidJob, enqueue
from tasks.base import MAX_INTEGER, JobTask
from tasks.models import DataSource
from tests.jobs.conftest import ApiClient

pytestmark = pytest.mark.django_db

SAVE = [{"op": "save"}]


def refused_fields(api_client: ApiClient, body: dict[str, Any]) -> dict[str, str]:
    response = api_client.post("/api/jobs", body)
    assert response.status_code == 400, response.content
    return {error["field"]: error["message"] for error in response.json()["errors"]}


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        (
            {"type": "images.process", "payload": {"asset_id": 10**30, "operations": SAVE}},
            "payload.asset_id",
            "less than or equal to 9223372036854775807",
        ),
        (
            {"type": "images.process", "payload": {"asset_id": 2**63, "operations": SAVE}},
            "payload.asset_id",
            "less than or equal to",
        ),
        ({"type": "data_sync.sync", "payload": {"source_id": 10**19}}, "payload.source_id", "less than"),
        (
            {"type": "images.process", "payload": {"asset_id": 424242, "operations": SAVE}},
            "payload.asset_id",
            "image asset 424242 does not exist",
        ),
        ({"type": "data_sync.sync", "payload": {"source_id": 424242}}, "payload.source_id", "does not exist"),
        (
            {"type": "email.send", "payload": {"to": "someone@example.com", "template": "no-such-template"}},
            "payload.template",
            "there is no email template 'no-such-template'",
        ),
        (
            {
                "type": "email.newsletter",
                "payload": {"campaign": "c1", "template": "nothing-here", "recipients": ["a@example.com"]},
            },
            "payload.template",
            "there is no email template",
        ),
    ],
)
def test_the_api_refuses_what_the_worker_would_dead_letter(
    api_client: ApiClient, body: dict[str, Any], field: str, message: str
) -> None:
    errors = refused_fields(api_client, body)

    assert field in errors and message in errors[field], errors
    assert not Job.objects.exists()


def test_the_api_still_takes_a_source_that_exists(api_client: ApiClient) -> None:
    source = DataSource.objects.create(name="catalog", url="https://93.184.216.34/items")
    body = {"type": "data_sync.sync", "payload": {"source_id": source.pk}, "delay_seconds": 3600}

    response = api_client.post("/api/jobs", body)

    assert response.status_code == 202, response.content


def test_a_batch_names_each_entry_that_refers_to_nothing(api_client: ApiClient) -> None:
    source = DataSource.objects.create(name="catalog", url="https://93.184.216.34/items")
    jobs = [
        {"type": "data_sync.sync", "payload": {"source_id": source.pk}, "delay_seconds": 3600},
        {"type": "data_sync.sync", "payload": {"source_id": source.pk + 1000}},
    ]

    response = api_client.post("/api/jobs/batch", {"jobs": jobs})

    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["accepted"], body["refused"]) == (1, 1)
    assert body["results"][1]["error"]["errors"] == [
        {"field": "payload.source_id", "message": f"data source {source.pk + 1000} does not exist"}
    ]


def test_enqueue_refuses_a_row_that_does_not_exist() -> None:
    with pytest.raises(InvalidJob, match=r"field 'source_id': data source 424242 does not exist"):
        enqueue("data_sync.sync", source_id=424242)
    with pytest.raises(InvalidJob, match="there is no email template"):
        enqueue("email.send", to="someone@example.com", template="absent")
    with pytest.raises(InvalidJob, match="less than or equal to"):
        enqueue("images.process", asset_id=10**30, operations=SAVE)
    assert not Job.objects.exists()


def test_the_schedule_admin_refuses_a_source_that_does_not_exist() -> None:
    user = get_user_model().objects.create_superuser("boss", password="pw-for-tests-only")
    client = Client()
    client.force_login(user)
    form = client.get("/admin/django_celery_beat/periodictask/add/")
    assert form.status_code == 200
    response = client.post(
        "/admin/django_celery_beat/periodictask/add/",
        {
            "name": "sync nothing",
            "regtask": "data_sync.sync",
            "task": "data_sync.sync",
            "cron_expression": "0 3 * * *",
            "cron_timezone": "UTC",
            "args": "[]",
            "kwargs": json.dumps({"source_id": 424242}),
            "enabled": "on",
            "options-TOTAL_FORMS": "1",
            "options-INITIAL_FORMS": "0",
            "options-MIN_NUM_FORMS": "0",
            "options-MAX_NUM_FORMS": "1",
        },
    )

    assert response.status_code == 200  # the form again, with the error
    assert "data source 424242 does not exist" in response.content.decode()
    assert not PeriodicTask.objects.filter(name="sync nothing").exists()


def every_integer_without_a_database_bound(schema: dict[str, Any]) -> list[str]:
    """Paths of integer fields in a JSON schema whose maximum is missing or over MAX_INTEGER."""
    defs = schema.get("$defs", {})
    found: list[str] = []

    def walk(node: Any, path: str, seen: frozenset[str]) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                name = ref.rsplit("/", 1)[-1]
                if name not in seen:
                    walk(defs.get(name, {}), path, seen | {name})
                return
            if node.get("type") == "integer":
                top = node.get("maximum", node.get("exclusiveMaximum"))
                if top is None or top > MAX_INTEGER:
                    found.append(path or "(root)")
            for key, value in node.items():
                if key == "$defs":
                    continue
                walk(value, f"{path}.{key}" if key not in ("properties", "items", "anyOf") else path, seen)
        elif isinstance(node, list):
            for item in node:
                walk(item, path, seen)

    walk(schema, "", frozenset())
    return found


def test_every_integer_argument_of_every_task_is_bounded_by_what_the_database_holds() -> None:
    from config.celery_app import import_task_modules

    import_task_modules()
    unbounded = {
        task.name: paths
        for task in app.tasks.values()
        if isinstance(task, JobTask) and task.schema is not None
        for paths in [every_integer_without_a_database_bound(task.schema.model_json_schema())]
        if paths
    }

    assert unbounded == {}


def test_a_day_whose_events_may_be_deleted_is_refused_when_sent(api_client: ApiClient, settings: Any) -> None:
    settings.ANALYTICS_EVENT_RETENTION_DAYS = 30

    aggregate = refused_fields(
        api_client, {"type": "analytics.aggregate_daily", "payload": {"day": "2020-01-01"}}
    )
    backfill = refused_fields(
        api_client, {"type": "analytics.backfill", "payload": {"start": "2020-01-01", "end": "2020-01-03"}}
    )

    assert "ANALYTICS_EVENT_RETENTION_DAYS=30" in aggregate["payload"]
    assert "ANALYTICS_EVENT_RETENTION_DAYS=30" in backfill["payload"]
