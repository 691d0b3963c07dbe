"""Every producer has timeouts: a frozen broker (a real Valkey, SIGSTOPped: it accepts TCP and never
answers) gives apply_async, beat and the admin's actions an error within seconds, and they work
again when it thaws. Workers keep their blocking BRPOP: an idle worker neither spins nor reconnects.

Times are printed (run with -s); the bound asserted is only "not a hang".
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone
from kombu.exceptions import OperationalError

from localdev.embedded_broker import EmbeddedBroker, free_port
from scheduling.beat import Scheduler
from scheduling.models import ScheduledRun
from tasks.default import ping
from tasks.models import DataSource, DeadLetter
from tests import queues
from tests.jobs.test_api_unavailable import reset_broker_connections
from tests.scheduling.beatdriver import Clock, add_interval

# A private Valkey frozen with SIGSTOP: the machine's RabbitMQ may be shared, and is not frozen.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.requires_redis_broker,
]

HANG = 60  # seconds: anything longer is a hang, whatever the machine's load


class Freezable:
    def __init__(self, broker: EmbeddedBroker) -> None:
        self.broker = broker
        self.url = broker.url
        self.frozen = False

    def freeze(self) -> None:
        assert self.broker.process is not None
        os.kill(self.broker.process.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        assert self.broker.process is not None
        os.kill(self.broker.process.pid, signal.SIGCONT)
        self.frozen = False


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Freezable]:
    """A Valkey of this test's own (never the machine's shared Redis: that one is not ours to stop)."""
    broker = EmbeddedBroker(free_port(), tmp_path / "broker", persist=False)
    broker.start()
    freezable = Freezable(broker)
    try:
        yield freezable
    finally:
        if freezable.frozen:
            freezable.thaw()
        broker.stop()


@pytest.fixture
def send_to(private_broker: Freezable, monkeypatch: pytest.MonkeyPatch) -> Iterator[Freezable]:
    """Everything this process sends goes to the private broker (Celery reads this variable first)."""
    monkeypatch.setenv("CELERY_BROKER_WRITE_URL", private_broker.url)
    reset_broker_connections()
    yield private_broker
    monkeypatch.delenv("CELERY_BROKER_WRITE_URL")
    reset_broker_connections()


def timed_error(what: str, call: Any) -> BaseException:
    started = time.monotonic()
    with pytest.raises(Exception) as caught:
        call()
    elapsed = time.monotonic() - started
    print(f"{what}: {type(caught.value).__name__} after {elapsed:.1f} s")
    assert elapsed < HANG
    return caught.value


def test_apply_async_raises_within_seconds_when_the_broker_freezes(send_to: Freezable) -> None:
    ping.apply_async()  # a pooled connection, open and answering, as in a long-running process
    send_to.freeze()

    error = timed_error("apply_async, frozen broker (warm connection)", ping.apply_async)
    assert isinstance(error, OperationalError)
    reset_broker_connections()
    timed_error("apply_async, frozen broker (new connection)", ping.apply_async)

    send_to.thaw()
    ping.apply_async()  # and it sends again, with no restart
    # A timeout is not a refusal: the frozen server may still hold the command that timed out in
    # its socket buffer and run it when it thaws. The caller was told "error", and the message
    # may be delivered all the same: senders that retry must be idempotent (task ids, claims).
    assert queues.length(redis.Redis.from_url(send_to.url), "default") in (2, 3)


def test_beat_reports_a_frozen_broker_within_seconds_and_sends_when_it_thaws(
    celery_app: Celery, send_to: Freezable
) -> None:
    add_interval("every minute", 60)
    scheduler = Scheduler(app=celery_app, max_interval=3600)
    # Five seconds past a minute: start + 61, + 122 and + 130 s then fall in the next minute, the
    # one after and the same one again, whatever second the test starts at (from 50 s past a
    # minute on, + 130 s used to reach a third minute and a third occurrence).
    start = timezone.now().replace(second=5, microsecond=0)
    with Clock(start + timedelta(seconds=61)) as clock:
        scheduler.tick()  # takes the lease
        scheduler.tick()
        assert ScheduledRun.objects.filter(status=ScheduledRun.Status.DISPATCHED).count() == 1

        send_to.freeze()
        clock.move_to(start + timedelta(seconds=122))
        started = time.monotonic()
        scheduler.tick()
        elapsed = time.monotonic() - started
        print(f"beat tick, frozen broker: returned after {elapsed:.1f} s")
        assert elapsed < HANG
        assert ScheduledRun.objects.count() == 1  # the claim of the unsent occurrence was withdrawn

        send_to.thaw()
        clock.move_to(start + timedelta(seconds=130))
        deadline = time.monotonic() + 30  # beat tries again 5 s (real time) after a failed send
        while ScheduledRun.objects.filter(status=ScheduledRun.Status.DISPATCHED).count() < 2:
            assert time.monotonic() < deadline, "beat did not send after the broker thawed"
            scheduler.tick()
            time.sleep(0.2)
    scheduler.close()
    # Two occurrences; the one sent during the freeze may also arrive from the frozen attempt
    # (see above), under the same task id, which the job claim runs once.
    ids = [
        json.loads(raw)["headers"]["id"]
        for raw in queues.messages(redis.Redis.from_url(send_to.url), "default")
    ]
    assert len(set(ids)) == 2 and len(ids) in (2, 3)


def test_admin_actions_show_an_error_within_seconds_when_the_broker_freezes(send_to: Freezable) -> None:
    user = get_user_model().objects.create_superuser("ops", password="pw")
    client = Client()
    client.force_login(user)
    now = timezone.now()
    letter = DeadLetter.objects.create(
        task_id="t1",
        task_name="default.ping",
        exception_type="x.Boom",
        first_failed_at=now,
        last_failed_at=now,
    )
    periodic = add_interval("hourly ping", 3600)
    source = DataSource.objects.create(name="crm", url="https://crm.example.com/api/people")
    send_to.freeze()

    for what, url, action, pk in (
        ("admin: replay dead letter", "/admin/tasks/deadletter/", "replay_selected", letter.pk),
        ("admin: run schedule now", "/admin/django_celery_beat/periodictask/", "run_now", periodic.pk),
        ("admin: sync now", "/admin/tasks/datasource/", "sync_now", source.pk),
    ):
        started = time.monotonic()
        response = client.post(url, {"action": action, "_selected_action": [pk]}, follow=True)
        elapsed = time.monotonic() - started
        print(f"{what}: {response.status_code} after {elapsed:.1f} s")
        assert elapsed < HANG
        assert response.status_code == 200
        assert "the broker did not" in response.content.decode().lower()

    letter.refresh_from_db()
    assert (letter.replay_count, letter.replay_status) == (0, "")
    assert not ScheduledRun.objects.exists()


def worker_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_an_idle_worker_keeps_its_connections_and_does_not_spin(
    private_broker: Freezable, worker_process, celery_app: Celery
) -> None:
    """socket_timeout (3 s) is shorter than a worker's idle time: BRPOP must not be cut by it."""
    worker = worker_process("idle", "-Q", "default", "--pool=solo", broker_url=private_broker.url)
    client = redis.Redis.from_url(private_broker.url)
    time.sleep(3)  # past start-up: mingle, gossip, the first health checks
    connections_before = int(client.info("stats")["total_connections_received"])
    cpu_before = worker_cpu_seconds(worker.process.pid)
    log_before = worker.log.read_text()

    time.sleep(30)

    new_connections = int(client.info("stats")["total_connections_received"]) - connections_before
    cpu = worker_cpu_seconds(worker.process.pid) - cpu_before
    new_log = worker.log.read_text()[len(log_before) :]
    print(f"idle worker, 30 s: {new_connections} new connection(s), {cpu:.2f} s of CPU")
    assert new_connections == 0, new_log
    assert cpu < 3, "the worker spins while idle"
    for sign in ("Timeout", "timed out", "Connection to broker lost", "reconnect", "ERROR"):
        assert sign not in new_log, new_log

    # And it still takes work at once.
    with celery_app.connection_for_write(private_broker.url) as connection:
        result = ping.apply_async(connection=connection)
    assert result.get(timeout=10)["pong"].startswith("idle@")
