"""Fixtures for the REST API tests: users, tokens, an HTTP client that sends them."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from jobs.tokens import create_token

EMAIL_ADDRESS = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+\.[A-Za-z0-9.-]+")
ISSUED_TOKENS: list[str] = []


def secrets_in(text: str) -> list[str]:
    """Email addresses and API tokens issued in this session that appear in `text`."""
    found = EMAIL_ADDRESS.findall(text)
    found += [token[:12] + "…" for token in ISSUED_TOKENS if token in text]
    return found


@pytest.fixture(autouse=True)
def no_secrets_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every log line produced by these tests is free of email addresses and tokens."""
    caplog.set_level(logging.DEBUG)
    yield
    leaks = [
        (record.name, found)
        for record in caplog.records
        for found in secrets_in(record.getMessage() + (record.exc_text or ""))
    ]
    assert leaks == [], f"secrets in log lines: {leaks}"


class ApiClient:
    """Django's test client with `Authorization: Bearer <token>` and JSON bodies."""

    def __init__(self, token: str | None) -> None:
        self.client = Client()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _send(self, method: str, path: str, body: Any = None, **headers: str) -> Any:
        data = body if isinstance(body, str | bytes) or body is None else json.dumps(body)
        return getattr(self.client, method)(
            path, data=data, content_type="application/json", headers={**self.headers, **headers}
        )

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(path, params, headers=self.headers)

    def post(self, path: str, body: Any = None, **headers: str) -> Any:
        return self._send("post", path, body, **headers)

    def delete(self, path: str, **headers: str) -> Any:
        return self._send("delete", path, None, **headers)


@pytest.fixture
def make_client(db: None) -> Callable[..., ApiClient]:
    def make(username: str = "client", *, staff: bool = False) -> ApiClient:
        User = get_user_model()
        user, _ = User.objects.get_or_create(username=username, defaults={"is_staff": staff})
        _, raw = create_token(user, name=f"{username} token")
        ISSUED_TOKENS.append(raw)
        api_client = ApiClient(raw)
        api_client.token = raw  # type: ignore[attr-defined]
        return api_client

    return make


@pytest.fixture
def api_client(make_client: Callable[..., ApiClient]) -> ApiClient:
    return make_client("service")


@pytest.fixture
def staff_client(make_client: Callable[..., ApiClient]) -> ApiClient:
    return make_client("operator", staff=True)
