"""Pytest plugin (loaded with `-p tests.services`): the real services the suite talks to.

Broker: CELERY_BROKER_URL (or REDIS_URL) when set, and it must answer; otherwise
an embedded Valkey started here for the session and stopped at the end.
Database: DATABASE_URL when set (CI points it at PostgreSQL), otherwise SQLite.

This has to run before pytest-django imports the settings, which read the
broker URL, hence a wrapper around `pytest_load_initial_conftests`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from localdev.embedded_broker import EmbeddedBroker, free_port, is_listening

_embedded: EmbeddedBroker | None = None


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> Generator[None, None, None]:
    global _embedded
    url = os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL")
    if url:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        if parts.scheme.startswith("redis") and not is_listening(host, port, timeout=2):
            raise pytest.UsageError(
                f"the broker at {host}:{port} (CELERY_BROKER_URL/REDIS_URL) does not answer; "
                "start it, or unset both variables to let the tests start an embedded one."
            )
        os.environ["CELERY_BROKER_URL"] = url
    else:
        _embedded = EmbeddedBroker(
            free_port(), Path(tempfile.mkdtemp(prefix="jobs-test-broker-")), persist=False
        )
        _embedded.start()
        os.environ["CELERY_BROKER_URL"] = _embedded.url
    return (yield)


def pytest_report_header(config: pytest.Config) -> list[str]:
    from django.conf import settings

    source = "embedded Valkey started by the tests" if _embedded else "from CELERY_BROKER_URL/REDIS_URL"
    return [
        f"broker: {settings.CELERY_BROKER_URL} ({source})",
        f"database: {settings.DATABASES['default']['ENGINE']}",
    ]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded is not None:
        _embedded.stop()
