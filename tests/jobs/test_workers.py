"""The REST API's jobs against real `celery -A config worker` processes, a real broker and database.

Cancel, pause/resume, a killed worker and a retry are about what *processes* do: a new
process has none of the old one's memory (revoke list, cancelled consumers), a terminated
pool child is gone, a SIGKILLed worker leaves its message unacknowledged in the broker.
Every worker's log is checked for email addresses and API tokens at the end of each test.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone
from django_celery_results.models import TaskResult

from config.celery_app import app
from jobs import services
from jobs.models import Job
from monitoring import broker
from tasks.models import DataSource, SyncRun
from tests.conftest import WorkerProcess, broker_is_amqp
from tests.jobs.conftest import ApiClient, secrets_in
from tests.processes import descendants
from tests.smtp import SmtpServer
from tests.tasks import images as make
from tests.tasks.upstream import Upstream
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

StartWorker = Callable[..., WorkerProcess]


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture
def workers(worker_process: StartWorker, empty_queues: None) -> Iterator[StartWorker]:
    """`worker_process`, plus: no worker's log holds an email address or an API token."""
    started: list[WorkerProcess] = []

    def start(node: str, *args: str, wait: bool = True) -> WorkerProcess:
        worker = worker_process(node, *args, wait=wait)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()  # the whole log, shutdown included (stopping twice is harmless)
    leaks = {worker.node: secrets_in(worker.log.read_text()) for worker in started}
    assert all(not found for found in leaks.values()), f"secrets in worker logs: {leaks}"


def enqueue(client: ApiClient, job_type: str, payload: dict[str, Any]) -> str:
    response = client.post("/api/jobs", {"type": job_type, "payload": payload})
    assert response.status_code == 202, response.content
    return str(response.json()["id"])


def cancel(staff_client: ApiClient, job_id: str, *, running: bool = False) -> dict[str, Any]:
    """DELETE the job: final at once (200, cancelled), or, for a `running` one, asked to stop (202:
    still running, with its cancel requested, until its worker says how the run ended)."""
    response = staff_client.delete(f"/api/jobs/{job_id}")
    assert response.status_code == (202 if running else 200), response.content
    body: dict[str, Any] = response.json()
    assert body["status"] == ("running" if running else "cancelled")
    assert (body["cancel_requested_at"] is not None) == running
    return body


def status_of(job_id: str) -> str:
    return str(Job.objects.get(pk=job_id).status)


def wait_status(job_id: str, status: str, timeout: float = 30) -> Job:
    return wait_for(
        lambda: Job.objects.filter(pk=job_id, status=status).first(),
        timeout=timeout,
        what=f"job {job_id} to be {status} (it is {status_of(job_id)})",
    )


def result_of(job: Job) -> dict[str, Any]:
    assert isinstance(job.result, dict), job.result
    return job.result


def ran_on(worker: WorkerProcess, task_id: str, timeout: float = 10.0) -> bool:
    """The task succeeded on `worker` (its log says so: the job's row does not name workers). Celery
    logs the success just after the row says it: a test that saw the row waits for the line."""
    with contextlib.suppress(AssertionError):
        return wait_for(lambda: f"[{task_id}] succeeded in" in worker.log.read_text(), timeout=timeout)
    return False


def depth(queue: str) -> broker.QueueDepth:
    return broker.queue_depths([queue])[queue]


def unacked(queue: str) -> int | None:
    """Messages of `queue` a worker holds unacknowledged: the monitoring's count (Redis), else
    rabbitmqctl's (RabbitMQ: the monitoring does not know it)."""
    counted = depth(queue).unacked
    if counted is None and broker_is_amqp():
        from django.conf import settings

        from tests import rabbitmq

        rabbitmq.skip_unless_rabbitmqctl()
        return rabbitmq.unacknowledged(rabbitmq.vhost_of(settings.CELERY_BROKER_URL), queue)
    return counted


def consumed_queues(worker: WorkerProcess) -> set[str] | None:
    """The queues the worker says it consumes now; None if it did not answer."""
    node = f"{worker.node}@{socket.gethostname()}"
    replies = app.control.inspect([node], timeout=1.0).active_queues() or {}
    if node not in replies:
        return None
    return {queue["name"] for queue in replies[node]}


def wait_consuming(worker: WorkerProcess, expected: set[str]) -> None:
    wait_for(
        lambda: consumed_queues(worker) == expected,
        timeout=15,
        what=f"{worker.node} to consume exactly {sorted(expected)}",
    )


