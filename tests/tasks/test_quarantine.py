"""The quarantine store: rows capped at 64 KiB, the transport's Redis list drained into rows, the admin."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DatabaseError
from django.test import Client

from tasks import quarantine
from tasks.models import QuarantinedMessage

pytestmark = pytest.mark.django_db


@pytest.fixture
def raw_list() -> Iterator[redis.Redis]:
    """The broker's Redis with an empty `jobs:quarantine:raw`, as the transport would fill it."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.delete(quarantine.RAW_KEY)
    yield client
    client.delete(quarantine.RAW_KEY)


def push(client: redis.Redis, *entries: Any) -> None:
    """LPUSH and trim, as the transport does (newest at the head)."""
    for entry in entries:
        client.lpush(quarantine.RAW_KEY, entry if isinstance(entry, str | bytes) else json.dumps(entry))
        client.ltrim(quarantine.RAW_KEY, 0, quarantine.RAW_MAX_ENTRIES - 1)


def entry(n: int, **more: Any) -> dict[str, Any]:
    return {
        "queue": "email",
        "reason": f"body is not JSON ({n})",
        "size": 10,
        "body": f"bad {n}",
        "at": 1.7e9 + n,
        **more,
    }


# --- building rows --------------------------------------------------------------


def test_a_body_over_64_kib_is_kept_cut_with_its_full_size() -> None:
    body = "é" * 40_000  # 80,000 bytes of UTF-8: the cut falls inside a character

    row = quarantine.build(queue="email", kind="undecodable", reason="x", body=body)

    assert row.size == 80_000 and row.truncated
    assert row.body_encoding == "utf-8" and row.body == "é" * 32_768
    assert len(row.body.encode()) == quarantine.MAX_BODY_BYTES


def test_a_body_that_is_not_text_is_kept_in_base64() -> None:
    row = quarantine.build(queue="default", kind="content_type", reason="pickle", body=b"\x80\x04\x95 pickle")

    assert row.body_encoding == "base64" and row.body == "gASVIHBpY2tsZQ==" and row.size == 10
    row.save()  # and PostgreSQL takes it (a NUL in text would not be)
    nul = quarantine.build(queue="default", kind="undecodable", reason="nul", body=b"a\x00b")
    assert nul.body_encoding == "base64"
    nul.save()
    surrogate = quarantine.build(queue="default", kind="transport", reason="lone surrogate", body="a\ud800")
    assert surrogate.body_encoding == "base64" and surrogate.size == 4
    surrogate.save()


# --- draining the transport's list ------------------------------------------------


def test_drain_moves_entries_oldest_first_and_empties_the_list(raw_list: redis.Redis) -> None:
    push(raw_list, *(entry(n) for n in range(250)))

    assert quarantine.drain_transport_quarantine(raw_list, batch_size=100) == 250

    assert raw_list.llen(quarantine.RAW_KEY) == 0
    rows = list(QuarantinedMessage.objects.order_by("id"))
    assert [row.body for row in rows] == [f"bad {n}" for n in range(250)]  # inserted oldest first
    first = rows[0]
    assert (first.queue, first.kind, first.reason, first.size) == (
        "email",
        "transport",
        "body is not JSON (0)",
        10,
    )
    assert first.quarantined_at.timestamp() == 1.7e9
    assert quarantine.drain_transport_quarantine(raw_list) == 0


def test_an_entry_that_is_not_the_agreed_json_is_kept_whole(raw_list: redis.Redis) -> None:
    push(raw_list, "this is {not json", b"\xff\xfe", json.dumps([1, 2]), entry(1, size="big", at="yesterday"))

    assert quarantine.drain_transport_quarantine(raw_list) == 4

    rows = list(QuarantinedMessage.objects.order_by("id"))
    assert rows[0].body == "this is {not json" and "not the agreed JSON" in rows[0].reason
    assert rows[2].body == "[1, 2]"
    assert rows[3].body == "bad 1" and rows[3].size == 5  # a size that is not a number: the body's


def test_a_body_cut_by_the_transport_keeps_the_size_it_reported(raw_list: redis.Redis) -> None:
    push(raw_list, entry(1, size=5_000_000, body="x" * 100_000))

    quarantine.drain_transport_quarantine(raw_list)

    row = QuarantinedMessage.objects.get()
    assert row.size == 5_000_000 and row.truncated and len(row.body) == quarantine.MAX_BODY_BYTES


