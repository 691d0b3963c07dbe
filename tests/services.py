"""Pytest plugin (loaded with `-p tests.services`): the real services the suite talks to.

Broker: CELERY_BROKER_URL (or REDIS_URL) when set, and it must answer; otherwise
an embedded Valkey started here for the session and stopped at the end.
Database: DATABASE_URL when set (CI points it at PostgreSQL), otherwise SQLite.

This has to run before pytest-django imports the settings, which read the
broker URL, hence a wrapper around `pytest_load_initial_conftests`.

Run in parallel (`bin/test -n 2`, pytest-xdist), each test process gets brokers of its own:
Redis database number + its index (gw1 of db 0 uses db 1), a RabbitMQ virtual host of its own
(created with rabbitmqctl), and an embedded broker each; pytest-django gives each its own test
database. Workers, purges and control broadcasts of one never reach another's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Generator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from localdev.embedded_broker import EmbeddedBroker, free_port, is_listening

_embedded: EmbeddedBroker | None = None


def parallel_index() -> int:
    """0 in a serial run and in pytest-xdist's gw0; N in gwN."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


def own_broker_url(url: str, index: int | None = None) -> str:
    """`url` made this test process's own when tests run in parallel (see the module docstring)."""
    index = parallel_index() if index is None else index
    if not index:
        return url
    parts = urlsplit(url)
    if parts.scheme.startswith(("redis", "valkey")):
        base = int(parts.path.strip("/") or 0)
        return urlunsplit(parts._replace(path=f"/{base + index}"))
    if parts.scheme.startswith(("amqp", "pyamqp")):
        vhost = parts.path[1:] or "/"
        own = f"{'root' if vhost == '/' else vhost}-gw{index}"
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            raise pytest.UsageError(f"running in parallel on {url} needs rabbitmqctl to add vhost {own}")
        # The vhost is this test process's alone: what an earlier run left in it goes.
        subprocess.run([ctl, "-q", "delete_vhost", own], capture_output=True, check=False)
        subprocess.run([ctl, "-q", "add_vhost", own], capture_output=True, check=False)
        subprocess.run(
            [ctl, "-q", "set_permissions", "-p", own, parts.username or "guest", ".*", ".*", ".*"],
            capture_output=True,
            check=False,
        )
        return urlunsplit(parts._replace(path=f"/{own}"))
    return url


@pytest.hookimpl(wrapper=True)
def pytest_load_initial_conftests(
    early_config: pytest.Config, parser: pytest.Parser, args: list[str]
) -> Generator[None, None, None]:
    global _embedded
    url = os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL")
    for name in ("REDIS_URL", "METRICS_REDIS_URL", "RATE_LIMIT_STORAGE_URL"):
        if os.environ.get(name, "").startswith(("redis", "valkey")):
            os.environ[name] = own_broker_url(os.environ[name])
    if parallel_index() and shutil.which("rabbitmqctl"):
        # tests.rabbitmq reads it when first imported, after this
        rabbitmq = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
        os.environ["RABBITMQ_URL"] = own_broker_url(rabbitmq)
    if url:
        url = own_broker_url(url)
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