def stays(predicate: Callable[[], bool], seconds: float) -> bool:
    """True when `predicate` holds throughout `seconds` (negative evidence, bounded)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not predicate():
            return False
        time.sleep(0.1)
    return predicate()


def unacked_since() -> float:
    """When the broker delivered the one message still unacknowledged (Redis: kombu's index)."""
    with broker.broker_connection() as conn:
        channel: Any = conn.default_channel
        [(_tag, score)] = channel.client.zrange(channel.unacked_index_key, 0, -1, withscores=True)
    return float(score)


class HeldResponses:
    """A route of an Upstream that holds its first `held` requests for up to `hold` seconds.

    While holding it watches the connection: `hung_up` is set when the client goes away,
    `answered_held` when a held request was answered (the hold ran out). Later requests are
    answered at once with an empty page, so a sync of it finishes quickly.
    """

    def __init__(self, upstream: Upstream, *, held: int = 1, hold: float = 20.0) -> None:
        self.upstream, self.held, self.hold = upstream, held, hold
        self.arrived = threading.Event()
        self.hung_up = threading.Event()
        self.answered_held = threading.Event()
        self.count = 0
        self._lock = threading.Lock()
        upstream.route("/held", self)

    def __call__(self, handler: Any) -> None:
        with self._lock:
            self.count += 1
            holding = self.count <= self.held
        body = json.dumps({"results": [], "next": None}).encode()
        if not holding:
            handler.answer(200, body)
            return
        self.arrived.set()
        deadline = time.monotonic() + self.hold
        connection = handler.connection
        while time.monotonic() < deadline and not self.upstream.released.is_set():
            readable, _, _ = select.select([connection], [], [], 0.05)
            if readable:
                try:
                    gone = connection.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    gone = True
                if gone:
                    self.hung_up.set()
                    return
        self.answered_held.set()
        handler.answer(200, body)


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch, settings: Any) -> Iterator[Upstream]:
    """A loopback HTTP source the worker processes may fetch (through their environment)."""
    server = Upstream([]).start()
    monkeypatch.setenv("DATA_SYNC_ALLOWED_HOSTS", server.host)
    settings.DATA_SYNC_ALLOWED_HOSTS = [server.host]
    yield server
    server.stop()


def held_source(upstream: Upstream) -> DataSource:
    return DataSource.objects.create(name="held", url=upstream.url("/held"))


# --- 1. cancel before start --------------------------------------------------------------


def test_a_job_cancelled_while_queued_never_runs_on_a_worker_started_afterwards(
    workers: StartWorker, api_client: ApiClient, staff_client: ApiClient
) -> None:
    job_id = enqueue(api_client, "default.ping", {})
    body = cancel(staff_client, job_id)
    assert body["started_at"] is None
    follow_up = enqueue(api_client, "default.ping", {})  # queued behind the cancelled one
    assert depth("default").ready == 2

    # A new process: Celery's in-memory revoke list went with whatever process got the revoke.
    worker = workers("fresh", "-Q", "default", "-P", "prefork", "-c", "1")

    done = wait_status(follow_up, "succeeded")
    assert result_of(done)["pong"].startswith("fresh@")
    wait_for(lambda: depth("default").ready == 0 and unacked("default") == 0, what="an empty queue")
    job = Job.objects.get(pk=job_id)
    assert (job.status, job.started_at, job.attempts, job.result) == ("cancelled", None, 0, None)
    assert f"job {job_id} not started by task {job.task_id}: it is cancelled" in worker.log.read_text()
    assert app.AsyncResult(job.task_id).state == "REVOKED"  # from the row
    assert api_client.get(f"/api/jobs/{job_id}").json()["status"] == "cancelled"


# --- 2. cancel during a run --------------------------------------------------------------


