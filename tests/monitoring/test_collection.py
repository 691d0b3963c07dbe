"""Real tasks through a real worker process; counters through Redis; rows in the database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery import Celery

from monitoring import collect, metrics, rollup
from monitoring.models import TaskMetric, bucket_columns
from tests.monitoring.conftest import flush_here
from tests.probes import probe_flaky, probe_needs_file
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def row(task: str, queue: str = "default") -> TaskMetric:
    rows = list(TaskMetric.objects.filter(task=task))
    assert len(rows) >= 1, f"no rows for {task}: {list(TaskMetric.objects.values_list('task', flat=True))}"
    total = TaskMetric(task=task, queue=rows[0].queue, exceptions={})
    for item in rows:
        assert item.queue == queue
        for column in [*metrics.OUTCOMES, "rt_sum", "wt_sum", *bucket_columns("rt"), *bucket_columns("wt")]:
            setattr(total, column, getattr(total, column) + getattr(item, column))
        metrics.merge(total.exceptions, item.exceptions.items())
    return total


def histogram(item: TaskMetric, name: str) -> list[int]:
    return [getattr(item, column) for column in bucket_columns(name)]


def test_successes_failures_and_retries_are_counted_exactly_and_survive_a_worker_restart(
    celery_app: Celery, empty_queues: None, clean_metrics: None, worker_process, tmp_path: Path
) -> None:
    worker = worker_process("metrics", "-Q", "default", "-I", "tests.probes", "-c", "2")
    flaky, needs_file = probe_flaky, probe_needs_file

    results = [flaky.delay(fail_times=0) for _ in range(5)]
    results += [flaky.delay(fail_times=1) for _ in range(2)]
    failures = [needs_file.delay(path=str(tmp_path / "missing")) for _ in range(3)]
    for result in results:
        result.get(timeout=60)
    for result in failures:
        with pytest.raises(Exception, match="does not exist"):
            result.get(timeout=60)
    # Revoked before it arrives: the worker's main process drops it and counts it.
    revoked_id = "revoked-before-delivery"
    celery_app.control.revoke(revoked_id, reply=True, timeout=5)
    flaky.apply_async(kwargs={"fail_times": 0}, task_id=revoked_id)
    wait_for(lambda: "Discarding revoked task" in worker.log.read_text(), timeout=30, what="the revoke")
    # A message for a task this worker does not know: quarantined, counted rejected under its name.
    celery_app.send_task("default.no_such_task")
    wait_for(lambda: "no worker knows the task" in worker.log.read_text(), timeout=30, what="the rejection")
    flush_here()
    worker.stop()  # a warm shutdown flushes what the pool processes (and the main one) still hold

    rollup.roll_up()

    ran = row("default.probe_flaky")
    assert (ran.sent, ran.succeeded, ran.retried, ran.failed, ran.revoked) == (7 + 2 + 1, 7, 2, 0, 1)
    assert ran.exceptions == {"TransientJobError": 2}
    assert sum(histogram(ran, "rt")) == 9  # every run: 7 successes and 2 attempts that were retried
    assert sum(histogram(ran, "wt")) == 9
    p50 = metrics.quantile(0.5, histogram(ran, "rt"))
    assert p50 is not None and 0 < p50 < 5
    unknown = row("default.no_such_task")
    assert (unknown.sent, unknown.rejected, unknown.succeeded, unknown.failed) == (1, 1, 0, 0)
    failed = row("default.probe_needs_file")
    assert (failed.sent, failed.succeeded, failed.retried, failed.failed) == (3, 0, 0, 3)
    assert failed.exceptions == {"PermanentJobError": 3}

    # Rolling up again (late, twice) changes nothing; a new worker process finds the same rows.
    rollup.roll_up()
    worker_process("metrics2", "-Q", "default", "-I", "tests.probes", "--pool=solo")
    again = row("default.probe_flaky")
    assert (again.sent, again.succeeded, again.retried) == (10, 7, 2)

    # The admin page shows the same counts (a fresh client: nothing cached in this process).
    from django.contrib.auth.models import User
    from django.test import Client

    staff = User.objects.create_user("ops", password="pw", is_staff=True)
    client = Client()
    client.force_login(staff)
    page = client.get("/admin/metrics/?window=1h").content.decode()
    assert 'id="total-finished">10<' in page  # 7 succeeded + 3 failed
    assert 'id="total-failed">3<' in page and 'id="total-retried">2<' in page
    flaky_row = page.split('data-task="default.probe_flaky"')[1].split("</tr>")[0]
    assert 'class="num finished">7<' in flaky_row and 'class="num retried">2<' in flaky_row

    # Prometheus carries the same counts, read by prometheus-client's own parser.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").content.decode())}
    samples = {
        (s.labels["task"], s.labels["outcome"]): s.value
        for s in families["jobs_tasks"].samples
        if s.name == "jobs_tasks_total"
    }
    assert samples[("default.probe_flaky", "succeeded")] == 7
    assert samples[("default.probe_flaky", "retried")] == 2
    assert samples[("default.probe_flaky", "sent")] == 10
    assert samples[("default.probe_flaky", "revoked")] == 1
    assert samples[("default.probe_needs_file", "failed")] == 3
    runtime_count = [
        s.value
        for s in families["jobs_task_runtime_seconds"].samples
        if s.name.endswith("_count") and s.labels["task"] == "default.probe_flaky"
    ]
    assert runtime_count == [9]


def test_a_flush_that_comes_after_its_minute_was_closed_is_added_not_lost(
    clean_metrics: None, settings
) -> None:
    """Counts for a minute rolled up for good (a process that could not reach Redis for minutes)."""
    buffer = collect.Buffer(settings.METRICS_REDIS_URL, flush_every=3600)  # flushed by hand here
    minute = (int(time.time()) // 60 - 30) * 60  # half an hour ago: past the keep window
    buffer.add(minute + 5, "email.send", "email", "succeeded", 4)
    buffer.flush()
    rollup.roll_up()
    assert row("email.send", "email").succeeded == 4

    buffer.add(minute + 50, "email.send", "email", "succeeded", 3)
    buffer.add(minute + 50, "email.send", "email", "failed", 1)
    buffer.flush()
    rollup.roll_up()
    rollup.roll_up()  # nothing more to add

    stored = row("email.send", "email")
    assert (stored.succeeded, stored.failed) == (7, 1)
    assert not rollup.redis_client().exists(metrics.minute_key(minute))
