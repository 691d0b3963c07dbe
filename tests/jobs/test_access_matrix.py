"""Who may do what: every route the project serves, times every kind of caller, as a table.

The table is the access matrix in docs/security.md. The routes are enumerated from
the ninja API object and from config.urls, so a route added without a row here fails
`test_every_route_has_a_row`. Each row is walked with every caller: a staff token, the token of
the user who owns the job or dead letter in the path (its "owner"), another non-staff user's
token, the owner's revoked token, the token of a deactivated user, no token, several malformed
Authorization headers, a staff and a non-staff browser session, and the Prometheus token.
Tokens do not expire (there is no expiry to test); a revoked token or a deactivated user is how
one stops working.

Real PostgreSQL and Redis; no worker (nothing here needs a job to run). Each test runs in a
transaction that is rolled back; the few messages staff operations publish are purged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import uuid4

import pytest
from celery import Celery
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, URLResolver, reverse
from django.utils import timezone

from config import urls as site_urls
from jobs import tokens
from jobs.api import api
from jobs.models import ApiToken, Job
from tasks.models import DeadLetter
from tests.jobs.conftest import ISSUED_TOKENS

pytestmark = pytest.mark.django_db

METRICS_TOKEN = "metrics-scraper-secret-0123456789"
SERVER_PATH = "/srv/jobs/current/tasks/images.py"
PING = {"type": "default.ping", "payload": {}}

STAFF, OWNER, OTHER = "staff", "owner", "other"
REVOKED, INACTIVE, NONE, MALFORMED = "revoked token", "deactivated user", "no token", "malformed"
STAFF_SESSION, USER_SESSION, METRICS = "staff session", "non-staff session", "metrics token"
CALLERS = (STAFF, OWNER, OTHER, REVOKED, INACTIVE, NONE, MALFORMED, STAFF_SESSION, USER_SESSION, METRICS)
TOKEN_HOLDERS = (STAFF, OWNER, OTHER)


# --- the world: three users' rows, and a client per caller ----------------------------------------


@dataclass
class World:
    """Rows of the owner, of the other user and of nobody (beat's, internal tasks'), and callers."""

    users: dict[str, Any]
    raw_tokens: dict[str, str]
    jobs: dict[str, Job] = field(default_factory=dict)
    letters: dict[str, DeadLetter] = field(default_factory=dict)

    def token(self, caller: str) -> ApiToken:
        return ApiToken.objects.get(key_hash=tokens.hash_token(self.raw_tokens[caller]))

    def job(self, whose: str = OWNER, status: str = Job.Status.QUEUED, **fields: Any) -> Job:
        marker = f"{whose}-{uuid4().hex[:12]}"
        return Job.objects.create(
            type="default.ping",
            queue="default",
            task_id=f"task-{marker}",
            status=status,
            token=self.token(whose) if whose in (OWNER, OTHER) else None,
            error_type="PermanentJobError" if status == Job.Status.FAILED else "",
            error_message=f"could not open {SERVER_PATH}" if status == Job.Status.FAILED else "",
            result={"export": f"/srv/jobs/media/exports/{marker}.jsonl"},
            **fields,
        )

    def letter(self, whose: str = OWNER) -> DeadLetter:
        job = self.job(whose, status=Job.Status.FAILED) if whose in (OWNER, OTHER) else None
        now = timezone.now()
        return DeadLetter.objects.create(
            task_id=job.task_id if job else f"task-nobody-{uuid4().hex[:12]}",
            task_name="default.ping",
            queue="default",
            exception_type="tasks.errors.PermanentJobError",
            exception_message=f"{whose}-secret: could not open {SERVER_PATH}",
            traceback=(
                "Traceback (most recent call last):\n"
                f'  File "{SERVER_PATH}", line 7, in ping\n    raise PermanentJobError(...)\n'
                f"tasks.errors.PermanentJobError: {whose}-secret: could not open {SERVER_PATH}"
            ),
            first_failed_at=now - timedelta(minutes=1),
            last_failed_at=now,
            job=job,
        )

    def markers(self, whose: str) -> set[str]:
        """Strings that appear only in rows of `whose`: they must never reach another user."""
        job, letter = self.jobs[whose], self.letters[whose]
        found = {str(job.id), job.task_id, letter.task_id, f"{whose}-secret"}
        return found | ({str(letter.job_id)} if letter.job_id else set())


def malformed_headers(world: World) -> list[str]:
    owner = world.raw_tokens[OWNER]
    return [
        "Bearer",
        "Bearer    ",
        f"Token {owner}",
        f"Basic {owner}",
        f"Bearer {owner}x",
        f"Bearer {owner[:-1]}",
        "Bearer jobs_\xe9t\xe9",  # Latin-1, as a header arrives through WSGI
        "Bearer " + "x" * 5000,
    ]


@pytest.fixture
def world(db: None, settings: Any, celery_app: Celery) -> Iterator[World]:
    settings.METRICS_TOKEN = METRICS_TOKEN
    settings.METRICS_INSPECT_TIMEOUT = 0.2  # no worker answers here; do not wait a second per call
    User = get_user_model()
    users = {
        STAFF: User.objects.create_user("matrix-staff", is_staff=True),
        OWNER: User.objects.create_user("matrix-owner"),
        OTHER: User.objects.create_user("matrix-other"),
        INACTIVE: User.objects.create_user("matrix-gone", is_active=False),
    }
    raw_tokens = {}
    for caller, user in (*users.items(), (REVOKED, users[OWNER])):
        token, raw = tokens.create_token(user, name=caller)
        ISSUED_TOKENS.append(raw)
        raw_tokens[caller] = raw
        if caller == REVOKED:
            tokens.revoke(token)
    made = World(users=users, raw_tokens=raw_tokens)
    for whose in (OWNER, OTHER, "nobody"):
        made.jobs[whose] = made.job(whose, status=Job.Status.SUCCEEDED)
        made.letters[whose] = made.letter(whose)
    celery_app.control.purge()
    yield made
    celery_app.control.purge()  # what staff operations published (replay, retry, enqueue)


def client_for(world: World, caller: str, malformed: str | None = None) -> tuple[Client, dict[str, str]]:
    client = Client()
    if caller in (STAFF_SESSION, USER_SESSION):
        client.force_login(world.users[STAFF if caller == STAFF_SESSION else OWNER])
        return client, {}
    if caller == NONE:
        return client, {}
    if caller == MALFORMED:
        return client, {"Authorization": malformed or ""}
    raw = METRICS_TOKEN if caller == METRICS else world.raw_tokens[caller]
    return client, {"Authorization": f"Bearer {raw}"}


# --- the table ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One route (a URL name) with one kind of object in its path, and what each caller gets."""

    name: str
    method: str
    path: Callable[[World], str]  # may make a fresh row per call: staff operations change it
    expect: dict[str, int]  # callers not named get `otherwise`
    otherwise: int = 401
    body: Any = None
    # For lists: which world rows each caller sees, read from the response.
    listed: Callable[[World, Any], set[str]] | None = None
    label: str = ""