def test_cancelling_a_running_job_terminates_it_and_its_worker_then_records_it_cancelled(
    workers: StartWorker, upstream: Upstream, api_client: ApiClient, staff_client: ApiClient
) -> None:
    held = HeldResponses(upstream, hold=20)
    source = held_source(upstream)
    worker = workers("runner", "-Q", "data_sync,default", "-P", "prefork", "-c", "1")
    job_id = enqueue(api_client, "data_sync.sync", {"source_id": source.pk})
    wait_status(job_id, "running")
    assert held.arrived.wait(15), "the sync never reached the upstream"
    child = descendants(worker.process.pid)

    cancel(staff_client, job_id, running=True)

    assert held.hung_up.wait(15), "the running task was not terminated (its request is still open)"
    assert not held.answered_held.is_set()
    wait_for(lambda: all(not Path(f"/proc/{pid}").exists() for pid in child), what="the pool child to exit")
    # The worker's main process saw its pool process terminated before the run returned.
    stopped = wait_status(job_id, "cancelled")
    assert (stopped.error_type, stopped.error_message) == (
        "Cancelled",
        "terminated by the cancel while it ran",
    )
    # The worker goes on (a new pool child) and holds nothing of the cancelled job.
    follow_up = enqueue(api_client, "default.ping", {})
    wait_status(follow_up, "succeeded")
    wait_for(
        lambda: depth("data_sync").ready == 0 and unacked("data_sync") == 0,
        what="no message of the cancelled job left in the broker",
    )
    job = Job.objects.get(pk=job_id)
    assert job.status == "cancelled"
    assert job.result is None
    assert app.AsyncResult(job.task_id).state == "REVOKED"
    assert held.count == 1  # it never ran again
    # Its sync run is closed, not left "running" forever.
    run = SyncRun.objects.get(task_id=job.task_id)
    assert (run.status, run.error) == ("failed", "data_sync.sync was cancelled")
    assert worker.process.poll() is None


def test_a_job_claimed_after_the_cancel_request_read_it_is_still_terminated(
    workers: StartWorker, upstream: Upstream, api_client: ApiClient
) -> None:
    held = HeldResponses(upstream, hold=20)
    source = held_source(upstream)
    job_id = enqueue(api_client, "data_sync.sync", {"source_id": source.pk})
    as_read = Job.objects.get(pk=job_id)  # what the DELETE handler read: still queued
    assert as_read.status == "queued"
    workers("runner", "-Q", "data_sync", "-P", "prefork", "-c", "1")
    wait_status(job_id, "running")  # claimed in between
    assert held.arrived.wait(15)

    assert services.cancel(as_read).status == "running"  # and asked to stop

    assert held.hung_up.wait(15), "a job claimed after the cancel read it went on running"
    wait_status(job_id, "cancelled")


def test_a_run_the_cancel_cannot_stop_is_recorded_as_it_ended_not_as_cancelled(
    workers: StartWorker, upstream: Upstream, api_client: ApiClient, staff_client: ApiClient
) -> None:
    # The solo pool cannot interrupt its task: the run goes on, and its row says how it ended.
    held = HeldResponses(upstream, hold=3)
    source = held_source(upstream)
    workers("solo", "-Q", "data_sync", "-P", "solo")
    job_id = enqueue(api_client, "data_sync.sync", {"source_id": source.pk})
    wait_status(job_id, "running")
    assert held.arrived.wait(15)

    body = cancel(staff_client, job_id, running=True)

    assert held.answered_held.wait(15), "the held request was not answered"
    job = wait_for(
        lambda: Job.objects.filter(pk=job_id).exclude(status="running").first(), what="the run to end"
    )
    assert job.status == "succeeded", (job.status, job.error_message)
    assert job.cancel_requested_at is not None
    assert job.cancel_requested_at.isoformat()[:19] == body["cancel_requested_at"][:19]
    assert SyncRun.objects.get(task_id=job.task_id).status == "succeeded"


def test_a_run_asked_to_stop_whose_pool_process_is_killed_first_is_recorded_cancelled_by_its_worker(
    workers: StartWorker, upstream: Upstream, api_client: ApiClient
) -> None:
    # The pool process dies another way (SIGKILL, OOM) before the terminate reaches it: the
    # worker's main process ends the run there. (When the revoke comes after the loss, it
    # acknowledges the message: no redelivery would; the fault suite's cancels scenario met it.)
    held = HeldResponses(upstream, hold=20)
    source = held_source(upstream)
    worker = workers("runner", "-Q", "data_sync", "-P", "prefork", "-c", "1")
    job_id = enqueue(api_client, "data_sync.sync", {"source_id": source.pk})
    wait_status(job_id, "running")
    assert held.arrived.wait(15)
    Job.objects.filter(pk=job_id).update(cancel_requested_at=timezone.now())  # as the API asks

    for pid in descendants(worker.process.pid):
        os.kill(pid, signal.SIGKILL)

    stopped = wait_status(job_id, "cancelled")
    assert stopped.error_message == "its pool process was lost after the cancel was requested"
    time.sleep(1)
    assert held.count == 1  # not run again
    assert worker.process.poll() is None


