"""Stock Celery: an app with nothing but a broker URL, a no-op task, `celery worker` as it comes.

Celery's defaults otherwise: the prefork pool, concurrency = the cores, prefetch multiplier 4,
acknowledgement before the task runs, no result backend, no task events. The same Celery and
kombu versions as the project (requirements.txt), run with the project's interpreter.

    celery -A bench.peers.celery_stock worker -c N

Enqueue one at a time: `noop.delay(...)`. Batch: `apply_async` in a kombu producer batch
(`producer.batch()`, kombu 5.7: the messages go in one Redis pipeline, 1,000 a round trip).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from celery import Celery

from bench.peers.harness import BROKER_VARIABLE, PHASE_NONE, EnqueuePath, RecordingPeer
from bench.peers.record import record

CHUNK = 1000

app = Celery("bench_stock", broker=os.environ[BROKER_VARIABLE])


@app.task(name="bench.noop")
def noop(phase: int, sent: float) -> None:
    record(phase, sent)


class CelerySystem(RecordingPeer):
    def reset(self) -> None:
        import redis

        redis.Redis.from_url(self.config["broker_url"]).flushdb()
        self.records.clear()

    def purge(self) -> None:
        app.control.purge()

    def send(self, phase: int, sent: float) -> str:
        noop.delay(phase, sent)
        return str(sent)

    def _batch(self, count: int, deadline: float) -> int:
        sent = 0
        with app.producer_or_acquire() as producer:
            while sent < count and (not sent or time.monotonic() < deadline):
                size = min(CHUNK, count - sent)
                with producer.batch(max_size=2 * size + 8):
                    for _ in range(size):
                        noop.apply_async((PHASE_NONE, time.time()), producer=producer)
                sent += size
        return sent

    def enqueue_paths(self) -> dict[str, EnqueuePath]:
        return {"batch": self._batch}

    def backlog(self, count: int, phase: int) -> None:
        with app.producer_or_acquire() as producer:
            for start in range(0, count, CHUNK):
                with producer.batch(max_size=2 * CHUNK + 8):
                    for _ in range(min(CHUNK, count - start)):
                        noop.apply_async((phase, time.time()), producer=producer)

    def worker(self, processes: int) -> tuple[list[str], dict[str, str]]:
        return [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "bench.peers.celery_stock",
            "worker",
            "-c",
            str(processes),
        ], self.worker_environment()

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {
            "worker": f"celery -A bench.peers.celery_stock worker -c {self.config['processes']}",
            "celery": version("celery"),
            "kombu": version("kombu"),
            "pool": "prefork",
            "prefetch_multiplier": app.conf.worker_prefetch_multiplier,
            "acks_late": app.conf.task_acks_late,
            "result_backend": app.conf.result_backend,
            "task_events": app.conf.worker_send_task_events,
        }