def _callers(expect: dict[str, int]) -> dict[str, int]:
    names = {"staff": STAFF, "owner": OWNER, "other": OTHER, "token": None}
    out: dict[str, int] = {}
    for key, status in expect.items():
        if key == "token":  # every valid token
            out.update(dict.fromkeys(TOKEN_HOLDERS, status))
        else:
            out[names.get(key) or key.replace("_", " ")] = status
    return out


def jobs_listed(world: World, body: Any) -> set[str]:
    ids = {item["id"] for item in body["items"]}
    return {whose for whose, job in world.jobs.items() if str(job.id) in ids}


def letters_listed(world: World, body: Any) -> set[str]:
    ids = {item["id"] for item in body["items"]}
    return {whose for whose, letter in world.letters.items() if letter.pk in ids}


SEES = {STAFF: {OWNER, OTHER, "nobody"}, OWNER: {OWNER}, OTHER: {OTHER}}


def _reverse_later(url_name: str) -> Callable[[World], str]:
    return lambda world: reverse(url_name)


def _admin_pages() -> list[Case]:
    """The admin index and every registered model's list and add pages."""
    # Everyone but a staff login is sent to the login page (302); a token is not a login.
    pages = [Case("admin", "get", _reverse_later("admin:index"), {STAFF_SESSION: 200}, otherwise=302)]
    for model in admin.site._registry:
        info = (model._meta.app_label, model._meta.model_name)
        for page in ("changelist", "add"):
            # The staff user has no model permissions: the admin refuses it each model (403).
            pages.append(
                Case(
                    "admin",
                    "get",
                    _reverse_later(f"admin:{info[0]}_{info[1]}_{page}"),
                    {STAFF_SESSION: 403},
                    otherwise=302,
                    label=f"{info[0]}.{info[1]} {page}",
                )
            )
    return pages