def test_a_running_child_is_terminated_by_its_parents_cancel_and_the_parent_ends_cancelled(
    workers: StartWorker,
    smtp_server: SmtpServer,
    monkeypatch: pytest.MonkeyPatch,
    api_client: ApiClient,
    staff_client: ApiClient,
) -> None:
    monkeypatch.setenv("EMAIL_URL", f"smtp://{smtp_server.host}:{smtp_server.port}")
    smtp_server.rcpt_delay = 8  # the first batch's first recipient waits (EMAIL_TIMEOUT is 10 s)
    workers("mailer", "-Q", "email", "-P", "prefork", "-c", "1")
    campaign = {
        "campaign": f"cancel-{time.monotonic_ns()}",
        "template": "newsletter",
        "recipients": [f"reader{i}@example.com" for i in range(20)],
        "context": {"title": "Trees", "body": "News"},
        "batch_size": 10,
        "window_seconds": 6,
    }
    job_id = enqueue(api_client, "email.newsletter", campaign)
    batch = wait_for(
        lambda: Job.objects.filter(parent_id=UUID(job_id), status="running").first(), what="a running batch"
    )

    body = cancel(staff_client, job_id, running=True)

    assert body["children"]["counts"] == {"cancelled": 1, "running": 1}
    done = wait_status(job_id, "cancelled", timeout=20)
    stopped = Job.objects.get(pk=batch.pk)
    assert (stopped.status, stopped.error_message) == ("cancelled", "terminated by the cancel while it ran")
    assert isinstance(done.result, dict)
    assert (done.result["sent"], done.result["undelivered"]) == (0, 20)
    time.sleep(1)
    assert smtp_server.messages == []


# --- 3. pause and resume -----------------------------------------------------------------

EMAIL = {"to": "alice@example.com", "template": "welcome", "context": {"name": "Alice"}}


def test_a_worker_started_while_its_queue_is_paused_takes_nothing_until_resumed(
    workers: StartWorker, api_client: ApiClient, staff_client: ApiClient
) -> None:
    assert staff_client.post("/api/queues/email/pause").json() == {
        "name": "email",
        "paused": True,
        "changed": True,
    }
    waiting = enqueue(api_client, "email.send", EMAIL)  # a backlog when the worker starts

    worker = workers("mailer", "-Q", "email", "-P", "prefork", "-c", "1")
    wait_consuming(worker, set())
    later = enqueue(api_client, "email.send", EMAIL)

    assert stays(lambda: depth("email").ready == 2, seconds=2)
    assert unacked("email") == 0
    assert {status_of(waiting), status_of(later)} == {"queued"}

    assert staff_client.post("/api/queues/email/resume").json()["changed"] is True

    wait_status(waiting, "succeeded")
    wait_status(later, "succeeded")
    assert consumed_queues(worker) == {"email"}


def test_pausing_stops_a_running_worker_and_resuming_starts_it_again(
    workers: StartWorker, api_client: ApiClient, staff_client: ApiClient
) -> None:
    worker = workers("mailer", "-Q", "email", "-P", "prefork", "-c", "1")
    wait_consuming(worker, {"email"})

    assert staff_client.post("/api/queues/email/pause").status_code == 200
    wait_consuming(worker, set())
    job_id = enqueue(api_client, "email.send", EMAIL)

    # A BRPOP the worker sent before the pause may still take the message within its 1 s
    # timeout; kombu then hands it back (no consumer for it). It must never run.
    assert stays(lambda: status_of(job_id) == "queued", seconds=2)
    wait_for(lambda: depth("email").ready == 1 and unacked("email") == 0, what="the message back")

    assert staff_client.post("/api/queues/email/resume").status_code == 200
    wait_status(job_id, "succeeded")
    assert ran_on(worker, Job.objects.get(pk=job_id).task_id)


def test_resuming_a_queue_does_not_make_a_worker_started_without_it_take_it(
    workers: StartWorker, api_client: ApiClient, staff_client: ApiClient
) -> None:
    worker = workers("general", "-Q", "default", "-P", "prefork", "-c", "1")
    assert staff_client.post("/api/queues/email/pause").status_code == 200
    assert staff_client.post("/api/queues/email/resume").status_code == 200
    job_id = enqueue(api_client, "email.send", EMAIL)
    ping = enqueue(api_client, "default.ping", {})  # the resume broadcast was handled before this ran

    wait_status(ping, "succeeded")
    assert consumed_queues(worker) == {"default"}
    assert stays(lambda: depth("email").ready == 1, seconds=1)
    assert status_of(job_id) == "queued"


