"""PostgreSQL away: no accepted job is lost, none is stuck, and workers take nothing they can't record.

The database the test owns (pytest-django's test database) is closed to new connections
(`ALLOW_CONNECTIONS false`) and its sessions are terminated, as a failover or a restart
does; then it is opened again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from django.db import connection
from django.utils import timezone

from jobs.models import Job
from tests import queues
from tests.faults import oracle
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _admin() -> psycopg.Connection:
    """A connection to the server's maintenance database, beside the test database."""
    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"] or "127.0.0.1",
        port=int(db["PORT"] or 5432),
        user=db["USER"],
        password=db["PASSWORD"] or None,
        dbname="postgres",
        autocommit=True,
    )


@contextmanager
def database_unreachable() -> Iterator[None]:
    name = connection.settings_dict["NAME"]
    connection.close()
    with _admin() as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            [name],
        )
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("an outage the test can cause and end needs PostgreSQL")


def test_jobs_taken_while_the_database_is_away_all_complete_once_it_is_back(
    empty_queues: None, worker_process, tmp_path: Path
) -> None:
    worker = worker_process("outage", "-Q", "default", "-I", "tests.probes", "--concurrency=2")
    job_ids = oracle.accept_jobs(oracle.size(300), tmp_path / "effects", seconds=0.01)
    wait_for(lambda: (tmp_path / "effects" / "executions.log").exists(), what="the first execution")

    outage = 10.0  # seconds, as the review measured
    with database_unreachable():
        time.sleep(outage)
    recovered = oracle.wait_until_final(job_ids, timeout=90)

    result = oracle.report("PostgreSQL unreachable", job_ids, tmp_path / "effects", recovered)
    log = worker.log.read_text()
    result.record(f"{log.count('message sent again')} deliveries sent again")
    assert result.perfect, result.line() + "\n" + log[-3000:]
    # One clear error per outage, not a warning per message.
    assert log.count("database unreachable: not taking messages") == 1, log[-3000:]
    assert "database answers again" in log


def test_a_worker_whose_database_is_unreachable_takes_nothing(
    celery_app, empty_queues: None, worker_process, tmp_path: Path, monkeypatch
) -> None:
    """A worker started with a wrong DATABASE_URL waits; it does not drain the queue into nothing."""
    job_ids = oracle.accept_jobs(20, tmp_path / "effects")
    from localdev.embedded_broker import free_port

    monkeypatch.setattr(
        "tests.conftest.database_url_for_subprocess",
        lambda: f"postgres://postgres@127.0.0.1:{free_port()}/nowhere",
    )
    worker = worker_process("no-database", "-Q", "default", "-I", "tests.probes", "--concurrency=1")
    time.sleep(3)
    assert "database unreachable" in worker.log.read_text()

    # Nothing drained. At least: a copy an earlier test deferred on RabbitMQ (native delayed delivery,
    # which a purge does not reach) may come due here (CI saw 21 once).
    assert queues.depth(celery_app, "default") >= len(job_ids)
    assert Job.objects.filter(pk__in=job_ids, status=Job.Status.QUEUED).count() == len(job_ids)
    assert not (tmp_path / "effects" / "executions.log").exists()


def test_beat_outlives_a_database_outage_and_sends_again_once_it_is_back(tmp_path: Path) -> None:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from scheduling.models import ScheduledRun
    from tests.conftest import BeatProcess

    every_2s, _ = IntervalSchedule.objects.get_or_create(every=2, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(name="heartbeat", task="default.ping", interval=every_2s)
    beat = BeatProcess("beat", tmp_path / "beat.log")
    try:
        wait_for(lambda: ScheduledRun.objects.filter(schedule_name="heartbeat").exists(), timeout=60)
        with database_unreachable():
            time.sleep(10)
            assert beat.process.poll() is None, beat.log.read_text()[-3000:]
        back = timezone.now()
        wait_for(
            lambda: ScheduledRun.objects.filter(schedule_name="heartbeat", dispatched_at__gt=back).exists(),
            timeout=30,
            what="a run sent after the outage",
        )
        # Logged once the tick that sent it returns (the run's row is written before that).
        wait_for(lambda: beat.says("the database answers again"), timeout=30, what="beat's recovery line")
        assert beat.process.poll() is None
    finally:
        beat.stop()
        print(beat.log.read_text()[-4000:])
    log = beat.log.read_text()
    assert log.count("the database is unreachable") == 1, log[-3000:]
    assert "the database answers again" in log


@pytest.mark.requires_redis_broker  # on RabbitMQ: the test after this one
def test_a_worker_that_reconnects_to_the_broker_during_an_outage_consumes_again_after_it(
    celery_app, worker_process, tmp_path: Path
) -> None:
    """The consumer restarts after a broker reconnection; the gate must still reopen its queues."""
    from localdev.embedded_broker import EmbeddedBroker, free_port
    from tests import probes

    broker = EmbeddedBroker(free_port(), tmp_path / "broker", persist=False)
    broker.start()
    try:
        worker = worker_process(
            "reconnects", "-Q", "default", "-I", "tests.probes", "--concurrency=1", broker_url=broker.url
        )
        with database_unreachable():
            wait_for(lambda: "database unreachable" in worker.log.read_text(), timeout=30, what="gate closed")
            with celery_app.connection_for_write(broker.url) as connection:
                connection.default_channel.client.execute_command("CLIENT", "KILL", "TYPE", "normal")
            wait_for(
                lambda: "Connection to broker lost" in worker.log.read_text(), timeout=30, what="reconnect"
            )
            time.sleep(3)
        directory = tmp_path / "effects"
        directory.mkdir()
        with celery_app.connection_for_write(broker.url) as connection:
            result = probes.probe_effect.apply_async(
                kwargs={"directory": str(directory), "key": "after"}, connection=connection
            )
        wait_for(
            lambda: Job.objects.filter(task_id=result.id, status=Job.Status.SUCCEEDED).exists(),
            timeout=60,
            what="a job taken after the outage",
        )
    finally:
        broker.stop()


@pytest.mark.requires_amqp_broker
def test_a_worker_whose_rabbitmq_connection_is_closed_during_an_outage_consumes_again_after_it(
    celery_app, empty_queues: None, worker_process, tmp_path: Path
) -> None:
    """The test above on RabbitMQ: the vhost's connections closed by rabbitmqctl, not CLIENT KILL."""
    from django.conf import settings

    from tests import probes, rabbitmq
    from tests.faults import harness

    rabbitmq.skip_unless_rabbitmqctl()
    worker = worker_process("reconnects", "-Q", "default", "-I", "tests.probes", "--concurrency=1")
    with database_unreachable():
        wait_for(lambda: "database unreachable" in worker.log.read_text(), timeout=30, what="gate closed")
        assert rabbitmq.close_connections(rabbitmq.vhost_of(settings.CELERY_BROKER_URL)) > 0
        wait_for(lambda: "Connection to broker lost" in worker.log.read_text(), timeout=30, what="reconnect")
        time.sleep(3)
    harness.forget_broker_connections(celery_app)  # this process's connections were closed too
    directory = tmp_path / "effects"
    directory.mkdir()
    result = probes.probe_effect.apply_async(kwargs={"directory": str(directory), "key": "after"})
    wait_for(
        lambda: Job.objects.filter(task_id=result.id, status=Job.Status.SUCCEEDED).exists(),
        timeout=60,
        what="a job taken after the outage",
    )
