"""Fixtures shared by the whole suite: the real Celery app, real workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from django.db import connection

from config.celery_app import app as project_app
from tests import pools
from tests.smtp import SmtpServer

ROOT = Path(__file__).resolve().parent.parent

BROKER_MARKERS = {
    "requires_redis_broker": (
        "about the Redis broker itself (delivery/redis.py, Redis lists, AOF, CLIENT KILL, a private "
        "Valkey): it ran in the Redis pass, and has an AMQP counterpart where the behaviour matters"
    ),
    "requires_amqp_broker": "about RabbitMQ (connections closed by rabbitmqctl): runs in the AMQP pass",
    "requires_ordered_priorities": (
        "about priority ordering or the queues declared for it: RabbitMQ's quorum queues (the AMQP "
        "default) have no priorities; tests/jobs/test_priorities.py's RabbitMQ backlog runs on "
        "classic queues and tests/jobs/test_rabbitmq.py covers quorum queues"
    ),
}


def broker_is_amqp() -> bool:
    """The suite's broker (CELERY_BROKER_URL, set by tests/services.py before settings load) is RabbitMQ."""
    return os.environ.get("CELERY_BROKER_URL", "").startswith(("amqp://", "amqps://", "pyamqp://"))


def pytest_configure(config: pytest.Config) -> None:
    for name, meaning in BROKER_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test marked for the other broker skips, saying why: `.ci/run` runs the suites on both."""
    amqp = broker_is_amqp()
    for item in items:
        if amqp and item.get_closest_marker("requires_redis_broker"):
            item.add_marker(
                pytest.mark.skip(reason="Redis broker only: " + BROKER_MARKERS["requires_redis_broker"])
            )
        quorum = amqp and os.environ.get("RABBITMQ_QUEUE_TYPE", "quorum") != "classic"
        if quorum and item.get_closest_marker("requires_ordered_priorities"):
            item.add_marker(
                pytest.mark.skip(reason="quorum queues: " + BROKER_MARKERS["requires_ordered_priorities"])
            )
        if not amqp and item.get_closest_marker("requires_amqp_broker"):
            item.add_marker(
                pytest.mark.skip(reason="RabbitMQ broker only: runs when CELERY_BROKER_URL is amqp://")
            )


@pytest.fixture(autouse=True)
def _no_closed_broker_pools() -> None:
    """A test that closed this process's broker pools (an outage test resetting kombu.pools) would
    leave closed ones cached for the next test's publish or control broadcast: they are dropped
    before each test (tests/pools.py lists where Celery and kombu keep them)."""
    pools.drop_closed(project_app)


@pytest.fixture(scope="session")
def celery_app() -> Celery:
    """The project's own app, configured from the test settings: no eager mode, real broker."""
    assert not project_app.conf.task_always_eager
    return project_app


@pytest.fixture
def empty_queues(celery_app: Celery) -> None:
    """Starts a test with no messages left in any project queue by an earlier one."""
    celery_app.control.purge()


@pytest.fixture(scope="module")
def celery_worker(celery_app: Celery, django_db_setup: None, django_db_blocker) -> Iterator[object]:
    """A real worker in a thread of this process, consuming every project queue.

    It stores results through the database backend, so tests that use it must be
    `django_db(transaction=True)`: the worker's connection sees only committed rows.
    """
    import celery.contrib.testing.tasks  # noqa: F401  (registers celery.ping for the start-up check)
    from celery.signals import task_postrun
    from django.db import DEFAULT_DB_ALIAS, connections

    # A worker keeps its database connection from task to task (jobs/connections.py); this one's
    # thread is gone once it stops, so its connection is closed for it (or the test database could
    # not be dropped at the end: "being accessed by other users").
    kept: list[Any] = []

    def remember_connection(**kwargs: Any) -> None:
        wrapper = connections[DEFAULT_DB_ALIAS]
        if not any(wrapper is seen for seen in kept):
            kept.append(wrapper)

    task_postrun.connect(remember_connection, weak=False, dispatch_uid="tests.celery_worker.connections")
    try:
        with django_db_blocker.unblock():
            celery_app.control.purge()
            with start_worker(celery_app, pool="solo", concurrency=1, perform_ping_check=True) as worker:
                yield worker
    finally:
        task_postrun.disconnect(dispatch_uid="tests.celery_worker.connections")
        for wrapper in kept:
            if wrapper.connection is not None:
                with contextlib.suppress(Exception):  # already dropped by the server: gone either way
                    wrapper.connection.close()


def database_url_for_subprocess() -> str:
    """DATABASE_URL naming the *test* database, for workers started as processes."""
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{Path(db['NAME']).resolve()}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class WorkerProcess:
    """`celery -A config worker ...` as a real process, as a user would start it."""

    def __init__(self, node: str, args: list[str], log: Path, broker_url: str | None = None) -> None:
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE="config.settings.test",
            DATABASE_URL=database_url_for_subprocess(),
            PYTHONUNBUFFERED="1",
        )
        if broker_url:
            env["CELERY_BROKER_URL"] = broker_url
        self.broker_url = broker_url
        self.node = node
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "worker", "-n", f"{node}@%h", *args],
            cwd=ROOT,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits for the worker's own "ready" line: connected, queues declared, consuming."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.node} exited early:\n{self.log.read_text()[-3000:]}")
            if f" {self.node}@" in self.log.read_text() and " ready." in self.log.read_text():
                return
            time.sleep(0.1)
        raise AssertionError(f"worker {self.node} was not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        stop_process(self.process)  # warm shutdown, as a deploy would do
        self._log_file.close()
        return self.process.returncode


class BeatProcess:
    """`celery -A config beat`, as the Procfile starts it (the project's scheduler, from settings)."""

    def __init__(self, name: str, log: Path) -> None:
        self.name, self.log = name, log
        env = dict(os.environ)
        env.update(
            DJANGO_SETTINGS_MODULE="config.settings.test",
            DATABASE_URL=database_url_for_subprocess(),
            PYTHONUNBUFFERED="1",
        )
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "beat", "--pidfile=", "-l", "INFO"],
            cwd=ROOT,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.holder = f":{self.process.pid}"  # ScheduledRun.beat is host:pid

    def says(self, text: str) -> bool:
        return text in self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process(self.process, sig)
        self._log_file.close()


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Sends `sig` and waits; kills what is still running after `timeout` seconds."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def worker_process(
    celery_app: Celery, tmp_path: Path, django_db_blocker
) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts worker processes on demand; every one is stopped at the end of the test."""
    started: list[WorkerProcess] = []

    def start(node: str, *args: str, wait: bool = True, broker_url: str | None = None) -> WorkerProcess:
        with django_db_blocker.unblock():
            worker = WorkerProcess(node, list(args), tmp_path / f"{node}.log", broker_url)
        started.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def smtp_server(settings) -> Iterator[SmtpServer]:
    """A real SMTP server on loopback (tests/smtp.py), with Django's SMTP backend pointed at it.

    It accepts everything; `smtp_server.set_failure(rcpt=(451, "try later"), times=2)` makes
    it refuse the next commands, or build an `SmtpServer(...)` of your own for other needs.
    The settings change is process-wide, so the in-process `celery_worker` sends through it too.
    """
    with SmtpServer() as server:
        for name, value in server.django_settings().items():
            setattr(settings, name, value)
        yield server
