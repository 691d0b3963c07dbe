"""jobs.sql's bulk INSERT stores what the ORM's bulk_create stores, value for value.

On PostgreSQL it sends the rows as one JSON document (jsonb_to_recordset); these tests read the rows
back through the ORM next to the same rows written by bulk_create, on the database the suite runs on.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from django.db import DataError, IntegrityError, transaction
from django.forms.models import model_to_dict

from jobs import sql
from jobs.models import ApiToken, Job

pytestmark = pytest.mark.django_db

COMPARED = [
    field.name
    for field in Job._meta.concrete_fields
    if field.name not in ("id", "task_id", "idempotency_key")
]


def job(parent: Job | None = None, token: ApiToken | None = None, **values: Any) -> Job:
    return Job(
        task_id=uuid4().hex, type="default.ping", queue="default", parent=parent, token=token, **values
    )


def varied(parent: Job, token: ApiToken, key: str) -> list[Job]:
    return [
        job(),
        job(
            parent=parent,
            token=token,
            payload={
                "text": 'quote " backslash \\ unicode é 漢 \u2028',
                "nested": [1, 2.5, None, True, {"a": []}],
            },
            priority=9,
            status=Job.Status.SCHEDULED,
            run_at=datetime(2031, 2, 3, 4, 5, 6, 789012, tzinfo=UTC),
            result={"x": None},
            held_headers={"x_dead_letter_id": "7"},
            error_message="line one\nline two",
            idempotency_key=key,
            request_hash="ab" * 32,
        ),
        job(payload=[], priority=0, result=[1, "two"]),
        job(payload="a string", result="null"),
        job(payload=12345678901234567890),
    ]


def stored(rows: list[Job]) -> list[dict[str, Any]]:
    found = {row.pk: row for row in Job.objects.filter(pk__in=[row.pk for row in rows])}
    return [
        model_to_dict(found[row.pk], fields=COMPARED) | {"created_at": found[row.pk].created_at}
        for row in rows
    ]


def test_insert_all_stores_every_value_as_bulk_create_does(django_user_model: Any) -> None:
    user = django_user_model.objects.create_user("owner")
    token = ApiToken.objects.create(user=user, name="t", key_hash=uuid4().hex)
    parent = Job.objects.create(task_id=uuid4().hex, type="default.ping", queue="default")

    ours, theirs = varied(parent, token, "ours"), varied(parent, token, "theirs")
    sql.insert_all(ours)
    Job.objects.bulk_create(theirs)

    assert all(not row._state.adding for row in ours)
    mine, orm = stored(ours), stored(theirs)
    for ours_row, orm_row, made in zip(mine, orm, ours, strict=True):
        assert ours_row.pop("created_at") == made.created_at  # as the instance was given it, to the µs
        orm_row.pop("created_at")
        assert ours_row == orm_row
    assert Job.objects.get(pk=ours[1].pk).idempotency_key == "ours"
    # A JSON field's None is SQL NULL, as the ORM stores it (not a JSON null)
    assert Job.objects.filter(pk=ours[0].pk, result__isnull=True).exists()
    assert Job.objects.filter(pk=ours[3].pk, result="null").exists()  # the string "null" stays one


def test_insert_all_in_batches_stores_every_row() -> None:
    rows = [job(payload={"n": n}) for n in range(25)]

    sql.insert_all(rows, batch_size=10)

    assert sorted(Job.objects.values_list("payload__n", flat=True)) == list(range(25))


def test_a_row_the_table_refuses_inserts_none_of_its_batch() -> None:
    taken = Job.objects.create(task_id="taken", type="default.ping", queue="default")
    rows = [job(), Job(task_id=taken.task_id, type="default.ping", queue="default")]

    with pytest.raises((IntegrityError, DataError)), transaction.atomic():
        sql.insert_all(rows)

    assert Job.objects.count() == 1