CASES: list[Case] = [
    # /api/jobs
    Case("create_job", "post", lambda w: "/api/jobs", _callers({"token": 202}), body=PING),
    Case(
        "create_batch", "post", lambda w: "/api/jobs/batch", _callers({"token": 200}), body={"jobs": [PING]}
    ),
    Case("list_jobs", "get", lambda w: "/api/jobs", _callers({"token": 200}), listed=jobs_listed),
    Case(
        "get_job",
        "get",
        lambda w: f"/api/jobs/{w.jobs[OWNER].id}",
        _callers({"staff": 200, "owner": 200, "other": 404}),
    ),
    Case(
        "get_job",
        "get",
        lambda w: f"/api/jobs/{w.jobs['nobody'].id}",
        _callers({"staff": 200, "owner": 404, "other": 404}),
        label="a job sent without a token (beat, apply_async)",
    ),
    Case("get_job", "get", lambda w: f"/api/jobs/{uuid4()}", _callers({"token": 404}), label="no such job"),
    Case(
        "list_children",
        "get",
        lambda w: f"/api/jobs/{w.jobs[OWNER].id}/children",
        _callers({"staff": 200, "owner": 200, "other": 404}),
    ),
    Case(
        "cancel_job",
        "delete",
        lambda w: f"/api/jobs/{w.job(OWNER).id}",
        _callers({"staff": 200, "owner": 403, "other": 403}),
    ),
    Case(
        "retry_job",
        "post",
        lambda w: f"/api/jobs/{w.job(OWNER, status=Job.Status.FAILED).id}/retry",
        _callers({"staff": 202, "owner": 403, "other": 403}),
    ),
    # /api/queues: the service's state, the same for every token (worker host names: staff only)
    Case("list_queues", "get", lambda w: "/api/queues", _callers({"token": 200})),
    Case("queue_stats", "get", lambda w: "/api/queues/email/stats", _callers({"token": 200})),
    Case(
        "pause_queue",
        "post",
        lambda w: "/api/queues/analytics/pause",
        _callers({"staff": 200, "owner": 403, "other": 403}),
    ),
    Case(
        "resume_queue",
        "post",
        lambda w: "/api/queues/analytics/resume",
        _callers({"staff": 200, "owner": 403, "other": 403}),
    ),
    # /api/dead-letters
    Case(
        "list_dead_letters",
        "get",
        lambda w: "/api/dead-letters",
        _callers({"token": 200}),
        listed=letters_listed,
    ),
    Case(
        "get_dead_letter",
        "get",
        lambda w: f"/api/dead-letters/{w.letters[OWNER].pk}",
        _callers({"staff": 200, "owner": 200, "other": 404}),
    ),
    Case(
        "get_dead_letter",
        "get",
        lambda w: f"/api/dead-letters/{w.letters['nobody'].pk}",
        _callers({"staff": 200, "owner": 404, "other": 404}),
        label="a dead letter of no API job",
    ),
    Case(
        "replay_dead_letter",
        "post",
        lambda w: f"/api/dead-letters/{w.letter(OWNER).pk}/replay",
        _callers({"staff": 202, "owner": 403, "other": 403}),
    ),
    # the OpenAPI document: any token, or a staff login
    Case("openapi-json", "get", lambda w: "/api/schema", _callers({"token": 200, "staff_session": 200})),
    Case("openapi-view", "get", lambda w: "/api/docs", _callers({"token": 200, "staff_session": 200})),
    Case("api-root", "get", lambda w: "/api/", {}, otherwise=404),
    # outside the API
    Case("healthz", "get", lambda w: "/healthz", {}, otherwise=200),
    Case("readyz", "get", lambda w: "/readyz", {}, otherwise=503),  # no worker, no beat here
    Case("prometheus-metrics", "get", lambda w: "/metrics", {STAFF_SESSION: 200, METRICS: 200}),
    # the front page: links for staff; anyone else to the admin's login page
    Case("home", "get", lambda w: "/", {STAFF_SESSION: 200}, otherwise=302),
    Case(
        "admin-metrics",
        "get",
        lambda w: "/admin/metrics/",
        {STAFF_SESSION: 200},
        otherwise=302,  # to the admin's login page
    ),
    *_admin_pages(),
]


