"""What the broker and the workers say about queues: real broker, real worker processes."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from localdev.embedded_broker import free_port
from monitoring.broker import BrokerError, QueueDepth, WorkerView, inspect_workers, queue_depths
from tests.rabbitmq import RABBITMQ_URL, rabbitmq_answers
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def app_reading_from(url: str) -> Celery:
    """An app whose broker connections go to `url` (CELERY_BROKER_URL in the environment would
    override broker_url itself, but not broker_read_url, which is what the monitoring reads)."""
    app = Celery("monitoring-test", set_as_current=False)
    app.conf.update(broker_read_url=url)
    return app


def on_redis(app: Celery) -> bool:
    return app.connection_for_read().transport.driver_type == "redis"


@pytest.fixture
def purged_after(celery_app: Celery) -> Iterator[None]:
    yield
    celery_app.control.purge()


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """A TCP server on loopback that accepts connections and never says a word: a hung broker."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"127.0.0.1:{server.getsockname()[1]}"


def test_queue_depths_count_the_messages_waiting_in_a_queue_nobody_consumes(
    celery_app: Celery, empty_queues: None, purged_after: None
) -> None:
    for _ in range(3):
        celery_app.send_task("default.ping", queue="analytics")

    depths = queue_depths()

    assert depths["analytics"].ready == 3
    assert {name: depth.ready for name, depth in depths.items() if name != "analytics"} == {
        "email": 0,
        "images": 0,
        "data_sync": 0,
        "default": 0,
    }
    if on_redis(celery_app):
        assert depths["analytics"].unacked == 0


def test_a_queue_that_does_not_exist_yet_has_depth_zero() -> None:
    name = f"never-declared-{uuid.uuid4().hex[:8]}"

    assert queue_depths([name, "email"])[name].ready == 0


def test_a_countdown_message_a_worker_holds_is_unacked_and_scheduled_not_ready(
    celery_app: Celery, empty_queues: None, purged_after: None, worker_process
) -> None:
    worker = worker_process("holder", "-Q", "analytics", "--pool=solo")

    celery_app.send_task("default.ping", queue="analytics", countdown=60)

    def scheduled() -> WorkerView | None:
        view = inspect_workers()
        return view if view.queues["analytics"].scheduled == 1 else None

    view = wait_for(scheduled, what="the worker to report the countdown message as scheduled")
    assert view.queues["analytics"].active == 0
    depths = queue_depths()
    assert depths["analytics"].ready == 0
    if on_redis(celery_app):
        assert depths["analytics"].unacked == 1
        assert depths["analytics"].unacked_all_queues == 1
        assert depths["default"].unacked == 0
    worker.stop()  # a warm shutdown gives the message back to the broker; purged_after removes it


def test_inspect_workers_lists_a_worker_under_the_queues_it_consumes_only(worker_process) -> None:
    worker_process("mailer", "-Q", "email", "--pool=solo")

    def answered() -> WorkerView | None:
        view = inspect_workers()
        return view if view.consumers("email") else None

    view = wait_for(answered, what="the worker to answer")

    assert view.consumers("email") == (f"mailer@{socket.gethostname()}",)
    assert view.queues_without_workers() == ["images", "data_sync", "analytics", "default"]
    assert not view.failed


def test_inspect_workers_without_workers_returns_an_empty_view_within_the_timeout() -> None:
    started = time.monotonic()
    view = inspect_workers(timeout=1.0)
    elapsed = time.monotonic() - started

    assert elapsed < 1.0 + 2
    assert view.workers == ()
    assert view.queues_without_workers() == ["email", "images", "data_sync", "analytics", "default"]
    assert not view.failed


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_broker_that_refuses_connections_fails_at_once_with_a_clear_error(scheme: str) -> None:
    app = app_reading_from(f"{scheme}://user:secret@127.0.0.1:{free_port()}/0")

    started = time.monotonic()
    with pytest.raises(BrokerError, match="could not connect to the broker at") as error:
        queue_depths(app=app)
    view = inspect_workers(timeout=1.0, app=app)

    assert time.monotonic() - started < 2
    assert "secret" not in str(error.value)
    assert view.failed and view.workers == ()
    assert set(view.errors) == {"active_queues", "active", "reserved", "scheduled"}


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_broker_that_never_answers_cannot_hang_the_caller(scheme: str, silent_broker: str) -> None:
    app = app_reading_from(f"{scheme}://{silent_broker}/0")

    started = time.monotonic()
    with pytest.raises(BrokerError):
        queue_depths(app=app, timeout=1.0)
    assert time.monotonic() - started < 1.0 + 1

    started = time.monotonic()
    view = inspect_workers(timeout=1.0, app=app)
    assert time.monotonic() - started < 1.0 + 2 * 2 + 1
    assert view.failed


@pytest.mark.skipif(not rabbitmq_answers(), reason=f"no RabbitMQ at {RABBITMQ_URL} (RABBITMQ_URL)")
def test_queue_depths_work_on_rabbitmq() -> None:
    name = f"monitoring-test-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(RABBITMQ_URL) as conn:
        producer = conn.Producer()
        try:
            for _ in range(3):
                producer.publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue])
            app = app_reading_from(RABBITMQ_URL)

            def counted() -> dict[str, QueueDepth] | None:
                depths = queue_depths([name, "not-declared-" + name], app=app)
                return depths if depths[name].ready == 3 else None

            depths = wait_for(counted, timeout=10, what="RabbitMQ to count the published messages")

            assert depths["not-declared-" + name].ready == 0
            assert depths[name].unacked is None  # AMQP does not tell
        finally:
            queue(conn.default_channel).delete()
            queue.exchange(conn.default_channel).delete()
