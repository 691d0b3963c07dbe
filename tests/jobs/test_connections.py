"""jobs.connections: a worker's connection is trusted without a health check by the task that follows
closely on the last, and a claim on one the database dropped meanwhile is sent again on a new one.

Against the real database; the task signals are sent as Celery sends them around a task.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from celery.signals import task_postrun, task_prerun
from django.db import OperationalError, connection

from jobs import connections

pytestmark = pytest.mark.django_db(transaction=True)


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def terminate(pid: int) -> None:
    """As a database restart or a failover drops a session: from another connection."""
    settings = connection.settings_dict
    with psycopg.connect(
        host=settings["HOST"] or None,
        port=settings["PORT"] or None,
        user=settings["USER"] or None,
        dbname=settings["NAME"],
        autocommit=True,
    ) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])


def task_ends_then_the_next_starts(pause: float = 0.0) -> None:
    task_postrun.send(sender=None, task_id="a")
    time.sleep(pause)
    task_prerun.send(sender=None, task_id="b")


@pytest.fixture
def postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("sessions are terminated with PostgreSQL's pg_terminate_backend")


def test_the_next_task_trusts_a_connection_the_last_one_used_a_moment_ago(postgresql: None) -> None:
    pid = backend_pid()
    task_ends_then_the_next_starts()

    assert getattr(connection, "health_check_done")  # noqa: B009 (django-stubs lacks it) no SELECT 1 first
    assert backend_pid() == pid


def test_a_connection_idle_longer_is_checked_first(postgresql: None) -> None:
    backend_pid()
    task_ends_then_the_next_starts(pause=connections.TRUSTED_FOR + 0.1)

    assert not getattr(connection, "health_check_done")  # noqa: B009 (django-stubs lacks it) SELECT 1 first


def test_a_claim_on_a_trusted_connection_the_database_dropped_is_sent_again_on_a_new_one(
    postgresql: None,
) -> None:
    pid = backend_pid()
    task_ends_then_the_next_starts()
    terminate(pid)
    tries: list[bool] = []

    def claim(again: bool) -> int:
        tries.append(again)
        return backend_pid()

    new_pid = connections.claiming(claim)

    assert tries == [False, True]  # the second as a redelivery's claim: the row may hold its first
    assert new_pid != pid


def test_a_claim_on_a_checked_connection_is_not_sent_again(postgresql: None) -> None:
    tries: list[bool] = []

    def claim(again: bool) -> Any:
        tries.append(again)
        raise OperationalError("the database is away")

    task_ends_then_the_next_starts(pause=connections.TRUSTED_FOR + 0.1)
    with pytest.raises(OperationalError):
        connections.claiming(claim)

    assert tries == [False]  # an outage: tasks.reliability decides