def api_route_names() -> set[str]:
    return {pattern.name for pattern in api.urls[0] if isinstance(pattern, URLPattern) and pattern.name}


def site_route_names() -> set[str]:
    names = set()
    for entry in site_urls.urlpatterns:
        if isinstance(entry, URLPattern):
            names.add(entry.name or str(entry.pattern))
        elif isinstance(entry, URLResolver):
            names.add(entry.namespace or str(entry.pattern))
    return names - {"api"}  # the API's routes are counted one by one above


def test_every_route_has_a_row() -> None:
    assert api_route_names() - {case.name for case in CASES} == set()
    assert site_route_names() - {case.name for case in CASES} == set()
    # and the table names nothing that is not served
    assert {case.name for case in CASES} - api_route_names() - site_route_names() == set()


# --- walking the table ---------------------------------------------------------------------------------


def send(world: World, case: Case, caller: str, malformed: str | None = None) -> tuple[str, Any]:
    client, headers = client_for(world, caller, malformed)
    path = case.path(world)
    kwargs: dict[str, Any] = {"headers": headers}
    if case.body is not None:
        kwargs.update(data=json.dumps(case.body), content_type="application/json")
    return path, getattr(client, case.method)(path, **kwargs)


def invisible_markers(world: World, caller: str) -> set[str]:
    """What `caller` must never be shown: the marks of every row it does not see."""
    if caller == STAFF or caller in (STAFF_SESSION, METRICS):
        return set()
    return set().union(
        *(world.markers(whose) for whose in world.jobs if whose not in SEES.get(caller, set()))
    )


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.method} {case.name} {case.label}".strip())
def test_each_caller_gets_what_the_access_matrix_says(world: World, case: Case) -> None:
    wrong: dict[str, Any] = {}
    for caller in CALLERS:
        expected = case.expect.get(caller, case.otherwise)
        for malformed in malformed_headers(world) if caller == MALFORMED else [None]:
            who = f"{caller} ({malformed[:30]!r})" if malformed else caller
            path, response = send(world, case, caller, malformed)
            if response.status_code != expected:
                wrong[who] = (expected, response.status_code, response.content[:200])
                continue
            text = response.content.decode("utf-8", "replace")
            leaked = {mark for mark in invisible_markers(world, caller) if mark in text and mark not in path}
            if caller not in (STAFF, STAFF_SESSION, METRICS) and "/srv/" in text:
                leaked.add("a server path")
            if leaked:
                wrong[who] = ("leaks", sorted(leaked))
            if case.listed and response.status_code == 200:
                seen = case.listed(world, response.json())
                if seen != SEES.get(caller, set()):
                    wrong[who] = ("lists", sorted(seen), "should list", sorted(SEES.get(caller, set())))
    assert wrong == {}


# --- around the table: filters, cursors, idempotency keys, what the owner is shown ---------------------


def get_json(world: World, caller: str, path: str, **params: Any) -> Any:
    client, headers = client_for(world, caller)
    response = client.get(path, params, headers=headers)
    assert response.status_code == 200, response.content
    return response.json()


