"""API tokens: made by the management command or the admin, stored as a hash, revoked for good."""

from __future__ import annotations

import hashlib
import io
import re

import pytest
from django.apps import apps
from django.contrib.auth import get_user_model
from django.core import serializers
from django.core.management import CommandError, call_command
from django.test import Client

from jobs import tokens
from jobs.models import ApiToken
from tests.jobs.conftest import ISSUED_TOKENS, ApiClient

pytestmark = pytest.mark.django_db

PING = {"type": "default.ping", "payload": {}, "delay_seconds": 400}  # held: no message needed
TOKEN = re.compile(r"jobs_[A-Za-z0-9_-]{20,}")


def create_api_token(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_token", *args, stdout=out, stderr=err)
    raw = out.getvalue().strip()
    ISSUED_TOKENS.append(raw)  # the log check in conftest looks for it
    return raw, err.getvalue()


def nowhere_in_the_database(raw: str) -> bool:
    for model in apps.get_models():
        dump = serializers.serialize("json", model._default_manager.all())
        if raw in dump:
            return False
    return True


def test_it_prints_a_token_that_works_against_the_api() -> None:
    get_user_model().objects.create_user("svc-cmd")

    raw, err = create_api_token("svc-cmd", "--name", "billing")

    assert TOKEN.fullmatch(raw)
    assert raw[:12] in err and "svc-cmd" in err
    assert raw not in err
    client = ApiClient(raw)
    assert client.post("/api/jobs", PING).status_code == 202
    token = ApiToken.objects.get(user__username="svc-cmd")
    assert (token.name, token.prefix) == ("billing", raw[:12])
    assert token.last_used_at is not None


def test_it_makes_a_new_token_each_time() -> None:
    get_user_model().objects.create_user("svc-twice")

    first, _ = create_api_token("svc-twice")
    second, _ = create_api_token("svc-twice")

    assert first != second
    assert ApiClient(first).get("/api/jobs").status_code == 200
    assert ApiClient(second).get("/api/jobs").status_code == 200


def test_it_refuses_an_unknown_user() -> None:
    with pytest.raises(CommandError, match="no user 'ghost'"):
        create_api_token("ghost")

    assert not ApiToken.objects.exists()


def test_it_refuses_an_inactive_user() -> None:
    get_user_model().objects.create_user("svc-gone", is_active=False)

    with pytest.raises(CommandError, match="not active"):
        create_api_token("svc-gone")


def test_it_stores_only_the_sha256_of_the_token() -> None:
    get_user_model().objects.create_user("svc-hash")

    raw, _ = create_api_token("svc-hash")

    token = ApiToken.objects.get(user__username="svc-hash")
    assert token.key_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert nowhere_in_the_database(raw)


def test_it_refuses_a_token_revoked_in_code() -> None:
    user = get_user_model().objects.create_user("svc-revoked")
    token, raw = tokens.create_token(user)
    ISSUED_TOKENS.append(raw)
    client = ApiClient(raw)
    assert client.get("/api/jobs").status_code == 200

    tokens.revoke(token)

    assert client.get("/api/jobs").status_code == 401
    assert client.post("/api/jobs", PING).status_code == 401
    token.refresh_from_db()
    assert token.revoked_at is not None


def test_it_keeps_other_tokens_of_the_user_working_after_a_revoke() -> None:
    user = get_user_model().objects.create_user("svc-two-tokens")
    revoked, raw_revoked = tokens.create_token(user)
    _, raw_kept = tokens.create_token(user)
    ISSUED_TOKENS.extend([raw_revoked, raw_kept])

    tokens.revoke(revoked)

    assert ApiClient(raw_revoked).get("/api/jobs").status_code == 401
    assert ApiClient(raw_kept).get("/api/jobs").status_code == 200


@pytest.fixture
def admin_client_of_superuser() -> Client:
    user = get_user_model().objects.create_superuser("root-admin", "root-admin@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def test_it_revokes_tokens_with_the_admin_action(admin_client_of_superuser: Client) -> None:
    user = get_user_model().objects.create_user("svc-admin-revoke")
    token, raw = tokens.create_token(user)
    ISSUED_TOKENS.append(raw)
    assert ApiClient(raw).get("/api/jobs").status_code == 200

    response = admin_client_of_superuser.post(
        "/admin/jobs/apitoken/", {"action": "revoke", "_selected_action": [token.pk]}, follow=True
    )

    assert response.status_code == 200
    assert "1 token(s) revoked." in response.content.decode()
    assert ApiClient(raw).get("/api/jobs").status_code == 401


def test_it_shows_a_token_made_in_the_admin_once_and_it_works(admin_client_of_superuser: Client) -> None:
    user = get_user_model().objects.create_user("svc-admin")

    response = admin_client_of_superuser.post(
        "/admin/jobs/apitoken/add/", {"user": user.pk, "name": "from the admin"}, follow=True
    )

    assert response.status_code == 200
    shown = [str(message) for message in response.context["messages"]]
    found = [match for message in shown for match in TOKEN.findall(message)]
    assert len(found) == 1, shown
    [raw] = found
    ISSUED_TOKENS.append(raw)
    token = ApiToken.objects.get(user=user)
    assert token.name == "from the admin"
    assert token.key_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert ApiToken.objects.count() == 1
    assert ApiClient(raw).post("/api/jobs", PING).status_code == 202

    change_page = admin_client_of_superuser.get(f"/admin/jobs/apitoken/{token.pk}/change/").content.decode()
    listing = admin_client_of_superuser.get("/admin/jobs/apitoken/").content.decode()
    assert raw not in change_page and raw not in listing
    assert raw[:12] in listing
    assert nowhere_in_the_database(raw)
