"""Task events only while someone watches: off by default, on at Flower's broadcast, off again after."""

from __future__ import annotations

import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from tests.waiting import wait_for

pytestmark = pytest.mark.django_db(transaction=True)


class EventLog:
    """Every event the broker carries, captured by a real event receiver in a thread (as Flower's)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._connection = app.connection_for_read()
        self.receiver = app.events.Receiver(self._connection, handlers={"*": self._on_event})
        self._thread = threading.Thread(target=self._capture, daemon=True)
        self._thread.start()

    def _capture(self) -> None:
        # The connection is closed under it at the end of the test.
        with contextlib.suppress(Exception):
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self.events.append(event)

    def types_for(self, task_id: str) -> set[str]:
        with self._lock:
            return {event["type"] for event in self.events if event.get("uuid") == task_id}

    def sync_with(self, node: str) -> None:
        """Waits for a heartbeat the worker sends *now*: every event it sent before has arrived
        (one dispatcher, one connection, in order), so an event that is missing was never sent."""
        marker = len(self.events)

        def heartbeat_after_marker() -> bool:
            self.app.control.heartbeat(destination=[node])
            with self._lock:
                return any(
                    event["type"] == "worker-heartbeat" and event.get("hostname") == node
                    for event in self.events[marker:]
                )

        wait_for(heartbeat_after_marker, timeout=30, what=f"a heartbeat from {node}")

    def close(self) -> None:
        self.receiver.should_stop = True
        self._connection.close()


@pytest.fixture
def event_log(celery_app: Celery) -> Iterator[EventLog]:
    log = EventLog(celery_app)
    yield log
    log.close()


def run_ping(celery_app: Celery) -> str:
    task_id = f"events-{uuid.uuid4()}"
    celery_app.send_task("default.ping", queue="analytics", task_id=task_id).get(timeout=30)
    return task_id


def test_task_events_and_the_sent_event_are_off_by_default(celery_app: Celery) -> None:
    assert celery_app.conf.worker_send_task_events is False
    assert celery_app.conf.task_send_sent_event is False


def test_flowers_enable_events_broadcast_turns_task_events_on(
    celery_app: Celery, worker_process: Any, event_log: EventLog, empty_queues: None
) -> None:
    worker_process("watched", "-Q", "analytics", "--pool=solo")
    node = f"watched@{socket.gethostname()}"
    event_log.sync_with(node)  # the receiver listens, and the worker's own events reach it

    unwatched = run_ping(celery_app)
    event_log.sync_with(node)
    assert event_log.types_for(unwatched) == set()  # not even task-sent from this client

    replies = celery_app.control.enable_events(destination=[node], reply=True, timeout=5)
    assert replies == [{node: {"ok": "task events enabled"}}]
    watched = run_ping(celery_app)
    wait_for(
        lambda: {"task-received", "task-started", "task-succeeded"} <= event_log.types_for(watched),
        what="the watched task's events",
    )


def test_task_events_go_off_again_when_nobody_asks_for_them_any_more(
    celery_app: Celery, worker_process: Any, event_log: EventLog, empty_queues: None, monkeypatch: Any
) -> None:
    monkeypatch.setenv("MONITORING_TASK_EVENTS_LAPSE_SECONDS", "2")
    worker_process("forgotten", "-Q", "analytics", "--pool=solo")
    node = f"forgotten@{socket.gethostname()}"
    event_log.sync_with(node)
    celery_app.control.enable_events(destination=[node], reply=True, timeout=5)
    watched = run_ping(celery_app)
    wait_for(lambda: "task-succeeded" in event_log.types_for(watched), what="the watched task's events")

    # No broadcast since: within a few lapses a task runs without events.
    def runs_unwatched() -> bool:
        task_id = run_ping(celery_app)
        event_log.sync_with(node)
        return not event_log.types_for(task_id)

    wait_for(runs_unwatched, timeout=30, what="task events to lapse")