@pytest.mark.django_db(transaction=True)  # each thread has its own connection: rows are committed
def test_two_drains_at_once_store_every_entry_once(raw_list: redis.Redis, django_db_blocker) -> None:
    push(raw_list, *(entry(n) for n in range(400)))
    counts: list[int] = []

    def drain() -> None:
        with django_db_blocker.unblock():
            counts.append(quarantine.drain_transport_quarantine(batch_size=7))

    threads = [threading.Thread(target=drain) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sum(counts) == 400
    bodies = list(QuarantinedMessage.objects.values_list("body", flat=True))
    assert sorted(bodies) == sorted(f"bad {n}" for n in range(400))


def test_when_the_database_refuses_a_batch_it_goes_back_where_it_was(
    raw_list: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    push(raw_list, *(entry(n) for n in range(5)))
    before = raw_list.lrange(quarantine.RAW_KEY, 0, -1)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise DatabaseError("the database is away")

    # The database's refusal is the subject; stopping PostgreSQL would also stop the test's own connection.
    monkeypatch.setattr(QuarantinedMessage.objects, "bulk_create", refuse)
    with pytest.raises(DatabaseError):
        quarantine.drain_transport_quarantine(raw_list, batch_size=3)

    assert raw_list.lrange(quarantine.RAW_KEY, 0, -1) == before


def test_the_worker_falls_back_to_the_list_when_the_database_refuses(
    raw_list: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    row = quarantine.build(queue="default", kind="content_type", reason="pickle", body=b"\x80\x04")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise DatabaseError("the database is away")

    monkeypatch.setattr(QuarantinedMessage, "save", refuse)  # as above: the database's refusal is the subject
    assert quarantine.record_message(row, redis_client=raw_list) == "redis"
    monkeypatch.undo()

    [raw] = raw_list.lrange(quarantine.RAW_KEY, 0, -1)
    assert set(json.loads(raw)) == {"queue", "reason", "size", "body", "at"}
    quarantine.drain_transport_quarantine(raw_list)
    stored = QuarantinedMessage.objects.get()
    assert (stored.kind, stored.queue, stored.size) == ("content_type", "default", 2)
    assert (stored.reason, stored.body, stored.body_encoding) == ("pickle", "gAQ=", "base64")


def test_the_minute_roll_up_drains_the_list(raw_list: redis.Redis) -> None:
    from monitoring.tasks import metrics_rollup

    push(raw_list, entry(1), entry(2))

    report = metrics_rollup.apply().get()

    assert report["quarantined"] == 2 and QuarantinedMessage.objects.count() == 2


# --- the admin --------------------------------------------------------------------


@pytest.fixture
def staff_client() -> Client:
    user = get_user_model().objects.create_superuser("ops", password="pw")
    client = Client()
    client.force_login(user)
    return client


def test_the_admin_lists_searches_and_shows_the_body_escaped(staff_client: Client) -> None:
    quarantine.build(
        queue="email", kind="undecodable", reason="body is not JSON", body="<script>x</script>"
    ).save()
    quarantine.build(
        queue="images", kind="unknown_task", reason="no worker knows 'images.old'", body="[]"
    ).save()

    listing = staff_client.get("/admin/tasks/quarantinedmessage/").content.decode()
    assert "body is not JSON" in listing and "images.old" in listing
    found = staff_client.get("/admin/tasks/quarantinedmessage/", {"q": "images"}).content.decode()
    assert "images.old" in found and "body is not JSON" not in found
    by_reason = staff_client.get("/admin/tasks/quarantinedmessage/", {"q": "not JSON"}).content.decode()
    assert "body is not JSON" in by_reason and "images.old" not in by_reason

    row = QuarantinedMessage.objects.get(queue="email")
    page = staff_client.get(f"/admin/tasks/quarantinedmessage/{row.pk}/change/").content.decode()
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x</script>" not in page
    assert staff_client.get("/admin/tasks/quarantinedmessage/add/").status_code == 403


def test_the_admin_deletes_selected_messages(staff_client: Client) -> None:
    rows = [quarantine.build(queue="email", kind="undecodable", reason=f"r{n}", body="x") for n in range(3)]
    for row in rows:
        row.save()

    response = staff_client.post(
        "/admin/tasks/quarantinedmessage/",
        {"action": "delete_selected", "_selected_action": [rows[0].pk, rows[1].pk], "post": "yes"},
    )

    assert response.status_code == 302
    assert list(QuarantinedMessage.objects.values_list("reason", flat=True)) == ["r2"]


def test_the_drain_takes_little_time_per_entry(raw_list: redis.Redis) -> None:
    push(raw_list, *(entry(n) for n in range(1000)))
    started = time.monotonic()
    assert quarantine.drain_transport_quarantine(raw_list) == 1000
    print(f"drained 1000 entries in {time.monotonic() - started:.2f} s")


def test_a_payload_kombu_could_not_make_a_message_of_is_kept_whole() -> None:
    """kombu calls on_decode_error with the raw payload (a dict, no ack) when even that failed."""
    from tasks.poison import PoisonMessages

    class Consumer:
        """Celery's consumer, as far as on_decode_error touches it: no broker involved."""

        connection_errors = ()

        def create_task_handler(self) -> None:
            return None

    consumer: Any = Consumer()
    step = PoisonMessages(consumer)
    payload = {"body": "not base64!", "properties": {"body_encoding": "base64"}}

    consumer.on_decode_error(payload, ValueError("Incorrect padding"))

    row = QuarantinedMessage.objects.get()
    assert row.kind == "undecodable" and "Incorrect padding" in row.reason
    assert json.loads(row.body) == payload
    assert step.consumer is consumer