# --- 4. a killed worker ------------------------------------------------------------------


# The visibility timeout and kombu's unacked index are Redis's; on RabbitMQ the message comes back
# when the dead worker's connection closes: tests/faults/test_worker_kills.py runs there.
@pytest.mark.requires_redis_broker
def test_a_job_whose_worker_is_killed_mid_run_is_redelivered_and_succeeds(
    workers: StartWorker, upstream: Upstream, api_client: ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Redis gives an unacknowledged message back after the visibility timeout, which must exceed
    # the hard time limit: short ones for these workers make the redelivery come within seconds.
    monkeypatch.setenv("CELERY_TASK_SOFT_TIME_LIMIT", "4")
    monkeypatch.setenv("CELERY_TASK_TIME_LIMIT", "5")
    monkeypatch.setenv("CELERY_BROKER_VISIBILITY_TIMEOUT", "6")
    held = HeldResponses(upstream, hold=20)
    source = held_source(upstream)
    doomed = workers("doomed", "-Q", "data_sync", "-P", "prefork", "-c", "1")
    job_id = enqueue(api_client, "data_sync.sync", {"source_id": source.pk})
    first = wait_status(job_id, "running")
    assert held.arrived.wait(15)

    # The whole worker dies at once (an OOM kill of the container): main process, then its pool.
    children = descendants(doomed.process.pid)
    os.kill(doomed.process.pid, signal.SIGKILL)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    doomed.process.wait()
    assert held.hung_up.wait(10)
    assert status_of(job_id) == "running"
    assert unacked("data_sync") == 1  # still the broker's
    # A worker restores abandoned messages when it connects, then only every ~100 s (kombu's
    # sweep): start the next one once the message has been unacknowledged past the timeout.
    delivered_at = unacked_since()
    wait_for(lambda: time.time() > delivered_at + 6.5, timeout=15, what="the visibility timeout to pass")

    heir = workers("heir", "-Q", "data_sync", "-P", "prefork", "-c", "1")

    job = wait_status(job_id, "succeeded", timeout=40)
    assert held.count == 2
    assert job.task_id == first.task_id
    assert job.started_at is not None and first.started_at is not None
    assert job.started_at > first.started_at
    assert result_of(job)["batches"] == 0
    assert ran_on(heir, job.task_id)


# --- 5. retry through the API ------------------------------------------------------------


def test_a_failed_job_retried_through_the_api_runs_under_a_new_task_id_and_succeeds(
    workers: StartWorker,
    api_client: ApiClient,
    staff_client: ApiClient,
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
    tmp_path: Path,
) -> None:
    media = tmp_path / "media"
    monkeypatch.setenv("MEDIA_ROOT", str(media))
    settings.MEDIA_ROOT = media
    # The asset exists (the API checks that) but its file is not an image yet: a permanent error.
    broken = make.asset(b"GIF89a not really", "pic.png")
    asset_id = broken.pk
    workers("painter", "-Q", "images", "-P", "prefork", "-c", "1")
    operations = [{"op": "thumbnail", "width": 32, "height": 32}]

    job_id = enqueue(api_client, "images.process", {"asset_id": asset_id, "operations": operations})
    failed = wait_status(job_id, "failed")
    assert failed.error_type == "PermanentJobError"
    assert failed.attempts == 1  # permanent: no retry by the worker
    broken.file.save("pic.png", ContentFile(make.encoded(make.picture((64, 48)), "PNG")))

    response = staff_client.post(f"/api/jobs/{job_id}/retry")

    assert response.status_code == 202, response.content
    assert response.json()["status"] in {"queued", "running", "succeeded"}  # the row as it is now
    job = wait_status(job_id, "succeeded")
    assert job.task_id != failed.task_id
    assert (job.attempts, job.error_type, job.error_message) == (1, "", "")
    assert result_of(job)["outputs"]
    assert TaskResult.objects.get(task_id=failed.task_id).status == "FAILURE"
    assert app.AsyncResult(job.task_id).state == "SUCCESS"  # from the job's row: no result row besides
