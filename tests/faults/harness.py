"""What the fault scenarios share: workers as the Procfile starts them, a private broker the test
may kill, freeze or restart, and the reconciler run by hand.

The machine's shared Redis is never faulted: a scenario that hurts the broker starts its own
(`private_broker`), and points this process's Celery app (and the API's publish connection) at
it for the length of the test.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery

from jobs import publish
from tests.processes import alive, descendants

logger = logging.getLogger(__name__)

# As the Procfile's `worker` runs, on the one queue the probe uses, with the probe tasks loaded.
WORKER_ARGS = ("-Q", "default", "-I", "tests.probes", "--pool=prefork", "--concurrency=2", "-l", "INFO")

# The reliable Redis transport (delivery/redis.py: atomic fetch, heartbeats, reaper) is on
# another branch; scenarios that need it are expected to fail without it.
HAS_DELIVERY_TRANSPORT = importlib.util.find_spec("delivery") is not None
# Celery-level quarantine of poison messages (tasks/poison.py), on another branch too.
HAS_QUARANTINE = importlib.util.find_spec("tasks.poison") is not None


def pool_children(worker: Any) -> list[int]:
    """The live pool processes of a prefork worker (the direct children of its main process)."""
    return sorted(pid for pid in descendants(worker.process.pid) if alive(pid))


def kill_random_child(worker: Any, rng: random.Random) -> int | None:
    children = pool_children(worker)
    if not children:
        return None
    victim = rng.choice(children)
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim, signal.SIGKILL)
    return victim


def kill_whole_worker(worker: Any) -> None:
    """SIGKILL the main process and every pool process at once: a container or host dying."""
    for pid in [worker.process.pid, *descendants(worker.process.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker.process.wait()


def _reset_app_connections(app: Celery) -> None:
    """Forgets the pooled connections of `app` and of jobs.publish, so the next use opens new ones.

    The old pools are dropped, not closed: kombu keeps one pool per broker URL for the whole
    process (kombu.pools), and a closed one would be handed out again for the same URL.
    """
    app._pool = None  # type: ignore[attr-defined]  # Celery's broker connection pool
    app.amqp._producer_pool = None  # type: ignore[attr-defined]
    with publish._lock:
        publish._connection = None


@contextlib.contextmanager
def private_broker(app: Celery, directory: Path, *, persist: bool) -> Iterator[Any]:
    """A Valkey of the test's own, which this process's app publishes to until the block ends."""
    from localdev.embedded_broker import EmbeddedBroker, free_port

    broker = EmbeddedBroker(free_port(), directory, persist=persist)
    broker.start()
    shared, shared_env = app.conf.broker_url, os.environ.get("CELERY_BROKER_URL")
    # The environment wins over the configuration (celery.app.utils.Settings.broker_url).
    os.environ["CELERY_BROKER_URL"] = broker.url
    app.conf.broker_url = broker.url  # type: ignore[misc]  # celery-types: read-only, it is not
    _reset_app_connections(app)
    try:
        yield broker
    finally:
        if shared_env is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = shared_env
        app.conf.broker_url = shared  # type: ignore[misc]
        _reset_app_connections(app)
        if broker.process is not None and broker.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                broker.process.send_signal(signal.SIGCONT)  # a frozen one cannot stop
        broker.stop()


def reconcile_now() -> tuple[int, int]:
    """What `default.release_jobs` does each minute: resend lost messages, finish stored outcomes."""
    from django.db import connection

    from jobs import reconcile

    try:
        finished = reconcile.finish_from_results()  # first, as release_jobs does
        return reconcile.resend_lost(), finished
    except Exception as exc:  # the broker may still be coming back; the next round tries again
        logger.warning("reconciler round failed: %s", exc)
        connection.close()
        return 0, 0


def wait_reconciling(job_ids: list[str], timeout: float, every: float = 5.0) -> float:
    """As oracle.wait_until_final, running the reconciler every `every` seconds meanwhile."""
    from tests.faults import oracle

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        remaining = timeout - (time.monotonic() - started)
        oracle.wait_until_final(job_ids, timeout=min(every, remaining))
        if oracle.final_count(job_ids) == len(job_ids):
            break
        reconcile_now()
    return time.monotonic() - started


def tail(*workers: Any, chars: int = 3000) -> str:
    return "\n".join(f"--- {w.node} ---\n{w.log.read_text()[-chars:]}" for w in workers)
