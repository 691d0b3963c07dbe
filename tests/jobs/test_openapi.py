"""The OpenAPI document of /api/ is valid, is what GET /api/schema serves, and the API keeps to it.

The conformance test is schemathesis (positive and negative cases, its default checks) against
the real app behind pytest-django's live server: real PostgreSQL, real broker (jobs really are
queued; the queues are purged afterwards), a staff token so staff-only operations run too.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from django.conf import settings as django_settings
from django.utils import timezone
from django_celery_results.models import TaskResult
from hypothesis import HealthCheck, settings
from ninja.responses import NinjaJSONEncoder
from schemathesis.specs.openapi.checks import negative_data_rejection

from config.celery_app import app
from jobs import queues, ratelimit
from jobs.api import api
from jobs.api.common import encode_cursor
from jobs.models import Job, QueuePause
from tasks.base import MAX_INTEGER
from tasks.models import DataSource, DeadLetter
from tasks.services.images import MAX_COORDINATE
from tests.tasks import images

# As served: JSON (ninja's own encoder; response codes become strings).
DOCUMENT: dict[str, Any] = json.loads(json.dumps(api.get_openapi_schema(), cls=NinjaJSONEncoder))
DATE_FIELDS = {"AggregateSchema": ("day",), "ReportSchema": ("day",), "BackfillSchema": ("start", "end")}
DATE = {"type": "string", "format": "date"}


ANNOTATIONS = {"title", "description", "default", "examples"}
schema = schemathesis.openapi.from_dict(DOCUMENT)
# PostgreSQL cannot store U+0000 (text, jsonb): the API answers 400 naming the field (see
# test_a_nul_character_is_a_400_naming_the_field), which JSON Schema cannot say of free-form
# payload strings; so no generated string holds one.
# Unknown query parameters are ignored, as most HTTP APIs do (OpenAPI does not make them errors).
schema.config.generation.update(allow_x00=False, allow_extra_parameters=False)

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
STAFF_ONLY_OPERATIONS = {
    ("post", "/api/jobs/{job_id}/retry"),
    ("delete", "/api/jobs/{job_id}"),
    ("post", "/api/queues/{name}/pause"),
    ("post", "/api/queues/{name}/resume"),
    ("post", "/api/dead-letters/{letter_id}/replay"),
}


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method, path, operation


# --- the document itself ----------------------------------------------------------------


def test_the_document_is_valid_openapi_3() -> None:
    assert DOCUMENT["openapi"].startswith("3.")
    # Against the OpenAPI meta-schema schemathesis bundles for the document's version.
    schema.validate()
    assert len(list(schema.get_all_operations())) == len(list(operations(DOCUMENT)))

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    def resolve(ref: str) -> Any:
        assert ref.startswith("#/"), f"only local references are expected: {ref}"
        node: Any = DOCUMENT
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]
        return node

    found = list(refs(DOCUMENT))
    assert "#/components/schemas/JobRequest" in found
    for ref in found:
        resolve(ref)

    operation_ids = [operation["operationId"] for _, _, operation in operations(DOCUMENT)]
    assert len(operation_ids) == len(set(operation_ids))
    for method, path, operation in operations(DOCUMENT):
        declared = {param["name"] for param in operation.get("parameters", []) if param["in"] == "path"}
        in_template = {part[1:-1] for part in path.split("/") if part.startswith("{")}
        assert declared == in_template, (method, path)
        assert "401" in operation["responses"], (method, path)


def test_get_schema_serves_the_same_document(make_client: Callable[..., Any]) -> None:
    client = make_client("reader")
    response = client.get("/api/schema")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == json.loads(json.dumps(DOCUMENT, default=str))


@pytest.mark.django_db
@pytest.mark.parametrize("authorization", [None, "Bearer", "Bearer jobs_not-a-token", "Basic abc"])
def test_get_schema_without_a_valid_token_is_401(client: Any, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = client.get("/api/schema", headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "Unauthorized"}


def test_staff_only_operations_are_marked() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert schemes["ApiTokenAuth"] == {"type": "http", "scheme": "bearer"}
    assert schemes["StaffTokenAuth"] == {"type": "http", "scheme": "bearer"}
    seen = set()
    for method, path, operation in operations(DOCUMENT):
        if (method, path) in STAFF_ONLY_OPERATIONS:
            seen.add((method, path))
            assert operation.get("x-staff-only") is True, (method, path)
            assert operation["security"] == [{"StaffTokenAuth": []}], (method, path)
            assert "403" in operation["responses"], (method, path)
        else:
            assert "x-staff-only" not in operation, (method, path)
            assert operation["security"] == [{"ApiTokenAuth": []}], (method, path)
    assert seen == STAFF_ONLY_OPERATIONS


# --- the API keeps to it ------------------------------------------------------------------


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integral_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(item) for item in value]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_date(value: Any) -> bool:
    try:
        return isinstance(value, str) and date.fromisoformat(value).isoformat() == value
    except ValueError:
        return False


def _meet_checks_the_document_does_not_state(job_type: Any, payload: dict[str, Any]) -> None:
    """Turns generated payload values that the declared schema allows into values the task's checks take.

    Each is a rule in tasks/ that the payload schema does not state (test_every_payload_field_says_
    what_it_takes lists the ones a schema could state). Only values already valid for the declared
    schema are touched, so a negative case stays negative.
    """
    dates = [payload.get(name) for name in ("start", "end")]
    if job_type == "analytics.backfill" and all(_is_date(value) for value in dates):
        payload["end"] = payload["start"]  # start <= end, within a bounded range: across two fields
    if job_type == "analytics.ingest" and isinstance(payload.get("events"), list):
        for event in payload["events"]:
            if EVENT.is_valid(event):
                # name and user_id: printable (str.isprintable, which no pattern can say exactly)
                for field in ("name", "user_id"):
                    if isinstance(event.get(field), str) and not event[field].isprintable():
                        event[field] = "".join(c if c.isprintable() else "x" for c in event[field])
                # properties: at most 16 KB as JSON
                if len(json.dumps(event.get("properties", {}), ensure_ascii=False).encode()) > 16 * 1024:
                    event["properties"] = {}
    if job_type == "email.send" and isinstance(payload.get("to"), str) and len(payload["to"]) <= 320:
        payload["to"] = "ada@example.com"  # a string, checked as an address
    if job_type == "email.newsletter" and isinstance(payload.get("recipients"), list):
        recipients = payload["recipients"]
        if recipients and all(isinstance(item, str) for item in recipients):
            payload["recipients"] = [f"reader{index}@example.com" for index in range(len(recipients))]
        # declared le=21600, but checked against the broker's visibility timeout (settings)
        limit = django_settings.CELERY_BROKER_VISIBILITY_TIMEOUT - django_settings.CELERY_TASK_TIME_LIMIT
        window: Any = payload.get("window_seconds")
        if _is_int(window) and limit <= window <= 6 * 3600:
            payload["window_seconds"] = limit - 1
    if job_type == "images.process" and isinstance(payload.get("operations"), list):
        for op in payload["operations"]:
            # convert.format: a string, but one of IMAGES_ALLOWED_FORMATS (any case)
            if isinstance(op, dict) and op.get("op") == "convert" and isinstance(op.get("format"), str):
                op["format"] = "png" if len(op["format"]) % 2 else "WEBP"
            # crop: right > left and bottom > top, across two fields
            if isinstance(op, dict) and op.get("op") == "crop":
                for low, high in (("left", "right"), ("top", "bottom")):
                    if _is_int(op.get(low)) and _is_int(op.get(high)) and op[low] >= 0 and op[high] >= 1:
                        if op[high] <= op[low] and op[low] >= MAX_COORDINATE:
                            op[low] = op[high] - 1  # high cannot pass the largest coordinate
                        op[high] = max(op[high], op[low] + 1)


EVENT = jsonschema_rs.validator_for(
    DOCUMENT["components"]["schemas"]["IngestSchema"]["properties"]["events"]["items"], validate_formats=True
)
BATCH_SHAPE = jsonschema_rs.validator_for(
    {"type": "object", "required": ["jobs"], "properties": {"jobs": {"type": "array", "minItems": 1}}}
)
JOB_REQUEST = jsonschema_rs.validator_for(
    {"$ref": "#/components/schemas/JobRequest", "components": schema.raw_schema["components"]},
    validate_formats=True,
)


def batch_entries_follow_the_document(ctx: Any, response: Any, case: Any) -> bool | None:
    """POST /api/jobs/batch answers 200 with one result per entry: a JobRequest is accepted, else refused.

    Stands in for negative_data_rejection, which expects the whole request refused: by design one
    bad entry does not sink the batch (it is refused in its result, status_code 400).
    """
    if case.operation.path != "/api/jobs/batch" or not isinstance(case.body, dict):
        return None
    if not BATCH_SHAPE.is_valid(case.body):
        assert response.status_code != 200, f"a batch that is not {{jobs: [...]}} was taken: {case.body!r}"
        return None
    if response.status_code != 200:
        return None
    results = response.json()["results"]
    assert [result["index"] for result in results] == list(range(len(case.body["jobs"])))
    for entry, result in zip(case.body["jobs"], results, strict=True):
        if JOB_REQUEST.is_valid(entry):
            # 409: an idempotency key reused within the batch with another body.
            assert result["status_code"] in (200, 202, 409), f"valid entry refused: {entry!r} -> {result!r}"
        else:
            assert result["status_code"] == 400, f"invalid entry accepted: {entry!r} -> {result!r}"
    return True


class World:
    """What the generated requests are pointed at some of the time, so they find real rows."""

    def __init__(self, token: str) -> None:
        self.token = token
        now = timezone.now()
        self.jobs = [
            Job.objects.create(type="default.ping", queue="default", status=status, task_id=str(uuid.uuid4()))
            for status in Job.Status.values
        ]
        failed = next(job for job in self.jobs if job.status == Job.Status.FAILED)
        Job.objects.filter(pk=failed.pk).update(error_type="ValueError", error_message="bad", attempts=3)
        succeeded = next(job for job in self.jobs if job.status == Job.Status.SUCCEEDED)
        Job.objects.filter(pk=succeeded.pk).update(result={"pong": "node"}, attempts=1, finished_at=now)
        running = next(job for job in self.jobs if job.status == Job.Status.RUNNING)
        TaskResult.objects.create(
            task_id=running.task_id, status="PROGRESS", result=json.dumps({"percent": 40, "message": "half"})
        )
        # Rows a payload may name (`x-references` in the document: existing rows, else 400).
        self.rows = {
            "tasks.ImageAsset": images.asset(images.encoded(images.picture(), "PNG"), "world.png").pk,
            "tasks.DataSource": DataSource.objects.create(name="world", url="https://93.184.216.34/items").pk,
        }
        self.letters = [
            DeadLetter.objects.create(
                task_id=str(uuid.uuid4()),
                task_name=name,
                queue="default",
                exception_type="RuntimeError",
                exception_message="it broke",
                traceback="Traceback ...",
                first_failed_at=now - timedelta(minutes=5),
                last_failed_at=now,
            )
            for name in ("default.ping", "default.no_longer_exists")
        ]

    def point(self, case: Any) -> None:
        """Points some generated ids at existing rows and replaces cursors this API never issued.

        Decided from the generated value itself, so hypothesis still shrinks and replays it.
        """
        path = case.path_parameters or {}
        if isinstance(path.get("job_id"), str):
            try:
                number = uuid.UUID(path["job_id"]).int
            except ValueError:
                pass
            else:
                if number % 4:
                    path["job_id"] = str(self.jobs[number % len(self.jobs)].pk)
        if _is_int(path.get("letter_id")) and path["letter_id"] % 3:
            path["letter_id"] = self.letters[path["letter_id"] % len(self.letters)].pk
        if isinstance(path.get("name"), str) and len(path["name"]) % 2 == 0:
            path["name"] = django_settings.TASK_QUEUES[len(path["name"]) % len(django_settings.TASK_QUEUES)]
        # The API reads JSON strictly (docs/api.md): 4.0 is not an integer to it, while JSON Schema
        # counts it as one. Integral floats are sent as integers, which changes no case's validity.
        if isinstance(case.body, dict | list):
            case.body = _integral_floats_as_ints(case.body)
        # An Idempotency-Key header and a body idempotency_key must agree (else 400): a rule across
        # two parameters. When both are generated, the header follows the body.
        header_key = (case.headers or {}).get("Idempotency-Key")
        body_key = case.body.get("idempotency_key") if isinstance(case.body, dict) else None
        if isinstance(header_key, str) and isinstance(body_key, str) and header_key != body_key:
            case.headers["Idempotency-Key"] = body_key
        bodies = case.body.get("jobs") if isinstance(case.body, dict) else None
        callback = case.body.get("callback") if isinstance(bodies, list) else None
        if isinstance(callback, dict):
            callback.pop("depends_on", None)  # a batch's callback waits for the batch, nothing else
        # A negative case keeps its depends_on as generated: named over with real ids, its wrong
        # item (an integer where an id goes, say) became a valid request, then "accepted".
        mode = getattr(getattr(getattr(case, "meta", None), "generation", None), "mode", None)
        negative = str(getattr(mode, "value", mode)) == "negative"
        for body in [*(bodies if isinstance(bodies, list) else [case.body]), callback]:
            if isinstance(body, dict) and isinstance(body.get("depends_on"), list) and not negative:
                self._name_existing_jobs(body)
            if isinstance(body, dict) and isinstance(body.get("payload"), dict):
                _meet_checks_the_document_does_not_state(body.get("type"), body["payload"])
                self._name_existing_rows(body.get("type"), body["payload"])

    def _name_existing_jobs(self, body: dict[str, Any]) -> None:
        """`depends_on` names jobs that exist (`x-references`); indexes of batch entries, which a
        schema cannot tie to the batch (in range, no cycle, not refused), are tested on their own
        (tests/jobs/test_job_trees.py)."""
        jobs = self.jobs
        body["depends_on"] = [
            str(jobs[(len(str(item)) + n) % len(jobs)].pk) for n, item in enumerate(body["depends_on"])
        ]

    def _name_existing_rows(self, job_type: Any, payload: dict[str, Any]) -> None:
        """A valid id in a field that names a row (`x-references`) becomes the id of a row that exists."""
        task = app.tasks.get(job_type) if isinstance(job_type, str) else None
        for name, label in getattr(task, "references", {}).items():
            if _is_int(payload.get(name)) and 0 < payload[name] <= MAX_INTEGER:
                payload[name] = self.rows[label]


@pytest.fixture
def world(
    make_client: Callable[..., Any], settings: Any, celery_app: Any, django_db_blocker: Any
) -> Iterator[World]:
    # 429 is documented, but a limit hit would hide every other answer of the enqueue operations.
    settings.JOBS_API_ENQUEUE_RATE = "100000/minute"
    ratelimit._limiter.cache_clear()
    celery_app.control.purge()
    yield World(make_client("operator", staff=True).token)
    ratelimit._limiter.cache_clear()
    # Pause is exercised, not excluded: resume whatever it paused, so no worker of a later test
    # is told to stop consuming, and drop the messages the generated jobs queued.
    with django_db_blocker.unblock():
        for name in QueuePause.objects.values_list("queue", flat=True):
            queues.resume(name)
    celery_app.control.purge()


@pytest.mark.django_db(transaction=True)
@schema.parametrize()
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)
def test_the_api_conforms_to_its_document(case: Any, live_server: Any, world: World) -> None:
    world.point(case)
    batch = case.operation.path == "/api/jobs/batch"
    case.call_and_validate(
        base_url=live_server.url,
        headers={"Authorization": f"Bearer {world.token}"},
        additional_checks=[batch_entries_follow_the_document],
        excluded_checks=[negative_data_rejection] if batch else [],
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("method", "path"), sorted(STAFF_ONLY_OPERATIONS))
def test_staff_only_operations_answer_a_documented_403_to_other_tokens(
    live_server: Any, make_client: Callable[..., Any], method: str, path: str
) -> None:
    token = make_client("service").token
    job = Job.objects.create(type="default.ping", queue="default", status="failed", task_id="t-403")
    values = {"job_id": str(job.pk), "name": "email", "letter_id": 1}
    operation = schema[path][method.upper()]
    params = {name: values[name] for name in values if "{" + name + "}" in path}
    case = operation.Case(path_parameters=params)
    response = case.call_and_validate(base_url=live_server.url, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert QueuePause.objects.count() == 0
    assert Job.objects.get(pk=job.pk).status == "failed"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/api/jobs", "/api/dead-letters"])
def test_a_cursor_the_api_did_not_give_out_is_400(
    live_server: Any, make_client: Callable[..., Any], path: str
) -> None:
    token = make_client("service").token
    case = schema[path]["GET"].Case(query={"cursor": "bm90LWEtY3Vyc29y"})  # "not-a-cursor"
    response = case.call_and_validate(base_url=live_server.url, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400
    assert response.json()["errors"] == [{"field": "cursor", "message": "is not a cursor this API gave out"}]


def test_payload_fields_say_what_they_take() -> None:
    """Dates say YYYY-MM-DD, addresses say email, a newsletter window says the real maximum."""
    schemas = DOCUMENT["components"]["schemas"]
    for name, fields in DATE_FIELDS.items():
        for field in fields:
            prop = schemas[name]["properties"][field]
            variants = [
                {k: v for k, v in item.items() if k not in ANNOTATIONS} for item in prop.get("anyOf", [prop])
            ]
            assert DATE in variants, f"{name}.{field}: {prop}"
    assert schemas["SendSchema"]["properties"]["to"]["format"] == "email"
    assert schemas["Convert"]["properties"]["format"]["pattern"].startswith("^(?:[Jj][Pp][Ee][Gg]|")
    assert schemas["NewsletterSchema"]["properties"]["recipients"]["items"]["format"] == "email"
    limit = django_settings.CELERY_BROKER_VISIBILITY_TIMEOUT - django_settings.CELERY_TASK_TIME_LIMIT
    assert schemas["NewsletterSchema"]["properties"]["window_seconds"]["maximum"] < limit


def test_every_payload_field_says_what_it_takes() -> None:
    """analytics.ingest events were `{"type": "object"}`: `{}` was valid by the document, refused
    by the API (a strict xfail until they were declared)."""
    schemas = DOCUMENT["components"]["schemas"]
    event = schemas["IngestSchema"]["properties"]["events"]["items"]
    assert event["required"] == ["name", "timestamp"]
    assert event["additionalProperties"] is False
    assert set(event["properties"]) == {"name", "user_id", "properties", "timestamp"}
    assert event["properties"]["timestamp"]["format"] == "date-time"
    assert not EVENT.is_valid({})
    assert EVENT.is_valid({"name": "signup", "user_id": 42, "timestamp": "2026-11-23T10:00:00+02:00"})


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "event",
    [
        {},
        {"name": "signup"},
        {"name": 5, "timestamp": "2026-11-23T10:00:00Z"},
        {"name": "signup", "timestamp": 1700000000},
        {"name": "signup", "timestamp": "2026-11-23 10:00:00Z"},
        {"name": "signup", "timestamp": "2026-11-23T10:00:00Z", "extra": 1},
    ],
)
def test_an_event_the_document_refuses_the_api_refuses(
    live_server: Any, make_client: Callable[..., Any], event: dict[str, Any]
) -> None:
    """Each used to be taken by pydantic's lax parsing (a number as a name or a Unix time...)."""
    token = make_client("service").token
    body: Any = {"type": "analytics.ingest", "payload": {"events": [event]}}
    assert not JOB_REQUEST.is_valid(body)
    case = schema["/api/jobs"]["POST"].Case(body=body)
    response = case.call_and_validate(base_url=live_server.url, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"].startswith("payload.events")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/api/jobs", "/api/dead-letters"])
