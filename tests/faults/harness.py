"""What the fault scenarios share: workers as the Procfile starts them, a private broker the test
may kill, freeze or restart, and the reconciler run by hand.

The machine's shared Redis is never faulted: a scenario that hurts the broker starts its own
(`private_broker`), and points this process's Celery app (and the API's publish connection) at
it for the length of the test.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from tests import pools
from tests.processes import alive, descendants

logger = logging.getLogger(__name__)

# As the Procfile's `worker` runs, on the one queue the probe uses, with the probe tasks loaded.
WORKER_ARGS = ("-Q", "default", "-I", "tests.probes", "--pool=prefork", "--concurrency=2", "-l", "INFO")


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


def forget_broker_connections(app: Celery) -> None:
    """After the broker closed this process's connections (the same URL as before): every kombu
    pool of the process is closed and emptied, so the next publish, purge or broadcast opens a new
    one."""
    pools.reset(app)


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
    pools.forget(app)
    try:
        yield broker
    finally:
        if shared_env is None:
            os.environ.pop("CELERY_BROKER_URL", None)
        else:
            os.environ["CELERY_BROKER_URL"] = shared_env
        app.conf.broker_url = shared  # type: ignore[misc]
        pools.forget(app)
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


def wait_after_fault(job_ids: list[str], timeout: float, reconcile_every: float | None = None) -> Recovery:
    """Waits (from the end of a fault) until every job is final; says when work resumed and ended.

    `reconcile_every`: run the reconciler that often meanwhile, as `default.release_jobs` does.
    """
    from tests.faults import oracle

    started = last_round = time.monotonic()
    at_start = oracle.final_count(job_ids)
    resumed: float | None = None
    resent = finished_from_results = 0
    while True:
        elapsed = time.monotonic() - started
        final = oracle.final_count(job_ids)
        if resumed is None and (final > at_start or final == len(job_ids)):
            resumed = elapsed
        if final == len(job_ids) or elapsed >= timeout:
            return Recovery(
                resumed if resumed is not None else elapsed,
                elapsed,
                reconciled=reconcile_every is not None,
                resent=resent,
                finished_from_results=finished_from_results,
            )
        if reconcile_every is not None and time.monotonic() - last_round >= reconcile_every:
            sent_again, finished = reconcile_now()
            resent, finished_from_results = resent + sent_again, finished_from_results + finished
            last_round = time.monotonic()
        time.sleep(0.2)


def patience(job_ids: list[str], per_job: float = 0.2) -> float:
    """How long to wait for every job to be final: a minute, plus the backlog at full size."""
    return 60 + per_job * len(job_ids)


@dataclass
class Recovery:
    resumed: float  # seconds until the first job became final after the fault
    final: float  # seconds until every job was final (or the timeout)
    reconciled: bool = False  # the test ran the reconciler meanwhile
    resent: int = 0  # jobs the reconciler sent again
    finished_from_results: int = 0  # running rows it finished from their stored result

    def note(self) -> str:
        note = f"work resumed after {self.resumed:.1f} s"
        if self.reconciled:
            note += (
                f"; reconciler every 5 s: {self.resent} sent again, "
                f"{self.finished_from_results} finished from their stored result"
            )
        return note

    def check(self, line: str) -> None:
        """The issue's goal: back within 30 s of the fault ending. At full size (FAULTS_JOBS) the
        backlog alone takes longer than that to drain: there work must resume within 30 s."""
        assert self.resumed < 30, line
        if "FAULTS_JOBS" not in os.environ:
            assert self.final < 30, line


def tail(*workers: Any, chars: int = 3000) -> str:
    return "\n".join(f"--- {w.node} ---\n{w.log.read_text()[-chars:]}" for w in workers)
