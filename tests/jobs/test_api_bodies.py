"""What the API does with bodies it cannot take (too deep, too large, not JSON) and with the largest
bodies each job type documents, through Django's test client on the real database and broker.

Bodies nested a thousand deep were a RecursionError (a 500, a traceback per request); a body of
NaN was a DataError from PostgreSQL (a 500); every body over 64 KB was a 413, so a 10,000-event
analytics.ingest or a newsletter past ~2,500 addresses could not be sent at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from jobs import ratelimit
from jobs.models import Job
from jobs.registry import BodyLimit, body_limit
from tasks.analytics import MAX_INGEST_EVENTS
from tasks.email import MAX_NEWSLETTER_RECIPIENTS
from tests.jobs.conftest import ApiClient

pytestmark = pytest.mark.django_db(transaction=True)

HELD = {"delay_seconds": 400}  # held in the database: nothing runs, nothing is published


def nested(depth: int) -> str:
    """A JSON value `depth` arrays deep."""
    return "[" * depth + "]" * depth


def email_with_context(value: str) -> str:
    return (
        '{"type": "email.send", "delay_seconds": 400, "payload": {"to": "ann@example.com", '
        f'"template": "welcome", "context": {{"x": {value}}}}}}}'
    )


def ingest(count: int) -> dict[str, Any]:
    events = [
        {
            "name": "page_view",
            "user_id": str(index),
            "timestamp": "2026-11-23T10:00:00+01:00",
            "properties": {"path": f"/articles/{index}", "referrer": "https://example.org/"},
        }
        for index in range(count)
    ]
    return {"type": "analytics.ingest", "payload": {"events": events}, **HELD}


def newsletter(count: int) -> dict[str, Any]:
    recipients = [f"reader{index}@example.com" for index in range(count)]
    payload = {"campaign": "autumn", "template": "newsletter", "recipients": recipients}
    return {"type": "email.newsletter", "payload": payload, **HELD}


@pytest.fixture(autouse=True)
def unlimited_rate(settings: Any) -> Iterator[None]:
    settings.JOBS_API_ENQUEUE_RATE = "100000/minute"
    ratelimit._limiter.cache_clear()
    yield
    ratelimit._limiter.cache_clear()


@pytest.fixture(autouse=True)
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A refused body is the client's mistake: no ERROR line, no traceback (no mail to the admins)."""
    yield
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info] == []


# --- depth --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "raw", "depth", "limit"),
    [
        ("/api/jobs", nested(1000), 1000, 32),
        ("/api/jobs", email_with_context(nested(1000)), 1003, 32),
        ("/api/jobs", email_with_context(nested(31)), 34, 32),
        ("/api/jobs", nested(100_000), 100_000, 32),
        ("/api/jobs/batch", '{"jobs": ' + nested(1000) + "}", 1001, 34),
        ("/api/jobs/batch", '{"jobs": [' + email_with_context(nested(1000)) + "]}", 1005, 34),
        ("/api/jobs/batch", '{"jobs": [' + email_with_context(nested(31)) + "]}", 36, 34),
    ],
)
def test_a_body_nested_deeper_than_the_limit_is_a_400_naming_the_limit(
    api_client: ApiClient, path: str, raw: str, depth: int, limit: int
) -> None:
    response = api_client.post(path, raw)

    assert response.status_code == 400
    body = response.json()
    assert body["detail"] == (
        f"the body is refused: it nests arrays and objects {depth} levels deep; at most {limit} are accepted"
    )
    assert body["errors"] == [
        {"field": "(body)", "message": f"nests arrays and objects deeper than {limit} levels"}
    ]
    assert not Job.objects.exists()


def test_a_job_nested_to_the_limit_is_accepted_alone_and_in_a_batch(api_client: ApiClient) -> None:
    # The body is level 1, payload 2, context 3, x 4: 28 more arrays make 32.
    deepest = email_with_context(nested(29))

    assert api_client.post("/api/jobs", deepest).status_code == 202
    response = api_client.post("/api/jobs/batch", '{"jobs": [' + deepest + "]}")
    assert response.status_code == 200
    assert [r["status_code"] for r in response.json()["results"]] == [202]


def test_brackets_inside_strings_do_not_count(api_client: ApiClient) -> None:
    assert (
        api_client.post("/api/jobs", email_with_context(json.dumps("[" * 1000 + '\\"{'))).status_code == 202
    )


# --- values JSON has no place for -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("NaN", "NaN is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
        ("1e999", "1e999 is too large a number"),
        ("1" * 5000, "Exceeds the limit (4300 digits)"),
    ],
)
def test_a_number_postgresql_cannot_store_is_a_400(api_client: ApiClient, value: str, message: str) -> None:
    for path, raw in (
        ("/api/jobs", email_with_context(value)),
        ("/api/jobs/batch", '{"jobs": [' + email_with_context(value) + "]}"),
    ):
        response = api_client.post(path, raw)

        assert response.status_code == 400, response.content
        assert message in response.json()["detail"]
        assert response.json()["errors"] == [{"field": "(body)", "message": "is not valid JSON"}]
    assert not Job.objects.exists()


@pytest.mark.parametrize("path", ["/api/jobs", "/api/jobs/batch"])
def test_a_chunked_body_is_a_411_asking_for_a_content_length(api_client: ApiClient, path: str) -> None:
    # Django reads a WSGI body only as far as Content-Length: a chunked one would read as empty.
    response = api_client.client.post(
        path,
        data=b"",
        content_type="application/json",
        headers={**api_client.headers, "Transfer-Encoding": "chunked"},
    )

    assert response.status_code == 411
    assert "Content-Length" in response.json()["detail"]