def test_every_cursor_the_document_allows_is_read(
    live_server: Any, make_client: Callable[..., Any], path: str
) -> None:
    """A cursor had no pattern: any string was valid by the document, and most were a 400."""
    token = make_client("service").token
    pattern = next(
        p["schema"]["pattern"] for p in DOCUMENT["paths"][path]["get"]["parameters"] if p["name"] == "cursor"
    )
    now = timezone.now()
    cursors = {
        "/api/jobs": ["0_" + "0" * 32, "9" * 16 + "_" + "f" * 32, encode_cursor(now, uuid.uuid4())],
        "/api/dead-letters": ["0_0", "9" * 16 + "_" + "9" * 18, encode_cursor(now, 7)],
    }
    for cursor in cursors[path]:
        assert re.fullmatch(pattern, cursor), cursor
        case = schema[path]["GET"].Case(query={"cursor": cursor})
        response = case.call_and_validate(
            base_url=live_server.url, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 200, (cursor, response.content)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (
            "/api/jobs",
            {
                "type": "email.send",
                "payload": {"to": "a@example.com", "template": "welcome", "context": {"n": "a\x00"}},
            },
            "payload.context.n",
        ),
        ("/api/jobs", {"type": "data_sync.export", "payload": {"fields\x00": 1}}, "payload"),
        ("/api/jobs?type=a%00b", None, "type"),
        ("/api/jobs?cursor=a%00b", None, "cursor"),
        ("/api/dead-letters?task=a%00b", None, "task"),
        ("/api/dead-letters?queue=a%00b", None, "queue"),
    ],
)
def test_a_nul_character_is_a_400_naming_the_field(
    live_server: Any, make_client: Callable[..., Any], path: str, body: Any, field: str
) -> None:
    """PostgreSQL text and jsonb cannot hold U+0000: it used to be a 500 (DataError)."""
    token = make_client("service").token
    method = "POST" if body is not None else "GET"
    url, _, query = path.partition("?")
    params = dict(part.split("=", 1) for part in query.split("&")) if query else {}
    params = {name: value.replace("%00", "\x00") for name, value in params.items()}
    case = schema[url][method].Case(query=params or None, **({"body": body} if body is not None else {}))
    response = case.call_and_validate(base_url=live_server.url, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"].startswith(field)
    assert Job.objects.count() == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("since", "status"),
    [
        ("2026-11-23T00:00:00Z", 200),
        ("2026-11-23T00:00:00.5+01:00", 200),
        ("0.5", 400),  # pydantic alone reads a number as Unix time
        ("2026-11-23T00:00:00", 400),  # no zone: pydantic alone reads it in the server's zone
        ("2026-11-23", 400),
        ("2026-11-23T08:00:00+22:00", 200),  # PostgreSQL refuses offsets over 15:59: it was a 500
        ("0001-01-01T00:00:00+01:00", 400),  # before year 1 in UTC: it was a 500
    ],
)
def test_since_is_an_rfc_3339_date_time(
    live_server: Any, make_client: Callable[..., Any], since: str, status: int
) -> None:
    token = make_client("service").token
    case = schema["/api/jobs"]["GET"].Case(query={"since": since})
    response = case.call_and_validate(
        base_url=live_server.url,
        headers={"Authorization": f"Bearer {token}"},
        excluded_checks=[negative_data_rejection],  # the Case is built by hand, not "negative"
    )
    assert response.status_code == status
