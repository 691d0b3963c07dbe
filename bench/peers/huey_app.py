"""Huey on Redis: `RedisHuey` with its defaults, the consumer with process workers = the cores.

    huey_consumer bench.peers.huey_app.huey -w N -k process

Huey's defaults otherwise: blocking dequeue (BRPOP), results stored (a task returning None
stores none), no retries. Runs in the peers' virtualenv (bench/requirements.txt). Enqueue one at
a time: calling the task. Batch: `noop.map(...)`, Huey's way to enqueue many calls at once; it is
one LPUSH (one round trip) per task: Huey has no pipelined enqueue.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import huey as huey_package
from huey import RedisHuey

from bench.peers.harness import BROKER_VARIABLE, PHASE_NONE, EnqueuePath, RecordingPeer
from bench.peers.record import record

CHUNK = 1000

huey = RedisHuey("bench", url=os.environ[BROKER_VARIABLE])


@huey.task()
def noop(phase: int, sent: float) -> None:
    record(phase, sent)


class HueySystem(RecordingPeer):
    def reset(self) -> None:
        huey.storage.conn.flushdb()
        self.records.clear()

    def purge(self) -> None:
        huey.flush()

    def send(self, phase: int, sent: float) -> str:
        noop(phase, sent)
        return str(sent)

    def _map(self, count: int, deadline: float, phase: int = PHASE_NONE) -> int:
        sent = 0
        while sent < count and (not sent or time.monotonic() < deadline):
            size = min(CHUNK, count - sent)
            noop.map([(phase, time.time()) for _ in range(size)])
            sent += size
        return sent

    def enqueue_paths(self) -> dict[str, EnqueuePath]:
        return {"batch": self._map}

    def backlog(self, count: int, phase: int) -> None:
        self._map(count, time.monotonic() + 3600, phase)

    def worker(self, processes: int) -> tuple[list[str], dict[str, str]]:
        command = [sys.executable, "-m", "huey.bin.huey_consumer", "bench.peers.huey_app.huey"]
        return [*command, "-w", str(processes), "-k", "process"], self.worker_environment()

    def describe(self) -> dict[str, Any]:
        return {
            "worker": f"huey_consumer bench.peers.huey_app.huey -w {self.config['processes']} -k process",
            "huey": huey_package.__version__,
            "blocking_dequeue": huey.storage.blocking,
            "results": huey.results,
        }
