"""This project, as deployed: production settings, the Procfile's `worker` line, `default.ping`.

The worker is the Procfile's general worker, word for word (`celery -A config worker -Q
default,images,data_sync,analytics -n general@%h --loglevel=INFO`, read from the Procfile), with
config.settings.base, its concurrency from CELERY_WORKER_CONCURRENCY (the default is the cores of
this machine). The jobs are `default.ping`: a job row, the result stored as configured, task
events and metrics as configured. A job's start and end are its row's `started_at` and
`finished_at` (jobs.models.Job): nothing is added to the task.

Enqueue paths, each from one client:
- one at a time: `ping.apply_async()` (the row is made when a worker claims the job);
- `apply_async_batch`: `apply_async` in a kombu producer batch, 1,000 messages a round trip;
- `batch`: what `POST /api/jobs/batch` runs without HTTP: `parse_job` for each entry, then
  `jobs.services.enqueue` 1,000 at a time (rows in one INSERT, one pipelined publish);
- `durable`: `jobs.outbox.enqueue()` one at a time, each in its own transaction (row, then the
  publish on commit).
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from bench.peers.harness import EnqueuePath, Progress, System

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 1000
# What "monitoring off" means: task metrics collection (monitoring/collect.py). Task events are off
# by default already (they flow only while Flower watches); `project_flower` turns them on.
MONITORING_OFF = {"METRICS_ENABLED": "false"}
# A worker while Flower watches: Flower's enable_events broadcast turns task events on (the
# client's task-sent event stays off, as it does then).
FLOWER_WATCHING = {"CELERY_WORKER_SEND_TASK_EVENTS": "true"}


def procfile_worker(environ: dict[str, str]) -> list[str]:
    """The Procfile's `worker:` line as an argument list, `${NAME:-default}` filled in from `environ`."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.startswith("worker:"):
            command = line.split(":", 1)[1].strip()
            command = re.sub(
                r"\$\{(\w+):-([^}]*)\}", lambda match: environ.get(match[1]) or match[2], command
            )
            return shlex.split(command)
    raise SystemExit("the Procfile has no `worker:` line")


def environment(config: dict[str, Any]) -> dict[str, str]:
    """Production settings on the bench's database and broker (the variables the settings read)."""
    env = {
        "DJANGO_SETTINGS_MODULE": "config.settings.base",
        "DJANGO_READ_DOT_ENV_FILE": "false",  # as in production: a development stack's .env is not read
        "DATABASE_URL": config["database_url"],
        "CELERY_BROKER_URL": config["broker_url"],
    }
    env.setdefault("DJANGO_SECRET_KEY", os.environ.get("DJANGO_SECRET_KEY", "bench-only-not-a-secret"))
    if config.get("metrics_redis_url"):  # RabbitMQ: metrics and the shared rate limits in Redis
        env["METRICS_REDIS_URL"] = env["RATE_LIMIT_STORAGE_URL"] = config["metrics_redis_url"]
    if not config.get("monitoring", True):
        env.update(MONITORING_OFF)
    if config.get("events"):
        env.update(FLOWER_WATCHING)
    return env


