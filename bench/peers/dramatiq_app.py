"""Dramatiq on Redis, as its CLI starts it by default: processes = the cores, 8 threads each.

    dramatiq bench.peers.dramatiq_app --processes N --threads 8

Dramatiq's default middleware (age and time limits, retries, callbacks, pipelines), no results.
Runs in the peers' virtualenv (bench/requirements.txt). Enqueue one at a time: `noop.send(...)`.
Batch: `dramatiq.group(...).run()`, the one way Dramatiq sends many messages at once; on Redis it
is still one enqueue (one Lua script call, one round trip) per message: there is no pipelined send.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.peers.harness import BROKER_VARIABLE, PHASE_NONE, EnqueuePath, RecordingPeer
from bench.peers.record import record

THREADS = 8  # Dramatiq's default
CHUNK = 1000

broker = RedisBroker(url=os.environ[BROKER_VARIABLE])
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="default")
def noop(phase: int, sent: float) -> None:
    record(phase, sent)


class DramatiqSystem(RecordingPeer):
    def reset(self) -> None:
        broker.client.flushdb()
        self.records.clear()

    def purge(self) -> None:
        broker.flush_all()

    def send(self, phase: int, sent: float) -> str:
        noop.send(phase, sent)
        return str(sent)

    def _group(self, count: int, deadline: float, phase: int = PHASE_NONE) -> int:
        sent = 0
        while sent < count and (not sent or time.monotonic() < deadline):
            size = min(CHUNK, count - sent)
            dramatiq.group(noop.message(phase, time.time()) for _ in range(size)).run()
            sent += size
        return sent

    def enqueue_paths(self) -> dict[str, EnqueuePath]:
        return {"batch": self._group}

    def backlog(self, count: int, phase: int) -> None:
        self._group(count, time.monotonic() + 3600, phase)

    def worker(self, processes: int) -> tuple[list[str], dict[str, str]]:
        command = [sys.executable, "-m", "dramatiq", "bench.peers.dramatiq_app"]
        return [*command, "--processes", str(processes), "--threads", str(THREADS)], self.worker_environment()

    def describe(self) -> dict[str, Any]:
        return {
            "worker": (
                f"dramatiq bench.peers.dramatiq_app --processes {self.config['processes']} "
                f"--threads {THREADS}"
            ),
            "dramatiq": dramatiq.__version__,
            "middleware": [type(item).__name__ for item in broker.middleware],
        }