def test_filters_and_forged_cursors_never_reach_another_users_rows(world: World) -> None:
    from jobs.api.common import encode_cursor

    later = timezone.now() + timedelta(days=1)
    owner_job, owner_letter = world.jobs[OWNER], world.letters[OWNER]
    job_params: list[dict[str, Any]] = [
        {"type": "default.ping"},
        {"status": "succeeded"},
        {"since": "2000-01-01T00:00:00Z"},
        {"cursor": encode_cursor(later, owner_job.id)},  # a cursor built from the owner's job
        {"cursor": encode_cursor(later, uuid4())},
    ]
    letter_params: list[dict[str, Any]] = [
        {"task": "default.ping"},
        {"queue": "default"},
        {"cursor": encode_cursor(later, owner_letter.pk + 1)},
        {"cursor": encode_cursor(later, 10**12)},
    ]

    for params in job_params:
        body = get_json(world, OTHER, "/api/jobs", **params)
        assert jobs_listed(world, body) <= {OTHER}, params
        assert str(owner_job.id) not in json.dumps(body)
    for params in letter_params:
        body = get_json(world, OTHER, "/api/dead-letters", **params)
        assert letters_listed(world, body) <= {OTHER}, params
        assert "owner-secret" not in json.dumps(body)


def test_an_idempotency_key_belongs_to_its_token_alone(world: World) -> None:
    def enqueue(caller: str, payload: dict[str, Any]) -> Any:
        client, headers = client_for(world, caller)
        return client.post("/api/jobs", json.dumps(payload), content_type="application/json", headers=headers)

    mine = enqueue(OWNER, {**PING, "idempotency_key": "nightly-1"})
    same_body = enqueue(OTHER, {**PING, "idempotency_key": "nightly-1"})
    other_body = enqueue(OTHER, {**PING, "priority": 3, "idempotency_key": "nightly-1"})

    assert mine.status_code == 202
    # Neither the owner's job (200) nor a conflict with it (409): another token's key is not seen.
    assert same_body.status_code == 202 and same_body.json()["id"] != mine.json()["id"]
    assert other_body.status_code == 409  # with the other user's own first job, not the owner's
    assert mine.json()["id"] not in other_body.content.decode()


def test_the_owner_sees_the_final_exception_line_and_staff_the_whole_traceback(world: World) -> None:
    letter = world.letters[OWNER]

    shown = get_json(world, OWNER, f"/api/dead-letters/{letter.pk}")
    whole = get_json(world, STAFF, f"/api/dead-letters/{letter.pk}")

    assert shown["traceback"] == (
        "tasks.errors.PermanentJobError: owner-secret: could not open \N{HORIZONTAL ELLIPSIS}/images.py"
    )
    assert shown["exception_message"] == "owner-secret: could not open \N{HORIZONTAL ELLIPSIS}/images.py"
    assert whole["traceback"] == letter.traceback
    assert whole["exception_message"] == letter.exception_message


def test_the_owner_sees_its_jobs_error_and_result_without_server_paths(world: World) -> None:
    job = world.job(OWNER, status=Job.Status.FAILED)

    shown = get_json(world, OWNER, f"/api/jobs/{job.id}")
    whole = get_json(world, STAFF, f"/api/jobs/{job.id}")

    assert shown["error"]["message"] == "could not open \N{HORIZONTAL ELLIPSIS}/images.py"
    assert shown["result"]["export"].startswith("\N{HORIZONTAL ELLIPSIS}/owner-")
    assert (whole["error"]["message"], whole["result"]) == (job.error_message, job.result)


def test_health_answers_name_no_host_address_or_path(world: World, settings: Any) -> None:
    for path in ("/healthz", "/readyz"):
        text = Client().get(path).content.decode()
        body = json.loads(text)
        assert set(body) <= {"status", "checks"}
        for secret in (
            "127.0.0.1",
            "localhost",
            "redis://",
            "postgres",
            settings.DATABASES["default"]["NAME"],
        ):
            assert secret not in text, (path, secret)
        assert "/" not in text