class ProjectSystem(System):
    poll_seconds = 0.2

    def __init__(self, config: dict[str, Any]) -> None:
        self.name = config["label"]
        self.config = config
        self.env = environment(config)
        os.environ.update(self.env)
        import django

        django.setup()
        if config.get("migrate"):
            from django.core.management import call_command

            call_command("migrate", verbosity=0)
        from config.celery_app import app
        from tasks.default import ping

        self.app = app
        self.ping = ping

    # --- emptying ------------------------------------------------------------------------------

    def _redis_urls(self) -> list[str]:
        urls = [self.config["broker_url"]] if self.config["broker_url"].startswith("redis") else []
        return urls + ([self.config["metrics_redis_url"]] if self.config.get("metrics_redis_url") else [])

    def reset(self) -> None:
        import redis
        from django.db import connection
        from django_celery_results.models import TaskResult

        from jobs.models import Job

        if not self.config["broker_url"].startswith("redis"):
            self.purge()
        for url in self._redis_urls():
            redis.Redis.from_url(url).flushdb()
        tables = ", ".join(connection.ops.quote_name(model._meta.db_table) for model in (Job, TaskResult))
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {tables} CASCADE")

    def purge(self) -> None:
        self.app.control.purge()

    # --- sending -------------------------------------------------------------------------------

    def send(self, phase: int, sent: float) -> str:
        return str(self.ping.apply_async().id)

    def _apply_async_batch(self, count: int, deadline: float) -> int:
        sent = 0
        with self.app.producer_or_acquire() as producer:
            while sent < count and (not sent or time.monotonic() < deadline):
                size = min(CHUNK, count - sent)
                with producer.batch(max_size=2 * size + 8):
                    for _ in range(size):
                        self.ping.apply_async(producer=producer)
                sent += size
        return sent

    def _api_batch(self, count: int, deadline: float) -> int:
        from jobs import services
        from jobs.registry import parse_job

        sent = 0
        while sent < count and (not sent or time.monotonic() < deadline):
            size = min(CHUNK, count - sent)
            requests = [parse_job({"type": "default.ping", "payload": {}}) for _ in range(size)]
            services.enqueue_with_key_retry(requests, None)
            sent += size
        return sent

    def _durable(self, count: int, deadline: float) -> int:
        from django.db import transaction

        from jobs.outbox import enqueue

        sent = 0
        while sent < count and (sent % 50 or time.monotonic() < deadline):
            with transaction.atomic():
                enqueue(self.ping)
            sent += 1
        return sent

    def enqueue_paths(self) -> dict[str, EnqueuePath]:
        paths: dict[str, EnqueuePath] = {"batch": self._api_batch}
        if self.config.get("all_paths"):  # once is enough: the variants of the project share them
            paths.update(apply_async_batch=self._apply_async_batch, durable=self._durable)
        return paths

    def backlog(self, count: int, phase: int) -> None:
        self._apply_async_batch(count, time.monotonic() + 3600)

    # --- the worker and what it did ------------------------------------------------------------

    def worker(self, processes: int) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, **self.env, "CELERY_WORKER_CONCURRENCY": str(processes), "PYTHONUNBUFFERED": "1"}
        command = procfile_worker(env)
        if command[0] != "celery":
            raise SystemExit(
                f"the Procfile's worker line does not start with `celery`: {shlex.join(command)}"
            )
        return [sys.executable, "-m", "celery", *command[1:]], env

    def progress(self, phase: int, keys: Collection[str] | None = None) -> Progress:
        from django.db.models import Count, Max, Min, Q

        from jobs.models import Job

        rows = Job.objects.filter(type="default.ping")
        if keys is not None:
            rows = rows.filter(task_id__in=list(keys))
        found = rows.aggregate(
            done=Count("pk", filter=Q(status=Job.Status.SUCCEEDED)),
            first=Min("started_at"),
            last=Max("finished_at", filter=Q(status=Job.Status.SUCCEEDED)),
        )
        return Progress(
            done=found["done"],
            first_start=found["first"].timestamp() if found["first"] else None,
            last_end=found["last"].timestamp() if found["last"] else None,
        )

    def waits(self, phase: int, sent: dict[str, float]) -> list[float]:
        from jobs.models import Job

        rows = Job.objects.filter(task_id__in=list(sent), started_at__isnull=False)
        found = rows.values_list("task_id", "started_at")
        return [started.timestamp() - sent[task_id] for task_id, started in found if started is not None]

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        from django.conf import settings

        command, _ = self.worker(int(settings.CELERY_WORKER_CONCURRENCY))
        return {
            "worker": shlex.join(["celery", *command[3:]]),
            "celery": version("celery"),
            "kombu": version("kombu"),
            "broker": self.config["broker_url"].split("://")[0],
            "transport": self.app.conf.broker_url.split("://")[0],
            "concurrency_default": settings.CELERY_WORKER_CONCURRENCY,
            "prefetch_multiplier": settings.CELERY_WORKER_PREFETCH_MULTIPLIER,
            "acks_late": settings.CELERY_TASK_ACKS_LATE,
            "result_backend": settings.CELERY_RESULT_BACKEND,
            "track_started": settings.CELERY_TASK_TRACK_STARTED,
            "task_events": settings.CELERY_WORKER_SEND_TASK_EVENTS,
            "sent_events": settings.CELERY_TASK_SEND_SENT_EVENT,
            "max_tasks_per_child": settings.CELERY_WORKER_MAX_TASKS_PER_CHILD,
            "metrics_enabled": settings.METRICS_ENABLED,
            "quorum_queues": bool(getattr(settings, "RABBITMQ_QUORUM_QUEUES", False)),
        }