# --- size -------------------------------------------------------------------------------------


def test_an_analytics_ingest_of_the_documented_10000_events_is_accepted(api_client: ApiClient) -> None:
    body = ingest(MAX_INGEST_EVENTS)
    assert len(json.dumps(body)) > 1_500_000  # was a 413 at 64 KB

    response = api_client.post("/api/jobs", body)

    assert response.status_code == 202, response.content
    assert len(Job.objects.get().payload["events"]) == 10_000


def test_a_newsletter_to_the_documented_100000_addresses_is_accepted(api_client: ApiClient) -> None:
    body = newsletter(MAX_NEWSLETTER_RECIPIENTS)

    response = api_client.post("/api/jobs", body)

    assert response.status_code == 202, response.content
    assert len(Job.objects.get().payload["recipients"]) == 100_000


def test_a_batch_holds_a_bulk_job_among_small_ones(api_client: ApiClient) -> None:
    small = {"type": "default.ping", "payload": {}, **HELD}

    response = api_client.post("/api/jobs/batch", {"jobs": [small, ingest(MAX_INGEST_EVENTS), small]})

    assert [r["status_code"] for r in response.json()["results"]] == [202, 202, 202]


def test_a_body_over_its_types_limit_is_a_413_naming_the_limit_and_its_setting(
    api_client: ApiClient, settings: Any
) -> None:
    settings.JOBS_API_MAX_BULK_BODY_BYTES = 200_000
    ping = {"type": "default.ping", "payload": {}, "idempotency_key": "k" * 200, **HELD}
    padded = json.dumps(ping).replace(", ", "," + " " * (64 * 1024), 1)  # valid JSON, 64 KB + a bit

    response = api_client.post("/api/jobs", padded)

    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"the body is {len(padded)} bytes; at most 65536 are accepted for default.ping "
        "(JOBS_API_MAX_BODY_BYTES)"
    )
    over = json.dumps(ingest(2000))
    response = api_client.post("/api/jobs", over)
    assert response.status_code == 413
    assert response.json()["detail"] == (
        f"the body is {len(over)} bytes; at most 200000 are accepted (JOBS_API_MAX_BULK_BODY_BYTES)"
    )
    assert response.json()["errors"] == [{"field": "(body)", "message": "is over 200000 bytes"}]
    assert not Job.objects.exists()


def test_a_body_over_every_limit_is_a_413_before_it_is_read(api_client: ApiClient, settings: Any) -> None:
    settings.JOBS_API_MAX_BULK_BODY_BYTES = 200_000
    settings.JOBS_API_MAX_BATCH_BYTES = 300_000
    raw = b"x" * 300_001  # not JSON either: the size is what is said first

    single = api_client.post("/api/jobs", raw)
    batch = api_client.post("/api/jobs/batch", raw)

    assert single.status_code == batch.status_code == 413
    assert single.json()["detail"] == (
        "the body is 300001 bytes; at most 200000 are accepted (JOBS_API_MAX_BULK_BODY_BYTES)"
    )
    assert batch.json()["detail"] == (
        "the body is 300001 bytes; at most 300000 are accepted (JOBS_API_MAX_BATCH_BYTES)"
    )


def test_a_batch_entry_over_its_types_limit_is_refused_413_alone(
    api_client: ApiClient, settings: Any
) -> None:
    settings.JOBS_API_MAX_BULK_BODY_BYTES = 200_000
    small = {"type": "default.ping", "payload": {}, **HELD}

    response = api_client.post("/api/jobs/batch", {"jobs": [small, ingest(2000), small]})

    results = response.json()["results"]
    assert [r["status_code"] for r in results] == [202, 413, 202]
    assert results[1]["error"]["detail"] == (
        f"the job (as compact JSON) is {len(json.dumps(ingest(2000), separators=(',', ':')))} bytes; "
        "at most 200000 are accepted for analytics.ingest (JOBS_API_MAX_BULK_BODY_BYTES)"
    )
    assert Job.objects.count() == 2


def test_every_documented_maximum_fits_the_default_limits() -> None:
    """The arithmetic behind the defaults: documented maxima at ordinary sizes fit with room to spare."""
    from django.conf import settings

    assert len(json.dumps(ingest(MAX_INGEST_EVENTS))) * 3 < settings.JOBS_API_MAX_BULK_BODY_BYTES
    assert len(json.dumps(newsletter(MAX_NEWSLETTER_RECIPIENTS))) * 2 < settings.JOBS_API_MAX_BULK_BODY_BYTES
    assert settings.JOBS_API_MAX_BATCH_BYTES >= settings.JOBS_API_MAX_BULK_BODY_BYTES
    assert settings.DATA_UPLOAD_MAX_MEMORY_SIZE >= settings.JOBS_API_MAX_BATCH_BYTES
    assert body_limit("analytics.ingest") == BodyLimit(
        settings.JOBS_API_MAX_BULK_BODY_BYTES, "JOBS_API_MAX_BULK_BODY_BYTES"
    )
    assert body_limit("email.newsletter") == body_limit("analytics.ingest")
    assert body_limit("email.send") == BodyLimit(settings.JOBS_API_MAX_BODY_BYTES, "JOBS_API_MAX_BODY_BYTES")
